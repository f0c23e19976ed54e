"""``pitome calibrate``: a per-block merge schedule for a FLOPs budget, found on unlabeled
images or sentences (docs/calibration.md), written as JSON for
``pitome.patch(model, algo, r=...)`` (images) or ``pitome.patch(model, algo, ratio=...)``
(text)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli_common import (HelpFormatter, UsageError, add_device, add_weights, algorithm_list,
                         at_least, ratio, weights_label)

DTYPES = ("fp32", "bf16", "fp16")
DEFAULT_IMAGE_MODEL = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def add_calibrate_parser(commands: argparse._SubParsersAction,
                         shared: argparse.ArgumentParser) -> None:
    command = commands.add_parser(
        "calibrate", parents=[shared], formatter_class=HelpFormatter,
        help="find a per-block merge schedule for a FLOPs budget on unlabeled images or "
             "sentences",
        description="Searches the tokens each block merges (images; per-block keep ratios "
                    "for text) so that the merged model's outputs stay closest to the "
                    "unmerged model's (KL of the predictions; 1 - cos of the mean-pooled "
                    "output of a text encoder), at no more than the budget's FLOPs. Labels "
                    "are not read: the images come from the even positions of the folder "
                    "sorted by class (every class range, half the images), the sentences "
                    "from the even lines of the file, leaving the odd ones to evaluate on.")
    data = command.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", "--images-from", dest="data",
                      help="an ImageNet-style image folder (labels only order it)")
    data.add_argument("--text", metavar="FILE",
                      help="a TSV/CSV file of sentences (e.g. SST-2's dev.tsv) to calibrate a "
                           "BERT-family text encoder on")
    command.add_argument("--model", default=None,
                         help="timm model name (default vit_tiny_patch16_224.augreg_in21k_"
                              "ft_in1k); with --text a Hugging Face name or folder, or "
                              "'minilm' (the default: all-MiniLM-L6-v2, pitome[text-model])")
    command.add_argument("--text-column", default="sentence",
                         help="with --text: the column holding the sentences")
    command.add_argument("--max-length", type=at_least(2), default=128,
                         help="with --text: tokens per sentence, longer ones are truncated")
    command.add_argument("--grid", type=float, default=None,
                         help="with --text: the step of the keep ratios searched (0.005)")
    add_weights(command, random_by_default=False)
    command.add_argument("--algo", "--algos", dest="algo", default="pitome",
                         help="the algorithm to calibrate for (`pitome algorithms`)")
    budget = command.add_mutually_exclusive_group()
    budget.add_argument("--flops", type=float,
                        help="the budget as a fraction of the unmerged model's FLOPs")
    budget.add_argument("--like-ratio", type=ratio, default=0.9,
                        help="the budget: the FLOPs of a uniform keep ratio (ignored with "
                             "--flops)")
    command.add_argument("--num-images", "--num-inputs", dest="images", type=at_least(2),
                         default=64, help="calibration images (spread over the classes) or "
                                          "sentences")
    command.add_argument("--batch-size", "--batch", dest="batch_size", type=at_least(1),
                         default=16, help="images or sentences per forward")
    command.add_argument("--holdout", type=float, default=0.25,
                         help="fraction of the batches held out to choose the result by")
    command.add_argument("--max-evaluations", type=at_least(1), default=150,
                         help="forward passes over the calibration images to spend")
    command.add_argument("--rates", choices=("probe", "gradient", "gradient-then-probe"),
                         default="probe",
                         help="how the search measures each block's harm per FLOP: one "
                              "forward per block, the derivatives of a relaxed merge, or "
                              "derivatives first and probes where they find nothing (the "
                              "last two for images only)")
    add_device(command)
    command.add_argument("--dtype", choices=DTYPES, default="fp32", help="autocast precision")
    command.add_argument("--out", help="output JSON (default: calibration-ALGO.json)")
    command.add_argument("--overwrite", action="store_true", help="replace an existing --out")


def run_calibrate(args: argparse.Namespace) -> int:
    import torch

    from .bench import pick_device
    from .calibration import calibrate, uniform_flops

    algo = algorithm_list(args.algo)
    if len(algo) != 1:
        raise UsageError(f"--algo takes one algorithm, got {args.algo!r}")
    out = Path(args.out or f"calibration-{algo[0]}.json")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; give --overwrite to replace it, or another --out")
    if args.text is not None and args.rates != "probe":
        raise UsageError(f"--rates {args.rates} relaxes a vision model's token counts; a "
                         "text model is searched with --rates probe")
    if args.text is None and args.grid is not None:
        raise UsageError("--grid is the step of a text model's keep ratios; give it with --text")
    device = pick_device(args.device)
    if args.text is not None:
        weights = "its own"
        model, batches = _text_inputs(args, device)
        budget_inputs = {"batches": batches}
        text_options = {"grid": args.grid}
    else:
        weights = weights_label(args)
        model, batches = _image_inputs(args, device)
        budget_inputs, text_options = {}, {}
    budget = args.flops if args.flops is not None else uniform_flops(
        model, args.like_ratio, algo[0], **budget_inputs)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    result = calibrate(model, batches, algo[0], budget, holdout=args.holdout,
                       max_evaluations=args.max_evaluations, batch_size=args.batch_size,
                       dtype=dtype, progress=True, name=args.model, rates=args.rates,
                       **text_options)
    result.save(out, overwrite=args.overwrite)
    if weights == "random weights":
        print("RANDOM WEIGHTS, the schedule means nothing", file=sys.stderr)
    print(summary(result))
    schedule = f"ratio={result.ratio}" if result.ratio is not None else f"r={result.r}"
    print(f"wrote {out}; apply with pitome.patch(model, {algo[0]!r}, {schedule})",
          file=sys.stderr)
    return 0


def _image_inputs(args: argparse.Namespace, device):
    """The timm model and the calibration images (even positions of the class-sorted folder)."""
    from .models import create_timm_model
    from .tasks.image_classification import (class_balanced_halves, evenly_spread,
                                             load_readable_images, model_transform,
                                             read_image_folder)

    args.model = args.model or DEFAULT_IMAGE_MODEL
    model = create_timm_model(args.model, checkpoint=args.checkpoint,
                              pretrained=args.pretrained).to(device)
    calibration_half, _ = class_balanced_halves(read_image_folder(args.data))
    images = load_readable_images(evenly_spread(calibration_half, args.images),
                                  model_transform(model))
    return model, images


def _text_inputs(args: argparse.Namespace, device):
    """The text encoder and batches of the calibration sentences (the file's even lines,
    spread over it), tokenized and sorted by length."""
    from .tasks.image_classification import evenly_spread
    from .tasks.text import length_sorted_batches, load_text_encoder, read_texts

    if args.checkpoint or args.pretrained or args.random_weights:
        raise UsageError("--checkpoint, --pretrained and --random-weights are for timm image "
                         "models; with --text, --model names the weights")
    args.model = args.model or "minilm"
    model, tokenizer = load_text_encoder(args.model)
    sentences = evenly_spread(read_texts(args.text, args.text_column)[0::2], args.images)
    batches = length_sorted_batches(tokenizer, sentences, args.batch_size, args.max_length)
    return model.to(device), [{k: v.to(device) for k, v in b.items()} for b in batches]


def summary(result) -> str:
    """The simple shapes and the calibrated schedule, with FLOPs and losses, as a table."""
    text = result.ratio is not None

    def row(name: str, schedule, flops: float, loss: float, held: float | None) -> str:
        held_text = "-" if held is None else f"{held:.4f}"
        listed = [f"{v:g}" for v in schedule] if text else list(schedule)
        return f"{name:<12} {flops:>6.3f} {loss:>9.4f} {held_text:>9}  {listed}"

    what = "sentences" if text else "images"
    lines = [f"{result.model}, {result.algo}, budget {result.budget:.4f} of the unmerged "
             f"FLOPs, objective {result.objective}, {result.examples.get('search', 0)} {what} "
             f"searched + {result.examples.get('holdout', 0)} held out, "
             f"{result.evaluations} evaluations in {result.seconds:.0f} s",
             f"{'schedule':<12} {'FLOPs':>6} {'loss':>9} {'held-out':>9}  "
             f"{'keep ratio' if text else 'r'} per block"]
    key = "ratio" if text else "r"
    for name, shape in result.shapes.items():
        lines.append(row(name, shape[key], shape["flops"], shape["loss"],
                         shape["holdout_loss"]))
    lines.append(row("calibrated", getattr(result, key), result.flops, result.loss,
                     result.holdout_loss))
    return "\n".join(lines)
