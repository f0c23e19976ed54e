"""Measure the configurations of SPEC §10 (and the candidates for ``algo="pitome"``).

Runs a timm ViT with real weights over an ImageNet-style folder and prints, per merge
configuration and ratio: top-1, top-1 agreement with the unmerged model, mean KL(unmerged ‖
merged) with its standard error, and the paired difference in KL to ToMe (negative: closer
to the unmerged model than ToMe). Paired differences cancel most of the image-to-image
variance, so they separate configurations that the top-1 of a few hundred images cannot.

    python benchmarks/choose_default.py                       # shared ViT-Tiny, 500 images
    python benchmarks/choose_default.py --ratios 0.85 0.9 0.95 --json results.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import pitome
from pitome.models import create_timm_model
from pitome.tasks.image_classification import (kl_per_image, load_images, model_transform,
                                               predict, read_image_folder, score)

SHARED = Path(__file__).resolve().parents[2] / "shared"
REFERENCE = "tome"


@dataclass(frozen=True)
class Config:
    label: str
    algo: str
    options: dict


CONFIGS = [
    Config("pitome (default)", "pitome", {}),
    Config("paper PiToMe, no prop. attn", "pitome_paper", {}),
    Config("paper PiToMe, prop. attn", "pitome_paper", {"prop_attn": True}),
    Config("authors' DeiT, no prop. attn", "pitome_deit", {}),
    Config("authors' DeiT, prop. attn", "pitome_deit", {"prop_attn": True}),
    Config("BSM-PiToMe, prop. attn", "bsm_pitome", {"prop_attn": True}),
    Config("BSM-PiToMe, size-weighted energy", "bsm_pitome",
           {"prop_attn": True, "size_weighted": True}),
    Config("ToMe, authors' convention, no prop.", "tome_authors", {"prop_attn": False}),
    Config("ToMe, authors' convention, prop.", "tome_authors", {}),
    Config("ToMe, no prop. attn", "tome", {"prop_attn": False}),
    Config("ToMe, prop. attn", REFERENCE, {}),
]


@dataclass(frozen=True)
class Row:
    label: str
    algo: str
    ratio: float
    top1: float
    agreement: float
    kl: float
    kl_se: float
    kl_minus_tome: float
    kl_minus_tome_se: float


def standard_error(values: torch.Tensor) -> float:
    return values.std(unbiased=True).item() / math.sqrt(values.numel())


def measure(model, images, labels, reference, ratios, configs) -> list[Row]:
    rows = []
    for ratio in ratios:
        kls = {}
        results = []
        for config in configs:
            print(f"ratio {ratio}: {config.label}", file=sys.stderr, flush=True)
            pitome.patch(model, algo=config.algo, ratio=ratio, **config.options)
            logits = predict(model, images)
            kls[config.label] = kl_per_image(logits, reference)
            results.append((config, score(logits, labels, reference)))
        pitome.unpatch(model)
        tome = next(kls[c.label] for c in configs if c.algo == REFERENCE and not c.options)
        for config, result in results:
            difference = kls[config.label] - tome
            rows.append(Row(config.label, config.algo, ratio, result.top1, result.agreement,
                            result.kl, standard_error(kls[config.label]),
                            difference.mean().item(), standard_error(difference)))
    return rows


def format_rows(rows: list[Row], baseline_top1: float) -> str:
    lines = [f"unmerged top-1: {baseline_top1:.1f}%",
             "| ratio | configuration | algo | top-1 | agree | KL ± se | KL − ToMe ± se |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.ratio:g} | {row.label} | `{row.algo}` | {row.top1:.1f} | "
                     f"{row.agreement:.1f} | {row.kl:.3f} ± {row.kl_se:.3f} | "
                     f"{row.kl_minus_tome:+.3f} ± {row.kl_minus_tome_se:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    parser.add_argument("--checkpoint", type=Path, default=SHARED / "models" /
                        "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors")
    parser.add_argument("--images", type=Path, default=SHARED / "data" / "imagenet-sample")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.9])
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    args = parser.parse_args()

    model = create_timm_model(args.model, checkpoint=args.checkpoint)
    images, labels = load_images(read_image_folder(args.images), model_transform(model))
    reference = predict(model, images)
    baseline = score(reference, labels).top1
    rows = measure(model, images, labels, reference, args.ratios, CONFIGS)
    print(format_rows(rows, baseline))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "unmerged_top1": baseline,
                                         "rows": [asdict(row) for row in rows]}, indent=2))


if __name__ == "__main__":
    main()
