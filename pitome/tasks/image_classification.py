"""Image classification: reading an ImageNet-style folder and scoring a model on it."""

from __future__ import annotations

import csv
import sys
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
    (columns ``index``, ``synset``, one row for every folder) or, failing that, the sorted
    folder names. A bad row is an error naming its file and line.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    labels_file = root / "labels.tsv"
    if labels_file.is_file():
        images = [LabelledImage(root / row["path"], class_index(row["label"], labels_file, line))
                  for line, row in read_tsv(labels_file, ("path", "label"))]
        if not images:
            raise ValueError(f"{labels_file} lists no images")
        missing = [item.path for item in images if not item.path.is_file()]
        if missing:
            raise FileNotFoundError(f"{labels_file} lists {len(missing)} file(s) that do not "
                                    f"exist, e.g. {missing[0]}")
        return images
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    classes_file = root / "classes.tsv"
    if classes_file.is_file():
        index = {row["synset"]: class_index(row["index"], classes_file, line)
                 for line, row in read_tsv(classes_file, ("index", "synset"))}
        unlisted = [folder.name for folder in folders if folder.name not in index]
        if unlisted:
            raise ValueError(f"{classes_file} has no row for {len(unlisted)} folder(s) of "
                             f"{root}: {', '.join(unlisted[:5])}{', ...' if len(unlisted) > 5 else ''}"
                             "; add them, or move them out of the folder")
    else:
        index = {folder.name: i for i, folder in enumerate(folders)}
    images = [LabelledImage(path, index[folder.name]) for folder in folders
              for path in sorted(folder.iterdir()) if path.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise ValueError(f"no images found under {root}")
    return images


def class_balanced_halves(images: list[LabelledImage]) -> tuple[list[LabelledImage],
                                                                  list[LabelledImage]]:
    """Two halves of ``images`` that span the same classes: sorted by label, the even
    positions and the odd ones (an image folder is usually sorted by class, so its first
    half holds the first half of the classes only)."""
    ordered = sorted(images, key=lambda item: (item.label, str(item.path)))
    return ordered[0::2], ordered[1::2]


def evenly_spread(images: list[LabelledImage], count: int) -> list[LabelledImage]:
    """``count`` of ``images`` at evenly spaced positions (all of them if there are fewer):
    of a label-sorted list, a sample spread over its classes."""
    if count >= len(images):
        return list(images)
    return [images[(index * len(images)) // count] for index in range(count)]


def read_tsv(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a tab-separated file with a header, each with its line number; the header
    must name ``columns`` and every row must fill them."""
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = set(columns) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}:1: the header needs the columns {', '.join(columns)} "
                             f"(tab-separated); it has {', '.join(reader.fieldnames or ()) or 'none'}")
        rows = []
        for row in reader:
            if any(not (row.get(column) or "").strip() for column in columns):
                raise ValueError(f"{path}:{reader.line_num}: the row needs a value in each of "
                                 f"{', '.join(columns)}")
            rows.append((reader.line_num, row))
    return rows


def class_index(text: str, path: Path, line: int) -> int:
    """A class index read from ``path`` at ``line``: a whole number ≥ 0."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{path}:{line}: class index {text!r} is not a whole number") from None
    if value < 0:
        raise ValueError(f"{path}:{line}: class index {value} is negative")
    return value


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


def load_readable_images(images: list[LabelledImage], transform) -> torch.Tensor:
    """The readable ones of ``images`` preprocessed into one ``N×3×H×W`` tensor; each
    unreadable one is reported on stderr, and none readable is an error."""
    tensors = []
    for item in images:
        image = decode(item, transform)
        if isinstance(image, str):
            print(f"pitome: skipped {item.path} ({image})", file=sys.stderr)
        else:
            tensors.append(image)
    if not tensors:
        raise ValueError(f"none of the {len(images)} images could be read")
    return torch.stack(tensors)


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


def decode(item: LabelledImage, transform) -> torch.Tensor | str:
    """The preprocessed image, or the reason it could not be read."""
    from .runner import open_rgb

    picture = open_rgb(item.path)
    return picture if isinstance(picture, str) else transform(picture)


def class_count(model: nn.Module) -> int | None:
    count = getattr(model, "num_classes", None)
    if isinstance(count, int) and count > 0:
        return count
    head = getattr(model, "head", None)
    return head.out_features if isinstance(head, nn.Linear) else None


def check_labels(items: list[LabelledImage], model: nn.Module) -> None:
    """Refuse labels the model cannot predict before an hour is spent on them."""
    count = class_count(model)
    bad = [item for item in items if item.label < 0 or count is not None and item.label >= count]
    if bad:
        raise ValueError(f"{len(bad)} label(s) outside the model's {count} classes, e.g. "
                         f"{bad[0].label} for {bad[0].path}")


class ImageNetEvaluation:
    """Top-1, top-5, GFLOPs and img/s of one model on a labelled image folder, per cell.

    Decoded images are kept in memory across cells when there are at most ``cache_limit``
    of them; an image that fails to decode is reported once and left out of every cell.
    """

    columns = (("top1", "top-1 %", ".2f"), ("top5", "top-5 %", ".2f"),
               ("gflops", "GFLOPs", ".3f"), ("images_per_second", "img/s", ".1f"),
               ("examples", "images", "d"))
    metric, metric_label = "top1", "top-1 accuracy (%)"

    def __init__(self, model: nn.Module, items: list[LabelledImage], processes,
                 batch_size: int = 64, cache_limit: int = 2000, dtype: torch.dtype | None = None,
                 title: str = "", setup: dict | None = None):
        check_labels(items, model)
        self.title, self.setup = title, {"images": len(items), **(setup or {})}
        self.model, self.items, self.processes = model, items, processes
        self.batch_size, self.dtype = batch_size, dtype
        self.transform = model_transform(model)
        self.cache: dict[int, torch.Tensor | str] | None = {} if len(items) <= cache_limit else None
        self.reported: set[int] = set()

    def _image(self, index: int) -> torch.Tensor | str:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        image = decode(self.items[index], self.transform)
        if self.cache is not None:
            self.cache[index] = image
        if isinstance(image, str) and index not in self.reported:
            self.reported.add(index)
            print(f"pitome: skipped {self.items[index].path} ({image})", file=sys.stderr)
        return image

    def __call__(self, cell) -> dict:
        from ..analysis.flops import flops
        from .runner import apply_cell, evaluate_shard

        apply_cell(self.model, cell)
        result = evaluate_shard(self.processes, self.items, self.batch_size, cell.key, self._step)
        if result is None:
            return {}
        records = result.records
        top1 = 100.0 * sum(label == best[0] for _, label, best in records) / len(records)
        top5 = 100.0 * sum(label in best for _, label, best in records) / len(records)
        example = torch.zeros(1, 3, *self.model.patch_embed.img_size, device=self.processes.device)
        with self._autocast():
            gflops = flops(self.model, example).total_macs / 1e9
        return {"top1": top1, "top5": top5, "gflops": gflops,
                "images_per_second": result.examples_per_second, "examples": len(records),
                "skipped": result.skipped}

    def _autocast(self):
        return torch.autocast(self.processes.device.type, self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    def _step(self, indices: list[int], stopwatch):
        from .runner import Batch

        images = {index: self._image(index) for index in indices}
        readable = [index for index, image in images.items() if not isinstance(image, str)]
        skipped = [str(self.items[i].path) for i in indices if i not in readable]
        if not readable:
            return Batch([], skipped)
        batch = torch.stack([images[i] for i in readable]).to(self.processes.device)
        with torch.no_grad(), self._autocast():
            logits = stopwatch(lambda: self.model(batch), len(readable))
        top5 = logits.float().topk(5, dim=-1).indices.cpu().tolist()
        return Batch([(i, self.items[i].label, best) for i, best in zip(readable, top5)], skipped)
