"""A whole bipartite-matching merge plan in two launches.

Planned with PyTorch, one block's ToMe or PiToMe plan is some twenty small operations:
index arithmetic, gathers, a sort of the edges, concatenations, and a sort of the
destinations to group the merges for the merge kernel. On a GPU each costs a launch and a
few microseconds however little it computes, which is most of a block's time at small
batches. Here one kernel finds every A token's best edge and a second writes the plan,
already grouped by destination, one program per item.
"""

from __future__ import annotations

import torch

from ..core.plan import MergePlan
from .backend import use_triton
from .launch import MAX_METRIC_DIM, dot_precision, metric_block, metric_rows, metric_stages, \
    next_power_of_2

BLOCK_TOKENS = 64
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
    """The plan of :func:`pitome.core.matching.match_top_edges` on sets given by position.

    ``metric`` is ``B×n×d`` (the non-prefix tokens), or ``B×n×H×d`` per-head keys whose mean
    is the metric; ``order`` (``B×n``, or None for token order) lists the tokens, of which
    the first ``pooled`` take part and the rest are protected; ``set_a`` and ``set_b`` are ``(first, step, count)`` places in that list.
    Returns None where the kernels do not run, and the caller plans with PyTorch.
    """
    batch, tokens, dim = metric.shape[0], metric.shape[1], metric.shape[-1]
    num_a, num_b = set_a[2], set_b[2]
    if (dim > MAX_METRIC_DIM or num_a > MAX_SET or num_b == 0 or not 0 < r <= num_a
            or not use_triton(metric)):
        return None
    from . import _triton

    device = metric.device
    metric, heads, stride_h = metric_rows(metric)
    ordered = order is not None
    order = order.contiguous() if ordered else metric  # never read when not ordered
    score = torch.empty(batch, num_a, dtype=torch.float32, device=device)
    partner = torch.empty(batch, num_a, dtype=torch.long, device=device)
    _triton.best_partner_kernel[(batch, -(-num_a // BLOCK_TOKENS))](
        metric, order, order, score, partner, num_a, num_b, dim, metric.stride(0),
        metric.stride(1), stride_h, tokens, set_a[0], set_a[1], tokens, set_b[0], set_b[1],
        LOOKUP=ordered, HEADS=heads, BLOCK_A=BLOCK_TOKENS, BLOCK_B=BLOCK_TOKENS,
        BLOCK_D=metric_block(dim), PRECISION=dot_precision(), num_stages=metric_stages(heads))

    num_out = num_prefix + tokens - r
    keep = torch.empty(batch, num_out, dtype=torch.long, device=device)
    src = torch.empty(batch, r, dtype=torch.long, device=device)
    dst = torch.empty(batch, r, dtype=torch.long, device=device)
    offsets = torch.empty(batch * num_out + 1, dtype=torch.long, device=device)
    sources = torch.empty(batch * r, dtype=torch.long, device=device)
    rank = torch.empty(batch, num_a, dtype=torch.int32, device=device)
    block_a = max(16, next_power_of_2(num_a))
    _triton.bipartite_plan_kernel[(batch,)](
        score, partner, order, rank, keep, src, dst, offsets, sources, batch, tokens, pooled,
        num_prefix, r, num_a, set_a[0], set_a[1], num_b, set_b[0], set_b[1],
        ORDERED=ordered, ALL_MERGE=r == num_a, BLOCK_A=block_a, CHUNK=CHUNK,
        num_warps=4 if block_a <= 256 else 8)
    return MergePlan(keep=keep, src=src, dst=dst, grouped_sources=(offsets, sources))
