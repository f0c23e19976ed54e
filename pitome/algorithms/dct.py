"""DCT token reduction: the Fourier Transformer (He et al., arXiv 2305.15099)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.registry import Algorithm, MergeContext


def dct_matrix(n: int, device: torch.device) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``D`` (``n×n``): ``D @ x`` transforms along tokens."""
    k = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, device=device, dtype=torch.float64).unsqueeze(0)
    matrix = torch.cos(math.pi / n * (i + 0.5) * k) * math.sqrt(2.0 / n)
    matrix[0] /= math.sqrt(2.0)
    return matrix


def downsampling_matrix(tokens: int, kept: int, device: torch.device) -> torch.Tensor:
    """``kept×tokens``: DCT-II, keep the ``kept`` lowest frequencies, inverse DCT at ``kept``.

    Scaled by ``√(kept/tokens)`` so a constant sequence stays the same constant.
    """
    forward = dct_matrix(tokens, device)[:kept]
    inverse = dct_matrix(kept, device).transpose(0, 1)
    return (inverse @ forward * math.sqrt(kept / tokens)).float()


@dataclass(frozen=True)
class LinearPlan:
    """Non-prefix tokens replaced by ``matrix @ tokens``: a resampling, not a merge.

    Every output token mixes every input token, so there are no sources; each output token
    stands for an equal share of the input tokens (sizes stay a partition of the count).
    """

    num_prefix: int
    matrix: torch.Tensor

    @property
    def num_out(self) -> int:
        return self.num_prefix + self.matrix.shape[0]

    def weighted_mean(self, x: torch.Tensor, sizes: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        if sizes is None:  # every token holds one input token
            sizes = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
        prefix, rest = x[:, :self.num_prefix], x[:, self.num_prefix:]
        compute = torch.promote_types(x.dtype, torch.float32)
        mixed = self.matrix.to(compute) @ rest.to(compute)
        kept = self.matrix.shape[0]
        share = sizes[:, self.num_prefix:].sum(dim=1, keepdim=True) / kept
        new_sizes = torch.cat([sizes[:, :self.num_prefix], share.expand(-1, kept, -1)], dim=1)
        return torch.cat([prefix, mixed.to(x.dtype)], dim=1), new_sizes

    def apply(self, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
        raise ValueError("dct mixes every token into every output token, so it has no sources "
                         "or masks to carry; use trace_source=False and no padding")


class DCT(Algorithm):
    """Keep the ``T′ − r`` lowest DCT frequencies of the non-prefix token sequence.

    Fourier Transformer (He et al. 2023): DCT-II along the sequence, truncate to
    ``⌈T′ρ⌉`` coefficients, inverse DCT at the shorter length. Applied at the library's merge
    point (after attention, before the MLP) rather than after the block, so that every
    method shares one schedule. The transform ignores the metric; token order matters, so
    it suits models whose tokens keep spatial order (it is best in early blocks).
    """

    traceable = False

    def __init__(self) -> None:
        self._cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> LinearPlan:
        if ctx.padding is not None:
            raise ValueError("dct cannot keep padding apart from real tokens")
        tokens = metric.shape[1] - ctx.num_prefix
        key = (tokens, tokens - ctx.r, metric.device)
        if key not in self._cache:
            self._cache[key] = downsampling_matrix(tokens, tokens - ctx.r, metric.device)
        return LinearPlan(ctx.num_prefix, self._cache[key])

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        return 0
