"""The ``pitome`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from . import __version__
from .api import DEFAULT_RATIO
from .core.registry import available_algorithms

DEFAULT_MODEL = "vit_base_patch16_224"
DEFAULT_ALGOS = ("none", "tome", "pitome")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pitome", description="Token merging for pretrained transformers (PiToMe, ToMe, ...).")
    parser.add_argument("--version", action="version", version=f"pitome {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    bench = commands.add_parser(
        "bench", help="compare tokens, FLOPs and throughput of merging methods on one model",
        description="Compare no merging, ToMe and PiToMe on a timm ViT: tokens after the last "
                    "block, GFLOPs per image and measured images/s. Offline by default "
                    "(random weights; throughput does not depend on them).")
    bench.add_argument("--model", default=DEFAULT_MODEL, help="timm model name (default: %(default)s)")
    bench.add_argument("--ratio", type=float, default=DEFAULT_RATIO,
                       help="fraction of tokens each block keeps (default: %(default)s)")
    bench.add_argument("--algos", default=",".join(DEFAULT_ALGOS),
                       help="comma-separated algorithms; 'none' is the unmerged model "
                            "(default: %(default)s)")
    weights = bench.add_mutually_exclusive_group()
    weights.add_argument("--checkpoint", metavar="FILE", help="load weights from a state-dict file")
    weights.add_argument("--pretrained", action="store_true",
                         help="download pretrained weights from the Hugging Face hub")
    bench.add_argument("--batch", type=int, help="images per forward (default: 256 on CUDA, 8 on CPU)")
    bench.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    bench.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                       help="model precision (default: bf16 on CUDA, fp32 on CPU)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed forwards per method")
    bench.add_argument("--repeats", type=int, default=5, help="timed forwards per method (median)")
    bench.add_argument("--oracle", action="store_true",
                       help="add the token-slicing oracle: the same schedule with zero merge "
                            "cost, the speed limit of merging")
    bench.add_argument("--cuda-graph", action="store_true",
                       help="replay every variant as a CUDA graph (removes launch overhead)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")

    commands.add_parser("algorithms", help="list the registered merging algorithms")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    from .bench import BenchSetup, benchmark, format_table, pick_device, pick_dtype
    from .models import create_timm_model

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    batch = args.batch or (256 if device.type == "cuda" else 8)
    algos = [name.strip() for name in args.algos.split(",") if name.strip()]
    if args.oracle and "oracle" not in algos:
        algos.insert(1 if algos[:1] == ["none"] else 0, "oracle")
    known = set(available_algorithms()) | {"none", "oracle"}
    unknown = [name for name in algos if name.replace("-", "_").lower() not in known]
    if unknown:
        raise SystemExit(f"pitome bench: unknown algorithm(s) {unknown}; "
                         f"available: none, {', '.join(sorted(available_algorithms()))}")
    if args.batch is not None and args.batch < 1:
        raise SystemExit("pitome bench: --batch must be at least 1")
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit(f"pitome bench: --cuda-graph needs a CUDA device, not {device}")

    model = create_timm_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)
    weights = args.checkpoint or ("pretrained" if args.pretrained else "random weights")
    setup = BenchSetup(model=args.model, device=str(device), dtype=str(dtype).split(".")[-1],
                       batch=batch, weights=weights, cuda_graph=args.cuda_graph)
    progress = None if args.json else (
        lambda algo: print(f"timing {algo} ...", file=sys.stderr, flush=True))
    rows = benchmark(model, algos, args.ratio, batch, device, dtype, warmup=args.warmup,
                     repeats=args.repeats, progress=progress, cuda_graph=args.cuda_graph)
    if args.json:
        print(json.dumps({"setup": setup.__dict__, "rows": [row.as_dict() for row in rows],
                          "torch": torch.__version__}, indent=2))
    else:
        print(format_table(rows, setup))
    return 0


def run_algorithms() -> int:
    algorithms = available_algorithms()
    width = max(map(len, algorithms))
    for name, summary in algorithms.items():
        print(f"{name.ljust(width)}  {summary}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "bench":
        return run_bench(args)
    if args.command == "algorithms":
        return run_algorithms()
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
