"""Proportional attention (ToMe §3, docs/method.md §4) without leaving a flash-style kernel.

``softmax(q kᵀ/√d + log s) v`` weighs each key by the number of input tokens it holds.
Through ``scaled_dot_product_attention`` the ``log s`` bias takes PyTorch off its flash
kernel; the Triton kernel here keeps flash attention's online softmax and adds each key's
bias as it loads the key, and writes heads straight into the ``B×T×(H·d)`` layout the
output projection reads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..core.attention import log_size_bias
from .backend import interpreting, use_triton
from .launch import next_power_of_2

LOG2_E = 1.0 / math.log(2.0)
# Below this many tokens PyTorch's biased path was faster on an H100 (88 vs 108 µs at 100
# tokens, batch 256, 12 heads); above it the kernel was (222 vs 255 µs at 178 tokens).
MIN_TOKENS = 128
# ... except for small batches (batch × heads up to this), where the kernel was faster at
# every length (H200, ViT-S/B at batch 1, 8 and 32): there the bias's own two small kernels
# and SDPA's slower biased path cost more than the kernel's arithmetic saves.
MAX_HEADS_ALWAYS_KERNEL = 512


def proportional_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           sizes: torch.Tensor | None, scale: float,
                           dropout: float = 0.0) -> torch.Tensor:
    """Attention of ``B×H×T×d`` heads with each key's logits raised by ``log s``.

    ``sizes`` is ``B×T×1`` (None: plain attention). Returns ``B×T×(H·d)``. Without sizes,
    with dropout, in float32, below ``MIN_TOKENS`` tokens at large batches, or where the
    Triton kernel does not run, this is ``scaled_dot_product_attention`` with the additive
    bias.
    """
    batch, heads, tokens, head_dim = q.shape
    if (sizes is None or dropout > 0.0 or q.dtype not in (torch.bfloat16, torch.float16)
            or not use_triton(q, k, v) or head_dim > 256
            or tokens < MIN_TOKENS and batch * heads > MAX_HEADS_ALWAYS_KERNEL):
        bias = None if sizes is None else log_size_bias(sizes, q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout,
                                             scale=scale)
        return out.transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    from .jit.attention import proportional_attention_kernel

    if not (q.stride(-1) == k.stride(-1) == v.stride(-1) == 1):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty(batch, tokens, heads, head_dim, dtype=q.dtype, device=q.device)
    block_m = 64
    grid = (-(-tokens // block_m), batch * heads)
    proportional_attention_kernel[grid](
        q, k, v, sizes.float().contiguous(), out, heads, tokens, scale * LOG2_E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(2), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=max(16, next_power_of_2(head_dim)), BLOCK_M=block_m,
        BLOCK_N=32, UPCAST=interpreting(), num_warps=4, num_stages=3)
    return out.view(batch, tokens, heads * head_dim)
