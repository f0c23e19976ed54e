"""PiToMe's energy score in one pass: similarity → ELU (or Gaussian) → mean, never
materialising the ``B×T×T`` similarity."""

from __future__ import annotations

import torch

from ..core.energy import EnergyKind, cosine_similarity, energy_score, unit_rows
from .backend import use_triton
from .launch import MAX_METRIC_DIM, dot_precision, metric_block

BLOCK_TOKENS = 64


def token_energy(metric: torch.Tensor, margin: float, kind: EnergyKind = "elu",
                 alpha: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``B×T`` float32 energy of each token of a ``B×T×d`` metric.

    Equal to ``energy_score(cosine_similarity(unit_rows(metric)), ...)`` (see
    :func:`pitome.core.energy.energy_score` for the arguments), which is what runs where
    the Triton kernel does not (see :mod:`pitome.kernels.backend`).
    """
    if kind not in ("elu", "gaussian"):
        raise ValueError(f"unknown energy kind {kind!r}; use 'elu' or 'gaussian'")
    batch, tokens, dim = metric.shape
    if dim > MAX_METRIC_DIM or not use_triton(metric):
        return energy_score(cosine_similarity(unit_rows(metric)), margin, kind, alpha, weights)
    from . import _triton

    if metric.stride(-1) != 1:
        metric = metric.contiguous()
    out = torch.empty(batch, tokens, dtype=torch.float32, device=metric.device)
    weights = out if weights is None else weights.float().contiguous()
    grid = (batch, -(-tokens // BLOCK_TOKENS))
    _triton.energy_kernel[grid](
        metric, weights, out, tokens, dim, metric.stride(0), metric.stride(1), float(margin),
        float(alpha), max(1.0 - float(margin), 1e-3),
        KIND=_triton.ELU if kind == "elu" else _triton.GAUSSIAN, HAS_WEIGHTS=weights is not out,
        BLOCK_I=BLOCK_TOKENS, BLOCK_J=BLOCK_TOKENS, BLOCK_D=metric_block(dim),
        PRECISION=dot_precision())
    return out
