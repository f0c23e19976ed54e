"""A whole bipartite-matching merge plan in one or two launches.

Planned with PyTorch, one block's ToMe or PiToMe plan is some twenty small operations:
index arithmetic, gathers, a sort of the edges, concatenations, and a sort of the
destinations to group the merges for the merge kernel. On a GPU each costs a launch and a
few microseconds however little it computes, which is most of a block's time at small
batches. Here one kernel finds every A token's best edge and a second writes the plan,
already grouped by destination, one program per item. PiToMe's plan at small batches
takes one launch where an item's tokens fit one tile (one program holds all their
similarities), else two: the energy in tiles, then one program per item that orders the
tokens by it, finds the best edges and writes the plan.
"""

from __future__ import annotations

import torch

from ..core.plan import MergePlan
from .backend import interpreting, use_triton
from .energy import ENERGY_KINDS, EnergyOptions, energy_partials, energy_scalars
from .launch import (
    MAX_METRIC_DIM,
    TILE_HEAD_STAGES,
    TILE_WARPS,
    dot_precision,
    fits_one_tile,
    is_small_batch,
    metric_block,
    metric_rows,
    metric_stages,
    row_block,
    row_warps,
)

BLOCK_TOKENS = 64
SMALL_BLOCK_TOKENS = 32  # small batches: more, shorter programs (H200, batch 1: 1-5% faster)
MAX_SET = 512  # the plan kernel ranks one item's whole set A at once
CHUNK = 32


def set_tokens(first: int, step: int, count: int, order: torch.Tensor | None,
               batch: int, device: torch.device) -> torch.Tensor:
    """``B×count`` tokens ``first + step·i``, or ``order``'s entries at those places."""
    places = torch.arange(first, first + step * count, step, device=device)
    return places.expand(batch, -1) if order is None else order[:, places]


def bipartite_plan(metric: torch.Tensor, order: torch.Tensor | None, pooled: int,
                   set_a: tuple[int, int, int], set_b: tuple[int, int, int], r: int,
                   num_prefix: int) -> MergePlan | None:
    """The plan of :func:`pitome.algorithms.matching.match_top_edges` on sets given by position.

    ``metric`` is ``B×n×d`` (the non-prefix tokens), or ``B×n×H×d`` per-head keys whose mean
    is the metric; ``order`` (``B×n``, or None for token order) lists the tokens, of which
    the first ``pooled`` take part and the rest are protected; ``set_a`` and ``set_b`` are
    ``(first, step, count)`` places in that list. Returns None where the kernels do not
    run, and the caller plans with PyTorch.
    """
    batch, tokens, dim = metric.shape[0], metric.shape[1], metric.shape[-1]
    num_a, num_b = set_a[2], set_b[2]
    if (dim > MAX_METRIC_DIM or num_a > MAX_SET or num_b == 0 or not 0 < r <= num_a
            or not use_triton(metric)):
        return None
    from .jit.bipartite import best_partner_kernel, bipartite_plan_kernel

    device = metric.device
    metric, heads, stride_h = metric_rows(metric)
    ordered = order is not None
    order = order.contiguous() if ordered else metric  # never read when not ordered
    score = torch.empty(batch, num_a, dtype=torch.float32, device=device)
    partner = torch.empty(batch, num_a, dtype=torch.long, device=device)
    block = SMALL_BLOCK_TOKENS if is_small_batch(batch) else BLOCK_TOKENS
    best_partner_kernel[(batch, -(-num_a // block))](
        metric, order, order, score, partner, num_a, num_b, dim, metric.stride(0),
        metric.stride(1), stride_h, tokens, set_a[0], set_a[1], tokens, set_b[0], set_b[1],
        LOOKUP=ordered, HEADS=heads, BLOCK_A=block, BLOCK_B=block,
        BLOCK_D=metric_block(dim), PRECISION=dot_precision(), num_stages=metric_stages(heads))

    plan, outputs = _plan_outputs(batch, tokens, num_prefix, r, device)
    rank = _rank_scratch(batch, num_a, device)
    block_a = row_block(num_a)
    bipartite_plan_kernel[(batch,)](
        score, partner, order, rank, *outputs, batch, tokens, pooled, num_prefix, r, num_a,
        set_a[0], set_a[1], num_b, set_b[0], set_b[1], ORDERED=ordered, ALL_MERGE=r == num_a,
        BLOCK_A=block_a, CHUNK=CHUNK, num_warps=row_warps(block_a))
    return plan


def energy_bipartite_plan(metric: torch.Tensor, energy: EnergyOptions, pooled: int,
                          set_a: tuple[int, int, int], set_b: tuple[int, int, int], r: int,
                          num_prefix: int) -> MergePlan | None:
    """:func:`bipartite_plan` over the tokens listed by energy, highest first (PiToMe), for
    small batches: in one launch where an item's tokens fit one tile (see
    ``launch.TILE_TOKENS``), else in two: the energy's partial sums
    (:func:`pitome.kernels.energy.energy_partials`), then one program per item that sums
    them, orders the tokens, finds set A's best edges and writes the plan. Returns None
    where it does not apply; the caller then orders the tokens and calls
    :func:`bipartite_plan`."""
    batch, tokens, dim = metric.shape[0], metric.shape[1], metric.shape[-1]
    num_a, num_b = set_a[2], set_b[2]
    if not use_triton(metric) or num_a > MAX_SET or num_b == 0 or not 0 < r <= num_a:
        return None
    if fits_one_tile(batch, tokens, dim) and energy.kind in ENERGY_KINDS:
        return _energy_tile_plan(metric, energy, pooled, set_a, set_b, r, num_prefix)
    metric, heads, stride_h = metric_rows(metric)
    split = energy_partials(metric, energy)
    if split is None:
        return None
    from .jit.bipartite import energy_plan_kernel

    partials, weights = split
    device = metric.device
    energy_out = torch.empty(batch, tokens, dtype=torch.float32, device=device)
    order = torch.empty(batch, tokens, dtype=torch.long, device=device)
    score = torch.empty(batch, num_a, dtype=torch.float32, device=device)
    partner = torch.empty(batch, num_a, dtype=torch.long, device=device)
    plan, outputs = _plan_outputs(batch, tokens, num_prefix, r, device)
    rank = _rank_scratch(batch, num_a, device)
    block_t, block_a = row_block(tokens), row_block(num_a)
    energy_plan_kernel[(batch,)](
        metric, partials, energy_out if weights is None else weights, energy_out, order, score,
        partner, rank, *outputs, batch, tokens, dim, metric.stride(0), metric.stride(1), stride_h,
        partials.shape[1], pooled, num_prefix, r, num_a, set_a[0], set_a[1], num_b, set_b[0],
        set_b[1], HAS_WEIGHTS=weights is not None, HEADS=heads, ALL_MERGE=r == num_a,
        BLOCK_T=block_t, BLOCK_A=block_a, BLOCK_EDGES=SMALL_BLOCK_TOKENS,
        BLOCK_D=metric_block(dim), CHUNK=CHUNK, PRECISION=dot_precision(),
        num_warps=row_warps(max(block_t, block_a)), num_stages=metric_stages(heads))
    return plan


def _energy_tile_plan(metric: torch.Tensor, energy: EnergyOptions, pooled: int,
                      set_a: tuple[int, int, int], set_b: tuple[int, int, int], r: int,
                      num_prefix: int) -> MergePlan:
    """:func:`energy_bipartite_plan` for items whose tokens fit one tile, in one launch."""
    from .jit.tile_plan import energy_tile_plan_kernel

    metric, heads, stride_h = metric_rows(metric)
    batch, tokens, dim = metric.shape[0], metric.shape[1], metric.shape[-1]
    plan, outputs = _plan_outputs(batch, tokens, num_prefix, r, metric.device)
    weights = None if energy.weights is None else energy.weights.float().contiguous()
    block = row_block(tokens)
    energy_tile_plan_kernel[(batch,)](
        metric, plan.keep if weights is None else weights, *outputs, batch, tokens, dim,
        metric.stride(0), metric.stride(1), stride_h,
        *energy_scalars(energy.margin, energy.alpha), pooled, num_prefix, r,
        set_a[2], set_a[0], set_a[1], set_b[2], set_b[0], set_b[1],
        KIND=ENERGY_KINDS.index(energy.kind), HAS_WEIGHTS=weights is not None, HEADS=heads,
        ALL_MERGE=r == set_a[2], BLOCK_T=block, BLOCK_D=metric_block(dim), CHUNK=CHUNK,
        PRECISION=dot_precision(), UPCAST=interpreting(), HEAD_STAGES=TILE_HEAD_STAGES,
        num_warps=TILE_WARPS)
    return plan


def _plan_outputs(batch: int, tokens: int, num_prefix: int, r: int,
                  device: torch.device) -> tuple[MergePlan, tuple[torch.Tensor, ...]]:
    """The plan the plan kernels write, and their output arguments in order (keep, src,
    dst, offsets and sources of the merges grouped by destination)."""
    num_out = num_prefix + tokens - r
    keep = torch.empty(batch, num_out, dtype=torch.long, device=device)
    src = torch.empty(batch, r, dtype=torch.long, device=device)
    dst = torch.empty(batch, r, dtype=torch.long, device=device)
    offsets = torch.empty(batch * num_out + 1, dtype=torch.long, device=device)
    sources = torch.empty(batch * r, dtype=torch.long, device=device)
    plan = MergePlan(keep=keep, src=src, dst=dst, grouped_sources=(offsets, sources))
    return plan, (keep, src, dst, offsets, sources)


def _rank_scratch(batch: int, num_a: int, device: torch.device) -> torch.Tensor:
    """Where the two-launch plan kernels keep each A token's edge rank."""
    return torch.empty(batch, num_a, dtype=torch.int32, device=device)
