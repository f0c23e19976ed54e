"""The Triton kernels. Imported only when a kernel runs, so Triton stays optional."""

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


@triton.jit
def row_ranks_kernel(values_ptr, order_ptr, length, DESCENDING: tl.constexpr,
                     BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Stable argsort of one short row by counting: an element's place is the number of
    elements that come before it (larger, or equal and earlier, when descending)."""
    item = tl.program_id(0).to(tl.int64)
    mine = tl.arange(0, BLOCK)
    valid = mine < length
    value = tl.load(values_ptr + item * length + mine, mask=valid, other=0)
    place = _places(values_ptr, item, length, mine, value, DESCENDING, CHUNK)
    tl.store(order_ptr + item * length + place, mine.to(tl.int64), mask=valid)


@triton.jit
def _places(values_ptr, item, length, mine, value, DESCENDING: tl.constexpr,
            CHUNK: tl.constexpr):
    """Where elements ``mine`` (holding ``value``) of row ``item`` go in its stable sort:
    the number of elements that come before each."""
    place = tl.zeros(mine.shape, dtype=tl.int32)
    for start in range(0, length, CHUNK):
        others = start + tl.arange(0, CHUNK)
        other = tl.load(values_ptr + item * length + others, mask=others < length, other=0)
        place += _count_before(value, mine, other, others, others < length, DESCENDING)
    return place


@triton.jit
def _count_before(value, member, other, other_member, other_valid, DESCENDING: tl.constexpr):
    """For each ``value``: how many valid ``other`` elements come before it in a stable
    sort (larger, or smaller when ascending; or equal with a smaller member index)."""
    if DESCENDING:
        ahead = other[None, :] > value[:, None]
    else:
        ahead = other[None, :] < value[:, None]
    ahead |= (other[None, :] == value[:, None]) & (other_member[None, :] < member[:, None])
    ahead &= other_valid[None, :]
    return tl.sum(ahead.to(tl.int32), axis=1)


# One tile per item. While an item's tokens fit one tile (TILE_TOKENS), one program holds
# all their similarities in registers and makes PiToMe's whole plan from them: no energy,
# order, scores or ranks go through memory between steps, and the plan is one launch.


@triton.jit
def _ranks(value, member, valid):
    """Each element's place in the stable descending sort of ``value`` over the ``valid``
    elements, all held in registers."""
    return _count_before(value, member, value, member, valid, True)


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
