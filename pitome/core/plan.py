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
        out = gather_rows(x, self.keep)
        if reduce == "drop" or self.drop_src or self.src.shape[1] == 0:
            return out
        moving = gather_rows(x, self.src)
        if reduce == "sum":
            flat = out.reshape(-1, x.shape[-1])
            flat.index_add_(0, flat_rows(self.dst, out.shape[1]), moving.reshape(-1, x.shape[-1]))
            return flat.view(out.shape)
        index = self.dst.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        return out.scatter_reduce(1, index, moving, reduce=reduce, include_self=True)

    def weighted_mean(self, x: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average of every merged group; returns the new tokens and sizes.

        ``x′ = Σ s·x / Σ s`` over each group, ``s′ = Σ s`` (SPEC §4 step 4). Only the merged
        rows are computed: a destination ``d`` becomes ``x_d + Σ_i s_i (x_i − x_d) / s′_d``
        over its sources ``i``, which is the same average, while every other token is a
        plain copy. The corrections are computed in at least float32.
        """
        new_sizes = self.apply(sizes, "sum")
        out = gather_rows(x, self.keep)
        if self.drop_src or self.src.shape[1] == 0:
            return out, new_sizes
        channels = x.shape[-1]
        moving = gather_rows(x, self.src)
        index = flat_rows(self.dst, out.shape[1])
        flat = out.reshape(-1, channels)
        compute = torch.promote_types(x.dtype, torch.float32)
        weight = gather_rows(sizes, self.src) / gather_rows(new_sizes, self.dst)
        target = flat.index_select(0, index).view(moving.shape)
        correction = (moving.to(compute) - target.to(compute)) * weight
        flat.index_add_(0, index, correction.to(x.dtype).reshape(-1, channels))
        return flat.view(out.shape), new_sizes


def flat_rows(index: torch.Tensor, rows_per_item: int) -> torch.Tensor:
    """``B×n`` per-item row indices as indices into the ``B·rows_per_item`` flattened rows."""
    offsets = torch.arange(index.shape[0], device=index.device) * rows_per_item
    return (index + offsets.unsqueeze(1)).reshape(-1)


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (``B×n``) of a ``B×T×C`` tensor, as a new ``B×n×C`` tensor.

    A row-wise ``index_select`` on the flattened batch: one contiguous copy per row, much
    faster on a GPU than ``gather`` with an index expanded over channels.
    """
    batch, tokens, channels = x.shape
    rows = x.reshape(batch * tokens, channels).index_select(0, flat_rows(index, tokens))
    return rows.view(batch, index.shape[1], channels)


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
