"""The two floors every comparison needs: random matching and attention pruning."""

from __future__ import annotations

import torch

from ..core.plan import MergePlan, assemble, prune
from ..core.registry import Algorithm, MergeContext


class RandomMatching(Algorithm):
    """Merge ``r`` random tokens into random partners (same schedule, no similarity).

    A random half of the tokens forms set A, the rest set B; ``r`` random A tokens each
    merge into a random B token. Anything that does not beat this is not using its metric.
    """

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        batch, tokens = metric.shape[0], metric.shape[1] - ctx.num_prefix
        order = torch.rand(batch, tokens, device=metric.device).argsort(dim=-1)
        half = tokens // 2
        sources, rest = order[:, :ctx.r], order[:, ctx.r:]
        destinations, kept = rest[:, :half], rest[:, half:]
        targets = torch.randint(0, half, (batch, ctx.r), device=metric.device)
        return assemble(ctx.num_prefix, kept=kept, destinations=destinations, src=sources,
                        dst_in_destinations=targets)

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        return 0


class AttentionPruning(Algorithm):
    """Drop the ``r`` tokens that receive the least attention from CLS (EViT without fusion).

    Liang et al., "Not All Patches Are What You Need" (ICLR 2022): class attention ranks
    the tokens and the inattentive ones are discarded. No merging: their content is lost.
    """

    needs_attention = True

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        order = ctx.attention[:, ctx.num_prefix:].argsort(dim=-1, descending=True)
        tokens = order.shape[1]
        return prune(ctx.num_prefix, kept=order[:, :tokens - ctx.r], dropped=order[:, tokens - ctx.r:])

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        return 0
