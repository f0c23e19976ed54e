"""Image-text retrieval (Flickr30k / COCO Karpathy splits): recall at 1, 5, 10 both ways."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .._optional import require


@dataclass(frozen=True)
class RetrievalSet:
    """Images and captions; ``caption_image[j]`` is the image caption ``j`` describes."""

    images: list[Path]
    captions: list[str]
    caption_image: list[int]


def read_karpathy(annotations: str | Path, image_root: str | Path, split: str = "test",
                  limit: int | None = None) -> RetrievalSet:
    """Karpathy's ``dataset_*.json`` (``{"images": [{filename, split, sentences}]}``) or a
    list of ``{"image": path, "caption": str | [str]}`` (the LAVIS/BLIP annotation files)."""
    annotations, image_root = Path(annotations), Path(image_root)
    if not annotations.is_file():
        raise FileNotFoundError(f"no annotation file at {annotations}")
    if not image_root.is_dir():
        raise FileNotFoundError(f"no image folder at {image_root}")
    data = json.loads(annotations.read_text())
    if isinstance(data, dict) and "images" in data:
        entries = [(Path(entry.get("filepath", "")) / entry["filename"],
                    [sentence["raw"] for sentence in entry["sentences"]])
                   for entry in data["images"] if entry.get("split", split) == split]
    elif isinstance(data, list):
        entries = [(Path(entry["image"]), entry["caption"] if isinstance(entry["caption"], list)
                    else [entry["caption"]]) for entry in data]
    else:
        raise ValueError(f"{annotations} is neither a Karpathy split file nor a list of "
                         "{image, caption} entries")
    entries = entries[:limit] if limit is not None else entries
    if not entries:
        raise ValueError(f"{annotations} has no images in split {split!r}")
    images, captions, owners = [], [], []
    for index, (path, sentences) in enumerate(entries):
        images.append(image_root / path)
        captions += [sentence.strip() for sentence in sentences]
        owners += [index] * len(sentences)
    return RetrievalSet(images, captions, owners)


def recall_at(similarity: torch.Tensor, caption_image: list[int],
              ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall (%) from an images×captions similarity matrix.

    Image→text: an image is found at K when any of its captions ranks in its top K.
    Text→image: a caption is found at K when its image ranks in the caption's top K.
    ``rsum`` adds all six numbers (the paper's retrieval metric).
    """
    owners = torch.tensor(caption_image)
    images = similarity.shape[0]
    order = similarity.argsort(dim=1, descending=True)
    is_own = owners[order] == torch.arange(images)[:, None]
    image_rank = is_own.float().argmax(dim=1)  # first of its captions in the ranking
    caption_order = similarity.t().argsort(dim=1, descending=True)
    caption_rank = (caption_order == owners[:, None]).float().argmax(dim=1)
    result = {}
    for k in ks:
        result[f"i2t_r{k}"] = 100.0 * (image_rank < k).float().mean().item()
    for k in ks:
        result[f"t2i_r{k}"] = 100.0 * (caption_rank < k).float().mean().item()
    result["rsum"] = sum(result.values())
    return result


class RetrievalEvaluation:
    """Recall of a dual encoder (CLIP, or BLIP's contrastive heads) with its image tower merged.

    Text embeddings do not depend on the merge and are computed once; each cell embeds the
    images (sharded over processes) and ranks. Unreadable images are reported and skipped
    with their captions.
    """

    columns = (("i2t_r1", "i2t R@1", ".1f"), ("i2t_r5", "R@5", ".1f"), ("i2t_r10", "R@10", ".1f"),
               ("t2i_r1", "t2i R@1", ".1f"), ("t2i_r5", "R@5", ".1f"), ("t2i_r10", "R@10", ".1f"),
               ("rsum", "rsum", ".1f"), ("gflops", "image GFLOPs", ".3f"),
               ("images_per_second", "img/s", ".1f"))
    metric, metric_label = "rsum", "recall sum"

    def __init__(self, model: nn.Module, image_processor, tokenizer, data: RetrievalSet,
                 processes, batch_size: int = 32, dtype: torch.dtype | None = None,
                 title: str = "", setup: dict | None = None) -> None:
        self.kind = "blip" if hasattr(model, "vision_proj") else "clip"
        if self.kind == "clip" and not hasattr(model, "get_image_features"):
            raise ValueError(f"{type(model).__name__} is neither a CLIP-style dual encoder nor "
                             "BlipForImageTextRetrieval")
        self.model, self.image_processor, self.tokenizer = model, image_processor, tokenizer
        self.data, self.processes, self.batch_size, self.dtype = data, processes, batch_size, dtype
        self.title, self.setup = title, {"images": len(data.images), **(setup or {})}
        self.text_features: torch.Tensor | None = None  # merging leaves them as they are

    def _autocast(self):
        return torch.autocast(self.processes.device.type, self.dtype or torch.float32,
                              enabled=self.dtype is not None)

    @torch.no_grad()
    def _embed_texts(self) -> torch.Tensor:
        features = []
        for start in range(0, len(self.data.captions), self.batch_size):
            inputs = self.tokenizer(self.data.captions[start:start + self.batch_size],
                                    padding=True, truncation=True, max_length=64,
                                    return_tensors="pt").to(self.processes.device)
            with self._autocast():
                if self.kind == "clip":
                    out = self.model.get_text_features(**inputs)
                    out = getattr(out, "pooler_output", out)
                else:
                    hidden = self.model.text_encoder(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"])
                    out = self.model.text_proj(hidden.last_hidden_state[:, 0])
            features.append(nn.functional.normalize(out.float(), dim=-1).cpu())
        return torch.cat(features)

    def _embed_images(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast():
            if self.kind == "clip":
                out = self.model.get_image_features(pixel_values=pixels)
                out = getattr(out, "pooler_output", out)
            else:
                hidden = self.model.vision_model(pixel_values=pixels).last_hidden_state
                out = self.model.vision_proj(hidden[:, 0])
        return nn.functional.normalize(out.float(), dim=-1).cpu()

    def _pixels(self, paths: list[Path]) -> tuple[torch.Tensor | None, list[bool]]:
        from .runner import read_pictures

        pictures, readable = read_pictures(paths)
        if not pictures:
            return None, readable
        pixels = self.image_processor(images=pictures, return_tensors="pt")["pixel_values"]
        return pixels.to(self.processes.device), readable

    def __call__(self, cell) -> dict:
        from ..analysis.flops import counted_flops
        from .runner import apply_cell, evaluate_shard

        if self.text_features is None:
            self.text_features = self._embed_texts()
        apply_cell(self.model, cell)
        result = evaluate_shard(self.processes, self.data.images, self.batch_size, cell.key,
                                self._step)
        if result is None:
            return {}
        found = {index: row for row, (index, _) in enumerate(result.records)}
        keep_caption = [owner in found for owner in self.data.caption_image]
        owners = [found[owner] for owner in self.data.caption_image if owner in found]
        image_features = torch.stack([features for _, features in result.records])
        similarity = image_features @ self.text_features[keep_caption].t()
        with self._autocast():
            gflops = counted_flops(self._embed_images,
                                   result.example.to(self.processes.device)) / 2e9
        return {**recall_at(similarity, owners), "gflops": gflops,
                "images_per_second": result.examples_per_second, "images": len(found),
                "skipped": len(result.skipped)}

    def _step(self, indices: list[int], stopwatch):
        from .runner import Batch

        paths = [self.data.images[i] for i in indices]
        pixels, readable = self._pixels(paths)
        skipped = [str(path) for path, ok in zip(paths, readable) if not ok]
        if pixels is None:
            return Batch([], skipped)
        features = stopwatch(lambda: self._embed_images(pixels), pixels.shape[0])
        kept = [index for index, ok in zip(indices, readable) if ok]
        return Batch(list(zip(kept, features)), skipped, pixels[:1].cpu())


def build_retrieval_evaluation(args, processes, dtype) -> RetrievalEvaluation:
    """The ``pitome eval retrieval`` task from its command-line arguments."""
    transformers = require("transformers", "hf")
    config = transformers.AutoConfig.from_pretrained(args.model)
    loader = transformers.BlipForImageTextRetrieval if config.model_type == "blip" \
        else transformers.AutoModel
    model = loader.from_pretrained(args.model).to(processes.device).eval()
    image_processor = transformers.AutoImageProcessor.from_pretrained(args.model)
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
    data = read_karpathy(args.data, args.images, args.split, args.limit)
    title = (f"{args.model} on {len(data.images)} images / {len(data.captions)} captions of "
             f"{Path(args.data).name} ({args.split}); GFLOPs = image-tower multiply-"
             "accumulates per image")
    return RetrievalEvaluation(model, image_processor, tokenizer, data, processes,
                               args.batch_size, dtype, title, {"split": args.split})
