"""Merge plans: which tokens survive a block and which merge into which.

An algorithm looks at the similarity metric and returns a :class:`MergePlan`. The same plan is
then applied to every per-token tensor of the forward pass (features, sizes, sources, masks),
each with the reduction that suits it. This split is what lets FLOPs, visualisation and the
spectral diagnostic read exactly the merges the model made.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Reduction = Literal["sum", "amax", "mean", "drop"]


@dataclass(frozen=True)
class MergePlan:
    """How one block turns ``T`` tokens into ``K`` tokens.

    Attributes:
        keep: ``B×K`` indices (into the ``T`` input tokens) of the tokens that survive, in
            output order. Prefix tokens come first and keep their places.
        src: ``B×R`` indices of the tokens that disappear by merging (``T = K + R``).
        dst: ``B×R`` output positions (into ``keep``) that each ``src`` token merges into.
        drop_src: when True the ``src`` tokens are discarded instead of merged (pruning).
        weights: optional ``B×T×1`` pooling weights (e.g. attention received, MCTF): a group
            averages with weights ``w·s`` instead of ``s``; sizes still add up as ``Σ s``.
        max_norm: give each merged token the largest norm in its group (ToFu's MLERP)
            instead of the norm of the average.
        grouped_sources: optionally, the merges grouped by output row, as
            :func:`pitome.kernels.sources_by_destination` returns them, from a planner that
            had them at hand.

    ``keep_rows``, ``src_rows`` and ``dst_rows`` are the same indices into the flattened
    ``B·T`` input and ``B·K`` output rows, computed on first use, so that every tensor the
    plan is applied to costs one row-wise ``index_select`` (far cheaper on a GPU than
    ``gather`` with an index expanded over channels).
    """

    keep: torch.Tensor
    src: torch.Tensor
    dst: torch.Tensor
    drop_src: bool = False
    weights: torch.Tensor | None = None
    max_norm: bool = False
    grouped_sources: tuple[torch.Tensor, torch.Tensor] | None = field(
        default=None, compare=False, repr=False)

    @property
    def keep_rows(self) -> torch.Tensor:
        return self._flat("keep", self.num_in)

    @property
    def src_rows(self) -> torch.Tensor:
        return self._flat("src", self.num_in)

    @property
    def dst_rows(self) -> torch.Tensor:
        return self._flat("dst", self.num_out)

    def _flat(self, name: str, row_length: int) -> torch.Tensor:
        """``getattr(self, name)`` as flat row indices, computed once (not with
        ``functools.cached_property``, whose lock ``torch.compile`` cannot trace)."""
        key = f"_{name}_rows"
        rows = self.__dict__.get(key)
        if rows is None:
            rows = flat_rows(getattr(self, name), row_length)
            object.__setattr__(self, key, rows)
        return rows

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor the plan holds."""
        held = [self.keep, self.src, self.dst]
        if self.weights is not None:
            held.append(self.weights)
        if self.grouped_sources is not None:
            held.extend(self.grouped_sources)
        return held

    @property
    def num_in(self) -> int:
        return self.keep.shape[1] + self.src.shape[1]

    @property
    def num_out(self) -> int:
        return self.keep.shape[1]

    def membership(self) -> torch.Tensor:
        """``B×K×T`` 0/1 matrix: which input tokens each output token holds (dropped: none)."""
        batch, num_out = self.keep.shape
        matrix = torch.zeros(batch, num_out, num_out + self.src.shape[1], device=self.keep.device)
        matrix.scatter_(2, self.keep.unsqueeze(-1), 1.0)
        if not self.drop_src and self.src.shape[1]:
            items = torch.arange(batch, device=self.keep.device).unsqueeze(1)
            matrix[items, self.dst, self.src] = 1.0
        return matrix

    def apply(self, x: torch.Tensor, reduce: Reduction = "sum") -> torch.Tensor:
        """Apply the plan to a ``B×T×C`` tensor.

        ``sum`` adds merged tokens into their destination, ``amax`` keeps the element-wise
        maximum (source membership), ``mean`` averages a destination with everything merged
        into it (unweighted), ``drop`` discards merged tokens.
        """
        batch, _, channels = x.shape
        rows = x.reshape(-1, channels)
        out = rows.index_select(0, self.keep_rows)
        if reduce != "drop" and not self.drop_src and self.src.shape[1] > 0:
            moving = rows.index_select(0, self.src_rows)
            if reduce == "sum":
                out.index_add_(0, self.dst_rows, moving)
            else:
                index = self.dst_rows.unsqueeze(1).expand(-1, channels)
                out = out.scatter_reduce(0, index, moving, reduce=reduce, include_self=True)
        return out.view(batch, self.num_out, channels)

    def weighted_mean(self, x: torch.Tensor, sizes: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """Size-weighted average of every merged group; returns the new tokens and sizes.

        ``x′ = Σ s·x / Σ s`` over each group, ``s′ = Σ s`` (docs/method.md §4 step 4). Only the merged
        rows are computed: a destination ``d`` becomes ``x_d + Σ_i s_i (x_i − x_d) / s′_d``
        over its sources ``i``, which is the same average, while every other token is a
        plain copy. The corrections are computed in at least float32. ``sizes`` None means
        every token holds one input token.
        """
        if sizes is None and self.weights is not None:
            sizes = x.new_ones(x.shape[0], x.shape[1], 1, dtype=torch.float32)
        out = self.apply(x, "drop")
        if self.drop_src or self.src.shape[1] == 0:
            return out, (self._group_sizes(x.shape[0], x.device) if sizes is None
                         else self.apply(sizes, "sum"))
        channels = x.shape[-1]
        out_rows = out.view(-1, channels)
        moving = x.reshape(-1, channels).index_select(0, self.src_rows)
        target = out_rows.index_select(0, self.dst_rows)
        if sizes is None:
            new_sizes = self._group_sizes(x.shape[0], x.device)
            weight = new_sizes.view(-1, 1).index_select(0, self.dst_rows).reciprocal()
        else:  # each size row read once: the sources' sizes are both summed and weights
            size_rows = sizes.reshape(-1, 1)
            moving_sizes = size_rows.index_select(0, self.src_rows)
            new_size_rows = size_rows.index_select(0, self.keep_rows).index_add_(
                0, self.dst_rows, moving_sizes)
            new_sizes = new_size_rows.view(x.shape[0], self.num_out, 1)
            if self.weights is None:
                weight = moving_sizes / new_size_rows.index_select(0, self.dst_rows)
            else:
                pool = sizes * self.weights.float()
                weight = (pool.reshape(-1, 1).index_select(0, self.src_rows)
                          / self.apply(pool, "sum").view(-1, 1).index_select(0, self.dst_rows))
        if x.dtype in (torch.float32, torch.float64):
            correction = (moving - target) * weight
        else:
            correction = (moving.float() - target.float()) * weight
        if self.max_norm:
            # One merged row per destination (not per source: a row written once per source
            # would take its gradient once per source too).
            compute = correction.dtype
            rows = out_rows.to(compute)
            merged = rows.index_add(0, self.dst_rows, correction)
            group_norm = self.apply(x.to(compute).norm(dim=-1, keepdim=True), "amax")
            scale = group_norm.view(-1, 1) / merged.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            receives = torch.zeros(rows.shape[0], 1, dtype=torch.bool, device=rows.device)
            receives = receives.index_fill(0, self.dst_rows, True)
            return torch.where(receives, merged * scale, rows).to(x.dtype).view_as(out), new_sizes
        out_rows.index_add_(0, self.dst_rows, correction if correction.dtype == x.dtype
                            else correction.to(x.dtype))
        return out, new_sizes


    def _group_sizes(self, batch: int, device: torch.device) -> torch.Tensor:
        """``B×K×1`` input tokens in each output token when every input token holds one."""
        sizes = torch.ones(batch * self.num_out, 1, dtype=torch.float32, device=device)
        if not self.drop_src and self.src.shape[1]:
            ones = sizes.new_ones(1, 1).expand(self.dst_rows.shape[0], 1)
            sizes.index_add_(0, self.dst_rows, ones)
        return sizes.view(batch, self.num_out, 1)


def flat_rows(index: torch.Tensor, row_length: int) -> torch.Tensor:
    """``B×n`` indices into rows of ``row_length`` as indices into the ``B·row_length``
    flattened rows."""
    if index.shape[0] == 1 and not torch.compiler.is_compiling():
        return index.reshape(-1)  # eager batch 1: no offsets to add (a traced batch stays free)
    offsets = torch.arange(0, index.shape[0] * row_length, row_length, device=index.device)
    return (index + offsets.unsqueeze(1)).flatten()


def gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (``B×n``) of a ``B×T×C`` tensor, as a new ``B×n×C`` tensor."""
    batch, tokens, channels = x.shape
    rows = x.reshape(-1, channels).index_select(0, flat_rows(index, tokens))
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


def prune(num_prefix: int, kept: torch.Tensor, dropped: torch.Tensor) -> MergePlan:
    """A plan that keeps ``kept`` and discards ``dropped`` (indices relative to non-prefix)."""
    batch = kept.shape[0]
    keep = torch.cat([prefix_indices(batch, num_prefix, kept.device), kept + num_prefix], dim=1)
    return MergePlan(keep=keep, src=dropped + num_prefix, dst=torch.zeros_like(dropped),
                     drop_src=True)
