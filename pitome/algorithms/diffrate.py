"""DiffRate with fixed rates (Chen et al., ICCV 2023)."""

from __future__ import annotations

from typing import Literal

import torch

from ..core.energy import unit_rows
from ..core.plan import MergePlan, assemble, gather_rows, prune
from ..core.registry import Algorithm, MergeContext


class DiffRate(Algorithm):
    """Sort tokens by the attention they receive from CLS; the ``r`` least attended go.

    DiffRate (Chen et al. 2023, §3.2) ranks tokens by class attention and either prunes the
    tail or merges each tail token into its most similar kept token (cosine of the metric).
    The paper learns how many tokens each block prunes and merges for a FLOPs target; as in
    the PiToMe paper's comparison, the counts here come from the ratio instead and learned
    rates are not implemented.

    Args:
        mode: ``"merge"`` (tail tokens join their most similar kept token) or ``"prune"``.
    """

    needs_attention = True

    def __init__(self, mode: Literal["merge", "prune"] = "merge") -> None:
        if mode not in ("merge", "prune"):
            raise ValueError(f"mode must be 'merge' or 'prune', got {mode!r}")
        self.mode = mode

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        received = ctx.attention[:, ctx.num_prefix:]
        order = received.argsort(dim=-1, descending=True)
        tokens = order.shape[1]
        kept, tail = order[:, :tokens - ctx.r], order[:, tokens - ctx.r:]
        if self.mode == "prune":
            return prune(ctx.num_prefix, kept=kept, dropped=tail)
        unit = unit_rows(metric[:, ctx.num_prefix:])
        scores = gather_rows(unit, tail) @ gather_rows(unit, kept).transpose(-1, -2)
        return assemble(ctx.num_prefix, kept=kept[:, :0], destinations=kept, src=tail,
                        dst_in_destinations=scores.argmax(dim=-1))

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        """Merging compares each of the ``r`` tail tokens with every kept one; pruning
        compares nothing (the class attention it ranks by is the block's own)."""
        return 0 if self.mode == "prune" else r * (mergeable - r)
