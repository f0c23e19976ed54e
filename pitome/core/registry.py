"""The algorithm registry: every merging method behind one call shape.

An algorithm is a callable ``(metric, ctx) -> MergePlan``: it sees tensors and a
:class:`MergeContext`, never a model. A registered *method* pairs an algorithm factory with
the defaults that belong to it (proportional attention, ratio convention), so
``algo="tome"`` and ``algo="pitome"`` differ by one string.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .plan import MergePlan
from .ragged import RaggedContext, RowPlan


@dataclass(frozen=True)
class MergeContext:
    """What an algorithm may know about the block it plans for.

    Attributes:
        r: tokens to remove in this block (0 < 2r ≤ mergeable tokens).
        num_prefix: leading tokens (CLS, distillation, registers) that never merge.
        block: index of the block; ``num_blocks`` the model's depth.
        margin: the energy margin for this block (docs/method.md §3); algorithms without one ignore it.
        sizes: ``B×T×1`` tokens represented by each token, or None while all are 1.
        padding: ``B×T`` bool, True for real tokens, or None when nothing is padded.
        attention: ``B×T`` attention each token receives from the first prefix token (CLS),
            averaged over heads, for algorithms with ``needs_attention = True``; models
            without a prefix token use the mean query instead.
    """

    r: int
    num_prefix: int
    block: int
    num_blocks: int
    margin: float
    sizes: torch.Tensor | None = None
    padding: torch.Tensor | None = None
    attention: torch.Tensor | None = None


class Algorithm(ABC):
    """Base of every merging algorithm: plans one block's merge from the ``B×T×d`` metric.

    Subclasses implement ``__call__`` and declare what they need as class (or instance)
    attributes, which the runtime reads instead of probing:

    Attributes:
        needs_attention: the algorithm reads ``ctx.attention`` (attention received from CLS).
        takes_head_keys: it may be handed the attention keys per head, ``B×T×H×d``, whose
            mean over heads is the metric: its kernels average them as they read them, one
            launch fewer per block (see :func:`pitome.kernels.launch.fuses_head_mean`);
            ``pitome.core.energy.head_mean`` gives the ``B×T×d`` metric wherever it needs one.
        traceable: its plans move whole tokens, so ``trace_source`` can follow them (False
            for methods that mix every token into every output, such as DCT).
        one_shot: it reduces the tokens once, in the last merging block, to the count the
            schedule would reach there (VisionZip); its plans may remove any number of
            tokens, not at most half.
        ragged: it plans the rows of a padded batch at once, each removing its own number
            of tokens (:meth:`plan_rows`), so padded text runs packed as one computation;
            padded batches of other algorithms are planned one sentence length at a time.
    """

    needs_attention: bool = False
    takes_head_keys: bool = False
    traceable: bool = True
    one_shot: bool = False
    ragged: bool = False

    @abstractmethod
    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        """The plan removing ``ctx.r`` tokens of this block."""

    def plan_rows(self, metric: torch.Tensor, ctx: RaggedContext) -> RowPlan:
        """The plan of every row of a padded ``B×W×d`` metric, row ``b`` removing
        ``ctx.r[b]`` of its ``ctx.lengths[b]`` tokens exactly as :meth:`__call__` would plan
        that row alone (for algorithms with ``ragged = True``)."""
        raise NotImplementedError(f"{type(self).__name__} plans one row length at a time")

    def similarity_pairs(self, mergeable: int, block: int, num_blocks: int,
                         r: int = 0) -> int:
        """Metric rows compared per image to plan a block of ``mergeable`` tokens that
        removes ``r`` of them (FLOPs); all pairs unless the algorithm compares fewer."""
        return mergeable ** 2


class FunctionAlgorithm(Algorithm):
    """A plain ``(metric, ctx) -> MergePlan`` function registered as an algorithm."""

    def __init__(self, function: Callable[[torch.Tensor, MergeContext], MergePlan]) -> None:
        self.function = function

    def __call__(self, metric: torch.Tensor, ctx: MergeContext) -> MergePlan:
        return self.function(metric, ctx)


@dataclass(frozen=True)
class Method:
    """A named, registered merging method."""

    name: str
    factory: Callable[..., Algorithm]
    summary: str
    defaults: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, **options: Any) -> Algorithm:
        merged = {**self.options, **options}
        accepted = inspect.signature(self.factory).parameters
        unknown = sorted(set(merged) - set(accepted))
        if unknown:
            raise TypeError(f"algorithm {self.name!r} does not take option(s) {unknown}; "
                            f"it takes {sorted(accepted)}")
        algorithm = self.factory(**merged)
        if isinstance(algorithm, Algorithm):
            return algorithm
        if not callable(algorithm):
            raise TypeError(f"algorithm {self.name!r}: its factory returned a "
                            f"{type(algorithm).__name__}, not a pitome.Algorithm or a callable")
        return FunctionAlgorithm(algorithm)


_METHODS: dict[str, Method] = {}


def register(name: str, factory: Callable[..., Algorithm], summary: str,
             defaults: dict[str, Any] | None = None, **options: Any) -> Method:
    """Register ``factory`` under ``name``.

    ``defaults`` are patch-level defaults (``prop_attn``, ``count_prefix``); ``options`` are
    fixed keyword arguments of the factory (how presets of one algorithm are made).
    """
    key = name.lower()
    if key in _METHODS:
        raise ValueError(f"an algorithm named {name!r} is already registered")
    method = Method(key, factory, summary, dict(defaults or {}), options)
    _METHODS[key] = method
    return method


def canonical_name(name: str) -> str:
    """How a registered name is looked up: case-insensitive, ``-`` read as ``_``."""
    return name.lower().replace("-", "_")


def get_method(name: str) -> Method:
    key = canonical_name(name)
    if key not in _METHODS:
        raise ValueError(f"unknown algorithm {name!r}; available: {', '.join(sorted(_METHODS))}")
    return _METHODS[key]


def available_algorithms() -> dict[str, str]:
    """Registered algorithm names and their one-line summaries."""
    return {name: method.summary for name, method in sorted(_METHODS.items())}
