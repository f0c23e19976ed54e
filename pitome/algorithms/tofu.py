"""ToFu: Token Fusion, bridging token pruning and merging (Kim et al., WACV 2024)."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..core.plan import MergePlan
from ..core.ragged import RaggedContext, RowPlan
from ..core.registry import Algorithm, MergeContext
from .tome import ToMe


class ToFu(Algorithm):
    """ToMe's bipartite matching; prune in early blocks, merge by MLERP in later ones.

    Early blocks (``block < prune_until·L``) drop the matched A tokens (pruning, where the
    paper finds averaging harmful); later blocks fuse them with MLERP, the norm-preserving
    average ``MLERP(x_1..x_n) = mean(x) · max‖x_i‖ / ‖mean(x)‖`` (Kim et al. 2024, Eq. 5),
    so merged tokens do not shrink the way plain averages of dissimilar vectors do.
    """

    def __init__(self, prune_until: float = 0.25) -> None:
        if not 0.0 <= prune_until <= 1.0:
            raise ValueError(f"prune_until is a fraction of the blocks in [0, 1], got {prune_until}")
        self.prune_until = prune_until
        self.matching = ToMe()

    ragged = True

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        return self._fuse(self.matching(metric, ctx), ctx.block, ctx.num_blocks)

    def plan_rows(self, metric: torch.Tensor, ctx: RaggedContext) -> RowPlan:
        return self._fuse(self.matching.plan_rows(metric, ctx), ctx.block, ctx.num_blocks)

    def _fuse(self, plan, block: int, num_blocks: int):
        """The matching's plan, pruning early and merging by MLERP later."""
        if block < self.prune_until * num_blocks:
            return replace(plan, drop_src=True)
        return replace(plan, max_norm=True)

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        return self.matching.similarity_pairs(mergeable, block, num_blocks)
