"""Bipartite plans of every row of a padded batch, each by its own length, in one launch.

Planned with PyTorch (:func:`pitome.algorithms.matching.ragged_bipartite`), a padded batch's
plan is some fifty operations on ``B×W`` and ``B×W×W`` tensors: each launch costs more than
its work, and a merging text block pays them all. Here one program per row does what the
row alone would: PiToMe's energy over its real tokens and the order it gives, the best edge
of each A token, the ranks of the edges and the row's :class:`~pitome.core.ragged.RowPlan`.
"""

from __future__ import annotations

import torch

from ..core.ragged import RaggedContext, RowPlan
from .backend import use_triton
from .energy import ENERGY_KINDS, EnergyOptions, energy_scalars
from .launch import MAX_METRIC_DIM, dot_precision, is_small_batch, metric_block, metric_rows, \
    row_block, row_warps
from .sort import MAX_LENGTH

BLOCK_ROWS = 64  # rows and columns of one energy tile
CHUNK = 32


def ragged_plan(mergeable: torch.Tensor, ctx: RaggedContext, energy: EnergyOptions | None = None,
                pool: float | None = None, start: int = 0, contiguous: bool = False
                ) -> RowPlan | None:
    """``ragged_bipartite``'s plan of every row (the same :class:`RowPlan`), in one launch.

    ``mergeable`` holds the non-prefix tokens (``B×n×d``, or ``B×n×H×d`` per-head keys whose
    mean is the metric). With ``energy`` (PiToMe) each row's real tokens are listed by
    energy over its real neighbours (``energy.weights``, ``B×n``, weigh them: sizes, 0 on
    padding) and the first ``min(m, round(2·r·pool))`` (``pool`` None: all) split into A
    and B; without (ToMe) its tokens in order do. The split alternates from place ``start``, or (``contiguous``)
    takes the first half and the second. Returns None where the kernel does not run; the
    caller then plans with PyTorch.
    """
    batch, tokens, dim = mergeable.shape[0], mergeable.shape[1], mergeable.shape[-1]
    if (tokens == 0 or tokens > MAX_LENGTH or dim > MAX_METRIC_DIM or not use_triton(mergeable)
            or (energy is not None and energy.kind not in ENERGY_KINDS)):
        return None
    from .jit.ragged import ragged_plan_kernel

    device = mergeable.device
    if mergeable.dim() == 4 and not is_small_batch(batch):
        mergeable = mergeable.mean(dim=2)  # one pass, not one per tile (see launch.SMALL_BATCH)
    metric, heads, stride_h = metric_rows(mergeable)
    width = ctx.num_prefix + tokens
    max_a = (tokens + 1) // 2
    slot = torch.empty(batch, width, dtype=torch.long, device=device)
    target = torch.empty(batch, width, dtype=torch.long, device=device)
    scores = torch.empty(batch, max_a, dtype=torch.float32, device=device)
    partners = torch.empty(batch, max_a, dtype=torch.long, device=device)
    by_energy = energy is not None
    weights = None
    if by_energy:
        energies = torch.empty(batch, tokens, dtype=torch.float32, device=device)
        order = torch.empty(batch, tokens, dtype=torch.long, device=device)
        margin, alpha, sigma = energy_scalars(energy.margin, energy.alpha)
        if energy.weights is not None:
            weights = energy.weights.float().contiguous()
    else:  # token order: the energy arguments are never read
        energies, order, (margin, alpha, sigma) = scores, partners, (0.0, 1.0, 1.0)
    block_t = row_block(tokens)
    ragged_plan_kernel[(batch,)](
        metric, energies if weights is None else weights, ctx.lengths.contiguous(),
        ctx.r.contiguous(), energies, order, scores, partners, slot, target, tokens, width,
        max_a, dim, metric.stride(0), metric.stride(1), stride_h, ctx.num_prefix, start,
        0.0 if pool is None else float(pool), margin, alpha, sigma,
        KIND=ENERGY_KINDS.index(energy.kind) if by_energy else 0,
        HAS_WEIGHTS=weights is not None, HEADS=heads, BY_ENERGY=by_energy,
        POOL_ALL=pool is None, CONTIGUOUS=contiguous, BLOCK_T=block_t,
        BLOCK_A=row_block(max_a), BLOCK_I=BLOCK_ROWS, BLOCK_D=metric_block(dim), CHUNK=CHUNK, PRECISION=dot_precision(),
        num_warps=row_warps(block_t))
    return RowPlan(slot=slot, target=target)
