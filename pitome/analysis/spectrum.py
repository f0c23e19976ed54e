"""The spectral-distance diagnostic of PiToMe's theory (docs/method.md §8).

Tokens are the nodes of a graph weighted by the similarity of their metric. A merge is a
coarsening with membership ``P`` (``n×N``, 0/1). Its lifted graph
``W_l = Pᵀ C⁻¹ (P W Pᵀ) C⁻¹ P`` (``C`` the group sizes) lives on the original ``N`` nodes and
has the coarse graph's normalised-Laplacian spectrum plus ``N − n`` eigenvalues equal to 1.
The spectral distance ``SD = Σ_k |λ_k(𝓛) − λ_k(𝓛_l)|`` over sorted eigenvalues measures how
much of the graph's structure a merge destroyed; PiToMe's claim is that its merges keep it
small.
"""

from __future__ import annotations

from typing import Literal

import torch

from ..core.energy import cosine_similarity, unit_rows
from ..core.registry import Algorithm

Weighting = Literal["relu", "margin"]


def token_graph(metric: torch.Tensor, weighting: Weighting = "relu",
                margin: float = 0.0) -> torch.Tensor:
    """``N×N`` weights of the token graph of an ``N×d`` metric (float64, zero diagonal).

    ``relu``: ``max(0, cos)``; ``margin``: ``cos`` where it exceeds ``margin``, else 0.
    """
    similarity = cosine_similarity(unit_rows(metric)).double()
    if weighting == "relu":
        weights = similarity.clamp_min(0.0)
    elif weighting == "margin":
        weights = torch.where(similarity > margin, similarity, torch.zeros_like(similarity))
    else:
        raise ValueError(f"weighting must be 'relu' or 'margin', got {weighting!r}")
    return weights.fill_diagonal_(0.0)


def normalized_laplacian(weights: torch.Tensor) -> torch.Tensor:
    """``I − D^{-1/2} W D^{-1/2}``; isolated nodes get a zero row in the normalised part."""
    degree = weights.sum(dim=-1)
    inverse_root = torch.where(degree > 0, degree.clamp_min(1e-300).rsqrt(),
                               torch.zeros_like(degree))
    adjacency = inverse_root[:, None] * weights * inverse_root[None, :]
    return torch.eye(weights.shape[0], dtype=weights.dtype, device=weights.device) - adjacency


def lifted_graph(weights: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """``Pᵀ C⁻¹ (P W Pᵀ) C⁻¹ P`` for a 0/1 ``n×N`` membership ``P`` (every node in one group)."""
    membership = membership.to(weights.dtype)
    sizes = membership.sum(dim=1)
    if (sizes == 0).any() or not torch.equal(membership.sum(dim=0),
                                            torch.ones_like(membership[0])):
        raise ValueError("membership must put every node in exactly one non-empty group "
                         "(pruned tokens have no group: the diagnostic needs a merge)")
    coarse = membership @ weights @ membership.transpose(0, 1)
    spread = membership / sizes[:, None]
    return spread.transpose(0, 1) @ coarse @ spread


def spectrum(weights: torch.Tensor) -> torch.Tensor:
    """Sorted eigenvalues of the normalised Laplacian."""
    return torch.linalg.eigvalsh(normalized_laplacian(weights))


def spectral_distance(weights: torch.Tensor, membership: torch.Tensor) -> float:
    """``Σ_k |λ_k(𝓛) − λ_k(𝓛_lifted)|`` of a graph and its coarsening by ``membership``."""
    before = spectrum(weights)
    after = spectrum(lifted_graph(weights, membership))
    return (before - after).abs().sum().item()


class _Recorder(Algorithm):
    """Wraps a patched model's algorithm and keeps every block's metric and plan."""

    def __init__(self, algorithm: Algorithm) -> None:
        self.algorithm = algorithm
        self.needs_attention = algorithm.needs_attention
        self.traceable = algorithm.traceable
        self.records: dict[int, tuple[torch.Tensor, object]] = {}

    def __call__(self, metric: torch.Tensor, ctx):
        plan = self.algorithm(metric, ctx)
        self.records[ctx.block] = (metric.detach().float().cpu(), plan)
        return plan


def _recorded_forward(model, images, algo, options) -> _Recorder:
    from ..api import merge_config, patch, unpatch

    patch(model, algo=algo, **options)
    config = merge_config(model)
    recorder = _Recorder(config.algorithm)
    schedule = config.schedule
    patch(model, algo=recorder, ratio=schedule.ratio, r=schedule.r,
          merge_blocks=schedule.merge_blocks, count_prefix=schedule.count_prefix,
          prop_attn=config.prop_attn, margin=config.margin, metric=config.metric)
    try:
        with torch.no_grad():
            model(images)
    finally:
        unpatch(model)
    return recorder


class NoSpectrum(ValueError):
    """The algorithm's plans are not a partition of the tokens into groups."""


def _distance(record, index: int, prefix: int, weighting: Weighting, margin: float):
    metric, plan = record
    if not hasattr(plan, "membership"):
        raise NoSpectrum("its merge is a linear resampling of all tokens, not groups")
    members = plan.membership()[index, prefix:, prefix:].cpu().double()
    if not torch.equal(members.sum(dim=0), torch.ones_like(members[0])):
        raise NoSpectrum("it discards tokens (pruning), so its merges are not a coarsening")
    weights = token_graph(metric[index, prefix:], weighting, margin)
    return weights, members, spectral_distance(weights, members)


def check_spectrum_algorithm(model: torch.nn.Module, image: torch.Tensor, algo: str,
                             ratio: float = 0.9) -> None:
    """Raise a ValueError naming ``algo`` if its merges have no spectral distance (DCT's
    resampling, pruning), tried on one image so a long run does not fail half-way."""
    try:
        block_distances(model, image[:1], algo, ratio)
    except NoSpectrum as reason:
        raise ValueError(f"{algo} has no spectral distance: {reason}; use a method that "
                         "merges tokens into groups (e.g. pitome, tome)") from None


def block_distances(model: torch.nn.Module, images: torch.Tensor, algo: str, ratio: float,
                    weighting: Weighting = "relu", margin: float = 0.0,
                    **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral distance of every block's merge in the merged model, per image.

    Returns two ``images×blocks`` tensors: the distance of each block's own merge (its
    token graph before the merge against the lifted graph of the merge), and the cumulative
    distance from the input (the first merging block's token graph against the lifting of
    every merge up to that block). Blocks that merge nothing have distance 0.
    """
    recorder = _recorded_forward(model, images, algo, {"ratio": ratio, **options})
    prefix = model.num_prefix_tokens
    own = torch.zeros(images.shape[0], len(model.blocks), dtype=torch.float64)
    cumulative = torch.zeros_like(own)
    for index in range(images.shape[0]):
        input_graph, total = None, None
        for block in range(len(model.blocks)):
            if block not in recorder.records:
                cumulative[index, block] = cumulative[index, block - 1] if block else 0.0
                continue
            weights, members, own[index, block] = _distance(
                recorder.records[block], index, prefix, weighting, margin)
            if input_graph is None:
                input_graph, total = weights, torch.eye(weights.shape[0], dtype=torch.float64)
            total = members @ total
            cumulative[index, block] = spectral_distance(input_graph, total)
    return own, cumulative


def single_merge_distances(model: torch.nn.Module, images: torch.Tensor, algo: str, r: int,
                           weighting: Weighting = "relu", margin: float = 0.0,
                           **options) -> torch.Tensor:
    """``images×blocks`` distances of one merge of ``r`` tokens on each block's unmerged tokens.

    Block ``b``'s graph comes from the unmerged model (nothing merges before it), so every
    algorithm faces the same tokens: the protocol of the check in docs/method.md §8.
    """
    distances = torch.zeros(images.shape[0], len(model.blocks), dtype=torch.float64)
    for block in range(len(model.blocks)):
        recorder = _recorded_forward(model, images, algo,
                                     {"r": r, "merge_blocks": [block], **options})
        for index in range(images.shape[0]):
            distances[index, block] = _distance(recorder.records[block], index,
                                                model.num_prefix_tokens, weighting, margin)[2]
    return distances


def plot_distances(results: dict[str, torch.Tensor], path: str) -> None:
    """Mean spectral distance per block with a band of ± one standard deviation."""
    from .._optional import require

    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    pyplot = require("matplotlib.pyplot", "plot")
    figure, axis = pyplot.subplots(figsize=(6.5, 4))
    for algo, distances in results.items():
        mean, std = distances.mean(0).numpy(), distances.std(0).numpy()
        blocks = range(len(mean))
        axis.plot(blocks, mean, marker="o", label=algo)
        axis.fill_between(blocks, mean - std, mean + std, alpha=0.2)
    axis.set_xlabel("block")
    axis.set_ylabel("spectral distance")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
