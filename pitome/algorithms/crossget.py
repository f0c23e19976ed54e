"""CrossGET's complete-graph soft matching (Shi et al., ICML 2024), vision tower only."""

from __future__ import annotations

import torch

from ..core.energy import cosine_similarity, unit_rows
from ..core.plan import MergePlan, assemble
from ..core.registry import Algorithm, MergeContext


class CrossGET(Algorithm):
    """Complete-graph soft matching: any token may merge into any other, without cycles.

    Every token's best match is taken over all other tokens (the diagonal removed), not
    over a fixed bipartite half (Shi et al. 2024, §3.2). The ``r`` tokens with the strongest
    best match become sources; sources never receive, so no merge chain or cycle can form,
    and each source merges into its most similar *non-source* token. (The PiToMe authors'
    copy of this method sends every source into one token; this is the method as written.)
    Cross-modal guidance tokens need a text tower and training; they are not implemented.
    """

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        unit = unit_rows(metric[:, ctx.num_prefix:])
        similarity = cosine_similarity(unit)
        similarity.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
        order = similarity.amax(dim=-1).argsort(dim=-1, descending=True)
        sources, others = order[:, :ctx.r], order[:, ctx.r:]
        rows = similarity.gather(1, sources.unsqueeze(-1).expand(-1, -1, similarity.shape[-1]))
        permitted = rows.gather(2, others.unsqueeze(1).expand(-1, ctx.r, -1))
        return assemble(ctx.num_prefix, kept=others[:, :0], destinations=others, src=sources,
                        dst_in_destinations=permitted.argmax(dim=-1))

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        return mergeable ** 2
