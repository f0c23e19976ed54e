"""Flash attention with a ``log size`` bias on every key (proportional attention)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def proportional_attention_kernel(
        q_ptr, k_ptr, v_ptr, sizes_ptr, out_ptr, heads, tokens, scale_log2,
        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
        stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """``softmax(q kᵀ·scale + log s) v`` for ``BLOCK_M`` queries of one head: flash
    attention (online softmax over key blocks, base 2) with each key's ``log₂ s`` added to
    its logits, so the bias costs one load per key instead of the fused kernel.
    ``UPCAST`` computes the products in float32 (Triton's interpreter has no bf16 ``dot``)."""
    scale_log2 = tl.cast(scale_log2, tl.float32)  # float64 under torch.compile
    item_head = tl.program_id(1).to(tl.int64)
    item, head = item_head // heads, item_head % heads
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    in_dims = dims < HEAD_DIM
    q = tl.load(q_ptr + item * stride_qb + head * stride_qh + rows[:, None] * stride_qt
                + dims[None, :], mask=(rows < tokens)[:, None] & in_dims[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + item * stride_kb + head * stride_kh
    v_base = v_ptr + item * stride_vb + head * stride_vh
    top = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(0, tokens, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        valid = keys < tokens
        inside = valid[:, None] & in_dims[None, :]
        k = tl.load(k_base + keys[:, None] * stride_kt + dims[None, :], mask=inside, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vt + dims[None, :], mask=inside, other=0.0)
        if UPCAST:
            k, v = k.to(tl.float32), v.to(tl.float32)
        sizes = tl.load(sizes_ptr + item * tokens + keys, mask=valid, other=1.0)
        logits = tl.dot(q, tl.trans(k)) * scale_log2 + tl.log2(sizes)[None, :]
        logits = tl.where(valid[None, :], logits, float("-inf"))
        new_top = tl.maximum(top, tl.max(logits, axis=1))
        decay = tl.exp2(top - new_top)
        weights = tl.exp2(logits - new_top[:, None])
        total = total * decay + tl.sum(weights, axis=1)
        acc = acc * decay[:, None] + tl.dot(weights.to(v.dtype), v)
        top = new_top
    out = acc / total[:, None]
    tl.store(out_ptr + item * stride_ob + head * stride_oh + rows[:, None] * stride_ot
             + dims[None, :], out.to(out_ptr.dtype.element_ty),
             mask=(rows < tokens)[:, None] & in_dims[None, :])
