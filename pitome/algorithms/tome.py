"""ToMe: bipartite soft matching by position (Bolya et al., ICLR 2023)."""

from __future__ import annotations

import torch

from .matching import bipartite_merge, ragged_bipartite
from ..core.plan import MergePlan
from ..core.ragged import RaggedContext, RowPlan
from ..core.registry import Algorithm, MergeContext


class ToMe(Algorithm):
    """Token Merging, Bolya et al. 2023, Eq. (bipartite soft matching, §3).

    Non-prefix tokens alternate between sets A and B by position; each A token's most similar
    B token (cosine of the metric) is its edge; the ``r`` strongest edges merge.

    Args:
        prefix_parity: alternate as if the prefix tokens were part of the sequence, so the
            token after a single CLS starts in set B. This is the original ToMe code, where
            CLS sits in set A with its edge disabled; the PiToMe authors' baseline uses it.
    """

    takes_head_keys = True  # bipartite_merge averages them as it reads them
    ragged = True

    def __init__(self, prefix_parity: bool = False) -> None:
        self.prefix_parity = prefix_parity

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        start = ctx.num_prefix % 2 if self.prefix_parity else 0
        return bipartite_merge(metric[:, ctx.num_prefix:], ctx.r, ctx.num_prefix, start=start,
                               padding=ctx.padding)

    def plan_rows(self, metric: torch.Tensor, ctx: RaggedContext) -> RowPlan:
        start = ctx.num_prefix % 2 if self.prefix_parity else 0
        return ragged_bipartite(metric[:, ctx.num_prefix:], ctx, start=start)

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        return (mergeable // 2) * ((mergeable + 1) // 2)
