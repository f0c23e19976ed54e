"""Each token's most similar partner in the other set of a bipartite split, in one pass."""

from __future__ import annotations

import torch

from ..core.energy import unit_rows
from ..core.plan import gather_rows
from .backend import use_triton
from .launch import MAX_METRIC_DIM, dot_precision, metric_block

BLOCK_TOKENS = 64


def pair_scores(metric: torch.Tensor, a_idx: torch.Tensor, b_idx: torch.Tensor) -> torch.Tensor:
    """``B×|A|×|B|`` cosine similarities between the A and B tokens of a ``B×T×d`` metric."""
    unit = unit_rows(metric)
    return gather_rows(unit, a_idx) @ gather_rows(unit, b_idx).transpose(-1, -2)


def best_partner(metric: torch.Tensor, a_idx: torch.Tensor,
                 b_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarity of each A token's closest B token, and that token's position in B.

    ``metric`` is ``B×T×d``; ``a_idx`` (``B×|A|``) and ``b_idx`` (``B×|B|``) index its
    tokens. Equal to ``(unit_A @ unit_Bᵀ).max(dim=-1)`` (ties aside), which is what runs
    where the Triton kernel does not; the kernel never writes the ``|A|×|B|`` scores.
    """
    batch, _, dim = metric.shape
    if dim > MAX_METRIC_DIM or not use_triton(metric):
        return pair_scores(metric, a_idx, b_idx).max(dim=-1)
    from .jit.bipartite import best_partner_kernel

    if metric.stride(-1) != 1:
        metric = metric.contiguous()
    a_idx, b_idx = a_idx.contiguous(), b_idx.contiguous()
    num_a, num_b = a_idx.shape[1], b_idx.shape[1]
    score = torch.empty(batch, num_a, dtype=torch.float32, device=metric.device)
    index = torch.empty(batch, num_a, dtype=torch.long, device=metric.device)
    grid = (batch, -(-num_a // BLOCK_TOKENS))
    best_partner_kernel[grid](
        metric, a_idx, b_idx, score, index, num_a, num_b, dim, metric.stride(0),
        metric.stride(1), 0, num_a, 0, 1, num_b, 0, 1, LOOKUP=True, HEADS=1, BLOCK_A=BLOCK_TOKENS,
        BLOCK_B=BLOCK_TOKENS, BLOCK_D=metric_block(dim), PRECISION=dot_precision())
    return score, index
