"""Loading metric rows (per head or averaged) as unit vectors, and their cosine tiles."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rounded_like(x, dtype: tl.constexpr):
    """Float32 ``x`` rounded to ``dtype`` (to nearest, ties to even) and back. bfloat16 is
    rounded on the bits: Triton's interpreter truncates when it casts to bfloat16."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    return x.to(dtype).to(tl.float32)


@triton.jit
def _unit_rows(base, rows, valid, dim, stride_t, stride_h, cols, HEADS: tl.constexpr):
    """Rows ``rows`` of a ``T×d`` metric at ``base`` in float32 (see :func:`_metric_rows`),
    scaled to unit length (``F.normalize``: divided by ``max(‖x‖, 1e-12)``)."""
    x = _metric_rows(base, rows, valid, dim, stride_t, stride_h, cols, HEADS, 1)
    return x / _norms(x)[:, None]


@triton.jit
def _metric_rows(base, rows, valid, dim, stride_t, stride_h, cols, HEADS: tl.constexpr,
                 HEAD_STAGES: tl.constexpr):
    """Rows ``rows`` of a ``T×d`` metric at ``base`` in float32; invalid rows and columns are
    zero. With ``HEADS > 1`` the metric is the mean of per-head rows ``stride_h`` apart,
    rounded to their dtype the way ``torch.mean`` rounds it (a float32 sum times
    ``1/HEADS``), the heads loaded ``HEAD_STAGES`` ahead through shared memory where that
    is above 1. Either way every value is one of the metric's dtype."""
    inside = valid[:, None] & (cols[None, :] < dim)
    offsets = rows[:, None] * stride_t + cols[None, :]
    if HEADS > 1 and HEAD_STAGES > 1:
        x = tl.zeros(offsets.shape, dtype=tl.float32)
        for head in tl.range(0, HEADS, num_stages=HEAD_STAGES):
            x += tl.load(base + head * stride_h + offsets, mask=inside, other=0.0).to(tl.float32)
    else:
        x = tl.load(base + offsets, mask=inside, other=0.0).to(tl.float32)
        for head in tl.static_range(1, HEADS):
            x += tl.load(base + head * stride_h + offsets, mask=inside,
                         other=0.0).to(tl.float32)
    if HEADS > 1:
        x = _rounded_like(x * (1.0 / HEADS), base.dtype.element_ty)
    return x


@triton.jit
def _norms(x):
    """``max(‖x‖, 1e-12)`` of each row, ``F.normalize``'s divisor."""
    return tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), 1e-12)


@triton.jit
def _cosine_tile(x, dtype: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """The cosine similarity of every two rows of ``x`` (float32 holding values of
    ``dtype``). Rows of a 16-bit dtype are multiplied as they are, in one pass on tensor
    cores (each product of two is exact in float32, the sums are float32), and the sums
    divided by both norms after; float32 rows are scaled to unit length first and multiplied
    in ``PRECISION``. ``UPCAST`` multiplies 16-bit rows in float32, for Triton's
    interpreter, which has no bfloat16 ``dot``."""
    norms = _norms(x)
    if dtype == tl.float32:
        unit = x / norms[:, None]
        return tl.dot(unit, tl.trans(unit), input_precision=PRECISION)
    if UPCAST:
        sums = tl.dot(x, tl.trans(x), input_precision=PRECISION)
    else:
        rows = x.to(dtype)
        sums = tl.dot(rows, tl.trans(rows))
    inverse = 1.0 / norms
    return sums * inverse[:, None] * inverse[None, :]
