"""PiToMe: energy-score token merging that protects isolated tokens (Tran et al., NeurIPS 2024)."""

from __future__ import annotations

import math
from typing import Literal

import torch

from ..core.energy import EnergyKind
from .matching import bipartite_merge, energy_bipartite_merge, ragged_energy_bipartite
from ..core.plan import MergePlan
from ..core.ragged import RaggedContext, RowPlan
from ..core.registry import Algorithm, MergeContext
from ..kernels.energy import EnergyOptions, token_energy
from ..kernels.sort import argsort_rows
from .tome import ToMe


class PiToMe(Algorithm):
    """Spectrum-preserving token merging, Tran et al. 2024, Eq. (4)-(6) and Alg. 1.

    1. Energy ``E_i`` of every non-prefix token from its cosine row (docs/method.md §3).
    2. Tokens sorted by energy; the top ``pool·2r`` form the mergeable pool, the rest are
       protected and pass unchanged.
    3. The pool splits into A and B, alternating over the energy order (``split="alternate"``,
       vision) or as its first and second half (``"contiguous"``, the text reference code).
    4. Each A token proposes its most similar B token; the ``r`` best proposals merge.

    ``pool=1`` is the paper's algorithm (A has exactly ``r`` tokens, all merge); ``pool=inf``
    is the authors' "BSM-PiToMe" (no protected set, ToMe's top-``r`` edge selection over an
    energy-ordered split).

    Args:
        energy: ``"elu"`` (vision) or ``"gaussian"`` (text), see :func:`pitome.core.energy.energy_score`.
        split: ``"alternate"`` or ``"contiguous"``.
        pool: size of the mergeable pool in units of ``2r`` (≥ 1, ``math.inf`` for all tokens).
        alpha: the ELU's α.
        size_weighted: weight each neighbour's energy term by its size (the number of input
            tokens it holds), so energy is measured on the original token graph; the paper
            and the authors' code use an unweighted mean.
    """

    takes_head_keys = True  # token_energy and bipartite_merge average them as they read them
    ragged = True

    def __init__(self, energy: EnergyKind = "elu",
                 split: Literal["alternate", "contiguous"] = "alternate",
                 pool: float = 1.0, alpha: float = 1.0, size_weighted: bool = False) -> None:
        if split not in ("alternate", "contiguous"):
            raise ValueError(f"split must be 'alternate' or 'contiguous', got {split!r}")
        if not pool >= 1.0:
            raise ValueError(f"pool must be at least 1 (the paper's 2r tokens), got {pool}")
        self.energy, self.split, self.pool, self.alpha = energy, split, pool, alpha
        self.size_weighted = size_weighted
        # Decided here, not per call: torch.compile(dynamic=True) traces float attributes as
        # symbols, and math.isinf of a symbol breaks the graph.
        self.pools_all = math.isinf(pool)

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        mergeable = metric[:, ctx.num_prefix:]
        weights = None
        if self.size_weighted and ctx.sizes is not None:
            weights = ctx.sizes[:, ctx.num_prefix:, 0]
        tokens = mergeable.shape[1]
        pooled = tokens if self.pools_all else min(tokens, int(round(2 * ctx.r * self.pool)))
        if ctx.padding is None:
            options = EnergyOptions(ctx.margin, self.energy, self.alpha, weights)
            return energy_bipartite_merge(mergeable, ctx.r, ctx.num_prefix, options, pooled,
                                          self.split)
        energy = token_energy(mergeable, ctx.margin, self.energy, self.alpha, weights)
        # Padding ranks last: it is protected before any real token is.
        energy = energy.masked_fill(~ctx.padding[:, ctx.num_prefix:], float("-inf"))
        order = argsort_rows(energy, descending=True)
        return bipartite_merge(mergeable, ctx.r, ctx.num_prefix, order, pooled, self.split,
                               padding=ctx.padding)

    def plan_rows(self, metric: torch.Tensor, ctx: RaggedContext) -> RowPlan:
        weights = None  # the mean over a row's real neighbours (sizes are 0 on padding)
        if self.size_weighted and ctx.sizes is not None:
            weights = ctx.sizes[:, ctx.num_prefix:, 0]
        options = EnergyOptions(ctx.margin, self.energy, self.alpha, weights)
        return ragged_energy_bipartite(metric[:, ctx.num_prefix:], ctx, options,
                                       None if self.pools_all else self.pool, self.split)

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        return mergeable ** 2


class Hybrid(Algorithm):
    """One algorithm in the first blocks, another after ``switch·L`` (the authors' schedules)."""

    def __init__(self, early: Algorithm, late: Algorithm, switch: float = 0.5) -> None:
        self.early, self.late, self.switch = early, late, switch
        self.needs_attention = early.needs_attention or late.needs_attention
        self.takes_head_keys = early.takes_head_keys and late.takes_head_keys
        self.traceable = early.traceable and late.traceable
        self.ragged = early.ragged and late.ragged

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        return self._choose(ctx.block, ctx.num_blocks)(metric, ctx)

    def plan_rows(self, metric: torch.Tensor, ctx: RaggedContext) -> RowPlan:
        return self._choose(ctx.block, ctx.num_blocks).plan_rows(metric, ctx)

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        return self._choose(block, num_blocks).similarity_pairs(mergeable, block, num_blocks)

    def _choose(self, block: int, num_blocks: int) -> Algorithm:
        return self.early if block < self.switch * num_blocks else self.late


def authors_deit(energy: EnergyKind = "elu") -> Hybrid:
    """The authors' DeiT patch: BSM-PiToMe in the first half of the blocks, PiToMe after."""
    return Hybrid(PiToMe(energy, pool=math.inf), PiToMe(energy, pool=1.0))


def authors_mae(energy: EnergyKind = "elu") -> Hybrid:
    """The authors' MAE patch: PiToMe in the first half of the blocks, BSM-PiToMe after."""
    return Hybrid(PiToMe(energy, pool=1.0), PiToMe(energy, pool=math.inf))


def tome_then_pitome(energy: EnergyKind = "elu", switch: float = 0.5, pool: float = 1.0,
                     size_weighted: bool = False) -> Hybrid:
    """The library's default: ToMe's positional matching before ``switch·L``, PiToMe after.

    Early blocks' keys describe local appearance, where ToMe's spatially interleaved split
    finds each token a close partner; later blocks form semantic clusters, where the energy
    score tells redundant tokens from informative ones. The PiToMe authors run this schedule
    for Hugging Face CLIP (docs/method.md §5); on ViT-Tiny it was the one PiToMe schedule that matched
    or beat ToMe at every ratio measured (docs/defaults.md).
    """
    return Hybrid(ToMe(), PiToMe(energy, pool=pool, size_weighted=size_weighted), switch)
