"""``pitome calibrate``: a per-block merge schedule for a FLOPs budget, found on unlabeled
images (docs/calibration.md), written as JSON for ``pitome.patch(model, algo, r=...)``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_common import (HelpFormatter, UsageError, add_device, add_weights, algorithm_list,
                         at_least, ratio, weights_label)

DTYPES = ("fp32", "bf16", "fp16")


def add_calibrate_parser(commands: argparse._SubParsersAction,
                         shared: argparse.ArgumentParser) -> None:
    command = commands.add_parser(
        "calibrate", parents=[shared], formatter_class=HelpFormatter,
        help="find per-block merge counts for a FLOPs budget on unlabeled images",
        description="Searches the tokens each block merges so that the merged model's "
                    "predictions stay closest (KL) to the unmerged model's, at no more than "
                    "the budget's FLOPs. Labels are not read: the images come from the even "
                    "positions of the folder sorted by class (every class range, half the "
                    "images), leaving the odd ones to evaluate on.")
    command.add_argument("--data", "--images-from", dest="data", required=True,
                         help="an ImageNet-style image folder (labels only order it)")
    command.add_argument("--model", default="vit_tiny_patch16_224.augreg_in21k_ft_in1k",
                         help="timm model name")
    add_weights(command, random_by_default=False)
    command.add_argument("--algo", "--algos", dest="algo", default="pitome",
                         help="the algorithm to calibrate for (`pitome algorithms`)")
    budget = command.add_mutually_exclusive_group()
    budget.add_argument("--flops", type=float,
                        help="the budget as a fraction of the unmerged model's FLOPs")
    budget.add_argument("--like-ratio", type=ratio, default=0.9,
                        help="the budget: the FLOPs of a uniform keep ratio (ignored with "
                             "--flops)")
    command.add_argument("--num-images", dest="images", type=at_least(2), default=64,
                         help="calibration images, spread over the classes")
    command.add_argument("--batch-size", "--batch", dest="batch_size", type=at_least(1),
                         default=16, help="images per forward")
    command.add_argument("--holdout", type=float, default=0.25,
                         help="fraction of the batches held out to choose the result by")
    command.add_argument("--max-evaluations", type=at_least(1), default=150,
                         help="forward passes over the calibration images to spend")
    add_device(command)
    command.add_argument("--dtype", choices=DTYPES, default="fp32", help="autocast precision")
    command.add_argument("--out", help="output JSON (default: calibration-ALGO.json)")
    command.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from .bench import pick_device
    from .calibration import calibrate, uniform_flops
    from .models import create_timm_model
    from .tasks.image_classification import (class_balanced_halves, evenly_spread,
                                             load_readable_images, model_transform,
                                             read_image_folder)

    algo = algorithm_list(args.algo)
    if len(algo) != 1:
        raise UsageError(f"--algo takes one algorithm, got {args.algo!r}")
    out = Path(args.out or f"calibration-{algo[0]}.json")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; give --overwrite to replace it, or another --out")
    weights = weights_label(args)
    device = pick_device(args.device)
    model = create_timm_model(args.model, checkpoint=args.checkpoint,
                              pretrained=args.pretrained).to(device)
    calibration_half, _ = class_balanced_halves(read_image_folder(args.data))
    images = load_readable_images(evenly_spread(calibration_half, args.images),
                                  model_transform(model))
    budget = args.flops if args.flops is not None else uniform_flops(model, args.like_ratio,
                                                                     algo[0])
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    result = calibrate(model, images, algo[0], budget, holdout=args.holdout,
                       max_evaluations=args.max_evaluations, batch_size=args.batch_size,
                       dtype=dtype, progress=True, name=args.model)
    result.save(out, overwrite=args.overwrite)
    if weights == "random weights":
        print("RANDOM WEIGHTS, the schedule means nothing", file=sys.stderr)
    print(summary(result))
    print(f"wrote {out}; apply with pitome.patch(model, {algo[0]!r}, r={result.r})",
          file=sys.stderr)
    return 0


def summary(result) -> str:
    """The simple shapes and the calibrated schedule, with FLOPs and losses, as a table."""
    def row(name: str, r, flops: float, loss: float, held: float | None) -> str:
        held_text = "-" if held is None else f"{held:.4f}"
        return f"{name:<12} {flops:>6.3f} {loss:>9.4f} {held_text:>9}  {list(r)}"

    lines = [f"{result.model}, {result.algo}, budget {result.budget:.4f} of the unmerged "
             f"FLOPs, objective {result.objective}, {result.examples.get('search', 0)} images "
             f"searched + {result.examples.get('holdout', 0)} held out, "
             f"{result.evaluations} evaluations in {result.seconds:.0f} s",
             f"{'schedule':<12} {'FLOPs':>6} {'loss':>9} {'held-out':>9}  r per block"]
    for name, shape in result.shapes.items():
        lines.append(row(name, shape["r"], shape["flops"], shape["loss"],
                         shape["holdout_loss"]))
    lines.append(row("calibrated", result.r, result.flops, result.loss, result.holdout_loss))
    return "\n".join(lines)
