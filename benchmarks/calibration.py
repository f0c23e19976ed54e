"""Calibrated against uniform and simple fixed schedules at equal FLOPs (docs/calibration.md).

ViT-Tiny (the shared weights) on the shared ImageNet sample, sorted by class and split
into two halves that span the same classes (even and odd positions). For every budget (the
FLOPs of uniform PiToMe at each keep ratio) and algorithm: calibrate on images of the even
half, then score every schedule (the four simple shapes at the budget and the calibrated
one) on all of the odd half: KL(unmerged ‖ merged) per image and top-1, mean ± standard
error over images. Prints a table and writes JSON.

    OMP_NUM_THREADS=1 python benchmarks/calibration.py --out docs/calibration-vit-tiny.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch

import pitome
from pitome.calibration import calibrate, uniform_flops
from pitome.models import create_timm_model
from pitome.tasks.image_classification import (class_balanced_halves, evenly_spread,
                                               kl_per_image, load_images, model_transform,
                                               predict, read_image_folder)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
PROGRESS = importlib.util.find_spec("tqdm") is not None


def mean_and_error(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def score(model, algo: str, r, images, labels, reference) -> dict:
    pitome.unpatch(model)
    if algo != "none":
        pitome.patch(model, algo, r=list(r))
    logits = predict(model, images, batch_size=50)
    pitome.unpatch(model)
    kls = kl_per_image(logits, reference)
    kl, kl_error = mean_and_error(kls)
    correct = (logits.argmax(-1) == labels).double() * 100
    top1, top1_error = mean_and_error(correct)
    return {"kl": kl, "kl_se": kl_error, "top1": top1, "top1_se": top1_error,
            "kl_per_image": [float(f"{value:.5g}") for value in kls.tolist()]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "data" / "imagenet-sample"))
    parser.add_argument("--checkpoint", default=str(SHARED / "models" / f"{MODEL}.safetensors"))
    parser.add_argument("--ratios", default="0.85,0.9,0.95",
                        help="budgets: the FLOPs of uniform PiToMe at these keep ratios")
    parser.add_argument("--algos", default="pitome,tome")
    parser.add_argument("--calibration-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-evaluations", type=int, default=120)
    parser.add_argument("--rates", default="probe",
                        help="comma-separated: how the search measures each block's harm "
                             "per MAC (probe, gradient, gradient-then-probe); with several, "
                             "each calibrated row is named by its rates")
    parser.add_argument("--device", default="cpu", help="where the model runs (cpu, cuda)")
    parser.add_argument("--out", help="JSON output")
    parser.add_argument("--table-from", metavar="JSON", help="print the table of a saved run")
    args = parser.parse_args()
    if args.table_from:
        saved = json.loads(Path(args.table_from).read_text())
        print(table(saved["rows"], saved["unmerged_top1"]))
        return 0
    if args.out and Path(args.out).exists():
        sys.exit(f"{args.out} exists; give another --out path")
    started = time.perf_counter()

    rates_list = args.rates.split(",")
    model = create_timm_model(MODEL, checkpoint=args.checkpoint).to(args.device)
    transform = model_transform(model)
    calibration_half, evaluation_half = class_balanced_halves(read_image_folder(args.data))
    calibration_images, _ = load_images(evenly_spread(calibration_half,
                                                      args.calibration_images), transform)
    images, labels = load_images(evaluation_half, transform)
    reference = predict(model, images, batch_size=50)
    unmerged_top1 = (reference.argmax(-1) == labels).double().mean().item() * 100
    print(f"{MODEL}: calibrate on {calibration_images.shape[0]} images of the even half, "
          f"evaluate on {images.shape[0]} of the odd half; unmerged top-1 {unmerged_top1:.1f}",
          file=sys.stderr)

    rows, budgets = [], {}
    for ratio in [float(text) for text in args.ratios.split(",")]:
        budget = uniform_flops(model, ratio, "pitome")
        budgets[ratio] = budget
        for algo in args.algos.split(","):
            for index, rates in enumerate(rates_list):
                result = calibrate(model, calibration_images, algo, budget,
                                   batch_size=args.batch_size,
                                   max_evaluations=args.max_evaluations,
                                   progress=PROGRESS, name=MODEL, rates=rates)
                print(f"rho {ratio} {algo} {rates}: {result.evaluations} evaluations in "
                      f"{result.seconds:.0f} s, start {result.start}, r {result.r}",
                      file=sys.stderr)
                schedules = {} if index else dict(result.shapes)  # the same for every rates
                calibrated = "calibrated" if len(rates_list) == 1 else f"calibrated ({rates})"
                schedules[calibrated] = {"r": result.r, "flops": result.flops}
                for name, shape in schedules.items():
                    rows.append({"ratio": ratio, "budget": budget, "algo": algo,
                                 "schedule": name, "r": shape["r"], "flops": shape["flops"],
                                 "calibration_loss": result.loss if name == calibrated else
                                 shape["loss"],
                                 **score(model, algo, shape["r"], images, labels, reference)})
                rows[-1].update(calibration_seconds=result.seconds,
                                evaluations=result.evaluations, rates=rates)
    print(table(rows, unmerged_top1))
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"model": MODEL, "calibration_images": calibration_images.shape[0],
             "evaluation_images": images.shape[0], "unmerged_top1": unmerged_top1,
             "max_evaluations": args.max_evaluations, "rates": rates_list,
             "device": str(args.device),
             "budgets": budgets, "rows": rows,
             "seconds": time.perf_counter() - started, "torch": torch.__version__},
            indent=1) + "\n")
    return 0


def table(rows: list[dict], unmerged_top1: float) -> str:
    """Markdown: every schedule's KL and top-1, its KL over uniform ToMe's at the budget,
    and its KL minus uniform's of the same algorithm, paired over images (± SE)."""
    lines = [f"unmerged top-1 {unmerged_top1:.1f}; KL to the unmerged model and top-1 on the "
             "evaluation half, mean ± standard error over images",
             "| budget (uniform ρ) | FLOPs | algo | schedule | KL | top-1 % | × uniform ToMe KL "
             "| KL − uniform's (paired) |",
             "|---|---|---|---|---|---|---|---|"]

    def find(row: dict, algo: str, schedule: str) -> dict | None:
        return next((other for other in rows if other["ratio"] == row["ratio"]
                     and other["algo"] == algo and other["schedule"] == schedule), None)

    for row in rows:
        tome, uniform = find(row, "tome", "uniform"), find(row, row["algo"], "uniform")
        difference = torch.tensor(row["kl_per_image"]) - torch.tensor(uniform["kl_per_image"])
        mean, error = mean_and_error(difference)
        lines.append(f"| {row['ratio']:g} ({row['budget']:.3f}) | {row['flops']:.3f} | "
                     f"{row['algo']} | {row['schedule']} | {row['kl']:.4f} ± {row['kl_se']:.4f} | "
                     f"{row['top1']:.1f} ± {row['top1_se']:.1f} | "
                     f"{row['kl'] / tome['kl'] if tome else float('nan'):.2f} | "
                     f"{mean:+.4f} ± {error:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
