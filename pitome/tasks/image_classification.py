"""Image classification: reading an ImageNet-style folder and scoring a model on it."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._optional import require

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class LabelledImage:
    path: Path
    label: int


def read_image_folder(root: str | Path) -> list[LabelledImage]:
    """Images and class indices of ``root``.

    Uses ``root/labels.tsv`` (columns ``path``, ``label``) when present; otherwise an
    ImageFolder layout (``SYNSET/file``), with class indices from ``root/classes.tsv``
    (columns ``index``, ``synset``) or, failing that, the sorted folder names.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    labels_file = root / "labels.tsv"
    if labels_file.is_file():
        with labels_file.open(newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        missing = {"path", "label"} - set(rows[0] if rows else {})
        if missing:
            raise ValueError(f"{labels_file} needs the columns path and label")
        return [LabelledImage(root / row["path"], int(row["label"])) for row in rows]
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    classes_file = root / "classes.tsv"
    if classes_file.is_file():
        with classes_file.open(newline="") as handle:
            index = {row["synset"]: int(row["index"])
                     for row in csv.DictReader(handle, delimiter="\t")}
    else:
        index = {folder.name: i for i, folder in enumerate(folders)}
    images = [LabelledImage(path, index[folder.name]) for folder in folders if folder.name in index
              for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise ValueError(f"no images found under {root}")
    return images


def model_transform(model: nn.Module):
    """The model's own evaluation preprocessing (timm data config: resize, crop, normalise)."""
    timm_data = require("timm.data", "timm")
    config = timm_data.resolve_data_config({}, model=model)
    return timm_data.create_transform(**config, is_training=False)


def load_images(images: list[LabelledImage], transform) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and preprocess every image into one ``N×3×H×W`` tensor plus labels."""
    image_module = require("PIL.Image", "eval")
    tensors = []
    for item in images:
        with image_module.open(item.path) as image:
            tensors.append(transform(image.convert("RGB")))
    return torch.stack(tensors), torch.tensor([item.label for item in images])


def batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, x.shape[0], batch_size):
        yield x[start:start + batch_size]


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, batch_size: int = 50) -> torch.Tensor:
    """Float32 logits of ``model`` for every image."""
    device = next(model.parameters()).device
    return torch.cat([model(chunk.to(device)).float().cpu() for chunk in batches(images, batch_size)])


@dataclass(frozen=True)
class ClassificationScore:
    top1: float
    top5: float
    agreement: float | None = None
    kl: float | None = None


def score(logits: torch.Tensor, labels: torch.Tensor,
          reference: torch.Tensor | None = None) -> ClassificationScore:
    """Top-1/top-5 accuracy (%), and against ``reference`` logits (the unmerged model) the
    top-1 agreement (%) and mean KL(reference ‖ logits)."""
    top5 = logits.topk(5, dim=-1).indices
    top1 = 100.0 * (top5[:, 0] == labels).float().mean().item()
    top5_acc = 100.0 * (top5 == labels[:, None]).any(-1).float().mean().item()
    if reference is None:
        return ClassificationScore(top1, top5_acc)
    agreement = 100.0 * (reference.argmax(-1) == top5[:, 0]).float().mean().item()
    kl = kl_per_image(logits, reference).mean().item()
    return ClassificationScore(top1, top5_acc, agreement, kl)


def kl_per_image(logits: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(reference) ‖ softmax(logits))`` of every row, in nats."""
    return F.kl_div(logits.float().log_softmax(-1), reference.float().log_softmax(-1),
                    log_target=True, reduction="none").sum(-1)
