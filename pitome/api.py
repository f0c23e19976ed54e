"""The public entry points: ``patch``, ``unpatch``, ``merge_info``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypeVar

from torch import nn

from .adapters import find_adapter, patched_adapter
from .adapters.base import INFO_ATTR
from .core.registry import get_method
from .core.schedule import MarginSpec, RSpec, TokenSchedule
from .core.state import MergeConfig, MergeInfo

ModelT = TypeVar("ModelT", bound=nn.Module)
DEFAULT_RATIO = 0.9


def patch(model: ModelT, algo: str = "pitome", ratio: float | None = None, *,
          r: RSpec | None = None, prop_attn: bool | None = None, margin: MarginSpec | None = None,
          metric: Literal["keys", "hidden"] = "keys", trace_source: bool = False,
          merge_blocks: Sequence[int] | None = None, count_prefix: bool | None = None,
          keep_plans: bool = False, **options: Any) -> ModelT:
    """Add token merging to ``model`` in place and return it.

    Args:
        model: a supported transformer (see ``pitome.supported_models()``).
        algo: a registered algorithm (``pitome.available_algorithms()``).
        ratio: fraction of mergeable tokens each block keeps, in [0.5, 1]; 1 merges nothing.
            Defaults to 0.9 unless ``r`` is given.
        r: ToMe's alternative: tokens merged per block as an int, a per-block list, or
            ``(r, inflection)``.
        prop_attn: add ``log size`` to attention logits; defaults to the algorithm's own.
        margin: PiToMe's energy margin, a float or per-block schedule; defaults to the model
            family's reference schedule (timm ViT: ``0.75 − 0.75·i/L``).
        metric: what similarity is measured on: the attention ``"keys"`` averaged over heads,
            or the ``"hidden"`` state after the attention residual.
        trace_source: track which input tokens each output token holds (``merge_info``).
        merge_blocks: merge only in these block indices.
        count_prefix: compute ``r`` from all tokens, prefix included (the authors' ToMe).
        keep_plans: keep every block's :class:`~pitome.core.plan.MergePlan` in ``merge_info``.
        **options: algorithm options (e.g. ``pool`` and ``energy`` for PiToMe).

    Raises:
        UnsupportedModelError: no adapter supports the model.
        ValueError: an out-of-range ratio, an impossible ``r`` or an unknown algorithm.
    """
    method = get_method(algo)
    if ratio is None and r is None:
        ratio = DEFAULT_RATIO
    schedule = TokenSchedule(
        ratio=ratio, r=r, merge_blocks=None if merge_blocks is None else tuple(merge_blocks),
        count_prefix=method.defaults.get("count_prefix", False) if count_prefix is None
        else count_prefix)
    if metric not in ("keys", "hidden"):
        raise ValueError(f"metric must be 'keys' or 'hidden', got {metric!r}")
    adapter = find_adapter(model)
    algorithm = method.build(**options)
    if trace_source and not getattr(algorithm, "traceable", True):
        raise ValueError(f"algorithm {method.name!r} mixes tokens instead of merging them, so "
                         "it has no sources to trace; use trace_source=False")
    config = MergeConfig(
        algo=method.name, algorithm=algorithm, schedule=schedule,
        margin=adapter.default_margin if margin is None else margin,
        prop_attn=method.defaults.get("prop_attn", False) if prop_attn is None else prop_attn,
        metric=metric, trace_source=trace_source, keep_plans=keep_plans)
    unpatch(model)
    adapter.patch(model, config)
    return model


def unpatch(model: ModelT) -> ModelT:
    """Remove merging from ``model`` in place (a no-op on an unpatched model); returns it."""
    adapter = patched_adapter(model)
    if adapter is not None:
        adapter.unpatch(model)
    return model


def merge_info(model: nn.Module) -> MergeInfo | None:
    """What the last forward pass of a patched model merged, or None before the first one."""
    return model.__dict__.get(INFO_ATTR)
