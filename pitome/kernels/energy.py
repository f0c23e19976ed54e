"""PiToMe's energy score in one pass: similarity → ELU (or Gaussian) → mean, never
materialising the ``B×T×T`` similarity."""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..core.energy import (
    EnergyKind,
    cosine_similarity,
    energy_score,
    gaussian_width,
    head_mean,
    unit_rows,
)
from .backend import use_triton
from .launch import (
    MAX_METRIC_DIM,
    dot_precision,
    is_small_batch,
    metric_block,
    metric_rows,
    metric_stages,
    row_block,
    row_warps,
)
from .sort import MAX_LENGTH, argsort_rows

ENERGY_KINDS = ("elu", "gaussian")  # a kind's place here is the kernels' KIND
BLOCK_TOKENS = 64
# Rows and columns of one program of the split energy (small batches). Equal to the
# column block of the unsplit kernel, so both sum the same terms in the same order.
SPLIT_BLOCK = BLOCK_TOKENS


def token_energy(metric: torch.Tensor, margin: float, kind: EnergyKind = "elu",
                 alpha: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``B×T`` float32 energy of each token of a ``B×T×d`` metric (or of the mean of
    ``B×T×H×d`` per-head keys, which the kernel takes as it reads them).

    Equal to ``energy_score(cosine_similarity(unit_rows(metric)), ...)`` (see
    :func:`pitome.core.energy.energy_score` for the arguments), which is what runs where
    the Triton kernel does not (see :mod:`pitome.kernels.backend`).
    """
    if kind not in ENERGY_KINDS:
        raise ValueError(f"unknown energy kind {kind!r}; use 'elu' or 'gaussian'")
    batch, tokens, dim = metric.shape[0], metric.shape[1], metric.shape[-1]
    if dim > MAX_METRIC_DIM or not use_triton(metric):
        metric = head_mean(metric)
        return energy_score(cosine_similarity(unit_rows(metric)), margin, kind, alpha, weights)
    from .jit.energy import energy_kernel

    metric, heads, stride_h = metric_rows(metric)
    out = torch.empty(batch, tokens, dtype=torch.float32, device=metric.device)
    weights = out if weights is None else weights.float().contiguous()
    grid = (batch, -(-tokens // BLOCK_TOKENS))
    energy_kernel[grid](
        metric, weights, out, tokens, dim, metric.stride(0), metric.stride(1), stride_h,
        *energy_scalars(margin, alpha), KIND=ENERGY_KINDS.index(kind),
        HAS_WEIGHTS=weights is not out, HEADS=heads,
        BLOCK_I=BLOCK_TOKENS, BLOCK_J=BLOCK_TOKENS, BLOCK_D=metric_block(dim),
        PRECISION=dot_precision(), num_stages=metric_stages(heads))
    return out


class EnergyOptions(NamedTuple):
    """How PiToMe's energy is computed (see :func:`token_energy`)."""

    margin: float
    kind: EnergyKind = "elu"
    alpha: float = 1.0
    weights: torch.Tensor | None = None


def tokens_by_energy(metric: torch.Tensor, margin: float, kind: EnergyKind = "elu",
                     alpha: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``B×T`` token indices by :func:`token_energy`, highest first (a stable sort).

    Equal to ``argsort_rows(token_energy(...), descending=True)``, and that is what runs for
    large batches. Up to ``SMALL_BATCH`` items the energy is split over one program per
    block of rows and of columns (:func:`energy_partials`), and one more launch sums the
    blocks and sorts: two short launches where one program per row block would walk every
    column in series.
    """
    options = EnergyOptions(margin, kind, alpha, weights)
    split = energy_partials(metric, options)
    if split is None:
        return argsort_rows(token_energy(metric, *options), descending=True)
    from .jit.energy import energy_order_kernel

    partials, weights = split
    batch, blocks, tokens = partials.shape
    energy = torch.empty(batch, tokens, dtype=torch.float32, device=metric.device)
    order = torch.empty(batch, tokens, dtype=torch.long, device=metric.device)
    block = row_block(tokens)
    energy_order_kernel[(batch,)](
        partials, energy if weights is None else weights, energy, order, tokens, blocks,
        HAS_WEIGHTS=weights is not None, BLOCK=block, CHUNK=32, num_warps=row_warps(block))
    return order


def energy_scalars(margin: float, alpha: float) -> tuple[float, float, float]:
    """The energy kernels' ``margin, alpha, sigma`` arguments, as Python floats."""
    return float(margin), float(alpha), gaussian_width(float(margin))


def energy_partials(metric: torch.Tensor, options: EnergyOptions
                    ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """The energy's sums over each block of ``SPLIT_BLOCK`` columns, ``B×(blocks)×T``, and
    the weights as the kernels read them; or None where the split does not apply (large
    batches, rows too long to sort in one program, no Triton)."""
    batch, tokens, dim = metric.shape[0], metric.shape[1], metric.shape[-1]
    if (not use_triton(metric) or not is_small_batch(batch) or tokens > MAX_LENGTH
            or options.kind not in ENERGY_KINDS or dim > MAX_METRIC_DIM):
        return None
    from .jit.energy import energy_partials_kernel

    metric, heads, stride_h = metric_rows(metric)
    blocks = -(-tokens // SPLIT_BLOCK)
    partials = torch.empty(batch, blocks, tokens, dtype=torch.float32, device=metric.device)
    weights = None if options.weights is None else options.weights.float().contiguous()
    energy_partials_kernel[(batch, blocks, blocks)](
        metric, partials if weights is None else weights, partials, tokens, dim,
        metric.stride(0), metric.stride(1), stride_h,
        *energy_scalars(options.margin, options.alpha), KIND=ENERGY_KINDS.index(options.kind),
        HAS_WEIGHTS=weights is not None, HEADS=heads,
        BLOCK=SPLIT_BLOCK, BLOCK_D=metric_block(dim), PRECISION=dot_precision())
    return partials, weights
