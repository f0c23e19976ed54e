"""The host cost of merging, measured on the CPU: a ViT so narrow that its matrix products cost
nothing, so the forward's time is the Python and operator dispatch of each block.

The eager/export issue's proxy: a timm ``VisionTransformer`` with embed_dim 16, one head, 12
blocks, 197 tokens, batch 1, one thread; ρ 0.9. Variants take turns over ``--rounds`` in one
process; the table gives the median CPU time of the process per forward (``time.process_time``,
so other work on a shared machine counts less) and the ratio to the unpatched model, plus
the number of top-level aten operators each forward dispatches.

    python benchmarks/host_cost_cpu.py --json host-cost-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import pitome


def build() -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=224, patch_size=16, embed_dim=16, depth=12, num_heads=1,
                             num_classes=10).eval()


def operator_count(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Top-level aten operators one forward dispatches (those no other aten operator called)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x)
    return sum(1 for event in prof.events() if event.name.startswith("aten::")
               and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--algos", default="tome,pitome", help="comma-separated algorithms")
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=10, help="forwards per timing")
    parser.add_argument("--json", help="write the rows here (refuses to overwrite)")
    args = parser.parse_args()
    if args.json and Path(args.json).exists():
        sys.exit(f"{args.json} exists; give another --json path")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    models = {"none": build()}
    for algo in args.algos.split(","):
        models[algo] = pitome.patch(build(), algo, args.ratio)
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):
                model(x)
        operators = {name: operator_count(model, x) for name, model in models.items()}
        for index in range(args.rounds):
            for name, model in models.items():
                start = time.process_time()
                for _ in range(args.repeats):
                    model(x)
                seconds[name].append((time.process_time() - start) / args.repeats)
            print(f"round {index + 1}/{args.rounds}", file=sys.stderr, end="\r", flush=True)
    print(file=sys.stderr)
    base = statistics.median(seconds["none"])
    rows = [{"algo": name, "ratio": 1.0 if name == "none" else args.ratio,
             "ms": statistics.median(times) * 1e3, "vs_unpatched": statistics.median(times) / base,
             "operators": operators[name]} for name, times in seconds.items()]
    print(f"{'algo':8} {'ratio':>5} {'ms':>8} {'vs unpatched':>12} {'aten ops':>9}")
    for row in rows:
        print(f"{row['algo']:8} {row['ratio']:5g} {row['ms']:8.3f} {row['vs_unpatched']:11.2f}x "
              f"{row['operators']:9d}")
    if args.json:
        environment = {"python": platform.python_version(), "torch": torch.__version__,
                       "machine": platform.machine(), "threads": 1}
        Path(args.json).write_text(json.dumps({"environment": environment, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
