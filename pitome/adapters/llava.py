"""LLaVA-1.5: merging in the CLIP vision tower leaves fewer image tokens for the language model.

The processor expands each ``<image>`` into as many placeholder tokens as the unmerged tower
produces; :func:`fit_image_placeholders` shortens every run to the merged count and rebuilds
the attention mask. A patched model does this itself: :func:`fit_inside` wraps its
``forward`` (a pre-hook) and its ``generate``, so the processor's output goes in unchanged.
Fitting is idempotent, so inputs fitted by hand pass through as they are.

LLaVA-NeXT (``LlavaNextForConditionalGeneration``) is not supported: its processor sizes
each image's placeholders from the anyres tile grid and the unpadded base features, and the
model splits, unpads and re-arranges the tower's per-tile features on a 2-D grid (with a
newline token per row) before they meet the placeholders; merged tiles have no grid left
to unpad, so there is no token count the placeholders could be fitted to.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..core.schedule import token_counts
from ..runtime.patcher import Patch, patch_of

LLAVA_NEXT_REFUSAL = (
    "LlavaNextForConditionalGeneration (anyres tiles): its features are unpadded and "
    "re-arranged on each image's tile grid before they meet the placeholders, which merged "
    "tiles no longer fill; patch its vision tower (model.model.vision_tower) to measure the "
    "tower alone")

# Per-token inputs that must be cut where input_ids is, and the value that pads each.
PER_TOKEN_PADDING = {"labels": -100}


def feature_index(config: Any) -> int:
    """The tower hidden state LLaVA reads (``vision_feature_layer`` counted from 0, where 0
    is the embeddings), which is also the index of the first block whose output is unused."""
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError("pitome supports LLaVA models with one vision_feature_layer, got "
                         f"{layer!r}")
    return layer % (config.vision_config.num_hidden_layers + 1)


def read_blocks(config: Any) -> tuple[int, ...]:
    """The tower blocks whose output reaches the language model: those before
    :func:`feature_index` (the blocks from it on produce nothing it reads)."""
    return tuple(range(feature_index(config)))


def _tower_counts(model: nn.Module) -> tuple[list[int], int]:
    """Tokens entering every tower layer and leaving the last, and the hidden-state index used."""
    vision = model.config.vision_config
    index = feature_index(model.config)
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    patch = patch_of(model)
    merges = [0] * vision.num_hidden_layers if patch is None else \
        patch.runtime.config.schedule.plan(tokens, 1, vision.num_hidden_layers)
    return token_counts(tokens, merges), index


def image_tokens(model: nn.Module) -> int:
    """Image tokens per image that the language model of ``model`` (patched or not) sees."""
    counts, index = _tower_counts(model)
    drop_cls = model.config.vision_feature_select_strategy == "default"
    return counts[index] - int(drop_cls)


def unmerged_image_tokens(model: nn.Module) -> int:
    """Placeholder tokens per image as the processor expands them (the unmerged count)."""
    counts, _ = _tower_counts(model)
    return counts[0] - int(model.config.vision_feature_select_strategy == "default")


def _run_positions(image: torch.Tensor) -> torch.Tensor:
    """For a ``B×T`` bool mask of placeholders, each one's place in its run (0, 1, …)."""
    seen = image.long().cumsum(dim=1)
    starts = image & ~torch.nn.functional.pad(image, (1, 0))[:, :-1]
    before = torch.where(starts, seen - 1, torch.zeros_like(seen)).cummax(dim=1).values
    return seen - 1 - before


def _placeholder_layout(image: torch.Tensor, full: int, keep: int,
                        images: int | None) -> str:
    """``"unfitted"``, ``"fitted"`` or ``"none"``: how the placeholder runs are laid out."""
    total = int(image.sum())
    if total == 0:
        return "none"
    if images is not None:
        if total == images * full:
            return "unfitted"
        if total == images * keep:
            return "fitted"
        raise ValueError(f"the prompts hold {total} image placeholders for {images} images; "
                         f"the processor gives {full} per image (this patched model sees "
                         f"{keep}): pass the processor's output for this model unchanged")
    lengths = (_run_positions(image) + 1)[image & ~torch.nn.functional.pad(
        image, (0, 1))[:, 1:]]
    for size, layout in ((full, "unfitted"), (keep, "fitted")):
        if bool((lengths % size == 0).all()):
            return layout
    raise ValueError(f"placeholder runs are not multiples of {full} image tokens; pass the "
                     "processor's output for this model unchanged")


def fit_image_placeholders(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """``inputs`` (the processor's output) with every image's placeholders cut to the merged
    count and the attention mask rebuilt; ``labels`` and other per-token tensors are cut
    alike, everything else passes through unchanged.

    Padding keeps its side (left when any row starts with padding, as LLaVA processors pad
    for generation). Inputs already fitted, or holding no placeholders, are returned as
    they are (a copy of the mapping).

    Raises:
        ValueError: the placeholder count fits neither the unmerged nor the merged count.
    """
    fitted = dict(inputs)
    input_ids = inputs.get("input_ids")
    full, keep = unmerged_image_tokens(model), image_tokens(model)
    if input_ids is None or full == keep:
        return fitted
    pixels = inputs.get("pixel_values")
    images = pixels.shape[0] if isinstance(pixels, torch.Tensor) and pixels.dim() == 4 else None
    mask = inputs.get("attention_mask")
    per_token = isinstance(mask, torch.Tensor) and mask.shape == input_ids.shape
    real = mask.bool() if per_token else torch.ones_like(input_ids, dtype=torch.bool)
    image = (input_ids == model.config.image_token_id) & real
    if _placeholder_layout(image, full, keep, images) != "unfitted":
        return fitted
    if mask is not None and not per_token:
        # Generation with a static cache hands the prefill a mask already built for the
        # attention (4-D, as wide as the cache); such a prompt must arrive fitted.
        raise ValueError(f"attention_mask of shape {_shape(mask)} cannot be fitted to the "
                         f"merged image tokens: give the processor's per-token mask (shape "
                         f"{tuple(input_ids.shape)}, like input_ids), or inputs already "
                         "fitted with pitome.llava.fit_image_placeholders")
    kept = real & (~image | (_run_positions(image) % full < keep))
    lengths = kept.sum(dim=1)
    width = int(lengths.max())
    left = bool((~real[:, 0]).any())
    place = kept.long().cumsum(dim=1) - 1
    if left:
        place = place + (width - lengths).unsqueeze(1)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(place)
    rows, place = rows[kept], place[kept]
    pad_id = input_ids[~real][0] if bool((~real).any()) else 0

    def cut(values: torch.Tensor, fill: Any) -> torch.Tensor:
        out = torch.full((values.shape[0], width), fill, dtype=values.dtype,
                         device=values.device)
        out[rows, place] = values[kept]
        return out

    fitted["input_ids"] = cut(input_ids, pad_id)
    fitted["attention_mask"] = cut(torch.ones_like(input_ids) if mask is None else mask, 0)
    for name, value in inputs.items():
        if name not in ("input_ids", "attention_mask") and isinstance(value, torch.Tensor) \
                and value.shape == input_ids.shape:
            fitted[name] = cut(value, PER_TOKEN_PADDING.get(name, 0))
    return fitted


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__


class FitPlaceholders:
    """A forward pre-hook (``with_kwargs``) fitting a call's placeholders to the merged
    count; ``position_ids`` (given) are recomputed from the new mask and ``cache_position``
    (given) restarts where it started, when the prompt's length changes."""

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if kwargs.get("pixel_values") is None and (len(args) < 2 or args[1] is None):
            return None  # no image in this call (a decoding step): nothing to fit
        bound = inspect.signature(type(model).forward).bind(model, *args, **kwargs)
        named = dict(bound.arguments)
        named.pop("self", None)
        extra = named.pop(next((name for name, parameter in bound.signature.parameters.items()
                                if parameter.kind is parameter.VAR_KEYWORD), ""), {})
        named.update(extra)
        fitted = fit_with_positions(model, named)
        return (), fitted


def fit_with_positions(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`fit_image_placeholders`, with given ``position_ids`` and ``cache_position``
    made to match the fitted prompt."""
    before = inputs.get("input_ids")
    fitted = fit_image_placeholders(model, inputs)
    after = fitted.get("input_ids")
    if before is None or after is before:
        return fitted
    if fitted.get("position_ids") is not None:
        mask = fitted["attention_mask"]
        fitted["position_ids"] = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    if fitted.get("cache_position") is not None:
        start = fitted["cache_position"][0]
        fitted["cache_position"] = torch.arange(after.shape[1], device=after.device) + start
    return fitted


class FittedGenerate:
    """``generate`` of a patched LLaVA: the prompt's placeholders are fitted first, and the
    returned sequences start with the prompt as it was given, so ``output[:, len(prompt):]``
    are the new tokens as with an unpatched model."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self.model
        if args:
            kwargs = {"input_ids": args[0], **kwargs}
            args = args[1:]
        given = kwargs.get("input_ids")
        kwargs = fit_with_positions(model, kwargs)
        output = type(model).generate(model, *args, **kwargs)
        fitted = kwargs.get("input_ids")
        if given is None or fitted is given:
            return output
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        restored = torch.cat([given.to(sequences.device), sequences[:, fitted.shape[1]:]], dim=1)
        if isinstance(output, torch.Tensor):
            return restored
        output.sequences = restored
        return output


# Where transformers keeps a static cache's length between generate calls: 5.20 and later
# remember the longest length asked for, earlier versions keep the cache itself.
STATIC_CACHE_MEMORY = ("_previous_max_cache_length", "_cache")


def forget_static_cache(model: nn.Module) -> None:
    """Let the next ``generate(..., cache_implementation="static")`` size its cache to its
    own prompt. transformers keeps a static cache as long as the longest one asked for
    before (to spare a compiled decoding step its recompilation), so after a generate with
    the unmerged prompt a merged one would still read a cache of the unmerged length."""
    for name in STATIC_CACHE_MEMORY:
        model.__dict__.pop(name, None)


def fit_inside(model: nn.Module, patch: Patch) -> None:
    """Make the patched ``model``'s ``forward`` and ``generate`` fit placeholders themselves."""
    forget_static_cache(model)
    patch.hook(model.register_forward_pre_hook(FitPlaceholders(), with_kwargs=True))
    patch.set(model, "generate", FittedGenerate(model))
