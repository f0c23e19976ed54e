"""Merge plans: which tokens survive a block and which merge into which.

An algorithm looks at the similarity metric and returns a :class:`MergePlan`. The same plan is
then applied to every per-token tensor of the forward pass (features, sizes, sources, masks),
each with the reduction that suits it. This split is what lets FLOPs, visualisation and the
spectral diagnostic read exactly the merges the model made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Reduction = Literal["sum", "amax", "mean", "drop"]


@dataclass(frozen=True)
class MergePlan:
    """How one block turns ``T`` tokens into ``K`` tokens.

    Attributes:
        keep: ``B×K`` indices (into the ``T`` input tokens) of the tokens that survive, in
            output order. Prefix tokens come first and keep their places.
        src: ``B×R`` indices of the tokens that disappear by merging.
        dst: ``B×R`` output positions (into ``keep``) that each ``src`` token merges into.
        drop_src: when True the ``src`` tokens are discarded instead of merged (pruning).
    """

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    drop_src: bool = False

    @property
    def num_out(self) -> int:
        return self.keep.shape[1]

    def apply(self, x: torch.Tensor, reduce: Reduction = "sum") -> torch.Tensor:
        """Apply the plan to a ``B×T×C`` tensor.

        ``sum`` adds merged tokens into their destination, ``amax`` keeps the element-wise
        maximum (source membership), ``mean`` averages a destination with everything merged
        into it (unweighted), ``drop`` discards merged tokens.
        """
        channels = x.shape[-1]
        out = x.gather(1, self.keep.unsqueeze(-1).expand(-1, -1, channels))
        if reduce == "drop" or self.drop_src or self.src.shape[1] == 0:
            return out
        moving = x.gather(1, self.src.unsqueeze(-1).expand(-1, -1, channels))
        index = self.dst.unsqueeze(-1).expand(-1, -1, channels)
        return out.scatter_reduce(1, index, moving, reduce=reduce, include_self=True)

    def weighted_mean(self, x: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average of every merged group; returns the new tokens and sizes.

        ``x′ = Σ s·x / Σ s`` over each group, ``s′ = Σ s`` (SPEC §4 step 4). Arithmetic runs in
        at least float32 so bf16 features lose nothing to the accumulation.
        """
        dtype = torch.promote_types(x.dtype, torch.float32)
        new_sizes = self.apply(sizes, "sum")
        if self.drop_src:
            return self.apply(x, "drop"), new_sizes
        summed = self.apply(x.to(dtype) * sizes, "sum")
        return (summed / new_sizes).to(x.dtype), new_sizes


def prefix_indices(batch: int, num_prefix: int, device: torch.device) -> torch.Tensor:
    """``B×P`` indices ``0..P-1``: prefix tokens always survive in place."""
    return torch.arange(num_prefix, device=device).expand(batch, num_prefix)


def assemble(
    num_prefix: int,
    kept: torch.Tensor,
    destinations: torch.Tensor,
    src: torch.Tensor,
    dst_in_destinations: torch.Tensor,
    drop_src: bool = False,
) -> MergePlan:
    """Build a plan from indices relative to the non-prefix tokens.

    Output order is ``[prefix, kept, destinations]``: ``kept`` pass unchanged (protected or
    unmatched), ``destinations`` receive the ``src`` tokens. ``dst_in_destinations`` says which
    destination (by position in ``destinations``) each ``src`` token joins.
    """
    batch = kept.shape[0]
    keep = torch.cat([prefix_indices(batch, num_prefix, kept.device), kept + num_prefix,
                      destinations + num_prefix], dim=1)
    dst = dst_in_destinations + (num_prefix + kept.shape[1])
    return MergePlan(keep=keep, src=src + num_prefix, dst=dst, drop_src=drop_src)
