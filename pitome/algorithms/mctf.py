"""MCTF: multi-criteria token fusion (Lee et al., CVPR 2024), without its one-step-ahead attention."""

from __future__ import annotations

from dataclasses import replace

import torch

from ..core.energy import unit_rows
from ..core.plan import MergePlan, assemble
from ..core.registry import Algorithm, MergeContext


class MCTF(Algorithm):
    """Bipartite fusion weighted by similarity, informativeness and size, in both directions.

    The edge weight between tokens ``i`` and ``j`` multiplies three criteria (Lee et al.
    2024, Eq. 3-6), written here in log space, where only the ranking matters:

        log W_ij = cos_ij / τ_sim − (log a_i + log a_j) / τ_info − (log s_i + log s_j) / τ_size

    with ``a`` the attention a token receives from the CLS query (uninformative tokens,
    rarely attended to, merge first) and ``s`` its size (large tokens merge last).
    Bidirectional: ``⌈r/2⌉`` tokens of set A fuse into set B by their best edges, then
    ``⌊r/2⌋`` tokens of the updated set B fuse into set A. Fusion pools with weights
    ``a·s`` (attention-weighted pooling). The published defaults are τ_sim = 1,
    τ_info = 20, τ_size = 40. Its one-step-ahead attention (needs the next block's attention
    before merging) is not implemented; the current block's attention stands in.
    """

    needs_attention = True

    def __init__(self, tau_sim: float = 1.0, tau_info: float = 20.0,
                 tau_size: float = 40.0) -> None:
        self.tau_sim, self.tau_info, self.tau_size = tau_sim, tau_info, tau_size

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        p = ctx.num_prefix
        unit = unit_rows(metric[:, p:])
        batch, tokens, _ = unit.shape
        received = ctx.attention[:, p:].float().clamp_min(1e-12)
        sizes = (torch.ones_like(received) if ctx.sizes is None
                 else ctx.sizes[:, p:, 0].float())
        prior = -received.log() / self.tau_info - sizes.log() / self.tau_size
        a_idx = torch.arange(0, tokens, 2, device=unit.device).expand(batch, -1)
        b_idx = torch.arange(1, tokens, 2, device=unit.device).expand(batch, -1)
        first = self._fuse(unit, prior, a_idx, b_idx, (ctx.r + 1) // 2)
        # Second direction: the B tokens (each with what it absorbed) fuse into the A tokens
        # that stayed. Indices stay relative to the original tokens so the two steps compose.
        stayed = first["stay"]
        second = self._fuse(unit, prior, b_idx, stayed, ctx.r // 2) if ctx.r // 2 else None
        plan = self._compose(p, tokens, first, second, b_idx, stayed)
        weights = torch.cat([torch.ones_like(ctx.attention[:, :p]), ctx.attention[:, p:]], dim=1)
        return replace(plan, weights=weights.unsqueeze(-1))

    def _fuse(self, unit, prior, src_set, dst_set, r):
        scores = (unit.gather(1, src_set.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
                  @ unit.gather(1, dst_set.unsqueeze(-1).expand(-1, -1, unit.shape[-1]))
                  .transpose(-1, -2)) / self.tau_sim
        scores = scores + prior.gather(1, src_set).unsqueeze(-1) + prior.gather(1, dst_set).unsqueeze(1)
        best, best_dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        moved = order[:, :r]
        return {"src": src_set.gather(1, moved), "dst": dst_set.gather(1, best_dst.gather(1, moved)),
                "stay": src_set.gather(1, order[:, r:])}

    @staticmethod
    def _compose(num_prefix, tokens, first, second, b_idx, stayed):
        """One plan for both steps; every source maps to its final destination token."""
        if second is None:
            kept, destinations = stayed, b_idx
            src, final = first["src"], first["dst"]
        else:
            # A B token that moves in step 2 takes what it absorbed in step 1 along.
            redirect = torch.full_like(b_idx[:, :1].expand(-1, tokens), -1)
            redirect = redirect.scatter(1, second["src"], second["dst"])
            hop = redirect.gather(1, first["dst"])
            kept = stayed[:, :0]
            destinations = torch.cat([stayed, _without(b_idx, second["src"], tokens)], dim=1)
            src = torch.cat([first["src"], second["src"]], dim=1)
            final = torch.cat([torch.where(hop >= 0, hop, first["dst"]), second["dst"]], dim=1)
        position = torch.zeros_like(b_idx[:, :1].expand(-1, tokens))
        slots = torch.arange(destinations.shape[1], device=src.device).expand_as(destinations)
        position = position.scatter(1, destinations, slots)
        return assemble(num_prefix, kept=kept, destinations=destinations, src=src,
                        dst_in_destinations=position.gather(1, final))

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        half = mergeable // 2
        return 2 * half * ((mergeable + 1) // 2)


def _without(full: torch.Tensor, removed: torch.Tensor, tokens: int) -> torch.Tensor:
    """Rows of ``full`` without the entries in ``removed`` (as many removed in every row)."""
    removed_mask = torch.zeros(full.shape[0], tokens, dtype=torch.bool, device=full.device)
    removed_mask.scatter_(1, removed, True)
    stays = ~removed_mask.gather(1, full)
    order = stays.to(torch.int8).argsort(dim=1, descending=True, stable=True)
    return full.gather(1, order[:, :full.shape[1] - removed.shape[1]])
