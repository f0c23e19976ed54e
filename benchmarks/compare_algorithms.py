"""Every merging method on one model: top-1, agreement, KL and GFLOPs across ratios.

Writes a markdown table and an accuracy-vs-GFLOPs plot (docs/results.md, docs/results.png
by default) for the shared ViT-Tiny and the 500 shared ImageNet images, or any timm ViT and
ImageNet-style folder.

    python benchmarks/compare_algorithms.py
    python benchmarks/compare_algorithms.py --ratios 0.9 0.95 --algos tome pitome mctf
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import pitome
from pitome._optional import require
from pitome.analysis.flops import VitShape, vit_macs
from pitome.models import create_timm_model
from pitome.tasks.image_classification import (load_images, model_transform, predict,
                                               read_image_folder, score)

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
ALGOS = ["pitome", "pitome_paper", "tome", "tofu", "dct", "diffrate", "mctf", "crossget",
         "random", "prune"]
RATIOS = [0.9, 0.925, 0.95, 0.975]


@dataclass(frozen=True)
class Result:
    algo: str
    ratio: float
    gflops: float
    top1: float
    agreement: float
    kl: float


def measure(model, images, labels, reference, algos, ratios) -> list[Result]:
    shape = VitShape.of(model)
    num_patches = model.patch_embed.num_patches
    results = []
    for ratio in ratios:
        for algo in algos:
            print(f"ratio {ratio}: {algo}", file=sys.stderr, flush=True)
            torch.manual_seed(0)  # the random floor is reproducible
            pitome.patch(model, algo=algo, ratio=ratio)
            outcome = score(predict(model, images), labels, reference)
            counts = pitome.merge_info(model).token_counts
            results.append(Result(algo, ratio, vit_macs(shape, counts, num_patches) / 1e9,
                                  outcome.top1, outcome.agreement, outcome.kl))
    pitome.unpatch(model)
    return results


def markdown(results: list[Result], baseline_top1: float, baseline_gflops: float,
             model_name: str, images: int) -> str:
    ratios = sorted({r.ratio for r in results})
    algos = list(dict.fromkeys(r.algo for r in results))
    by_key = {(r.algo, r.ratio): r for r in results}
    header = "| algo | " + " | ".join(f"ρ={ratio:g}" for ratio in ratios) + " |"
    lines = [f"Model `{model_name}`, {images} images. Unmerged: top-1 {baseline_top1:.1f}%, "
             f"{baseline_gflops:.2f} GFLOPs (MACs). Each cell: top-1 / KL to the unmerged "
             "model; GFLOPs per ratio in the last row.", "", header,
             "|---" * (len(ratios) + 1) + "|"]
    for algo in algos:
        cells = [f"{by_key[algo, ratio].top1:.1f} / {by_key[algo, ratio].kl:.3f}"
                 for ratio in ratios]
        lines.append(f"| `{algo}` | " + " | ".join(cells) + " |")
    flops = [f"{by_key[algos[0], ratio].gflops:.2f}" for ratio in ratios]
    lines.append("| GFLOPs | " + " | ".join(flops) + " |")
    return "\n".join(lines)


def plot(results: list[Result], baseline_top1: float, baseline_gflops: float, path: Path) -> None:
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    pyplot = require("matplotlib.pyplot", "plot")
    figure, axis = pyplot.subplots(figsize=(7, 4.5))
    for algo in dict.fromkeys(r.algo for r in results):
        points = sorted((r.gflops, r.top1) for r in results if r.algo == algo)
        axis.plot(*zip(*points), marker="o", label=algo,
                  linewidth=2.5 if algo == "pitome" else 1.2)
    axis.scatter([baseline_gflops], [baseline_top1], marker="*", s=150, color="black",
                 label="unmerged", zorder=5)
    axis.set_xlabel("GFLOPs per image (MACs)")
    axis.set_ylabel("top-1 (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    parser.add_argument("--checkpoint", type=Path, default=SHARED / "models" /
                        "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors")
    parser.add_argument("--images", type=Path, default=SHARED / "data" / "imagenet-sample")
    parser.add_argument("--algos", nargs="+", default=ALGOS)
    parser.add_argument("--ratios", type=float, nargs="+", default=RATIOS)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    model = create_timm_model(args.model, checkpoint=args.checkpoint)
    images, labels = load_images(read_image_folder(args.images), model_transform(model))
    reference = predict(model, images)
    baseline_top1 = score(reference, labels).top1
    shape = VitShape.of(model)
    tokens = model.patch_embed.num_patches + model.num_prefix_tokens
    baseline_gflops = vit_macs(shape, [tokens] * (shape.num_blocks + 1),
                               model.patch_embed.num_patches) / 1e9
    results = measure(model, images, labels, reference, args.algos, args.ratios)
    table = markdown(results, baseline_top1, baseline_gflops, args.model, len(labels))
    print(table)
    args.out.with_suffix(".json").write_text(json.dumps(
        {"model": args.model, "unmerged_top1": baseline_top1, "unmerged_gflops": baseline_gflops,
         "rows": [asdict(r) for r in results]}, indent=2))
    args.out.with_suffix(".md").write_text(
        "# Every method on one model\n\nGenerated by `python benchmarks/compare_algorithms.py` "
        "(CPU, fp32); what each method is: [baselines.md](baselines.md).\n\n" + table
        + f"\n\n![top-1 against GFLOPs]({args.out.with_suffix('.png').name})\n")
    plot(results, baseline_top1, baseline_gflops, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
