"""PiToMe's energy score: how deep inside a cluster of similar tokens each token sits."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

EnergyKind = Literal["elu", "gaussian"]


def head_mean(metric: torch.Tensor) -> torch.Tensor:
    """A ``B×T×d`` metric: the mean of per-head ``B×T×H×d`` keys, or ``metric`` itself."""
    return metric.mean(dim=2) if metric.dim() == 4 else metric


def unit_rows(metric: torch.Tensor) -> torch.Tensor:
    """The rows of a ``B×T×d`` metric scaled to unit length, in float32."""
    metric = metric if metric.dtype == torch.float32 else metric.float()
    return metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def cosine_similarity(unit: torch.Tensor) -> torch.Tensor:
    """``B×T×T`` cosine similarities of unit rows (see :func:`unit_rows`)."""
    return unit @ unit.transpose(-1, -2)


def gaussian_width(margin: float) -> float:
    """The Gaussian energy's ``σ = 1 − m``, kept above zero for margins near 1."""
    return max(1.0 - margin, 1e-3)


def energy_score(similarity: torch.Tensor, margin: float, kind: EnergyKind = "elu",
                 alpha: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Energy of each token from its ``B×T×T`` similarity row (diagonal included).

    ``elu`` (vision, docs/method.md §3): ``E_i = 1/T Σ_j ELU_α(S_ij − m)``: neighbours above the margin add
    their excess similarity, the others a bounded negative. ``gaussian`` (text, the reference
    code): ``E_i = 1/T Σ_j exp(−½((1 − S_ij)/σ)²)`` with ``σ = 1 − m``. High energy means a
    token sits in a large cluster and is safe to merge.

    ``weights`` (``B×T``, e.g. token sizes) turn the mean over neighbours into a weighted
    mean, so a merged token counts once per input token it holds: the energy of the original
    token graph rather than of the coarsened one.
    """
    if kind == "elu":
        terms = F.elu(similarity - margin, alpha=alpha)
    elif kind == "gaussian":
        terms = torch.exp(-0.5 * ((1.0 - similarity) / gaussian_width(margin)) ** 2)
    else:
        raise ValueError(f"unknown energy kind {kind!r}; use 'elu' or 'gaussian'")
    if weights is None:
        return terms.mean(dim=-1)
    weights = weights.to(terms.dtype).unsqueeze(-2)
    return (terms * weights).sum(dim=-1) / weights.sum(dim=-1)
