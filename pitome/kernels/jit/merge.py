"""Applying a plan: each output row's size-weighted mean, fused with the residual add."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _token(x_ptr, residual_ptr, row, channels, cols, inside, HAS_RESIDUAL: tl.constexpr):
    """Row ``row`` of ``x`` (plus the residual branch, rounded as ``x + residual`` would be)."""
    offsets = row * channels + cols
    value = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        value += tl.load(residual_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        value = value.to(x_ptr.dtype.element_ty).to(tl.float32)
    return value


@triton.jit
def merge_rows_kernel(x_ptr, residual_ptr, sizes_ptr, keep_ptr, offsets_ptr, sources_ptr,
                      out_ptr, new_sizes_ptr, channels, tokens_in, num_out,
                      HAS_RESIDUAL: tl.constexpr, HAS_SIZES: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """One output token: its kept row ``d`` and the rows ``i`` merged into it become
    ``x_d + Σ_i s_i (x_i − x_d) / s′_d`` with ``s′_d = s_d + Σ_i s_i``, in float32.
    ``keep`` holds token indices within the item; ``sources`` holds flat input rows."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    inside = cols < channels
    kept = (row // num_out) * tokens_in + tl.load(keep_ptr + row)
    first = tl.load(offsets_ptr + row)
    last = tl.load(offsets_ptr + row + 1)
    if HAS_SIZES:
        size = tl.load(sizes_ptr + kept)
    else:
        size = tl.full([], 1.0, dtype=tl.float32)
    for j in range(first, last):
        if HAS_SIZES:
            size += tl.load(sizes_ptr + tl.load(sources_ptr + j))
        else:
            size += 1.0
    target = _token(x_ptr, residual_ptr, kept, channels, cols, inside, HAS_RESIDUAL)
    merged = target
    for j in range(first, last):
        source = tl.load(sources_ptr + j)
        if HAS_SIZES:
            share = tl.load(sizes_ptr + source) / size
        else:
            share = 1.0 / size
        value = _token(x_ptr, residual_ptr, source, channels, cols, inside, HAS_RESIDUAL)
        merged += share * (value - target)
    tl.store(out_ptr + row * channels + cols, merged.to(out_ptr.dtype.element_ty), mask=inside)
    tl.store(new_sizes_ptr + row, size)


@triton.jit
def merge_padded_rows_kernel(x_ptr, residual_ptr, sizes_ptr, order_ptr, bounds_ptr, out_ptr,
                             new_sizes_ptr, channels, width, width_out,
                             HAS_RESIDUAL: tl.constexpr, HAS_SIZES: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """Output place ``j`` of padded row ``b``: the size-weighted mean of its members, the row's
    tokens ``order[b, bounds[b, j]:bounds[b, j + 1]]``, in float32; a place without members
    (padding) is zeros of size 1."""
    program = tl.program_id(0).to(tl.int64)
    item = program // width_out
    place = program % width_out
    cols = tl.arange(0, BLOCK_C)
    inside = cols < channels
    first = tl.load(bounds_ptr + item * (width_out + 1) + place)
    last = tl.load(bounds_ptr + item * (width_out + 1) + place + 1)
    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    size = tl.full([], 0.0, dtype=tl.float32)
    for k in range(first, last):
        token = item * width + tl.load(order_ptr + item * width + k)
        if HAS_SIZES:
            weight = tl.load(sizes_ptr + token)
        else:
            weight = tl.full([], 1.0, dtype=tl.float32)
        total += weight * _token(x_ptr, residual_ptr, token, channels, cols, inside,
                                 HAS_RESIDUAL)
        size += weight
    empty = last <= first
    merged = tl.where(empty, 0.0, total / tl.maximum(size, 1e-12))
    tl.store(out_ptr + program * channels + cols, merged.to(out_ptr.dtype.element_ty),
             mask=inside)
    tl.store(new_sizes_ptr + program, tl.where(empty, 1.0, size))
