"""``pitome finetune``: train a classifier through merging (or unmerged, as the baseline),
optionally distilled from the unmerged model, then score it.

Writes ``results.json`` (never over an existing one) and the trained weights to ``--out``:
``model.safetensors`` for timm (loads with ``--checkpoint`` into the same model, patched or
not), a ``model/`` folder for Hugging Face (loads with ``from_pretrained`` or
``pitome eval text --model OUT/model``). The weights are the model's own state dict:
merging adds no parameters, so they fit the unpatched model as well.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .cli_common import (METHOD_DOC, UsageError, add_device, add_weights, algorithm_list,
                         at_least, ratio, task_command, weights_label)

DTYPES = {"auto": None, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_finetune_parser(commands: argparse._SubParsersAction,
                        shared: argparse.ArgumentParser) -> None:
    task = task_command(commands, shared, "finetune",
                        help="fine-tune a classifier with merging, optionally self-distilled",
                        description=__doc__.split("\n\n")[0] if __doc__ else None)

    image = task("image", help="a timm image classifier on an image folder",
                 description="An ImageFolder tree (or labels.tsv) to train on, and another to "
                             "evaluate on, or --split-half to use alternate images of one "
                             "folder for each (balanced over classes).")
    image.add_argument("--data", required=True, help="training image folder")
    image.add_argument("--eval-data", help="evaluation image folder")
    image.add_argument("--split-half", action="store_true",
                       help="train on half of --data and evaluate on the other half")
    image.add_argument("--model", required=True, help="timm model name")
    add_weights(image, random_by_default=False)
    image.add_argument("--no-augment", action="store_true",
                       help="train on the evaluation crop, without random crops and flips")
    common(image, lr=1e-4, batch_size=64, distill=1.0)

    text = task("text", help="a Hugging Face sequence classifier on TSV/CSV files",
                description="Files with a text and a label column. An encoder checkpoint "
                            "without a classification head gets a fresh one.")
    text.add_argument("--data", required=True, help="training file")
    text.add_argument("--eval-data", required=True, help="evaluation file")
    text.add_argument("--model", required=True,
                      help="Hugging Face name or folder; 'minilm' for the bundled "
                           "all-MiniLM-L6-v2 (pitome[text-model])")
    text.add_argument("--num-labels", type=at_least(2),
                      help="classes (default: the largest training label + 1)")
    text.add_argument("--text-column", default="sentence", help="column holding the text")
    text.add_argument("--label-column", default="label", help="column holding the label")
    text.add_argument("--teacher", metavar="MODEL",
                      help="distil from this fine-tuned classifier (folder or name; the same "
                           "tokenizer) instead of the model's own unmerged self")
    text.add_argument("--max-length", type=at_least(2), default=128,
                      help="tokens per text, longer ones are truncated")
    common(text, lr=5e-5, batch_size=64, distill=0.0)


def common(task: argparse.ArgumentParser, lr: float, batch_size: int, distill: float) -> None:
    task.add_argument("--algo", "--algos", dest="algo", default="pitome",
                      help="merging algorithm (`pitome algorithms`); 'none' trains unmerged")
    task.add_argument("--ratio", type=ratio, default=0.9,
                      help=f"fraction of tokens each merging block keeps ({METHOD_DOC} §1)")
    length = task.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float, default=1.0, help="passes over the training data")
    length.add_argument("--steps", type=at_least(1), help="optimizer steps (instead of --epochs)")
    task.add_argument("--batch-size", "--batch", dest="batch_size", type=at_least(1),
                      default=batch_size, help="examples per step")
    task.add_argument("--lr", type=float, default=lr, help="peak learning rate (AdamW)")
    task.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    task.add_argument("--warmup", type=float, default=0.1,
                      help="fraction of the steps warming the learning rate up (then cosine)")
    task.add_argument("--distill", type=float, default=distill,
                      help="weight in [0, 1] of KL to the frozen unmerged model's logits "
                           "(1: labels unused)")
    task.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    task.add_argument("--limit", type=at_least(1), help="use only the first N training examples")
    task.add_argument("--eval-limit", type=at_least(1), help="evaluate only the first N examples")
    task.add_argument("--seed", type=int, default=0, help="seeds the head, the order and dropout")
    add_device(task)
    task.add_argument("--dtype", choices=sorted(DTYPES), default="auto",
                      help="autocast precision; auto: bf16 on CUDA, fp32 on CPU")
    task.add_argument("--out", help="output folder (default: results/finetune-TASK); refused "
                                    "if it holds a results.json")
    task.add_argument("--no-save", action="store_true", help="do not save the trained weights")
    task.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_finetune(args: argparse.Namespace) -> int:
    from .tasks.finetune import evaluate_classifier, finetune, unmerged_teacher

    algos = algorithm_list(args.algo, extra=("none",))
    if len(algos) != 1:
        raise UsageError(f"--algo takes one algorithm, got {args.algo!r}")
    out = Path(args.out or f"results/finetune-{args.task}")
    results = out / "results.json"
    if results.exists():
        raise UsageError(f"{results} exists; choose another --out (results are never "
                         "overwritten)")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if args.task == "image":
        model, train, evaluation, setup = _image(args)
    else:
        model, train, evaluation, setup = _text(args)
    model.to(device)
    teacher = getattr(args, "teacher_model", None)
    if teacher is None and (args.distill > 0 or args.task == "image"):
        teacher = unmerged_teacher(model)
    from .api import patch

    if algos[0] != "none":
        patch(model, algo=algos[0], ratio=args.ratio)
    dtype = DTYPES[args.dtype]
    before = evaluate_classifier(model, evaluation, teacher, device, dtype)
    result = finetune(model, train, epochs=args.epochs, steps=args.steps, lr=args.lr,
                      weight_decay=args.weight_decay, warmup=args.warmup, distill=args.distill,
                      temperature=args.temperature,
                      teacher=teacher if args.distill > 0 else None, device=device,
                      dtype=dtype, seed=args.seed, progress=not args.no_progress)
    after = evaluate_classifier(model, evaluation, teacher, device, dtype)
    out.mkdir(parents=True, exist_ok=True)
    saved = None if args.no_save else _save(model, args, out)
    report = {"task": args.task, "model": args.model, "algo": algos[0],
              "ratio": 1.0 if algos[0] == "none" else args.ratio, "device": str(device),
              "seed": args.seed, "batch_size": args.batch_size, **setup,
              "weight_decay": args.weight_decay, "warmup": args.warmup,
              "training": result.as_dict(), "before": before.__dict__, "after": after.__dict__,
              "weights": saved, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    with results.open("x") as handle:  # exclusive: a results.json made meanwhile is kept
        json.dump(report, handle, indent=1)
    _print(report)
    print(f"results: {results}" + (f", weights: {saved}" if saved else ""), file=sys.stderr)
    return 0


def _image(args: argparse.Namespace):
    from .models import create_timm_model
    from .tasks.finetune_data import ImageBatches, image_tensors, split_alternating
    from .tasks.image_classification import check_labels, read_image_folder

    if args.split_half == bool(args.eval_data):
        raise UsageError("give --eval-data FOLDER or --split-half (one of them)")
    weights = weights_label(args)
    model = create_timm_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)
    items = read_image_folder(args.data)
    if args.split_half:
        train_items, eval_items = split_alternating(items)
    else:
        train_items, eval_items = items, read_image_folder(args.eval_data)
    train_items, eval_items = train_items[:args.limit], eval_items[:args.eval_limit]
    check_labels(train_items + eval_items, model)
    crop = None if args.no_augment else model.patch_embed.img_size[-1]
    images, labels = image_tensors(model, train_items, training=not args.no_augment)
    train = ImageBatches(images, labels, args.batch_size, shuffle=True, crop=crop,
                         flip=not args.no_augment, seed=args.seed)
    eval_images, eval_labels = image_tensors(model, eval_items, training=False)
    evaluation = ImageBatches(eval_images, eval_labels, args.batch_size)
    return model, train, evaluation, {"weights": weights, "train_examples": len(train_items),
                                      "eval_examples": len(eval_items),
                                      "augment": not args.no_augment}


def _text(args: argparse.Namespace):
    from .tasks.finetune_data import TextBatches, load_text_classifier, tokenize
    from .tasks.text import read_labelled_text

    texts, labels = read_labelled_text(args.data, args.text_column, args.label_column,
                                       args.limit)
    eval_texts, eval_labels = read_labelled_text(args.eval_data, args.text_column,
                                                 args.label_column, args.eval_limit)
    num_labels = args.num_labels or max(labels) + 1
    outside = [label for label in labels + eval_labels if not 0 <= label < num_labels]
    if outside:
        raise UsageError(f"label {outside[0]} is outside the {num_labels} classes "
                         f"(0 to {num_labels - 1}); set --num-labels")
    loaded = load_text_classifier(args.model, num_labels)
    model, tokenizer = loaded.model, loaded.tokenizer
    args.tokenizer = tokenizer
    if args.distill > 0 and args.teacher is None and loaded.fresh_head:
        raise UsageError(f"{args.model} has no classification head, so its unmerged self has "
                         "nothing to distil; fine-tune it unmerged first (--algo none) and "
                         "give that run's OUT/model as --teacher, or use --distill 0")
    if args.teacher is not None:
        args.teacher_model = load_text_classifier(args.teacher).model.eval()
    train = TextBatches(tokenize(tokenizer, texts, args.max_length), torch.tensor(labels),
                        args.batch_size, shuffle=True, seed=args.seed)
    evaluation = TextBatches(tokenize(tokenizer, eval_texts, args.max_length),
                             torch.tensor(eval_labels), args.batch_size)
    return model, train, evaluation, {"train_examples": len(texts),
                                      "eval_examples": len(eval_texts),
                                      "num_labels": num_labels, "max_length": args.max_length}


def _save(model: torch.nn.Module, args: argparse.Namespace, out: Path) -> str:
    if args.task == "text":
        folder = out / "model"
        model.save_pretrained(folder)
        args.tokenizer.save_pretrained(folder)
        return str(folder)
    from safetensors.torch import save_file

    path = out / "model.safetensors"
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    return str(path)


def _print(report: dict) -> None:
    train = report["training"]
    print(f"{report['model']} fine-tuned with {report['algo']} at ratio {report['ratio']:g}: "
          f"{train['steps']} steps in {train['seconds']:.1f} s, loss {train['loss_first']:.4f} "
          f"-> {train['loss_last']:.4f} (distill {train['distill']:g})")
    for name in ("before", "after"):
        score = report[name]
        line = f"  {name:<6} accuracy {score['accuracy']:.2f}% on {score['examples']}"
        if score["agreement"] is not None:
            line += (f", agreement with the unmerged model {score['agreement']:.2f}%, "
                     f"KL {score['kl']:.4f}")
        print(line)
