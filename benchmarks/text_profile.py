"""Where a merged BERT's GPU time goes over a padded batch: a kernel profile per variant.

The same model and batch as ``benchmarks/text.py`` (BERT-base shape, random weights, bf16,
lengths drawn from ``--lengths``, right-padded). Each variant runs ``--repeats`` forwards
under ``torch.profiler``; the table lists the kernels by total GPU time per forward, so the
merging blocks' own kernels (plan, apply, bias) stand beside the unpatched model's.

    python benchmarks/text_profile.py --variants none,pitome@0.9/all:padded --batch 64
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

from text import MODELS, TextBatch, Variant, build_model, draw_lengths  # noqa: E402


def kernel_times(run, repeats: int) -> list[tuple[str, float, int]]:
    """``(kernel, µs per forward, calls per forward)``, longest first."""
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    rows = [(event.key, event.device_time_total / repeats, event.count // repeats)
            for event in prof.key_averages() if event.device_time_total > 0]
    return sorted(rows, key=lambda row: -row[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert-base", choices=sorted(MODELS))
    parser.add_argument("--lengths", default="uniform")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--variants", default="none,pitome@0.9/all:padded")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--top", type=int, default=25, help="kernels listed per variant")
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    device = torch.device("cuda")
    base = build_model(MODELS[args.model], device, torch.bfloat16)
    batch = TextBatch.of(draw_lengths(args.lengths, args.batch), device)
    results = {}
    for text in args.variants.split(","):
        variant = Variant.parse(text)
        model = base if variant.algo == "none" else variant.patch(copy.deepcopy(base))
        forward = batch.model_forward(model)

        def run(forward=forward):
            with torch.inference_mode():
                forward(batch.input_ids)
        rows = kernel_times(run, args.repeats)
        total = sum(row[1] for row in rows)
        results[text] = {"total_us": total, "kernels": rows}
        print(f"\n== {text}: {total:.0f} µs of kernels per forward")
        print(f"{'µs':>8} {'calls':>5}  kernel")
        for name, micros, calls in rows[:args.top]:
            print(f"{micros:8.1f} {calls:5d}  {name[:110]}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
