"""Every sentence of a padded batch planned by its own length in one program per row."""

from __future__ import annotations

import triton
import triton.language as tl

from .bipartite import _set_tokens, _store_best_edges
from .energy import _column_weights, _energy_sums
from .ranks import _places
from .rows import _unit_rows


@triton.jit
def ragged_plan_kernel(metric_ptr, weights_ptr, lengths_ptr, merges_ptr, energy_ptr, order_ptr,
                       score_ptr, partner_ptr, slot_ptr, target_ptr, tokens, width, max_a,
                       dim, stride_b, stride_t, stride_h, num_prefix, start, pool, margin,
                       alpha, sigma, KIND: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
                       HEADS: tl.constexpr, BY_ENERGY: tl.constexpr, POOL_ALL: tl.constexpr,
                       CONTIGUOUS: tl.constexpr,
                       BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_I: tl.constexpr,
                       BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """The :class:`~pitome.core.ragged.RowPlan` of one row of a padded batch, as
    ``pitome.algorithms.matching.ragged_bipartite`` makes it: its ``lengths[row]`` real
    tokens (``num_prefix`` of them never merge) remove ``merges[row]``.

    ``metric`` holds the ``tokens`` non-prefix places of each row. With ``BY_ENERGY``
    (PiToMe) the real tokens are listed by energy over their real neighbours, highest first,
    and the first ``min(m, round(2·merges·pool))`` of them (all ``m`` with ``POOL_ALL``)
    split into A and B, alternately from place ``start`` or (``CONTIGUOUS``) as the first
    half and the second; otherwise (ToMe) the tokens in order split so. Every A token takes
    its best B edge; the strongest ``merges`` edges merge. ``slot`` and ``target`` rows are
    ``width`` long (prefix included); scratch rows are ``tokens`` (energy, order) and
    ``max_a`` (edges) long."""
    margin = tl.cast(margin, tl.float32)
    alpha, sigma = tl.cast(alpha, tl.float32), tl.cast(sigma, tl.float32)
    item = tl.program_id(0).to(tl.int64)
    base = metric_ptr + item * stride_b
    mergeable = tl.load(lengths_ptr + item) - num_prefix
    merges = tl.load(merges_ptr + item)
    order_row = order_ptr + item * tokens
    slot_row, target_row = slot_ptr + item * width, target_ptr + item * width
    lanes = tl.arange(0, CHUNK)
    cols = tl.arange(0, BLOCK_D)

    for first in range(0, width, CHUNK):  # padding and merged tokens have no slot
        places = first + lanes
        tl.store(slot_row + places, tl.where(places < num_prefix, places, -1).to(tl.int64),
                 mask=places < width)
        tl.store(target_row + places, tl.full([CHUNK], -1, tl.int64), mask=places < width)

    if BY_ENERGY:
        energy_row = energy_ptr + item * tokens
        for first in range(0, tokens, BLOCK_I):
            rows = first + tl.arange(0, BLOCK_I)
            real_rows = rows < mergeable
            unit_i = _unit_rows(base, rows, real_rows, dim, stride_t, stride_h, cols, HEADS)
            total = tl.zeros([BLOCK_I], dtype=tl.float32)
            weight_sum = tl.zeros([BLOCK_I], dtype=tl.float32)
            for other_first in range(0, mergeable, BLOCK_I):
                others = other_first + tl.arange(0, BLOCK_I)
                real_others = others < mergeable
                unit_j = _unit_rows(base, others, real_others, dim, stride_t, stride_h, cols,
                                    HEADS)
                similarity = tl.dot(unit_i, tl.trans(unit_j), input_precision=PRECISION)
                weight = _column_weights(weights_ptr, item, tokens, others, real_others,
                                         HAS_WEIGHTS)
                total += _energy_sums(similarity, weight, margin, alpha, sigma, KIND)
                weight_sum += weight
            energy = tl.where(real_rows, total / tl.sum(weight_sum, axis=0), float("-inf"))
            tl.store(energy_row + rows, energy, mask=rows < tokens)
        tl.debug_barrier()  # every energy is in memory before any is read back
        mine = tl.arange(0, BLOCK_T)
        listed = mine < tokens
        value = tl.load(energy_row + mine, mask=listed, other=float("-inf"))
        place = _places(energy_row, 0, tokens, mine, value, True, CHUNK)
        tl.store(order_row + place, mine.to(tl.int64), mask=listed)
        tl.debug_barrier()  # the order is in memory before it is read back

    if POOL_ALL:
        pooled = mergeable
    else:
        pooled = tl.minimum(mergeable, _round_half_even(2.0 * merges.to(tl.float32) * pool))
    if CONTIGUOUS:
        num_a, a_first, step = pooled // 2, 0, 1
        num_b, b_first = pooled - num_a, num_a
    else:
        num_a, a_first, step = (pooled - start + 1) // 2, start, 2
        num_b, b_first = (pooled - (1 - start) + 1) // 2, 1 - start
    score_row, partner_row = score_ptr + item * max_a, partner_ptr + item * max_a
    for first in range(0, num_a, CHUNK):
        _store_best_edges(base, order_row, order_row, score_row, partner_row, 0, first + lanes,
                          num_a, num_b, dim, stride_t, stride_h, tokens, a_first, step, tokens,
                          b_first, step, BY_ENERGY, HEADS, CHUNK, BLOCK_D, PRECISION)
    tl.debug_barrier()  # every edge (and the -1s above) in memory before the plan is written

    protected = mergeable - pooled
    num_kept = protected + num_a - merges
    members = tl.arange(0, BLOCK_A)
    in_a = members < num_a
    score = tl.load(score_row + members, mask=in_a, other=0.0)
    partner = tl.load(partner_row + members, mask=in_a, other=0)
    rank = _places(score_row, 0, num_a, members, score, True, CHUNK)
    token_a = num_prefix + _set_tokens(order_row, 0, members, in_a, tokens, a_first, step,
                                       BY_ENERGY)
    staying = in_a & (rank >= merges)
    merged = in_a & (rank < merges)
    tl.store(slot_row + token_a, (num_prefix + protected + rank - merges).to(tl.int64),
             mask=staying)
    tl.store(target_row + token_a, (num_prefix + num_kept + partner).to(tl.int64), mask=merged)
    for first in range(0, num_b, CHUNK):
        members_b = first + lanes
        in_b = members_b < num_b
        token_b = num_prefix + _set_tokens(order_row, 0, members_b, in_b, tokens, b_first, step,
                                           BY_ENERGY)
        tl.store(slot_row + token_b, (num_prefix + num_kept + members_b).to(tl.int64),
                 mask=in_b)
    for first in range(0, protected, CHUNK):  # listed after the pool, they pass in place
        members_p = first + lanes
        in_p = members_p < protected
        token_p = num_prefix + _set_tokens(order_row, 0, members_p, in_p, tokens, pooled, 1,
                                           BY_ENERGY)
        tl.store(slot_row + token_p, (num_prefix + members_p).to(tl.int64), mask=in_p)


@triton.jit
def _round_half_even(x):
    """``torch.round`` of a float32: to the nearest integer, ties to even."""
    whole = tl.floor(x)
    rest = x - whole
    odd = (whole.to(tl.int64) % 2) == 1
    up = (rest > 0.5) | ((rest == 0.5) & odd)
    return whole.to(tl.int64) + up.to(tl.int64)
