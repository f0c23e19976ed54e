"""Merge configuration (fixed at patch time) and merge state (one per forward pass)."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch

from ..core.attention import log_size_bias
from ..core.plan import MergePlan
from ..core.registry import Algorithm, MergeContext
from ..core.relaxed import move_fraction, next_merge
from ..core.schedule import MarginSpec, TokenSchedule, resolve_margin, token_counts
from ..kernels.launch import fuses_head_mean
from ..kernels.merge import merge_tokens
from .overlap import plan_ahead_enabled, side_stream
from .packed import PackedRun, right_padded_lengths
from .padded import PaddedRun, apply_row_plan, padded_counts


PADDED_LAYOUTS = ("auto", "packed", "padded", "by_length")
_RELAXED: ContextVar[Mapping[int, torch.Tensor] | None] = ContextVar("pitome_relaxed",
                                                                     default=None)


@contextlib.contextmanager
def relaxed_merges(fractions: Mapping[int, torch.Tensor]) -> Iterator[None]:
    """Forwards inside the ``with`` block (in this thread) merge a fraction more in some blocks.

    ``fractions`` maps a block index to a ``B`` tensor, one fraction in [0, 1) per input:
    that block merges its scheduled tokens, then moves the fraction of the token its
    algorithm would merge next into that token's destination (:mod:`pitome.core.relaxed`).
    Fractions of 0 that require gradients give, in backward, each block's first-order
    change of the loss per token merged more. Eager, unpadded forwards only; a block's
    fraction needs room for one merge more.
    """
    for block, fraction in fractions.items():
        if not isinstance(block, int) or not isinstance(fraction, torch.Tensor) \
                or fraction.ndim != 1:
            raise ValueError(f"relaxed_merges maps block indices to 1-D tensors of fractions "
                             f"(one per input), got {block!r}: {fraction!r}")
    token = _RELAXED.set(dict(fractions))
    try:
        yield
    finally:
        _RELAXED.reset(token)


def synchronisation_free() -> bool:
    """Whether the forward is being compiled or captured as a CUDA graph, so it must not
    read the GPU's values on the host."""
    return torch.compiler.is_compiling() or (
        torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


@dataclass(frozen=True)
class MergeConfig:
    """Everything ``pitome.patch`` decided: the algorithm and how to run it."""

    algo: str
    algorithm: Algorithm
    schedule: TokenSchedule
    margin: MarginSpec
    prop_attn: bool
    metric: str = "keys"
    trace_source: bool = False
    keep_plans: bool = False
    padded_layout: str = "auto"  # one of PADDED_LAYOUTS; "auto" chooses (see padded_layout)


def check_padded_layout(layout: str, algorithm: Algorithm, algo: str) -> None:
    """Refuse a ``padded_layout`` that is unknown, or that needs ragged rows ``algorithm``
    (registered as ``algo``) cannot plan."""
    if layout not in PADDED_LAYOUTS:
        raise ValueError(f"padded_layout must be one of {', '.join(map(repr, PADDED_LAYOUTS))}, "
                         f"got {layout!r}")
    if layout in ("packed", "padded") and not algorithm.ragged:
        raise ValueError(f"padded_layout={layout!r} needs an algorithm that plans rows of "
                         f"different lengths at once; {algo!r} does not (use 'auto' or "
                         "'by_length')")


def padded_layout(config: MergeConfig, packs: bool) -> str:
    """How a padded batch runs (see :class:`MergeState`): ``config.padded_layout``, or for
    ``"auto"`` packed where the layers pack and the algorithm plans ragged rows (padded
    while compiling or capturing), padded where the algorithm plans ragged rows, else by
    length."""
    layout = config.padded_layout
    check_padded_layout(layout, config.algorithm, config.algo)
    if layout == "auto":
        if not config.algorithm.ragged:
            return "by_length"
        return "packed" if packs and not synchronisation_free() else "padded"
    if layout == "packed" and not packs:
        raise ValueError("padded_layout='packed' needs layers that run packed tokens (BERT, "
                         "RoBERTa, DistilBERT); use 'auto' or 'padded'")
    return layout


@dataclass
class MergeInfo:
    """What the last forward pass did, readable through :func:`pitome.merge_info`.

    Attributes:
        token_counts: tokens entering each block, then the number leaving the last one.
        merges: tokens removed in each block.
        sizes: ``B×T×1`` input tokens each output token represents (None if nothing merged).
        source: ``B×T×N`` 0/1 membership of output tokens over input tokens (when traced).
        plans: the plan of every merging block, by block index (when ``keep_plans``; padded
            batches keep none, each sentence length has its own plan).
        padding: ``B×T`` bool, True for the output tokens that hold real (non-padding)
            tokens, or None when the input was not padded.
    """

    algo: str
    token_counts: list[int]
    merges: list[int]
    sizes: torch.Tensor | None = None
    source: torch.Tensor | None = None
    plans: dict[int, MergePlan] = field(default_factory=dict)
    padding: torch.Tensor | None = None


def schedule_plan(schedule: TokenSchedule, tokens: int, num_prefix: int,
                  num_blocks: int) -> list[int]:
    """``schedule.plan(...)``, which ``torch.compile`` takes as a constant: for a fixed token
    count (a plain int, not a symbol) the plan is fixed, and traced it would turn the
    schedule's float ratio into a symbol under ``dynamic=True`` (breaking a full graph)."""
    if torch.compiler.is_compiling():
        return _constant_plan(schedule.key, tokens, num_prefix, num_blocks)
    return schedule.plan(tokens, num_prefix, num_blocks)


@torch.compiler.assume_constant_result
def _constant_plan(key: str, tokens: int, num_prefix: int, num_blocks: int) -> list[int]:
    return _schedule(key).plan(tokens, num_prefix, num_blocks)


@functools.lru_cache(maxsize=64)
def _schedule(key: str) -> TokenSchedule:
    return TokenSchedule.from_key(key)


class MergeState:
    """The running state of one forward pass, handed explicitly from block to block.

    A padded batch (``padding`` given, real tokens first in every row) is merged sentence by
    sentence: each row follows the schedule of its own length, as it would alone, so its
    output never depends on what else is in the batch. With an algorithm that plans rows of
    different lengths at once (``Algorithm.ragged``) the batch runs as one computation:
    packed (:attr:`packed`, see :mod:`pitome.runtime.packed`) when the layers can run packed
    tokens (``packs``) and the forward may read sentence lengths on the host, else padded
    with per-row counts on the device (:attr:`rows`, see :mod:`pitome.runtime.padded`),
    which compiles and captures. Otherwise rows of equal length are planned together and the
    padding a shorter row needs to fill the batch is kept, never merged.
    """

    def __init__(self, config: MergeConfig, x: torch.Tensor, num_prefix: int, num_blocks: int,
                 padding: torch.Tensor | None = None, packs: bool = False,
                 count_tables: dict | None = None) -> None:
        batch, tokens, _ = x.shape
        self.config = config
        self.num_prefix = num_prefix
        self.num_blocks = num_blocks
        self.merges = schedule_plan(config.schedule, tokens, num_prefix, num_blocks) \
            if isinstance(tokens, int) else config.schedule.plan(tokens, num_prefix, num_blocks)
        self.sizes: torch.Tensor | None = None
        self._bias: tuple | None = None
        self.rows_by_length: dict[int, tuple[torch.Tensor, list[int]]] = {}
        self.packed: PackedRun | None = None
        self.rows: PaddedRun | None = None
        self.padding = None
        layout = padded_layout(config, packs) if padding is not None else None
        tables = {} if count_tables is None else count_tables
        if layout == "padded" and synchronisation_free():
            self.rows = PaddedRun(tables, config.schedule, padding.bool(), num_prefix, num_blocks)
        elif padding is not None and not bool(padding.all()):
            self.padding = padding.bool()
            if layout == "by_length":
                lengths = right_padded_lengths(self.padding, num_prefix)
                self.rows_by_length = self._rows_by_length(self.padding, lengths)
            elif layout == "padded":
                right_padded_lengths(self.padding, num_prefix)
                self.rows = PaddedRun(tables, config.schedule, self.padding, num_prefix,
                                      num_blocks)
            else:  # packed; the padded layout's counts are then ready for a later capture
                counts = padded_counts(tables, config.schedule, tokens, num_prefix, num_blocks,
                                       x.device)
                if any(counts.merging):
                    lengths = right_padded_lengths(self.padding, num_prefix)
                    self.packed = PackedRun(self, lengths, tokens, x.device, counts.by_length)
                    if not any(self.packed.merges(k) for k in range(num_blocks)):
                        self.packed = None  # nothing merges: the model's own padded layout
        if self.rows is not None:
            self.merges = self.rows.merges
            self.padding = self.rows.real(0)
        self.source: torch.Tensor | None = None
        if config.trace_source:
            self.source = torch.eye(tokens, device=x.device).expand(batch, tokens, tokens)
        self.plans: dict[int, MergePlan] = {}
        self.planned_ahead: dict[int, MergePlan] = {}
        # Activation checkpointing runs a block again in backward, after the forward has
        # moved on: what entered each block, and its plan, replay it as it first ran.
        self._entering: dict[int, tuple] = {}
        self._replay_plans: dict[int, MergePlan] = {}
        self._replaying = False
        self.relaxed = self._relaxed_fractions(batch, padding)

    def enter(self, block: int) -> None:
        """Call as a block starts: a block entered before (a recomputation by activation
        checkpointing) sees the sizes, sources and padding it saw then, and its plan."""
        self._replaying = block in self._entering
        packed = None if self.packed is None else self.packed.snapshot()
        if self._replaying:
            self.sizes, self.source, self.padding, packed = self._entering[block]
            if packed is not None:
                self.packed.restore(packed)
        else:
            self._entering[block] = (self.sizes, self.source, self.padding, packed)

    def _rows_by_length(self, padding: torch.Tensor, lengths: list[int]
                        ) -> dict[int, tuple[torch.Tensor, list[int]]]:
        """Rows grouped by real length, each with its token count entering every block."""
        by_row = torch.tensor(lengths, device=padding.device)
        groups = {}
        for length in sorted(set(lengths)):
            merges = self.config.schedule.plan(length, self.num_prefix, self.num_blocks, clamp=True)
            rows = (by_row == length).nonzero().flatten()
            groups[length] = (rows, token_counts(length, merges))
        return groups

    def _relaxed_fractions(self, batch: int, padding: torch.Tensor | None
                           ) -> Mapping[int, torch.Tensor]:
        """The fractions :func:`relaxed_merges` gives this forward (checked), or none."""
        fractions = _RELAXED.get()
        if not fractions:
            return {}
        if padding is not None or synchronisation_free():
            raise ValueError("relaxed_merges runs eager forwards of unpadded inputs only")
        for block, fraction in fractions.items():
            if not 0 <= block < self.num_blocks:
                raise ValueError(f"relaxed_merges: block {block} is not one of the "
                                 f"{self.num_blocks} blocks")
            if fraction.shape != (batch,):
                raise ValueError(f"relaxed_merges: block {block}'s fractions have shape "
                                 f"{tuple(fraction.shape)}; the batch needs ({batch},)")
        return fractions

    def merging(self, block: int) -> bool:
        """Whether any token merges in ``block``."""
        if self.packed is not None:
            return self.packed.merges(block)
        if self.rows is not None:
            return self.rows.merging[block]
        return self.merges[block] > 0 or block in self.relaxed

    @property
    def biased(self) -> bool:
        """Whether attention needs a key bias now (sizes to weigh, or padding to block)."""
        return self.config.prop_attn and self.sizes is not None or self.padding is not None

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive ``B×1×1×T`` key bias: ``log s`` (proportional attention) on real tokens,
        the dtype's minimum on padding; None when neither applies. Made once per merge: the
        blocks between two merges read the same sizes and padding."""
        made = self._bias
        if made is not None and made[0] is self.sizes and made[1] is self.padding \
                and made[2] == dtype:
            return made[3]
        bias = self._make_bias(dtype)
        self._bias = (self.sizes, self.padding, dtype, bias)
        return bias

    def _make_bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        bias = None
        if self.config.prop_attn and self.sizes is not None:
            bias = log_size_bias(self.sizes, dtype)
        if self.padding is not None:
            blocked = torch.zeros(self.padding.shape, dtype=dtype, device=self.padding.device)
            blocked.masked_fill_(~self.padding, torch.finfo(dtype).min)
            blocked = blocked[:, None, None, :]
            bias = blocked if bias is None else bias + blocked
        return bias

    @property
    def needs_attention(self) -> bool:
        """Whether this block's algorithm wants the attention received by each token."""
        return self.config.algorithm.needs_attention

    def keys_metric(self, head_keys: torch.Tensor, block: int) -> torch.Tensor | None:
        """What :meth:`merge_residual` takes as ``keys`` for this block's ``B×H×T×d``
        attention keys: None when :meth:`plan_ahead` planned the block from them, else the
        metric the algorithm plans on (see :meth:`_metric_of_keys`). Call it as soon as the
        keys exist, so that the plan overlaps the attention."""
        return None if self.plan_ahead(head_keys, block) else self._metric_of_keys(head_keys)

    def _metric_of_keys(self, head_keys: torch.Tensor) -> torch.Tensor:
        """The keys' head mean (``B×T×d``); or, for an algorithm that takes head keys, the
        keys themselves as ``B×T×H×d``, averaged by its kernels as they read them."""
        if self.config.algorithm.takes_head_keys and fuses_head_mean(head_keys):
            return head_keys.transpose(1, 2)
        return head_keys.mean(dim=1)

    def plan_ahead(self, head_keys: torch.Tensor, block: int) -> bool:
        """Start planning this block's merge from its ``B×H×T×d`` attention keys on a side
        CUDA stream (see :mod:`pitome.runtime.overlap`), to run while the attention does.

        Returns whether it did. Then :meth:`merge_residual` takes no keys and waits for the
        plan; otherwise the keys' head mean is passed to it and the plan is made there.
        """
        r = self.merges[block]
        if (r == 0 or self._replaying or self.config.metric != "keys" or self.padding is not None
                or self.needs_attention or block in self.relaxed
                or not plan_ahead_enabled(head_keys)):
            return False
        main = torch.cuda.current_stream(head_keys.device)
        side = side_stream(head_keys.device)
        side.wait_stream(main)
        head_keys.record_stream(side)
        with torch.cuda.stream(side), torch.no_grad():
            plan = self._plan(self._metric_of_keys(head_keys), r, block, self.sizes, None)
        for tensor in plan.tensors():
            tensor.record_stream(main)
        self.planned_ahead[block] = plan
        return True

    def merge(self, x: torch.Tensor, metric: torch.Tensor | None, block: int,
              attention: torch.Tensor | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
        """Merge the scheduled number of tokens of ``x`` (between attention and MLP).

        With ``residual`` the tokens merged are ``x + residual``; the add is then fused into
        the merge where the merge kernel runs (one pass over the tokens instead of two).
        ``metric`` may be None when :meth:`plan_ahead` planned this block.
        """
        r = self.merges[block]
        if self.rows is not None and self.rows.merging[block]:
            return self._merge_padded_rows(x, metric, block, residual)
        if residual is not None and (r == 0 or self.padding is not None):
            x, residual = x + residual, None
        if self.packed is not None:
            return self.packed.merge(x, metric, block) if self.packed.merges(block) else x
        if self.rows is not None:
            return x
        if block in self.relaxed:
            return self._merge_relaxed(x, metric, block, attention, residual)
        if r == 0:
            return x
        plan = self.planned_ahead.pop(block, None)
        if plan is not None:
            torch.cuda.current_stream(x.device).wait_stream(side_stream(x.device))
        elif self._replaying and block in self._replay_plans:
            plan = self._replay_plans[block]
        elif metric is None:
            raise ValueError(f"block {block} was not planned ahead, so merging needs its metric")
        if self.padding is not None:
            return self._merge_rows_by_length(x, metric, block, attention)
        x, self.sizes, self.source, plan = self._plan_and_apply(
            x, metric, self.sizes, self.source, r, block, attention, residual, plan)
        if self.config.keep_plans:
            self.plans[block] = plan
        if torch.is_grad_enabled():
            self._replay_plans[block] = plan
        return x

    def merge_residual(self, x: torch.Tensor, residual: torch.Tensor, keys: torch.Tensor | None,
                       block: int, attention: torch.Tensor | None = None) -> torch.Tensor:
        """``x + residual`` merged on the configured metric: ``keys`` (from
        :meth:`keys_metric`; None when :meth:`plan_ahead` planned the block) or, with
        ``metric="hidden"``, ``x + residual`` itself."""
        if self.config.metric == "keys":
            return self.merge(x, keys, block, attention, residual)
        x = x + residual
        return self.merge(x, x, block, attention)

    def _plan(self, metric: torch.Tensor, r: int, block: int, sizes: torch.Tensor | None,
              attention: torch.Tensor | None) -> MergePlan:
        """The algorithm's plan removing ``r`` tokens of this block."""
        ctx = MergeContext(r=r, num_prefix=self.num_prefix, block=block,
                           num_blocks=self.num_blocks,
                           margin=resolve_margin(self.config.margin, block, self.num_blocks),
                           sizes=sizes, attention=None if attention is None else attention.detach())
        with torch.no_grad():
            return self.config.algorithm(metric.detach() if metric.requires_grad else metric, ctx)

    def _plan_and_apply(self, x: torch.Tensor, metric: torch.Tensor | None,
                        sizes: torch.Tensor | None, source: torch.Tensor | None, r: int,
                        block: int, attention: torch.Tensor | None,
                        residual: torch.Tensor | None = None, plan: MergePlan | None = None):
        """Apply the plan removing ``r`` tokens (made here unless given) to ``x`` (plus
        ``residual``), the sizes (None while all are 1) and the sources. Returns the three
        and the plan."""
        if plan is None:
            plan = self._plan(metric, r, block, sizes, attention)
        x, sizes = merge_tokens(plan, x, sizes, residual)
        return x, sizes, None if source is None else plan.apply(source, "amax"), plan

    def _merge_relaxed(self, x: torch.Tensor, metric: torch.Tensor | None, block: int,
                       attention: torch.Tensor | None,
                       residual: torch.Tensor | None) -> torch.Tensor:
        """The block's scheduled merges, then its fraction of the next (see
        :func:`relaxed_merges`)."""
        if metric is None:
            raise ValueError(f"block {block} was planned ahead; a relaxed block plans here")
        r, tokens, sizes = self.merges[block], x.shape[1], self.sizes
        if 2 * (r + 1) > tokens - self.num_prefix:
            raise ValueError(f"relaxed_merges: block {block} merges {r} of its {tokens} tokens "
                             "and has no room for one more")
        following = self._plan(metric, r + 1, block, sizes, attention)
        if type(following) is not MergePlan:  # the plan for r is of the same algorithm
            raise TypeError(f"relaxed_merges needs merge plans; {self.config.algo!r} plans "
                            f"with {type(following).__name__}")
        done = None
        if r:
            x, self.sizes, self.source, done = self._plan_and_apply(
                x, metric, sizes, self.source, r, block, attention, residual)
            if self.config.keep_plans:
                self.plans[block] = done
        elif residual is not None:
            x = x + residual
        source, target = next_merge(done, following, tokens)
        x, self.sizes = move_fraction(x, self.sizes, source, target, self.relaxed[block])
        return x

    def _merge_padded_rows(self, x: torch.Tensor, metric: torch.Tensor, block: int,
                           residual: torch.Tensor | None = None) -> torch.Tensor:
        """Merge every row of the padded ``x`` (plus ``residual``) by its own count (see
        :class:`PaddedRun`)."""
        rows, real = self.rows, self.padding
        ctx = rows.context(block, resolve_margin(self.config.margin, block, self.num_blocks),
                           real, self.sizes)
        if metric.dim() == 4:  # per-head keys: the rows are planned on their mean
            metric = metric.mean(dim=2)
        with torch.no_grad():
            plan = self.config.algorithm.plan_rows(metric.detach(), ctx)
        self.padding = rows.real(block + 1)
        x, self.sizes, self.source = apply_row_plan(plan, x, self.sizes, real, self.padding,
                                                    self.source, residual)
        return x

    def _merge_rows_by_length(self, x: torch.Tensor, metric: torch.Tensor, block: int,
                              attention: torch.Tensor | None) -> torch.Tensor:
        """Merge each group of equal-length rows on its real tokens alone, then re-pad."""
        batch, tokens, _ = x.shape
        num_out = tokens - self.merges[block]
        out = x.new_empty(batch, num_out, x.shape[-1])
        new_sizes = x.new_ones(batch, num_out, 1, dtype=torch.float32)
        source = None if self.source is None else \
            self.source.new_zeros(batch, num_out, self.source.shape[-1])
        lengths = torch.empty(batch, dtype=torch.long, device=x.device)
        for rows, counts in self.rows_by_length.values():
            length, length_out = counts[block], counts[block + 1]
            kept_padding = slice(length, length + num_out - length_out)
            part = x[rows, :length]
            part_sizes = None if self.sizes is None else self.sizes[rows, :length]
            part_source = None if source is None else self.source[rows, :length]
            if length_out < length:
                part, part_sizes, part_source, _ = self._plan_and_apply(
                    part, metric[rows, :length], part_sizes, part_source, length - length_out,
                    block, None if attention is None else attention[rows, :length])
            out[rows] = torch.cat([part, x[rows, kept_padding]], dim=1)
            if part_sizes is not None:
                new_sizes[rows, :length_out] = part_sizes
            if source is not None:
                source[rows] = torch.cat([part_source, self.source[rows, kept_padding]], dim=1)
            lengths[rows] = length_out
        self.sizes, self.source = new_sizes, source
        self.padding = torch.arange(num_out, device=x.device) < lengths.unsqueeze(1)
        return out

    def info(self, num_tokens: int) -> MergeInfo:
        if self.packed is not None:
            self.padding, self.sizes, self.source = self.packed.padded()
        return MergeInfo(algo=self.config.algo, token_counts=token_counts(num_tokens, self.merges),
                         merges=list(self.merges), sizes=self.sizes, source=self.source,
                         plans=dict(self.plans), padding=self.padding)
