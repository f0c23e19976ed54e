"""Pictures of what merged with what: each merged group painted in its mean colour."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from .._optional import require
from ..api import merge_info, patch, unpatch

LABEL_HEIGHT = 16


def group_sources(model: torch.nn.Module, image: torch.Tensor, algo: str, ratio: float,
                  block: int = -1, **options) -> torch.Tensor:
    """``N``-long group id of every patch after ``block`` (negative counts from the end);
    ``-1`` for patches a pruning method discarded."""
    num_blocks = len(model.blocks)
    last = block % num_blocks
    patch(model, algo=algo, ratio=ratio, trace_source=True, merge_blocks=range(last + 1),
          **options)
    try:
        with torch.no_grad():
            model(image.unsqueeze(0))
        source = merge_info(model).source[0]
    finally:
        unpatch(model)
    prefix = model.num_prefix_tokens
    membership = source[prefix:, prefix:]
    groups = membership.argmax(dim=0)
    return torch.where(membership.sum(dim=0) > 0, groups, torch.full_like(groups, -1))


def paint_groups(picture: torch.Tensor, groups: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``3×H×W`` picture (0-1) with each group's patches filled by the group's mean colour
    and a dark line wherever neighbouring patches belong to different groups. Discarded
    patches (group ``-1``) are white."""
    channels, height, width = picture.shape
    rows, cols = grid
    ph, pw = height // rows, width // cols
    patches = picture[:, :rows * ph, :cols * pw].reshape(channels, rows, ph, cols, pw)
    patch_means = patches.mean(dim=(2, 4)).reshape(channels, -1)
    discarded = groups < 0
    groups = torch.where(discarded, groups.max() + 1, groups)
    count = int(groups.max()) + 1
    sums = torch.zeros(channels, count).index_add_(1, groups, patch_means)
    means = sums / torch.bincount(groups, minlength=count).clamp_min(1)
    means[:, groups[discarded]] = 1.0
    painted = means[:, groups].reshape(channels, rows, 1, cols, 1).expand(-1, -1, ph, -1, pw)
    painted = painted.reshape(channels, rows * ph, cols * pw).clone()
    ids = groups.reshape(rows, cols)
    for r in range(rows):
        for c in range(cols):
            if c + 1 < cols and ids[r, c] != ids[r, c + 1]:
                painted[:, r * ph:(r + 1) * ph, (c + 1) * pw - 1] = 0.1
            if r + 1 < rows and ids[r, c] != ids[r + 1, c]:
                painted[:, (r + 1) * ph - 1, c * pw:(c + 1) * pw] = 0.1
    return painted


def visualize(model: torch.nn.Module, image_path: str | Path, algos: Sequence[str], ratio: float,
              out: str | Path, block: int = -1, caption: str | None = None) -> Path:
    """Write a PNG: the image, then one panel per algorithm with its merged groups painted;
    ``caption`` (e.g. "RANDOM WEIGHTS") is written in red beside the input's label."""
    image_module = require("PIL.Image", "eval")
    from ..tasks.image_classification import model_transform

    transform = model_transform(model)
    with image_module.open(image_path) as handle:
        rgb = handle.convert("RGB")
        image = transform(rgb)
    config = transform.transforms[-1]
    mean = torch.as_tensor(config.mean).view(3, 1, 1)
    std = torch.as_tensor(config.std).view(3, 1, 1)
    picture = (image * std + mean).clamp(0, 1)
    grid = model.patch_embed.grid_size
    panels = [picture] + [paint_groups(picture, group_sources(model, image, algo, ratio, block),
                                       grid) for algo in algos]
    gap = torch.ones(3, picture.shape[1], 8)
    strip = torch.cat([part for panel in panels for part in (panel, gap)][:-1], dim=2)
    pixels = (strip.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    canvas = image_module.new("RGB", (pixels.shape[1], pixels.shape[0] + LABEL_HEIGHT), "white")
    canvas.paste(image_module.fromarray(pixels), (0, LABEL_HEIGHT))
    draw = require("PIL.ImageDraw", "eval").Draw(canvas)
    panel_width = picture.shape[2] + gap.shape[2]
    for index, label in enumerate(["input", *(f"{algo}, ratio {ratio:g}" for algo in algos)]):
        draw.text((index * panel_width + 4, 3), label, fill="black")
    if caption:  # beside the input's label, off the pictures
        draw.text((48, 3), caption, fill="red")
    out = Path(out)
    canvas.save(out)
    return out
