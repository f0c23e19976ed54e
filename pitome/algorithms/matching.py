"""Bipartite matching shared by ToMe-style algorithms."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

from ..kernels.backend import use_triton
from ..kernels.bipartite import bipartite_plan, energy_bipartite_plan, set_tokens
from ..kernels.energy import EnergyOptions, token_energy, tokens_by_energy
from ..kernels.ragged import ragged_plan
from ..kernels.partner import best_partner, pair_scores
from ..kernels.sort import argsort_rows
from ..core.energy import head_mean, unit_rows
from ..core.plan import MergePlan, assemble
from ..core.ragged import RaggedContext, RowPlan, with_prefix

Split = Literal["alternate", "contiguous"]


class TokenSet(NamedTuple):
    """The places ``first, first + step, …`` (``count`` of them) in a list of tokens."""

    first: int
    step: int
    count: int


def split_pool(pooled: int, split: Split, start: int = 0) -> tuple[TokenSet, TokenSet]:
    """Sets A and B of a pool of ``pooled`` tokens: alternating places (A from ``start``),
    or the first half and the second."""
    if split == "alternate":
        return (TokenSet(start, 2, (pooled - start + 1) // 2),
                TokenSet(1 - start, 2, (pooled - (1 - start) + 1) // 2))
    half = pooled // 2
    return TokenSet(0, 1, half), TokenSet(half, 1, pooled - half)


def bipartite_merge(metric: torch.Tensor, r: int, num_prefix: int,
                    order: torch.Tensor | None = None, pooled: int | None = None,
                    split: Split = "alternate", start: int = 0,
                    padding: torch.Tensor | None = None) -> MergePlan:
    """Bipartite soft matching over a pool of tokens (see :func:`match_top_edges`).

    ``metric`` holds the non-prefix tokens (``B×n×d``, or ``B×n×H×d`` per-head keys whose
    mean is the metric). They are listed in ``order`` (``B×n``; None: token order); the
    first ``pooled`` (default all) split into A and B by ``split``, the rest are protected.
    On a GPU the plan comes from :func:`pitome.kernels.bipartite_plan` in two launches,
    elsewhere (and with padding) from :func:`match_top_edges`.
    """
    batch, tokens = metric.shape[:2]
    pooled = tokens if pooled is None else pooled
    set_a, set_b = split_pool(pooled, split, start)
    if padding is None:
        plan = bipartite_plan(metric, order, pooled, set_a, set_b, r, num_prefix)
        if plan is not None:
            return plan
    a_idx = set_tokens(*set_a, order, batch, metric.device)
    b_idx = set_tokens(*set_b, order, batch, metric.device)
    protected = order[:, pooled:] if order is not None and pooled < tokens else None
    metric = head_mean(metric)
    best = None
    if order is None and padding is None and not use_triton(metric):
        # sets in token order: their rows by slicing, not gathers (a GPU runs a kernel)
        unit = unit_rows(metric)
        scores = strided(unit, set_a) @ strided(unit, set_b).transpose(-1, -2)
        best = scores.max(dim=-1)
    return match_top_edges(metric, a_idx, b_idx, r, num_prefix, protected, padding, best)


def strided(x: torch.Tensor, places: TokenSet) -> torch.Tensor:
    """The ``B×count×d`` rows ``first + step·i`` of ``x``, as a view."""
    first, step, count = places
    return x[:, first:first + step * count:step] if count else x[:, :0]


def energy_bipartite_merge(metric: torch.Tensor, r: int, num_prefix: int,
                           energy: EnergyOptions, pooled: int,
                           split: Split = "alternate") -> MergePlan:
    """:func:`bipartite_merge` over the tokens listed by energy, highest first (PiToMe).

    At small batches on a GPU the whole plan takes one launch, or two where an item's tokens
    outgrow one tile (:func:`pitome.kernels.bipartite.energy_bipartite_plan`); elsewhere the
    tokens are ordered by :func:`pitome.kernels.energy.tokens_by_energy` first.
    """
    set_a, set_b = split_pool(pooled, split)
    plan = energy_bipartite_plan(metric, energy, pooled, set_a, set_b, r, num_prefix)
    if plan is not None:
        return plan
    order = tokens_by_energy(metric, *energy)
    return bipartite_merge(metric, r, num_prefix, order, pooled, split)


def forbid_padding_pairs(scores: torch.Tensor, padding: torch.Tensor | None,
                         a_idx: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
    """Set the score of every real/padding pair to −inf so padding never merges into text."""
    if padding is None:
        return scores
    real_a = padding.gather(1, a_idx).unsqueeze(-1)
    real_b = padding.gather(1, b_idx).unsqueeze(-2)
    return scores.masked_fill(real_a != real_b, float("-inf"))


def match_top_edges(metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor, r: int,
                    num_prefix: int, protected: torch.Tensor | None = None,
                    padding: torch.Tensor | None = None,
                    best: tuple[torch.Tensor, torch.Tensor] | None = None) -> MergePlan:
    """Bipartite soft matching (ToMe, Bolya et al. 2023, §3).

    Every token of set A proposes its most similar token of set B; the ``r`` proposals with
    the highest cosine similarity merge, the other A tokens stay. ``metric`` holds the
    metrics of the non-prefix tokens; indices are relative to them. ``protected`` tokens
    take part in nothing and pass unchanged. When ``|A| = r`` every A token merges, which is
    PiToMe's rule (docs/method.md §4 step 3). ``best``: each A token's best score and B
    partner, where the caller has them.
    """
    if best is not None:
        best_score, best_b = best
    elif padding is None:
        best_score, best_b = best_partner(metric, a_idx, b_idx)
    else:
        scores = forbid_padding_pairs(pair_scores(metric, a_idx, b_idx), padding[:, num_prefix:],
                                      a_idx, b_idx)
        best_score, best_b = scores.max(dim=-1)
    if r == a_idx.shape[1]:
        src, dst, stay = a_idx, best_b, a_idx[:, :0]
    else:
        order = argsort_rows(best_score, descending=True)
        src_pos, stay = order[:, :r], a_idx.gather(1, order[:, r:])
        src, dst = a_idx.gather(1, src_pos), best_b.gather(1, src_pos)
    kept = stay if protected is None else torch.cat([protected, stay], dim=1)
    return assemble(num_prefix, kept=kept, destinations=b_idx, src=src, dst_in_destinations=dst)


def ragged_bipartite(metric: torch.Tensor, ctx: RaggedContext,
                     order: torch.Tensor | None = None, pooled: torch.Tensor | None = None,
                     split: Split = "alternate", start: int = 0) -> RowPlan:
    """:func:`bipartite_merge` of every row of a padded batch at once, row ``b`` removing
    ``ctx.r[b]`` tokens, each row exactly as it would be planned alone.

    ``metric`` holds the non-prefix tokens (``B×n×d``, padding last). They are listed in
    ``order`` (``B×n``, padding last; None: token order); the first ``pooled[b]`` (default
    all real ones) split into A and B by ``split``, the other real ones are protected. Output
    places follow :func:`pitome.core.plan.assemble`: protected, unmerged A (strongest edge
    first), then B. In token order one launch plans every row on a GPU
    (:func:`pitome.kernels.ragged.ragged_plan`).
    """
    if order is None and pooled is None:
        plan = ragged_plan(metric, ctx, start=start, contiguous=split == "contiguous")
        if plan is not None:
            return plan
    batch, tokens = metric.shape[:2]
    device = metric.device
    mergeable = (ctx.lengths - ctx.num_prefix).unsqueeze(1)
    r = ctx.r.unsqueeze(1)
    pooled = mergeable if pooled is None else pooled.unsqueeze(1)
    place = torch.arange(tokens, device=device).unsqueeze(0)  # place in the order
    in_pool = place < pooled
    if split == "alternate":
        in_a = in_pool & ((place - start) % 2 == 0)
    else:
        in_a = place < pooled // 2
    in_b = in_pool & ~in_a
    unit = unit_rows(head_mean(metric))
    if order is not None:
        unit = unit.gather(1, order.unsqueeze(-1).expand_as(unit))
    scores = (unit @ unit.transpose(1, 2)).masked_fill(
        ~(in_a.unsqueeze(2) & in_b.unsqueeze(1)), float("-inf"))
    best, partner = scores.max(dim=-1)
    by_edge = argsort_rows(best.masked_fill(~in_a, float("-inf")), descending=True)
    edge_rank = torch.empty_like(by_edge).scatter_(1, by_edge, place.expand(batch, tokens))
    merged = in_a & (edge_rank < r)
    protected = pooled.expand(batch, tokens)
    num_protected = mergeable - pooled
    unmerged_a = in_a.sum(dim=1, keepdim=True) - r
    slot = torch.full_like(by_edge, -1)
    slot = torch.where(in_b, num_protected + unmerged_a + torch.cumsum(in_b, 1) - 1, slot)
    slot = torch.where(in_a & ~merged, num_protected + edge_rank - r, slot)
    slot = torch.where((place >= protected) & (place < mergeable), place - protected, slot)
    target = torch.where(merged, slot.gather(1, partner), -1)
    if order is not None:
        slot = torch.empty_like(slot).scatter_(1, order, slot)
        target = torch.empty_like(target).scatter_(1, order, target)
    return with_prefix(ctx.num_prefix, slot, target)


def ragged_energy_bipartite(metric: torch.Tensor, ctx: RaggedContext, energy: EnergyOptions,
                            pool: float | None, split: Split = "alternate") -> RowPlan:
    """:func:`ragged_bipartite` over each row's real tokens listed by energy, highest first
    (PiToMe): the energy of a token is over its row's real tokens (weighted by
    ``energy.weights``, ``B×n`` and 0 on padding, or 1 each when None), and the first
    ``min(m, round(2·r·pool))`` of a row's ``m`` split into A and B (``pool`` None: all
    ``m``; decided by the caller, since ``torch.compile(dynamic=True)`` traces a float
    setting as a symbol that ``math.isinf`` cannot read). One launch plans every row on a
    GPU (:func:`pitome.kernels.ragged.ragged_plan`)."""
    plan = ragged_plan(metric, ctx, energy, pool, contiguous=split == "contiguous")
    if plan is not None:
        return plan
    real = ctx.real[:, ctx.num_prefix:]
    weights = real.float() if energy.weights is None else energy.weights
    scores = token_energy(metric, energy.margin, energy.kind, energy.alpha, weights)
    order = argsort_rows(scores.masked_fill(~real, float("-inf")), descending=True)
    tokens = ctx.lengths - ctx.num_prefix
    pooled = tokens if pool is None else \
        torch.minimum(tokens, torch.round(2 * ctx.r * pool).long())
    return ragged_bipartite(metric, ctx, order, pooled, split)
