"""VisionZip: dominant tokens by [CLS] attention, the rest merged into contextual tokens
(Yang et al., CVPR 2025, "VisionZip: Longer is Better but Not Necessary in Vision Language
Models"); training-free, implemented from the paper's description."""

from __future__ import annotations

import torch

from ..core.energy import unit_rows
from ..core.plan import MergePlan, assemble, gather_rows, prune
from ..core.registry import Algorithm, MergeContext

# The paper's LLaVA-1.5 splits: 54 + 10 of 64 tokens, 108 + 20 of 128, 162 + 30 of 192.
PAPER_CONTEXTUAL = 10 / 64


def split_counts(total: int, contextual: float) -> tuple[int, int]:
    """Dominant and contextual token counts making up ``total`` kept tokens."""
    count = round(total * contextual)
    if contextual > 0 and total >= 2:
        count = max(count, 1)
    return total - count, count


class VisionZip(Algorithm):
    """Keep the tokens the [CLS] query attends to most, merge the others into a few
    contextual tokens, all at once.

    In the one block where it runs (the last merging block: on LLaVA the one whose output
    is the vision feature layer), of the ``T′ − r`` tokens to keep:

    1. ``K`` *dominant* tokens: the highest attention received from the first prefix token
       (CLS), averaged over heads (``ctx.attention``), kept in their order.
    2. ``M`` *contextual* tokens: among the remaining tokens, ``M`` targets evenly spaced in
       token order; every other remaining token joins its most similar target (cosine of
       the metric, the attention keys averaged over heads by default) and each group is
       averaged.

    ``M = round(contextual · (T′ − r))`` (the paper's 10 of 64 by default), ``K`` the rest.
    Unlike the paper, the reduction happens between the block's attention and its MLP (the
    merge point of every pitome algorithm), so the MLP runs on the kept tokens.

    Args:
        contextual: the fraction of kept tokens that are contextual, in [0, 1); 0 keeps only
            dominant tokens (the rest are dropped).
    """

    needs_attention = True
    one_shot = True

    def __init__(self, contextual: float = PAPER_CONTEXTUAL) -> None:
        if not 0.0 <= contextual < 1.0:
            raise ValueError(f"contextual is the fraction of kept tokens that are contextual, "
                             f"in [0, 1), got {contextual!r}")
        self.contextual = contextual

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        if ctx.attention is None:
            raise ValueError("VisionZip ranks tokens by the attention they receive; the runtime "
                             "must hand it over (needs_attention)")
        prefix = ctx.num_prefix
        tokens = metric[:, prefix:]
        batch, count = tokens.shape[:2]
        dominant, contextual = split_counts(count - ctx.r, self.contextual)
        received = ctx.attention[:, prefix:].float()
        chosen = received.topk(dominant, dim=1).indices.sort(dim=1).values
        is_dominant = torch.zeros(batch, count, dtype=torch.bool, device=metric.device)
        is_dominant.scatter_(1, chosen, True)
        # The remaining tokens in order: a stable sort puts the dominant ones last.
        rest = is_dominant.to(torch.int8).argsort(dim=1, stable=True)[:, :count - dominant]
        if contextual == 0:
            return prune(prefix, chosen, rest)
        # Spread targets over the rest; every index stays on the device and every shape
        # is fixed (no mask indexing), so a vision tower captured as a CUDA graph runs it.
        places = torch.arange(contextual, device=metric.device) * rest.shape[1] // contextual
        is_target = torch.zeros(rest.shape[1], dtype=torch.int8, device=metric.device)
        is_target.scatter_(0, places, 1)
        elsewhere = is_target.argsort(stable=True)[:rest.shape[1] - contextual]
        targets, others = rest[:, places], rest[:, elsewhere]
        unit = unit_rows(tokens)
        similarity = gather_rows(unit, others) @ gather_rows(unit, targets).transpose(1, 2)
        return assemble(prefix, kept=chosen, destinations=targets, src=others,
                        dst_in_destinations=similarity.argmax(dim=-1))

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        _, contextual = split_counts(mergeable - r, self.contextual)
        return r * contextual
