"""PiToMe's energy scores, whole or by column block, and the order they give."""

from __future__ import annotations

import triton
import triton.language as tl

from .ranks import _places
from .rows import _unit_rows


@triton.jit
def energy_kernel(metric_ptr, weights_ptr, out_ptr, tokens, dim, stride_b, stride_t, stride_h,
                  margin, alpha, sigma, KIND: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                  HEADS: tl.constexpr,
                  BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
                  PRECISION: tl.constexpr):
    """Energy of ``BLOCK_I`` tokens of one item: their cosine rows are built ``BLOCK_J``
    columns at a time and reduced at once, so the ``T×T`` similarity never reaches memory."""
    # torch.compile passes Python floats as float64; keep the arithmetic in float32.
    margin = tl.cast(margin, tl.float32)
    alpha, sigma = tl.cast(alpha, tl.float32), tl.cast(sigma, tl.float32)
    item = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    cols = tl.arange(0, BLOCK_D)
    base = metric_ptr + item * stride_b
    unit_i = _unit_rows(base, rows, rows < tokens, dim, stride_t, stride_h, cols, HEADS)
    total = tl.zeros([BLOCK_I], dtype=tl.float32)
    weight_sum = tl.zeros([BLOCK_J], dtype=tl.float32)
    for start in range(0, tokens, BLOCK_J):
        others = start + tl.arange(0, BLOCK_J)
        valid = others < tokens
        unit_j = _unit_rows(base, others, valid, dim, stride_t, stride_h, cols, HEADS)
        similarity = tl.dot(unit_i, tl.trans(unit_j), input_precision=PRECISION)
        weight = _column_weights(weights_ptr, item, tokens, others, valid, HAS_WEIGHTS)
        total += _energy_sums(similarity, weight, margin, alpha, sigma, KIND)
        weight_sum += weight
    energy = total / tl.sum(weight_sum, axis=0)
    tl.store(out_ptr + item * tokens + rows, energy, mask=rows < tokens)


@triton.jit
def _column_weights(weights_ptr, item, tokens, others, valid, HAS_WEIGHTS: tl.constexpr):
    """Each column's weight in the energy's mean: its size, or 1 (0 beyond the tokens)."""
    if HAS_WEIGHTS:
        return tl.load(weights_ptr + item * tokens + others, mask=valid, other=0.0)
    return valid.to(tl.float32)


@triton.jit
def _energy_sums(similarity, weight, margin, alpha, sigma, KIND: tl.constexpr):
    """Each row's weighted sum of energy terms over a block of columns; ``KIND`` 0 is the
    ELU, 1 the Gaussian (the order of ``energy.ENERGY_KINDS``)."""
    if KIND == 0:
        shifted = similarity - margin
        terms = tl.where(shifted > 0, shifted, alpha * (tl.exp(shifted) - 1.0))
    else:
        distance = (1.0 - similarity) / sigma
        terms = tl.exp(-0.5 * distance * distance)
    return tl.sum(terms * weight[None, :], axis=1)


@triton.jit
def energy_partials_kernel(metric_ptr, weights_ptr, partials_ptr, tokens, dim, stride_b,
                           stride_t, stride_h, margin, alpha, sigma, KIND: tl.constexpr,
                           HAS_WEIGHTS: tl.constexpr, HEADS: tl.constexpr,
                           BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                           PRECISION: tl.constexpr):
    """The energy sums of ``energy_kernel`` split by column block, one program per block of
    rows and of columns: for small batches, where one program per row block would leave
    most of the GPU idle while it walks every column. ``partials`` is ``B×(blocks)×T``;
    summed over blocks in order (``energy_order_kernel``) it is ``energy_kernel``'s total."""
    margin = tl.cast(margin, tl.float32)
    alpha, sigma = tl.cast(alpha, tl.float32), tl.cast(sigma, tl.float32)
    item = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    others = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    valid = others < tokens
    cols = tl.arange(0, BLOCK_D)
    base = metric_ptr + item * stride_b
    unit_i = _unit_rows(base, rows, rows < tokens, dim, stride_t, stride_h, cols, HEADS)
    unit_j = _unit_rows(base, others, valid, dim, stride_t, stride_h, cols, HEADS)
    similarity = tl.dot(unit_i, tl.trans(unit_j), input_precision=PRECISION)
    weight = _column_weights(weights_ptr, item, tokens, others, valid, HAS_WEIGHTS)
    sums = _energy_sums(similarity, weight, margin, alpha, sigma, KIND)
    row_of_partials = partials_ptr + (item * tl.num_programs(2) + tl.program_id(2)) * tokens
    tl.store(row_of_partials + rows, sums, mask=rows < tokens)


@triton.jit
def energy_order_kernel(partials_ptr, weights_ptr, energy_ptr, order_ptr, tokens, blocks,
                        HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """One item's energy from its partial sums, and its tokens by energy, highest first
    (a stable sort, as ``row_ranks_kernel``)."""
    _order_by_energy(partials_ptr, weights_ptr, energy_ptr, order_ptr,
                     tl.program_id(0).to(tl.int64), tokens, blocks, HAS_WEIGHTS, BLOCK, CHUNK)


@triton.jit
def _order_by_energy(partials_ptr, weights_ptr, energy_ptr, order_ptr, item, tokens, blocks,
                     HAS_WEIGHTS: tl.constexpr, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """``energy_order_kernel``'s work for one item."""
    mine = tl.arange(0, BLOCK)
    valid = mine < tokens
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for block in range(blocks):
        total += tl.load(partials_ptr + (item * blocks + block) * tokens + mine, mask=valid,
                         other=0.0)
    weight_sum = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, tokens, CHUNK):
        others = start + tl.arange(0, CHUNK)
        weight_sum += _column_weights(weights_ptr, item, tokens, others, others < tokens,
                                      HAS_WEIGHTS)
    energy = total / tl.sum(weight_sum, axis=0)
    tl.store(energy_ptr + item * tokens + mine, energy, mask=valid)
    tl.debug_barrier()  # every energy is in memory before any is read back
    place = _places(energy_ptr, item, tokens, mine, energy, True, CHUNK)
    tl.store(order_ptr + item * tokens + place, mine.to(tl.int64), mask=valid)
