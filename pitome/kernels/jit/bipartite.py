"""Bipartite matching: every A token's best B partner, and the plan from the best edges."""

from __future__ import annotations

import triton
import triton.language as tl

from .energy import _order_by_energy
from .ranks import _places
from .rows import _unit_rows


@triton.jit
def energy_plan_kernel(metric_ptr, partials_ptr, weights_ptr, energy_ptr, order_ptr, score_ptr,
                       partner_ptr, rank_ptr, keep_ptr, src_ptr, dst_ptr, offsets_ptr,
                       sources_ptr, batch, tokens, dim, stride_b, stride_t, stride_h, blocks,
                       pooled, num_prefix, merges, num_a, a_first, a_step, num_b, b_first,
                       b_step, HAS_WEIGHTS: tl.constexpr, HEADS: tl.constexpr,
                       ALL_MERGE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr,
                       BLOCK_EDGES: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                       PRECISION: tl.constexpr):
    """PiToMe's whole plan of one item from its energy partial sums, in one program: the
    tokens by energy (``energy_order_kernel``), the best edges of set A among them
    (``best_partner_kernel``) and the plan (``bipartite_plan_kernel``). For small batches,
    where each of those launches costs more than its work."""
    item = tl.program_id(0).to(tl.int64)
    _order_by_energy(partials_ptr, weights_ptr, energy_ptr, order_ptr, item, tokens, blocks,
                     HAS_WEIGHTS, BLOCK_T, CHUNK)
    tl.debug_barrier()  # the order is in memory before it is read back
    for start in range(0, num_a, BLOCK_EDGES):
        _store_best_edges(metric_ptr + item * stride_b, order_ptr, order_ptr, score_ptr,
                          partner_ptr, item, start + tl.arange(0, BLOCK_EDGES), num_a, num_b,
                          dim, stride_t, stride_h, tokens, a_first, a_step, tokens, b_first,
                          b_step, True, HEADS, BLOCK_EDGES, BLOCK_D, PRECISION)
    tl.debug_barrier()  # every edge is in memory before the plan reads them
    _write_plan(score_ptr, partner_ptr, order_ptr, rank_ptr, keep_ptr, src_ptr, dst_ptr,
                offsets_ptr, sources_ptr, item, batch, tokens, pooled, num_prefix, merges,
                num_a, a_first, a_step, num_b, b_first, b_step, True, ALL_MERGE, BLOCK_A, CHUNK)


@triton.jit
def _set_tokens(index_ptr, item, members, valid, row_length, first, step,
                LOOKUP: tl.constexpr):
    """Tokens ``first + step·i`` of a set, or when ``LOOKUP`` the entries of ``index_ptr``'s
    row ``item`` at those places (an explicit index, or the tokens in some order)."""
    places = first + step * members
    if LOOKUP:
        return tl.load(index_ptr + item * row_length + places, mask=valid, other=0)
    return places.to(tl.int64)


@triton.jit
def best_partner_kernel(metric_ptr, a_ptr, b_ptr, score_ptr, index_ptr, num_a, num_b, dim,
                        stride_b, stride_t, stride_h, a_row, a_first, a_step, b_row, b_first,
                        b_step, LOOKUP: tl.constexpr, HEADS: tl.constexpr,
                        BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr,
                        PRECISION: tl.constexpr):
    """For ``BLOCK_A`` tokens of set A of one item: the most similar token of set B (its
    position in B, first on ties) and the cosine similarity, without the ``|A|×|B|`` scores.
    The sets are given as in :func:`_set_tokens`."""
    item = tl.program_id(0).to(tl.int64)
    positions = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    _store_best_edges(metric_ptr + item * stride_b, a_ptr, b_ptr, score_ptr, index_ptr, item,
                      positions, num_a, num_b, dim, stride_t, stride_h, a_row, a_first,
                      a_step, b_row, b_first, b_step, LOOKUP, HEADS, BLOCK_B, BLOCK_D,
                      PRECISION)


@triton.jit
def _store_best_edges(base, a_ptr, b_ptr, score_ptr, index_ptr, item, positions, num_a, num_b,
                      dim, stride_t, stride_h, a_row, a_first, a_step, b_row, b_first, b_step,
                      LOOKUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_B: tl.constexpr,
                      BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """``best_partner_kernel``'s work for A tokens ``positions`` of the item at ``base``."""
    in_a = positions < num_a
    cols = tl.arange(0, BLOCK_D)
    rows_a = _set_tokens(a_ptr, item, positions, in_a, a_row, a_first, a_step, LOOKUP)
    unit_a = _unit_rows(base, rows_a, in_a, dim, stride_t, stride_h, cols, HEADS)
    best = tl.full(positions.shape, float("-inf"), dtype=tl.float32)
    best_at = tl.zeros(positions.shape, dtype=tl.int64)
    for start in range(0, num_b, BLOCK_B):
        others = start + tl.arange(0, BLOCK_B)
        in_b = others < num_b
        rows_b = _set_tokens(b_ptr, item, others, in_b, b_row, b_first, b_step, LOOKUP)
        unit_b = _unit_rows(base, rows_b, in_b, dim, stride_t, stride_h, cols, HEADS)
        scores = tl.dot(unit_a, tl.trans(unit_b), input_precision=PRECISION)
        scores = tl.where(in_b[None, :], scores, float("-inf"))
        top, top_at = tl.max(scores, axis=1, return_indices=True,
                             return_indices_tie_break_left=True)
        better = top > best
        best = tl.where(better, top, best)
        best_at = tl.where(better, top_at.to(tl.int64) + start, best_at)
    tl.store(score_ptr + item * num_a + positions, best, mask=in_a)
    tl.store(index_ptr + item * num_a + positions, best_at, mask=in_a)


@triton.jit
def bipartite_plan_kernel(score_ptr, partner_ptr, order_ptr, rank_ptr, keep_ptr, src_ptr,
                          dst_ptr, offsets_ptr, sources_ptr, batch, tokens, pooled, num_prefix,
                          merges, num_a, a_first, a_step, num_b, b_first, b_step,
                          ORDERED: tl.constexpr, ALL_MERGE: tl.constexpr,
                          BLOCK_A: tl.constexpr, CHUNK: tl.constexpr):
    """The whole merge plan of one item from its A tokens' best edges: the ``merges``
    strongest edges merge (every edge when ``ALL_MERGE``, in A's order), the other A tokens
    stay. Writes what ``match_top_edges`` and ``sources_by_destination`` compute, in the
    same order: ``keep`` = prefix, protected (``order[pooled:]``), staying A tokens by
    rank, B tokens; ``src``/``dst`` by rank; and the merges grouped by output row.
    Token indices are relative to the non-prefix tokens unless ``+ num_prefix``."""
    _write_plan(score_ptr, partner_ptr, order_ptr, rank_ptr, keep_ptr, src_ptr, dst_ptr,
                offsets_ptr, sources_ptr, tl.program_id(0).to(tl.int64), batch, tokens, pooled,
                num_prefix, merges, num_a, a_first, a_step, num_b, b_first, b_step, ORDERED,
                ALL_MERGE, BLOCK_A, CHUNK)


@triton.jit
def _write_plan(score_ptr, partner_ptr, order_ptr, rank_ptr, keep_ptr, src_ptr, dst_ptr,
                offsets_ptr, sources_ptr, item, batch, tokens, pooled, num_prefix, merges,
                num_a, a_first, a_step, num_b, b_first, b_step, ORDERED: tl.constexpr,
                ALL_MERGE: tl.constexpr, BLOCK_A: tl.constexpr, CHUNK: tl.constexpr):
    """``bipartite_plan_kernel``'s work for one item."""
    tokens_in = num_prefix + tokens
    num_out = tokens_in - merges
    protected = tokens - pooled
    num_kept = protected + num_a - merges
    keep_row = keep_ptr + item * num_out
    offset_row = offsets_ptr + item * num_out
    first_source = item * merges
    lanes = tl.arange(0, CHUNK)

    # Prefix tokens, then the protected ones, pass in place with nothing merged into them.
    for start in range(0, num_prefix + protected, CHUNK):
        rows = start + lanes
        valid = rows < num_prefix + protected
        token = rows.to(tl.int64)
        if ORDERED:
            listed = tl.load(order_ptr + item * tokens + pooled + rows - num_prefix,
                             mask=valid & (rows >= num_prefix), other=0)
            token = tl.where(rows < num_prefix, token, listed + num_prefix)
        tl.store(keep_row + rows, token, mask=valid)
        tl.store(offset_row + rows, first_source, mask=valid)

    # Rank of each A token's edge: strongest first, ties in A's order (a stable sort).
    members = tl.arange(0, BLOCK_A)
    in_a = members < num_a
    partner = tl.load(partner_ptr + item * num_a + members, mask=in_a, other=0)
    if ALL_MERGE:
        rank = members
    else:
        score = tl.load(score_ptr + item * num_a + members, mask=in_a, other=0.0)
        rank = _places(score_ptr, item, num_a, members, score, True, CHUNK)
    token_a = _set_tokens(order_ptr, item, members, in_a, tokens, a_first, a_step,
                          ORDERED) + num_prefix
    merged = _store_set_a(src_ptr, dst_ptr, keep_row, offset_row, first_source, num_prefix,
                          protected, num_kept, merges, token_a, in_a, rank, partner)
    tl.store(rank_ptr + item * num_a + members, rank, mask=in_a)
    tl.debug_barrier()  # every rank is in memory before any is read back

    # Merges grouped by destination, each group in rank order.
    key = partner * num_a + rank
    slot = tl.zeros([BLOCK_A], dtype=tl.int32)
    for start in range(0, num_a, CHUNK):
        others = start + lanes
        other_rank = tl.load(rank_ptr + item * num_a + others, mask=others < num_a, other=merges)
        other_partner = tl.load(partner_ptr + item * num_a + others, mask=others < num_a, other=0)
        before = (other_rank < merges)[None, :] & (
            (other_partner * num_a + other_rank)[None, :] < key[:, None])
        slot += tl.sum(before.to(tl.int32), axis=1)
    tl.store(sources_ptr + first_source + slot, item * tokens_in + token_a, mask=merged)

    # B tokens come last, each with the merges it receives.
    for start in range(0, num_b, CHUNK):
        members_b = start + lanes
        in_b = members_b < num_b
        token_b = _set_tokens(order_ptr, item, members_b, in_b, tokens, b_first, b_step,
                              ORDERED) + num_prefix
        rows = num_prefix + num_kept + members_b
        received_before = tl.zeros([CHUNK], dtype=tl.int32)
        for a_start in range(0, num_a, CHUNK):
            others = a_start + lanes
            other_rank = tl.load(rank_ptr + item * num_a + others, mask=others < num_a,
                                 other=merges)
            other_partner = tl.load(partner_ptr + item * num_a + others, mask=others < num_a,
                                    other=0)
            earlier = (other_rank < merges)[None, :] & (other_partner[None, :] < members_b[:, None])
            received_before += tl.sum(earlier.to(tl.int32), axis=1)
        tl.store(keep_row + rows, token_b, mask=in_b)
        tl.store(offset_row + rows, first_source + received_before, mask=in_b)
    tl.store(offsets_ptr + batch * num_out, batch * merges, mask=item == batch - 1)


@triton.jit
def _store_set_a(src_ptr, dst_ptr, keep_row, offset_row, first_source, num_prefix, protected,
                 num_kept, merges, token_a, in_a, rank, partner):
    """Set A's part of a plan: the A tokens whose edge ranks below ``merges`` merge (``src``
    and ``dst`` by rank), the others stay, after the protected tokens, with nothing merged
    into them. Returns which merge."""
    merged = in_a & (rank < merges)
    tl.store(src_ptr + first_source + rank, token_a.to(tl.int64), mask=merged)
    tl.store(dst_ptr + first_source + rank, (num_prefix + num_kept + partner).to(tl.int64),
             mask=merged)
    staying = in_a & (rank >= merges)
    stay_rows = num_prefix + protected + rank - merges
    tl.store(keep_row + stay_rows, token_a.to(tl.int64), mask=staying)
    tl.store(offset_row + stay_rows, first_source, mask=staying)
    return merged
