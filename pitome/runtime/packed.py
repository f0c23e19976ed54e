"""One forward pass over a padded text batch, run packed: the real tokens of every sentence
in one ``1×N×C`` row, each sentence merged by the schedule of its own length, all sentences
in one batched plan per block (see :mod:`pitome.core.ragged`)."""

from __future__ import annotations

import torch

from ..core.ragged import PackedLayout, RaggedContext, packed_layouts
from ..core.schedule import resolve_margin, token_counts
from ..kernels.merge import merge_tokens


def right_padded_lengths(padding: torch.Tensor, num_prefix: int) -> list[int]:
    """Real tokens per row of a ``B×T`` mask, checked to be right padding with at least one
    token besides the prefix."""
    lengths = padding.sum(dim=1)
    positions = torch.arange(padding.shape[1], device=padding.device)
    if not torch.equal(padding, positions < lengths.unsqueeze(1)):
        raise ValueError("token merging needs right-padded input (real tokens first in every "
                         "row); pad on the right, e.g. tokenizer.padding_side = 'right'")
    lengths = lengths.tolist()
    if min(lengths) <= num_prefix:
        raise ValueError("every row needs at least one token besides the prefix tokens")
    return lengths


class PackedRun:
    """The packed tokens' layout, sizes and sources as the blocks of one forward merge them.

    Attributes:
        layout: where each sentence's tokens sit now.
        sizes: ``1×N×1`` input tokens each packed token holds (None while all are 1).
        source: ``1×N×T`` which of its sentence's input tokens each packed token holds
            (when traced).
        counts: ``counts[k][b]``: tokens of sentence ``b`` entering block ``k``, read from
            ``by_length[L][k]`` (:func:`pitome.runtime.padded.count_table`).
    """

    def __init__(self, state, lengths: list[int], width: int, device: torch.device,
                 by_length: list[list[int]]) -> None:
        self.state = state
        config = state.config
        self.counts = [[by_length[length][k] for length in lengths]
                       for k in range(state.num_blocks + 1)]
        # The padded width between blocks: what the batch's width would reach by the
        # schedule (the longest sentence's count, unless padded beyond the longest).
        widths = token_counts(width, state.merges)
        self.widths = [max(widths[k], *self.counts[k]) for k in range(state.num_blocks + 1)]
        self.counts_on_device = torch.tensor(self.counts, device=device)  # one copy per forward
        entering = [0] + [k + 1 for k in range(state.num_blocks) if self.merges(k)]
        built = packed_layouts([self.counts[k] for k in entering],
                               [self.widths[k] for k in entering], self.counts_on_device[entering])
        self.layouts = dict(zip(entering, built))
        self.layout = self.layouts[0]
        self._key_bias: tuple[PackedLayout, torch.dtype, torch.Tensor] | None = None
        self.sizes: torch.Tensor | None = None
        self.source: torch.Tensor | None = None
        if config.trace_source:
            self.source = self.layout.pack(
                torch.eye(width, device=device).expand(len(lengths), width, width))

    def layout_entering(self, block: int) -> PackedLayout:
        """The layout of the tokens entering ``block`` (built for every merge at once)."""
        return self.layouts[block]

    def merges(self, block: int) -> bool:
        """Whether any sentence merges in ``block``."""
        return self.counts[block] != self.counts[block + 1]

    def snapshot(self) -> tuple:
        return self.layout, self.sizes, self.source

    def restore(self, snapshot: tuple) -> None:
        self.layout, self.sizes, self.source = snapshot

    def key_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """The attention's ``B×1×1×W`` key bias in the padded layout (padding blocked; ``log
        s`` with proportional attention)."""
        if self.state.config.prop_attn and self.sizes is not None:
            return self.layout.key_bias(dtype, self.sizes)
        cached = self._key_bias  # the padding alone: the same until the next merge
        if cached is None or cached[0] is not self.layout or cached[1] != dtype:
            cached = self._key_bias = (self.layout, dtype, self.layout.key_bias(dtype))
        return cached[2]

    def padded_sizes(self) -> torch.Tensor | None:
        """``B×W×1`` sizes in the padded layout, 0 on padding (None while all are 1)."""
        return None if self.sizes is None else self.layout.pad(self.sizes)

    def merge(self, x: torch.Tensor, metric: torch.Tensor, block: int) -> torch.Tensor:
        """Merge the packed ``1×N×C`` tokens ``x`` by this block's schedule of each sentence,
        planned on the padded ``B×W×d`` ``metric``."""
        state, layout = self.state, self.layout
        out = self.layout_entering(block + 1)
        ctx = RaggedContext(
            lengths=layout.counts, r=layout.counts - out.counts,
            num_prefix=state.num_prefix, block=block, num_blocks=state.num_blocks,
            margin=resolve_margin(state.config.margin, block, state.num_blocks),
            real=layout.real, sizes=self.padded_sizes())
        with torch.no_grad():
            rows = state.config.algorithm.plan_rows(metric.detach(), ctx)
        plan = layout.packed_plan(rows, out)
        x, self.sizes = merge_tokens(plan, x, self.sizes)
        if self.source is not None:
            self.source = plan.apply(self.source, "amax")
        self.layout = out
        return x

    def padded(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The ``B×W`` real-token mask, ``B×W×1`` sizes (1 on padding) and ``B×W×T`` sources
        of the tokens now, in the padded layout."""
        layout = self.layout
        sizes = None if self.sizes is None else layout.pad(self.sizes, fill=1.0)
        source = None if self.source is None else layout.pad(self.source)
        return layout.real, sizes, source
