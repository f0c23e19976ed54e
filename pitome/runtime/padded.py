"""One forward pass over a padded text batch kept padded: every sentence merged by the
schedule of its own length, with no host synchronisation, so the forward can be compiled by
``torch.compile`` or captured as a CUDA graph.

The packed run (:mod:`pitome.runtime.packed`) plans each sentence's token counts on the host,
which makes its shapes depend on the sentence lengths. Here the counts come from a table over
every length the padded width allows, looked up on the device; the batch stays ``B×W`` with
``W`` falling block by block as the longest possible sentence's count does, so every shape
depends on the batch's padded width alone. Each row merges its own tokens into the first
places of its row (:class:`~pitome.core.ragged.RowPlan`), padding after them.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..core.ragged import RaggedContext, RowPlan
from ..core.schedule import TokenSchedule, token_counts
from ..kernels.merge import merge_padded_rows


class Counts(NamedTuple):
    """The token counts of every sentence length a padded width allows (see
    :func:`padded_counts`)."""

    by_length: list[list[int]]  # by_length[L][k], on the host (count_table)
    table: torch.Tensor  # the same, (W+1)×(K+1) on the device
    widths: list[int]  # the padded width entering each block: the most tokens of any length
    merging: list[bool]  # whether a sentence of some length merges in each block


CountTables = dict  # (width, device) -> (schedule, Counts), per Runtime


def count_table(schedule: TokenSchedule, width: int, num_prefix: int,
                num_blocks: int) -> list[list[int]]:
    """``table[L][k]``: the tokens a sentence of ``L`` real tokens has entering block ``k``
    (``k = num_blocks``: leaving the last), for every ``L`` up to ``width``. A sentence with
    at most one token besides the prefix merges nothing."""
    return [token_counts(length, schedule.sentence_plan(length, num_prefix, num_blocks))
            for length in range(width + 1)]


def padded_counts(tables: CountTables, schedule: TokenSchedule, width: int, num_prefix: int,
                  num_blocks: int, device: torch.device) -> Counts:
    """:func:`count_table` on the host and as a ``(W+1)×(K+1)`` tensor on ``device``, the
    batch's padded width entering every block (the most tokens any sentence that fits
    ``width`` has there) and whether any such sentence merges in each block.

    Kept in ``tables`` once per padded width and device by eager forwards; a compiled one
    that finds none builds its own as a constant of its graph, and a CUDA graph capture
    cannot copy one from the host, so it needs an eager forward at that width first.
    """
    key = (width, device)
    entry = tables.get(key)
    if entry is None or entry[0] is not schedule:
        if (device.type == "cuda" and not torch.compiler.is_compiling()
                and torch.cuda.is_current_stream_capturing()):
            raise RuntimeError(
                f"a padded batch of width {width} is captured in a CUDA graph before any "
                "forward ran at that width: run one forward outside the capture first (its "
                "per-length token counts are copied to the GPU once, which a capture cannot do)")
        table = count_table(schedule, width, num_prefix, num_blocks)
        widths = [max(row[k] for row in table) for k in range(num_blocks + 1)]
        merging = [any(row[k] != row[k + 1] for row in table) for k in range(num_blocks)]
        entry = (schedule, Counts(table, torch.tensor(table, device=device), widths, merging))
        if not torch.compiler.is_compiling():
            tables[key] = entry
    return entry[1]


class PaddedRun:
    """The token counts of every sentence of a padded batch, block by block, on the device.

    Attributes:
        widths: ``widths[k]``: the batch's padded width entering block ``k`` (host integers
            that depend on the input width alone).
        merges: ``widths[k] - widths[k + 1]``, what ``merge_info`` reports per block.
        merging: ``merging[k]``: whether a sentence of some length merges in block ``k``.
        counts: ``B×(K+1)`` each sentence's tokens entering every block.
    """

    def __init__(self, tables: CountTables, schedule: TokenSchedule, padding: torch.Tensor,
                 num_prefix: int, num_blocks: int) -> None:
        counts = padded_counts(tables, schedule, padding.shape[1], num_prefix, num_blocks,
                               padding.device)
        self.widths, self.merging = counts.widths, counts.merging
        self.merges = [a - b for a, b in zip(self.widths, self.widths[1:])]
        self.counts = counts.table[padding.sum(dim=1)]
        self.num_prefix, self.num_blocks = num_prefix, num_blocks
        # Every block's inputs at once, a handful of launches per forward rather than per
        # block: each block's counts and removals as contiguous rows, and the real tokens
        # entering every block (a view of one mask per block).
        self._lengths = self.counts.t().contiguous()
        self._removed = (self._lengths[:-1] - self._lengths[1:]).contiguous()
        self._real = torch.arange(self.widths[0], device=padding.device) \
            < self.counts.unsqueeze(-1)

    def real(self, block: int) -> torch.Tensor:
        """``B×W_k`` True for the real tokens entering ``block`` (``num_blocks``: leaving
        the last)."""
        return self._real[:, block, :self.widths[block]]

    def context(self, block: int, margin: float, real: torch.Tensor,
                sizes: torch.Tensor | None) -> RaggedContext:
        """What the algorithm plans ``block``'s rows from (``sizes`` 1 on padding here, 0 in
        the context)."""
        return RaggedContext(
            lengths=self._lengths[block], r=self._removed[block],
            num_prefix=self.num_prefix, block=block, num_blocks=self.num_blocks,
            margin=margin, real=real,
            sizes=None if sizes is None else sizes * real.unsqueeze(-1))


def apply_row_plan(plan: RowPlan, x: torch.Tensor, sizes: torch.Tensor | None,
                   real: torch.Tensor, real_out: torch.Tensor,
                   source: torch.Tensor | None = None, residual: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``B×W×C`` padded tokens (plus ``residual``) merged by ``plan`` into ``B×W′×C``
    (``W′ = real_out.shape[1]``): each output token the size-weighted mean of its group,
    padding (zeros) after each row's tokens. Returns the tokens, their ``B×W′×1`` sizes (1 on
    padding) and the ``B×W′×T`` sources (None if ``source`` is).

    The merge kernel runs where it can (no sources to trace, no norm rule); this is its
    PyTorch twin."""
    batch, width_out = real_out.shape
    if source is None:
        merged = merge_padded_rows(plan, x, sizes, width_out, residual)
        if merged is not None:
            return merged[0], merged[1], None
    place = plan.slot if plan.drop_src else torch.where(plan.slot >= 0, plan.slot, plan.target)
    place = place.masked_fill(place < 0, width_out)  # padding and dropped tokens: a spare slot
    if residual is not None:
        x = x + residual
    channels = x.shape[-1]
    weight = real.unsqueeze(-1).float()
    if sizes is not None:
        weight = weight * sizes
    compute = torch.promote_types(x.dtype, torch.float32)
    index = place.unsqueeze(-1)
    total = x.new_zeros(batch, width_out + 1, channels, dtype=compute).scatter_add(
        1, index.expand(-1, -1, channels), x.to(compute) * weight)
    group = weight.new_zeros(batch, width_out + 1, 1).scatter_add(1, index, weight)
    out = total[:, :width_out] / group[:, :width_out].clamp_min(1e-12)
    if plan.max_norm:  # ToFu's MLERP: a merged group takes its largest member's norm
        norms = x.to(compute).norm(dim=-1, keepdim=True).masked_fill(~real.unsqueeze(-1), 0)
        largest = norms.new_zeros(batch, width_out + 1, 1).scatter_reduce(
            1, index, norms, "amax")[:, :width_out]
        members = weight.new_zeros(batch, width_out + 1, 1).scatter_add(
            1, index, real.unsqueeze(-1).float())[:, :width_out]
        scale = largest / out.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        out = torch.where(members > 1, out * scale, out)
    new_sizes = torch.where(real_out.unsqueeze(-1), group[:, :width_out], 1.0)
    if source is not None:
        source = source.new_zeros(batch, width_out + 1, source.shape[-1]).scatter_add(
            1, index.expand(-1, -1, source.shape[-1]),
            source * real.unsqueeze(-1))[:, :width_out]
    return out.to(x.dtype), new_sizes, source
