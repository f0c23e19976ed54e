"""The public entry points: ``patch``, ``unpatch``, ``merge_info``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, TypeVar

import torch
from torch import nn

from .adapters import find_adapter
from .core.registry import Algorithm, Method, get_method
from .core.schedule import (MarginSpec, RatioSpec, RSpec, TokenSchedule, check_margin, check_r,
                            scalar)
from .runtime import patcher
from .runtime.state import MergeConfig, MergeInfo, check_padded_layout

ModelT = TypeVar("ModelT", bound=nn.Module)
DEFAULT_RATIO = 0.9


def patch(model: ModelT, algo: str | Algorithm = "pitome", ratio: RatioSpec | None = None, *,
          r: RSpec | None = None, prop_attn: bool | None = None, margin: MarginSpec | None = None,
          metric: Literal["keys", "hidden"] = "keys", trace_source: bool = False,
          merge_blocks: Sequence[int] | None = None, count_prefix: bool | None = None,
          keep_plans: bool = False, tokens: int | None = None,
          padded_layout: Literal["auto", "packed", "padded", "by_length"] = "auto",
          **options: Any) -> ModelT:
    """Add token merging to ``model`` in place and return it.

    Args:
        model: a supported transformer (see ``pitome.supported_models()``).
        algo: a registered algorithm (``pitome.available_algorithms()``), or an
            :class:`~pitome.core.registry.Algorithm` instance. On text models ``"pitome"``
            means the text variant, ``"pitome_text"``.
        ratio: fraction of mergeable tokens each block keeps, in [0.5, 1]; 1 merges nothing.
            Defaults to 0.9 unless ``r`` or ``tokens`` is given. A per-block list (one keep
            ratio per block, 1 where a block does not merge, blocks past its end keep all)
            is a whole schedule: the model's default ``merge_blocks`` (text: the first three)
            does not apply to it, an explicit ``merge_blocks`` still does.
        r: ToMe's alternative: tokens merged per block as an int, a per-block list, or a
            2-tuple ``(r, inflection)`` (inflection in [-1, 1]; a 2-tuple is never read as
            a per-block schedule). A per-block list, like a per-block ``ratio``, is a whole
            schedule: the model's default ``merge_blocks`` does not apply to it. Numpy and
            0-d tensor scalars are accepted throughout.
        prop_attn: add ``log size`` to attention logits; defaults to the algorithm's own.
        margin: PiToMe's energy margin, a float or per-block schedule; defaults to the model
            family's reference schedule (ViT ``0.75 − 0.75·i/L``, CLIP ``0.9 − 0.9·i/L``,
            BERT-family ``0.9 − 0.25·i/L``).
        metric: what similarity is measured on: the attention ``"keys"`` averaged over heads,
            or the ``"hidden"`` state after the attention residual.
        trace_source: track which input tokens each output token holds (``merge_info``).
        merge_blocks: merge only in these block indices (each in ``[0, depth)``); text
            models default to the first three (the authors' text schedule), others to all.
        count_prefix: compute ``r`` from all tokens, prefix included (the authors' ToMe).
        keep_plans: keep every block's :class:`~pitome.core.plan.MergePlan` in ``merge_info``.
        tokens: instead of ``ratio`` or ``r``, the tokens per image (or sequence) to keep:
            what the last merging block emits, prefix tokens (CLS, registers) not counted.
            On LLaVA that is the image tokens the language model sees. Reached by a
            geometric per-block schedule (:func:`pitome.core.schedule.merges_for_tokens`);
            a count no schedule can reach is refused (at patch time where the model's input
            size is known).
        padded_layout: how a padded text batch runs, each sentence merged by the schedule of
            its own length: ``"packed"`` (the real tokens of all sentences in one row; the
            fastest eager layout for BERT-family layers, but it reads the sentence lengths on
            the host), ``"padded"`` (per-row counts on the device; compiles with
            ``fullgraph=True`` and captures as a CUDA graph), ``"by_length"`` (a loop over
            sentence lengths, the reference), or ``"auto"``: packed in eager BERT-family
            layers, padded when compiling or capturing or where layers do not pack, by
            length for algorithms that cannot plan rows of different lengths at once.
        **options: algorithm options (e.g. ``pool`` and ``energy`` for PiToMe).

    Raises:
        UnsupportedModelError: no adapter supports the model.
        ValueError: an out-of-range ratio, an impossible ``r`` or an unknown algorithm; or
            ``model`` is part of a model that is patched as a whole.

    Patching a model replaces any earlier patch of it or of its submodules.
    """
    if not isinstance(algo, (str, Algorithm)):
        raise TypeError(f"algo must be a registered algorithm's name (see "
                        f"pitome.available_algorithms()) or a pitome.Algorithm, got {algo!r}")
    for name, flag in (("trace_source", trace_source), ("keep_plans", keep_plans),
                       ("prop_attn", prop_attn), ("count_prefix", count_prefix)):
        if flag is not None and not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if margin is not None:
        margin = check_margin(margin)
    adapter = find_adapter(model)
    method = _method(algo) if isinstance(algo, Algorithm) else \
        get_method(adapter.preset_for(model, algo))
    if ratio is None and r is None and tokens is None:
        ratio = DEFAULT_RATIO
    if merge_blocks is None:
        merge_blocks = adapter.merge_blocks_for(model, per_block=_per_block(ratio, r))
    if isinstance(algo, Algorithm) and options:
        raise TypeError(f"options {sorted(options)} are for registered algorithms; an "
                        "Algorithm instance is passed as it is")
    algorithm = algo if isinstance(algo, Algorithm) else method.build(**options)
    schedule = TokenSchedule(
        ratio=ratio, r=r, tokens=tokens, merge_blocks=merge_blocks,
        count_prefix=method.defaults.get("count_prefix", False) if count_prefix is None
        else count_prefix, one_shot=bool(algorithm.one_shot))
    check_padded_layout(padded_layout, algorithm, method.name)
    if metric not in ("keys", "hidden"):
        raise ValueError(f"metric must be 'keys' or 'hidden', got {metric!r}")
    if trace_source and not algorithm.traceable:
        raise ValueError(f"algorithm {method.name!r} mixes tokens instead of merging them, so "
                         "it has no sources to trace; use trace_source=False")
    config = MergeConfig(
        algo=method.name, algorithm=algorithm, schedule=schedule,
        margin=adapter.margin_for(model) if margin is None else margin,
        prop_attn=method.defaults.get("prop_attn", False) if prop_attn is None else prop_attn,
        metric=metric, trace_source=trace_source, keep_plans=keep_plans,
        padded_layout=padded_layout)
    earlier = [(module, patcher.patch_of(module).runtime.config)  # type: ignore[union-attr]
               for module in model.modules() if patcher.patch_of(module) is not None]
    patcher.clear_for(model)
    try:
        patcher.apply(model, adapter.patch(model, config))
    except BaseException:
        # Checks against the model itself (its depth, its token count) run as the adapter
        # patches it: a refused patch leaves the model as it was, earlier patches included.
        for module, kept in earlier:
            patcher.apply(module, find_adapter(module).patch(module, kept))
        raise
    return model


def _per_block(ratio: Any, r: Any) -> bool:
    """Whether the schedule is given block by block: ``ratio`` a sequence rather than one
    number, or ``r`` a per-block list (a 2-tuple is ``(r, inflection)``)."""
    if ratio is not None:
        return scalar(ratio) is None and not isinstance(ratio, (str, bytes))
    return r is not None and isinstance(check_r(r), list)


def _method(algorithm: Algorithm) -> Method:
    return Method(type(algorithm).__name__.lower(), lambda: algorithm, "a user's algorithm")


def unpatch(model: ModelT) -> ModelT:
    """Remove merging from ``model`` in place (a no-op on an unpatched model); returns it."""
    patcher.remove(model)
    return model


def merge_config(model: nn.Module) -> MergeConfig | None:
    """What ``pitome.patch`` decided for ``model``, or None if it is not patched."""
    patch = patcher.patch_of(model)
    return None if patch is None else patch.runtime.config


def merge_info(model: nn.Module) -> MergeInfo | None:
    """What the last forward pass of a patched model merged (the calling thread's last, or
    any thread's if this one ran none), or None before the first one."""
    patch = patcher.patch_of(model)
    return None if patch is None else patch.runtime.info()


def pooling_weights(model: nn.Module, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``B×T×1`` weights to mean-pool the last output of ``model``'s latest forward pass.

    A merged token weighs as many input tokens as it holds, padding weighs nothing, so
    ``(hidden * w).sum(1) / w.sum(1)`` is the mean over the input's real tokens. When that
    forward merged nothing, the weights are ``attention_mask`` (or ones if it is None).
    """
    info = merge_info(model)
    if info is not None and info.sizes is not None:
        weights = info.sizes.float()
        if info.padding is not None:
            weights = weights * info.padding.unsqueeze(-1)
        return weights
    if attention_mask is None:
        raise ValueError("nothing was merged; pass the attention mask to pool by")
    return attention_mask.unsqueeze(-1).float()
