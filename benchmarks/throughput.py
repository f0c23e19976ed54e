"""Throughput of merging against the unmerged model and the token-slicing oracle (issue #7 grid).

Every configuration runs in one process, so all ratios in the table come from one run:
unpatched model, oracle (same schedule, zero merge cost), and each algorithm; median of
``--repeats`` timed forwards after warm-up (CUDA events on a GPU), peak memory per variant.

    python benchmarks/throughput.py                     # the GPU grid (H100/H200), bf16
    python benchmarks/throughput.py --quick             # small CPU grid for this machine
    python benchmarks/throughput.py --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
from dataclasses import asdict

import torch

from pitome.bench import BASELINE, ORACLE, benchmark, host_bound_note, pick_device, pick_dtype
from pitome.models import create_timm_model

GPU_GRID = [  # (model, batch, ratio)
    ("vit_small_patch16_224", 256, 0.9),
    ("vit_base_patch16_224", 256, 0.9),
    ("vit_large_patch16_384", 64, 0.9),
    ("vit_base_patch16_224", 256, 0.95),
    ("vit_small_patch16_224", 1, 0.9),
    ("vit_base_patch16_224", 1, 0.9),
    ("vit_large_patch16_384", 1, 0.9),
]
CPU_GRID = [
    ("vit_small_patch16_224", 16, 0.9),
    ("vit_base_patch16_224", 8, 0.9),
    ("vit_small_patch16_224", 1, 0.9),
]
ALGOS = ("tome", "pitome", "pitome_paper")


def environment(device: torch.device) -> dict[str, str]:
    import timm

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "device": str(device), "cpu": platform.processor()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the small CPU grid")
    parser.add_argument("--algos", nargs="+", default=list(ALGOS))
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5,
                        help="CUDA graph rows: the variants take turns this many times and "
                             "each keeps its median, so clock drift hits all alike")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="also measure every variant replayed as a CUDA graph")
    parser.add_argument("--compile", action="store_true",
                        help="also measure every variant under torch.compile (+ CUDA graph)")
    parser.add_argument("--only", type=int, nargs="+", help="run only these rows of the grid")
    parser.add_argument("--modes", nargs="+", help="run only these modes (e.g. 'compile + "
                        "CUDA graph')")
    parser.add_argument("--json", help="write every row and the environment to this file")
    args = parser.parse_args()

    device = pick_device(None)
    dtype = pick_dtype(None, device)
    grid = CPU_GRID if args.quick or device.type != "cuda" else GPU_GRID
    env = environment(device)
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)

    results = []
    if args.only:
        grid = [grid[i] for i in args.only]
    modes = [("eager", False, False)]
    if args.cuda_graph and device.type == "cuda":
        modes.append(("CUDA graph", True, False))
    if args.compile:
        modes.append(("compile", False, True))
        if device.type == "cuda":
            modes.append(("compile + CUDA graph", True, True))
    if args.modes:
        modes = [mode for mode in modes if mode[0] in args.modes]
    print("| model | batch | ratio | mode | algo | tokens out | img/s | vs unpatched | vs oracle "
          "| peak MiB | host ms |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
    host_bound = False
    for (name, batch, ratio), (mode, graphed, compiled) in itertools.product(grid, modes):
        model = create_timm_model(name)
        rows = benchmark(model, [BASELINE, ORACLE, *args.algos], ratio, batch, device, dtype,
                         warmup=args.warmup, repeats=args.repeats, cuda_graph=graphed,
                         compile=compiled, rounds=args.rounds if graphed else 1,
                         progress=lambda algo: print(f"  {name} b{batch} {mode}: {algo}",
                                                     file=sys.stderr, flush=True))
        oracle = rows[1].images_per_s
        for row in rows:
            memory = "-" if row.peak_memory_mib is None else f"{row.peak_memory_mib:.0f}"
            host_bound |= row.host_bound
            print(f"| {name} | {batch} | {row.ratio:g} | {mode} | {row.algo} | {row.tokens_out} "
                  f"| {row.images_per_s:.1f} | {row.speedup:.2f}x | "
                  f"{row.images_per_s / oracle:.2f} | {memory} | {row.host_cell} |", flush=True)
            results.append({"model": name, "batch": batch, "mode": mode, **asdict(row),
                            "of_oracle": row.images_per_s / oracle})
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if host_bound:
        print(host_bound_note(cuda_graph=args.cuda_graph), flush=True)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"environment": env, "dtype": str(dtype), "rows": results}, handle,
                      indent=2)


if __name__ == "__main__":
    main()
