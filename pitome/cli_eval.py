"""``pitome eval``: the paper's experiments on one's own models and data, one command each.

Every subcommand evaluates a grid of (algorithm, ratio) cells, prints a table, and writes
``results.json`` (resumable), ``results.csv`` and ``results.png`` (metric against GFLOPs) to
``--out``. Run it under ``torchrun --nproc_per_node N`` (or ``accelerate launch``) to shard
the examples over N processes; the metrics are the same as with one.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .cli_common import (METHOD_DOC, add_algos, add_device, add_weights,
                         algorithm_list, at_least, ratio_list, task_command, token_list,
                         weights_label)

TASKS = ("imagenet", "retrieval", "text", "vqa")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_RATIOS = "0.9,0.925,0.95,0.975"
RANDOM_WEIGHTS_TITLE = "RANDOM WEIGHTS, the accuracy means nothing: "


def add_eval_parser(commands: argparse._SubParsersAction,
                    shared: argparse.ArgumentParser) -> None:
    task = task_command(commands, shared, "eval",
                        help="accuracy, GFLOPs and speed across merge ratios on your data",
                        description=__doc__.split("\n\n")[1] if __doc__ else None)

    def common(task: argparse.ArgumentParser, default_algos: str = "none,pitome,tome") -> None:
        add_algos(task, default_algos)
        task.add_argument("--ratio", "--ratios", dest="ratio", type=ratio_list,
                          help="comma-separated keep ratios, each in [0.5, 1] "
                               f"({METHOD_DOC} §1; default {DEFAULT_RATIOS}, none when "
                               "--tokens is given)")
        task.add_argument("--tokens", type=token_list, default=[],
                          help="comma-separated token counts to keep per image or sequence "
                               "(prefix not counted; on LLaVA the image tokens), cells beside "
                               "the ratios'")
        task.add_argument("--out", help="output folder (default: results/eval-TASK)")
        task.add_argument("--batch-size", "--batch", dest="batch_size", type=at_least(1),
                          default=32, help="examples per forward")
        add_device(task)
        task.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                          help="autocast precision")
        task.add_argument("--limit", type=at_least(1), help="evaluate only the first N examples")
        task.add_argument("--fresh", action="store_true",
                          help="start a new results.json even if the output folder holds one "
                               "(the old one is kept as results.previous-N.json)")
        task.add_argument("--no-plot", action="store_true", help="skip results.png")

    imagenet = task(
        "imagenet", help="top-1/top-5 of a timm classifier on an image folder",
        description="An ImageFolder tree (SYNSET/file) with optional classes.tsv, or a "
                    "labels.tsv of path and label; the model's own timm preprocessing.")
    imagenet.add_argument("--data", required=True, help="image folder")
    imagenet.add_argument("--model", required=True, help="timm model name")
    add_weights(imagenet, random_by_default=False)
    imagenet.add_argument("--cache-limit", type=at_least(0), default=2000,
                          help="keep decoded images in memory up to this many")
    common(imagenet)

    text = task(
        "text", help="accuracy of a text classifier, or of a sentence encoder with a probe",
        description="TSV/CSV files with a text and a label column (or a Hugging Face dataset "
                    "as NAME[/CONFIG]:SPLIT when the hub is reachable). A sequence-"
                    "classification checkpoint is scored as is; with --probe-train, the "
                    "model is a sentence encoder and a logistic-regression probe is fitted on "
                    "its unmerged embeddings of that file.")
    text.add_argument("--data", required=True, help="evaluation file or dataset")
    text.add_argument("--model", required=True,
                      help="Hugging Face name or folder; 'minilm' for the bundled "
                           "all-MiniLM-L6-v2 (pitome[text-model])")
    text.add_argument("--probe-train", metavar="FILE", help="fit a probe on this file")
    text.add_argument("--probe-limit", type=at_least(2), default=5000,
                      help="probe training examples used")
    text.add_argument("--text-column", default="sentence", help="column holding the text")
    text.add_argument("--label-column", default="label", help="column holding the label")
    text.add_argument("--max-length", type=at_least(2), default=128,
                      help="tokens per text, longer ones are truncated")
    common(text)

    retrieval = task(
        "retrieval", help="image-text retrieval recall (R@1/5/10 both ways) with CLIP or BLIP",
        description="A Karpathy-split JSON (dataset_flickr30k.json style, or a list of "
                    "{image, caption}) and the image folder it refers to.")
    retrieval.add_argument("--data", required=True, help="annotation JSON")
    retrieval.add_argument("--images", required=True, help="image folder")
    retrieval.add_argument("--split", default="test", help="the Karpathy split to evaluate")
    retrieval.add_argument("--model", required=True, help="Hugging Face CLIP or BLIP name/folder")
    common(retrieval)

    vqa = task(
        "vqa", help="LLaVA-1.5 answers on a JSONL of questions (exact match / option letter)",
        description="One JSON object per line: image (path), question, answer, and for "
                    "multiple choice a list of choices (answer: letter, index or text).")
    vqa.add_argument("--data", required=True, help="questions JSONL")
    vqa.add_argument("--images", help="folder image paths are relative to (default: the "
                                      "JSONL's folder)")
    vqa.add_argument("--model", required=True, help="Hugging Face LLaVA name or folder")
    vqa.add_argument("--max-new-tokens", type=at_least(1), default=16,
                     help="longest answer generated")
    vqa.add_argument("--compile", action="store_true",
                     help="on a GPU, decode with pitome.generation.GreedyDecoder: the "
                          "decoding step compiled into CUDA graphs (static KV cache), no wait "
                          "for the GPU between tokens; each batch size and cache length (in "
                          "steps of 64 tokens) compiles once")
    vqa.add_argument("--eager-tower", action="store_true",
                     help="run the vision tower eagerly on a GPU (by default it is replayed as "
                          "CUDA graphs, pitome.llava.capture_vision_tower: a faster first token)")
    common(vqa, default_algos="none,pitome")


def run_eval(args: argparse.Namespace) -> int:
    from .tasks.runner import ResultStore, grid, run_grid, start_processes, write_outputs

    algos = algorithm_list(args.algos, extra=("none",))
    weights = weights_label(args) if args.task == "imagenet" else None
    ratios = args.ratio if args.ratio is not None else \
        ([] if args.tokens else ratio_list(DEFAULT_RATIOS))
    cells = grid(algos, ratios, args.tokens)
    out = Path(args.out or f"results/eval-{args.task}")
    processes = start_processes(args.device)
    task = _build_task(args, processes, weights)
    if weights == "random weights":
        task.title = RANDOM_WEIGHTS_TITLE + task.title
    setup = {"task": args.task, "model": args.model, "data": _where(args.data),
             "limit": args.limit, "dtype": args.dtype,
             **{key: _where(value) for key, value in task.setup.items()}}
    store = ResultStore(out, setup, fresh=args.fresh, owner=processes.is_main)
    run_grid(task, cells, store, processes)
    if processes.is_main:
        print(write_outputs(store, cells, task.columns, task.metric, task.metric_label,
                            task.title, plot=not args.no_plot))
        print(f"results: {store.path}, {out / 'results.csv'}"
              + ("" if args.no_plot else f", {out / 'results.png'}"), file=sys.stderr)
    if processes.world > 1:
        torch.distributed.destroy_process_group()
    return 0


def _where(value):
    """A path the same however it was typed (relative or absolute); other values as given."""
    if isinstance(value, str) and value and Path(value).exists():
        return str(Path(value).resolve())
    return value


def _build_task(args: argparse.Namespace, processes, weights: str | None):
    dtype = DTYPES[args.dtype]
    if args.task == "imagenet":
        return _imagenet(args, processes, dtype, weights)
    if args.task == "text":
        from .tasks.text import build_text_evaluation

        return build_text_evaluation(args, processes, dtype)
    if args.task == "retrieval":
        from .tasks.retrieval import build_retrieval_evaluation

        return build_retrieval_evaluation(args, processes, dtype)
    from .tasks.vqa import build_vqa_evaluation

    return build_vqa_evaluation(args, processes, dtype)


def _imagenet(args: argparse.Namespace, processes, dtype, weights: str):
    from .models import create_timm_model
    from .tasks.image_classification import ImageNetEvaluation, read_image_folder

    items = read_image_folder(args.data)[: args.limit]
    model = create_timm_model(args.model, checkpoint=args.checkpoint,
                              pretrained=args.pretrained).to(processes.device)
    title = (f"{args.model} on {len(items)} images of {args.data}; GFLOPs = "
             "multiply-accumulates per image (timm's convention)")
    return ImageNetEvaluation(model, items, processes, args.batch_size, args.cache_limit, dtype,
                              title=title, setup={"weights": weights})
