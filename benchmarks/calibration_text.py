"""Calibrated per-block keep ratios against uniform ratios and simple shapes at equal MACs,
on all-MiniLM-L6-v2 and SST-2 dev sentences (docs/calibration.md).

SST-2 dev is split into its even and odd lines. For every budget (the MACs of PiToMe at
keep ratio ρ in layers 0-2, the text default, over the calibration sentences' lengths)
and algorithm: calibrate on the even half (``1 − cos`` of the mean-pooled output), then
score on all of the odd half: the default schedule (ρ in layers 0-2), one uniform ratio
in all six layers at equal MACs, the simple shapes the calibration started from and the
calibrated schedule. Score: cosine between the merged and unmerged size-weighted mean-pooled
embeddings per sentence (mean ± standard error), and ``1 − cos`` minus the default's,
paired over sentences. FLOPs are the MACs over the odd half's sentence lengths, as a
fraction of the unmerged model's. Prints a table and writes JSON (never over a file).

    OMP_NUM_THREADS=1 python benchmarks/calibration_text.py --out docs/calibration-minilm.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import pitome
from pitome.analysis.flops import text_macs
from pitome.calibration import (Objective, RatioSpace, calibrate, sentence_lengths,
                                uniform_flops)
from pitome.tasks.sst2 import read_sst2
from pitome.tasks.text import length_sorted_batches, load_minilm

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MODEL = "all-MiniLM-L6-v2"
DEFAULT_BLOCKS = (0, 1, 2)


def mean_and_error(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return values.mean().item(), (values.std() / math.sqrt(values.numel())).item()


def losses(model, algo: str, ratio, objective: Objective) -> torch.Tensor:
    """Per-sentence ``1 − cos`` of ``model`` merged by ``algo`` at ``ratio`` (a number: layers
    0-2; a list: per layer)."""
    pitome.unpatch(model)
    pitome.patch(model, algo, ratio=ratio)
    try:
        return objective.losses()
    finally:
        pitome.unpatch(model)


def evaluation_flops(model, algo: str, ratio, lengths: list[int]) -> float:
    """MACs of the schedule over the evaluation sentences, as a fraction of unmerged."""
    pitome.patch(model, algo, ratio=ratio)
    config = pitome.merge_config(model)
    pitome.unpatch(model)
    return text_macs(model, config.schedule, lengths, config.algorithm) / \
        text_macs(model, None, lengths)


def schedules_at(model, algo: str, ratio: float, calibration_batches, result) -> dict:
    """The schedules compared at one budget: the default (ρ in layers 0-2), one ratio in
    every layer at equal MACs, the calibration's simple shapes and the calibrated one."""
    space = RatioSpace.of(model, algo, {}, sentence_lengths(calibration_batches))
    budget = math.floor(result.budget * space.unmerged * (1 + 1e-12))
    everywhere = space.equal_cost_ratio(budget, None)
    schedules = {"default (layers 0-2)": ratio,
                 "uniform, all layers": [round(everywhere, 6)] * space.blocks}
    for name, shape in result.shapes.items():
        if name != "first-3":  # the default itself, on the grid
            schedules[f"shape: {name}"] = shape["ratio"]
    schedules["calibrated"] = result.ratio
    return schedules


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sst2", default=str(SHARED / "data" / "text" / "sst2" / "dev.tsv"))
    parser.add_argument("--ratios", default="0.9,0.8,0.7",
                        help="budgets: the MACs of PiToMe at these keep ratios in layers 0-2")
    parser.add_argument("--algos", default="pitome,tome")
    parser.add_argument("--calibration-sentences", type=int, default=None,
                        help="sentences of the even half to calibrate on (default: all)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-evaluations", type=int, default=100)
    parser.add_argument("--grid", type=float, default=0.005)
    parser.add_argument("--out", help="JSON output (refused if it exists)")
    parser.add_argument("--table-from", metavar="JSON", help="print the table of a saved run")
    args = parser.parse_args()
    if args.table_from:
        print(table(json.loads(Path(args.table_from).read_text())["rows"]))
        return 0
    if args.out and Path(args.out).exists():
        parser.error(f"{args.out} exists; give another --out")
    started = time.perf_counter()

    model, tokenizer = load_minilm()
    sentences, _ = read_sst2(args.sst2)  # labels unread
    even, odd = sentences[0::2], sentences[1::2]
    if args.calibration_sentences is not None:
        even = [even[(i * len(even)) // args.calibration_sentences]
                for i in range(min(args.calibration_sentences, len(even)))]
    calibration_batches = length_sorted_batches(tokenizer, even, args.batch_size)
    evaluation_batches = length_sorted_batches(tokenizer, odd, args.batch_size)
    lengths = sentence_lengths(evaluation_batches)
    objective = Objective(model, evaluation_batches, "cosine")
    print(f"{MODEL}: calibrate on {len(even)} sentences of the even half of {args.sst2}, "
          f"evaluate on {len(odd)} of the odd half", file=sys.stderr)

    rows, calibrations = [], []
    for ratio in [float(text) for text in args.ratios.split(",")]:
        budget = uniform_flops(model, ratio, "pitome", batches=calibration_batches)
        for algo in args.algos.split(","):
            result = calibrate(model, calibration_batches, algo, budget, objective="cosine",
                               max_evaluations=args.max_evaluations, grid=args.grid,
                               progress=True, name=MODEL)
            print(f"rho {ratio} {algo}: {result.evaluations} evaluations in "
                  f"{result.seconds:.0f} s, start {result.start}, ratio {result.ratio}",
                  file=sys.stderr)
            calibrations.append({"ratio": ratio, "algo": algo, "seconds": result.seconds,
                                 "evaluations": result.evaluations, "start": result.start,
                                 "calibrated": result.ratio, "loss": result.loss,
                                 "holdout_loss": result.holdout_loss, "shapes": result.shapes,
                                 "history": result.history})
            default = None
            for name, schedule in schedules_at(model, algo, ratio, calibration_batches,
                                               result).items():
                per_sentence = losses(model, algo, schedule, objective)
                default = per_sentence if default is None else default
                cosine, cosine_se = mean_and_error(1 - per_sentence)
                gain, gain_se = mean_and_error(per_sentence - default)
                rows.append({"ratio": ratio, "budget": budget, "algo": algo, "schedule": name,
                             "keep_ratio": schedule,
                             "flops": evaluation_flops(model, algo, schedule, lengths),
                             "cosine": cosine, "cosine_se": cosine_se,
                             "loss_minus_default": gain, "loss_minus_default_se": gain_se,
                             "loss_per_sentence": [float(f"{v:.5g}")
                                                   for v in per_sentence.tolist()]})
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"model": MODEL, "data": args.sst2, "calibration_sentences": len(even),
             "evaluation_sentences": len(odd), "grid": args.grid,
             "max_evaluations": args.max_evaluations, "rows": rows,
             "calibrations": calibrations, "seconds": time.perf_counter() - started,
             "threads": torch.get_num_threads(), "torch": torch.__version__}, indent=1) + "\n")
    return 0


def table(rows: list[dict]) -> str:
    """Markdown: every schedule's keep ratios, FLOPs on the evaluation half, cosine to the
    unmerged embedding, its ``1 − cos`` over the default ToMe schedule's, and minus the
    default schedule's of the same algorithm (paired over sentences, ± SE); then
    :func:`summary`."""
    lines = ["| budget (ρ, layers 0-2) | algo | schedule | keep ratio per layer | FLOPs | "
             "cos to unmerged | 1 − cos × default ToMe's | (1 − cos) − default's (paired) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = row["keep_ratio"]
        shown = f"{ratio:g} in 0-2" if isinstance(ratio, (int, float)) else \
            "[" + ", ".join(f"{value:.3g}" for value in ratio) + "]"
        tome = _find(rows, row["ratio"], "tome", "default (layers 0-2)")
        times = (1 - row["cosine"]) / (1 - tome["cosine"]) if tome else float("nan")
        lines.append(f"| {row['ratio']:g} ({row['budget']:.3f}) | {row['algo']} | "
                     f"{row['schedule']} | {shown} | {row['flops']:.3f} | "
                     f"{row['cosine']:.4f} ± {row['cosine_se']:.4f} | {times:.2f} | "
                     f"{row['loss_minus_default']:+.4f} ± {row['loss_minus_default_se']:.4f} |")
    return "\n".join(lines) + "\n\n" + summary(rows)


def _find(rows: list[dict], ratio: float, algo: str, schedule: str) -> dict | None:
    return next((row for row in rows if row["ratio"] == ratio and row["algo"] == algo
                 and row["schedule"] == schedule), None)


def summary(rows: list[dict]) -> str:
    """Markdown: per budget and algorithm, the calibrated ``1 − cos`` against the best fixed
    schedule's on the evaluation half (the best picked there, which favours it), and the
    paired difference to the uniform ratio in all layers."""
    lines = ["| budget (ρ, layers 0-2) | algo | calibrated 1 − cos | best fixed schedule | its "
             "1 − cos | calibrated below it | (1 − cos) − uniform all layers' (paired) |",
             "|---|---|---|---|---|---|---|"]
    for ratio, algo in dict.fromkeys((row["ratio"], row["algo"]) for row in rows):
        calibrated = _find(rows, ratio, algo, "calibrated")
        fixed = [row for row in rows if row["ratio"] == ratio and row["algo"] == algo
                 and row["schedule"] != "calibrated"]
        best = max(fixed, key=lambda row: row["cosine"])
        uniform = _find(rows, ratio, algo, "uniform, all layers")
        difference = torch.tensor(calibrated["loss_per_sentence"]) - \
            torch.tensor(uniform["loss_per_sentence"])
        mean, error = mean_and_error(difference)
        loss, best_loss = 1 - calibrated["cosine"], 1 - best["cosine"]
        lines.append(f"| {ratio:g} | {algo} | {loss:.4f} | {best['schedule']} | "
                     f"{best_loss:.4f} | {100 * (1 - loss / best_loss):.1f}% | "
                     f"{mean:+.4f} ± {error:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
