"""LLaVA-1.5: merging in the CLIP vision tower leaves fewer image tokens for the language model.

The processor expands each ``<image>`` into as many placeholder tokens as the unmerged tower
produces; :func:`fit_image_placeholders` shortens every run to the merged count and rebuilds
the attention mask, so ``generate`` and ``forward`` see matching features and placeholders.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..core.schedule import token_counts
from ..runtime.patcher import patch_of


def _tower_counts(model: nn.Module) -> tuple[list[int], int]:
    """Tokens entering every tower layer and leaving the last, and the hidden-state index used."""
    config = model.config
    vision = config.vision_config
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError("fit_image_placeholders supports one vision_feature_layer, got "
                         f"{layer!r}")
    tokens = (vision.image_size // vision.patch_size) ** 2 + 1
    patch = patch_of(model)
    merges = [0] * vision.num_hidden_layers if patch is None else \
        patch.runtime.config.schedule.plan(tokens, 1, vision.num_hidden_layers)
    return token_counts(tokens, merges), layer % (vision.num_hidden_layers + 1)


def image_tokens(model: nn.Module) -> int:
    """Image tokens per image that the language model of ``model`` (patched or not) sees."""
    counts, index = _tower_counts(model)
    drop_cls = model.config.vision_feature_select_strategy == "default"
    return counts[index] - int(drop_cls)


def unmerged_image_tokens(model: nn.Module) -> int:
    """Placeholder tokens per image as the processor expands them (the unmerged count)."""
    counts, _ = _tower_counts(model)
    return counts[0] - int(model.config.vision_feature_select_strategy == "default")


def fit_image_placeholders(model: nn.Module, inputs: Mapping[str, torch.Tensor]
                           ) -> dict[str, torch.Tensor]:
    """``inputs`` (the processor's output) with every image's placeholders cut to the merged
    count and the attention mask rebuilt; other entries pass through unchanged.

    Padding keeps its side (left when any row starts with padding, as LLaVA processors pad
    for generation).
    """
    input_ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(input_ids)
    image_id = model.config.image_token_id
    full, keep = unmerged_image_tokens(model), image_tokens(model)
    rows = []
    for ids, row_mask in zip(input_ids.tolist(), mask.tolist()):
        kept, run = [], 0
        for token, real in zip(ids, row_mask):
            if not real:
                continue
            run = run + 1 if token == image_id else 0
            if token != image_id or (run - 1) % full < keep:
                kept.append(token)
        rows.append(kept)
    if any(sum(token == image_id for token in row) % keep for row in rows if keep):
        raise ValueError(f"placeholder runs are not multiples of {full} image tokens; pass the "
                         "processor's output for this model unchanged")
    left = bool((mask[:, 0] == 0).any())
    pad_id = int(input_ids[mask == 0][0]) if bool((mask == 0).any()) else 0
    width = max(map(len, rows))
    new_ids = torch.full((len(rows), width), pad_id, dtype=input_ids.dtype)
    new_mask = torch.zeros((len(rows), width), dtype=mask.dtype)
    for index, row in enumerate(rows):
        span = slice(width - len(row), width) if left else slice(0, len(row))
        new_ids[index, span] = torch.tensor(row, dtype=input_ids.dtype)
        new_mask[index, span] = 1
    fitted = dict(inputs)
    fitted["input_ids"] = new_ids.to(input_ids.device)
    fitted["attention_mask"] = new_mask.to(mask.device)
    return fitted
