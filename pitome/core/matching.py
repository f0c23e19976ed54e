"""Bipartite matching shared by ToMe-style algorithms."""

from __future__ import annotations

import torch

from ..kernels.partner import best_partner, pair_scores
from ..kernels.sort import argsort_rows
from .plan import MergePlan, assemble


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
                    padding: torch.Tensor | None = None) -> MergePlan:
    """Bipartite soft matching (ToMe, Bolya et al. 2023, §3).

    Every token of set A proposes its most similar token of set B; the ``r`` proposals with
    the highest cosine similarity merge, the other A tokens stay. ``metric`` holds the
    metrics of the non-prefix tokens; indices are relative to them. ``protected`` tokens
    take part in nothing and pass unchanged. When ``|A| = r`` every A token merges, which is
    PiToMe's rule (SPEC §4 step 3).
    """
    if padding is None:
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
