"""PiToMe's whole plan for one small image in one program.

While an item's tokens fit one tile (``TILE_TOKENS``), one program holds all their
similarities in registers and makes the whole plan from them: no energy, order, scores or
ranks go through memory between steps, and the plan is one launch.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .bipartite import _store_set_a
from .energy import _column_weights, _energy_sums
from .ranks import _ranks
from .rows import _metric_rows, _cosine_tile


@triton.jit
def _best_in_tile(similarity, in_b, member_b):
    """Each row's most similar column of set B and its similarity: ``best_partner_kernel``'s
    edge (the first B member on ties) from a tile that holds the row's every B column."""
    scores = tl.where(in_b[None, :], similarity, float("-inf"))
    best = tl.max(scores, axis=1)
    tied = in_b[None, :] & (scores == best[:, None])
    partner = tl.min(tl.where(tied, member_b[None, :], 2147483647), axis=1)
    return best, partner


@triton.jit
def _write_tile_plan(keep_ptr, src_ptr, dst_ptr, offsets_ptr, sources_ptr, item, batch,
                     tokens, num_prefix, merges, pooled, num_a, token, place, valid, in_a,
                     rank, partner, in_b, member_b, CHUNK: tl.constexpr):
    """``_write_plan`` from vectors in registers, one lane per token: its index
    (``+ num_prefix``) and its ``place`` in the energy order."""
    tokens_in = num_prefix + tokens
    num_out = tokens_in - merges
    protected = tokens - pooled
    num_kept = protected + num_a - merges
    keep_row = keep_ptr + item * num_out
    offset_row = offsets_ptr + item * num_out
    first_source = item * merges

    # Prefix tokens, then the protected ones (places from ``pooled`` on, in energy order),
    # pass in place with nothing merged into them.
    for start in range(0, num_prefix, CHUNK):
        rows = start + tl.arange(0, CHUNK)
        tl.store(keep_row + rows, rows.to(tl.int64), mask=rows < num_prefix)
        tl.store(offset_row + rows, first_source, mask=rows < num_prefix)
    shielded = valid & (place >= pooled)
    tl.store(keep_row + num_prefix + place - pooled, token.to(tl.int64), mask=shielded)
    tl.store(offset_row + num_prefix + place - pooled, first_source, mask=shielded)

    merged = _store_set_a(src_ptr, dst_ptr, keep_row, offset_row, first_source, num_prefix,
                          protected, num_kept, merges, token, in_a, rank, partner)

    # Merges grouped by destination, each group in rank order.
    key = partner * num_a + rank
    slot = tl.sum((merged[None, :] & (key[None, :] < key[:, None])).to(tl.int32), axis=1)
    tl.store(sources_ptr + first_source + slot, item * tokens_in + token, mask=merged)

    # B tokens come last, each with the merges it receives.
    earlier = merged[None, :] & (partner[None, :] < member_b[:, None])
    received_before = tl.sum(earlier.to(tl.int32), axis=1)
    rows_b = num_prefix + num_kept + member_b
    tl.store(keep_row + rows_b, token.to(tl.int64), mask=in_b)
    tl.store(offset_row + rows_b, first_source + received_before, mask=in_b)
    tl.store(offsets_ptr + batch * num_out, batch * merges, mask=item == batch - 1)


@triton.jit
def energy_tile_plan_kernel(metric_ptr, weights_ptr, keep_ptr, src_ptr, dst_ptr, offsets_ptr,
                            sources_ptr, batch, tokens, dim, stride_b, stride_t, stride_h,
                            margin, alpha, sigma, pooled, num_prefix, merges, num_a, a_first,
                            a_step, num_b, b_first, b_step, KIND: tl.constexpr,
                            HAS_WEIGHTS: tl.constexpr, HEADS: tl.constexpr,
                            ALL_MERGE: tl.constexpr, BLOCK_T: tl.constexpr,
                            BLOCK_D: tl.constexpr, CHUNK: tl.constexpr,
                            PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                            HEAD_STAGES: tl.constexpr):
    """PiToMe's whole plan of one item whose tokens fit one tile, in one program: the
    energy (``energy_kernel``), each token's place in the energy order, the best edges of
    set A (places ``a_first + a_step·i``) into set B, and the plan."""
    margin = tl.cast(margin, tl.float32)
    alpha, sigma = tl.cast(alpha, tl.float32), tl.cast(sigma, tl.float32)
    item = tl.program_id(0).to(tl.int64)
    mine = tl.arange(0, BLOCK_T)
    valid = mine < tokens
    rows = _metric_rows(metric_ptr + item * stride_b, mine, valid, dim, stride_t, stride_h,
                        tl.arange(0, BLOCK_D), HEADS, HEAD_STAGES)
    similarity = _cosine_tile(rows, metric_ptr.dtype.element_ty, PRECISION, UPCAST)
    weight = _column_weights(weights_ptr, item, tokens, mine, valid, HAS_WEIGHTS)
    energy = _energy_sums(similarity, weight, margin, alpha, sigma, KIND) / tl.sum(weight, axis=0)
    place = _ranks(energy, mine, valid)

    from_a = tl.maximum(place - a_first, 0)
    member_a = from_a // a_step
    in_a = valid & (place >= a_first) & (from_a % a_step == 0) & (member_a < num_a)
    from_b = tl.maximum(place - b_first, 0)
    member_b = from_b // b_step
    in_b = valid & (place >= b_first) & (from_b % b_step == 0) & (member_b < num_b)
    best, partner = _best_in_tile(similarity, in_b, member_b)
    rank = member_a if ALL_MERGE else _ranks(best, member_a, in_a)

    _write_tile_plan(keep_ptr, src_ptr, dst_ptr, offsets_ptr, sources_ptr, item, batch, tokens,
                     num_prefix, merges, pooled, num_a, mine + num_prefix, place, valid, in_a,
                     rank, partner, in_b, member_b, CHUNK)
