"""Sentences of different lengths merged together: a right-padded batch packed into one row
of real tokens, each sentence removing the tokens of its own schedule.

A padded text batch merged with one count for every row would either merge padding into text
or let a sentence's merges depend on its batch-mates. Here every sentence follows the schedule
of its own length, as it would alone, and the batch still runs as one computation: the
algorithm plans all rows at once in the padded ``B×W`` layout (:class:`RowPlan`: each token's
output place within its own row), and :meth:`PackedLayout.packed_plan` turns that into one
ordinary :class:`~pitome.core.plan.MergePlan` over the packed ``1×N`` tokens, so the merge
kernels apply it unchanged. The layers between merges run on the packed tokens, so padding
costs nothing in the projections and the MLP; attention re-pads (:meth:`PackedLayout.pad`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .plan import MergePlan


@dataclass(frozen=True)
class RaggedContext:
    """What an algorithm may know about the rows it plans for at once.

    Attributes:
        lengths: ``B`` real tokens in each row (prefix included), real tokens first.
        r: ``B`` tokens each row removes in this block (at most half its mergeable tokens).
        num_prefix: leading tokens of every row that never merge.
        block, num_blocks: the block's index and the model's depth.
        margin: the energy margin for this block (docs/method.md §3).
        real: ``B×W`` True for real tokens.
        sizes: ``B×W×1`` input tokens each token holds (0 on padding), or None while all are 1.
    """

    lengths: torch.Tensor
    r: torch.Tensor
    num_prefix: int
    block: int
    num_blocks: int
    margin: float
    real: torch.Tensor
    sizes: torch.Tensor | None = None


@dataclass(frozen=True)
class RowPlan:
    """One block's merge of every row of a padded batch, in the padded ``B×W`` layout.

    Attributes:
        slot: ``B×W`` the place in its row's output of each token that survives (prefix
            tokens first, in place), −1 for tokens merged away and for padding.
        target: ``B×W`` the output place that each merged-away token joins, −1 elsewhere.
        drop_src, max_norm: as :class:`~pitome.core.plan.MergePlan`'s (pruning; ToFu's
            norm rule).
    """

    slot: torch.Tensor
    target: torch.Tensor
    drop_src: bool = False
    max_norm: bool = False


def with_prefix(num_prefix: int, slot: torch.Tensor, target: torch.Tensor) -> RowPlan:
    """A :class:`RowPlan` from places relative to the non-prefix tokens and outputs (−1 kept
    as is): the prefix tokens come first and keep their places."""
    batch = slot.shape[0]
    prefix = torch.arange(num_prefix, device=slot.device).expand(batch, num_prefix)
    shift = lambda places: places + (places >= 0) * num_prefix  # noqa: E731
    return RowPlan(slot=torch.cat([prefix, shift(slot)], dim=1),
                   target=torch.cat([torch.full_like(prefix, -1), shift(target)], dim=1))


class PackedLayout:
    """Where the real tokens of a right-padded ``B×W`` batch sit once packed into ``1×N``:
    row ``b``'s ``lengths[b]`` tokens, one row after another.

    ``lengths`` are host integers (the schedule of each row is planned on the host once per
    forward), so every shape below is known without waiting for the GPU.
    """

    def __init__(self, lengths: list[int], device: torch.device, width: int | None = None,
                 counts: torch.Tensor | None = None) -> None:
        width = max(lengths) if width is None else width
        if counts is None:  # ``lengths`` on the device, when the caller has them there
            counts = torch.tensor(lengths, device=device)
        layout = packed_layouts([list(lengths)], [width], counts.unsqueeze(0))[0]
        self.__dict__.update(layout.__dict__)

    @classmethod
    def of_parts(cls, lengths: list[int], width: int, counts: torch.Tensor,
                 starts: torch.Tensor, real: torch.Tensor, flat: torch.Tensor) -> PackedLayout:
        """A layout from its tensors: ``counts`` and ``starts`` (``B``), ``real``
        (``B×W``) and ``flat`` (``N``: each packed token's place in the padded ``B·W``)."""
        layout = cls.__new__(cls)
        layout.lengths, layout.batch, layout.width = list(lengths), len(lengths), width
        layout.total, layout.device = sum(lengths), counts.device
        layout.counts, layout.starts, layout.real, layout.flat = counts, starts, real, flat
        return layout

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """``B×W×C`` padded → ``1×N×C`` packed (the real tokens, row after row)."""
        return x.reshape(-1, x.shape[-1]).index_select(0, self.flat).unsqueeze(0)

    def pad(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``1×N×C`` packed → ``B×W×C`` padded, ``fill`` on padding."""
        channels = x.shape[-1]
        out = x.new_full((self.batch * self.width, channels), fill)
        return out.index_copy(0, self.flat, x.reshape(-1, channels)).view(
            self.batch, self.width, channels)

    def key_bias(self, dtype: torch.dtype, sizes: torch.Tensor | None = None) -> torch.Tensor:
        """Additive ``B×1×1×W`` key bias: the dtype's minimum on padding, and ``log s`` of the
        packed ``1×N×1`` ``sizes`` (proportional attention) on real tokens when given."""
        bias = torch.zeros(self.batch, self.width, dtype=dtype, device=self.device)
        if sizes is not None:
            bias = self.pad(sizes.log().to(dtype))[..., 0]
        bias = bias.masked_fill(~self.real, torch.finfo(dtype).min)
        return bias[:, None, None, :]

    def packed_plan(self, plan: RowPlan, out: PackedLayout) -> MergePlan:
        """``plan`` (over this layout's ``B×W``) as a plan over the packed ``1×N`` tokens that
        leaves the packed ``out`` layout: one plan for the whole batch."""
        in_place = self.starts.unsqueeze(1) + torch.arange(self.width, device=self.device)
        survives = plan.slot >= 0
        places = torch.where(survives, out.starts.unsqueeze(1) + plan.slot, out.total)
        keep = in_place.new_zeros(out.total + 1).scatter_(0, places.flatten(),
                                                           in_place.flatten())
        merged = (plan.target >= 0).flatten()
        removed = self.total - out.total
        order = torch.where(merged, torch.cumsum(merged, 0) - 1, removed)
        src = in_place.new_zeros(removed + 1).scatter_(0, order, in_place.flatten())
        joins = (out.starts.unsqueeze(1) + plan.target).flatten()
        dst = in_place.new_zeros(removed + 1).scatter_(0, order, joins)
        return MergePlan(keep=keep[None, :out.total], src=src[None, :removed],
                         dst=dst[None, :removed], drop_src=plan.drop_src, max_norm=plan.max_norm)


def packed_layouts(lengths: list[list[int]], widths: list[int],
                   counts: torch.Tensor) -> list[PackedLayout]:
    """The layouts of ``lengths[k]`` padded to ``widths[k]``, for every ``k``, from one set of
    batched operations (``counts`` is ``lengths`` on the device, ``K×B``): a forward builds
    the layout after every merging block at once rather than some ten launches each."""
    device = counts.device
    steps, batch = counts.shape
    totals = [sum(row) for row in lengths]
    flat_counts = counts.flatten()
    ends = torch.cumsum(counts, 1)
    starts = ends - counts
    real = torch.arange(max(widths), device=device) < counts.unsqueeze(-1)
    segment = torch.repeat_interleave(torch.arange(steps * batch, device=device), flat_counts,
                                      output_size=sum(totals))
    segment_starts = torch.cumsum(flat_counts, 0) - flat_counts
    within = torch.arange(sum(totals), device=device) - segment_starts[segment]
    row_width = torch.tensor(widths, device=device).repeat_interleave(batch)[segment] \
        if len(set(widths)) > 1 else widths[0]
    flat = (segment % batch) * row_width + within  # packed token → padded row of B·W
    layouts, offset = [], 0
    for k, (row, width, total) in enumerate(zip(lengths, widths, totals)):
        layouts.append(PackedLayout.of_parts(row, width, counts[k], starts[k],
                                             real[k, :, :width], flat[offset:offset + total]))
        offset += total
    return layouts
