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
def merge_padded_rows_kernel(x_ptr, residual_ptr, sizes_ptr, slot_ptr, target_ptr, out_ptr,
                             new_sizes_ptr, channels, width, width_out,
                             HAS_RESIDUAL: tl.constexpr, HAS_SIZES: tl.constexpr,
                             DROP_SRC: tl.constexpr, PLACES: tl.constexpr,
                             BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
    """Output places ``j, …, j + PLACES − 1`` of padded row ``b``: each the size-weighted mean
    of its members (the token whose ``slot`` is the place and those whose ``target`` is),
    summed in token order in float32; a place without members (padding) is zeros of size 1.
    The row's plan is read once; each member is found as the lowest token not yet taken."""
    item = tl.program_id(0).to(tl.int64)
    tokens = tl.arange(0, BLOCK_W)
    in_row = tokens < width
    slots = tl.load(slot_ptr + item * width + tokens, mask=in_row, other=-1)
    if not DROP_SRC:
        targets = tl.load(target_ptr + item * width + tokens, mask=in_row, other=-1)
    cols = tl.arange(0, BLOCK_C)
    inside = cols < channels
    for step in range(PLACES):
        place = tl.program_id(1) * PLACES + step
        members = slots == place
        if not DROP_SRC:
            members = members | (targets == place)
        total = tl.zeros([BLOCK_C], dtype=tl.float32)
        size = tl.full([], 0.0, dtype=tl.float32)
        taken = tl.full([], -1, dtype=tl.int32)
        for _ in range(tl.sum(members.to(tl.int32))):
            taken = tl.min(tl.where(members & (tokens > taken), tokens, BLOCK_W))
            token = item * width + taken
            if HAS_SIZES:
                weight = tl.load(sizes_ptr + token)
            else:
                weight = tl.full([], 1.0, dtype=tl.float32)
            total += weight * _token(x_ptr, residual_ptr, token, channels, cols, inside,
                                     HAS_RESIDUAL)
            size += weight
        empty = size == 0.0
        merged = tl.where(empty, 0.0, total / tl.maximum(size, 1e-12))
        row = item * width_out + place
        valid = place < width_out
        tl.store(out_ptr + row * channels + cols, merged.to(out_ptr.dtype.element_ty),
                 mask=inside & valid)
        tl.store(new_sizes_ptr + row, tl.where(empty, 1.0, size), mask=valid)
