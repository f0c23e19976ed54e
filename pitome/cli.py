"""The ``pitome`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from . import __version__
from .api import DEFAULT_RATIO
from .cli_eval import algorithm_list
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
    bench.add_argument("--rounds", type=int, default=1,
                       help="times every method this many times, the median counts; with "
                            "--cuda-graph the methods take turns, so clock drift hits all alike")
    bench.add_argument("--oracle", action="store_true",
                       help="add the token-slicing oracle: the same schedule with zero merge "
                            "cost, the speed limit of merging")
    bench.add_argument("--cuda-graph", action="store_true",
                       help="replay every variant as a CUDA graph (removes launch overhead)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")

    commands.add_parser("algorithms", help="list the registered merging algorithms")

    from .cli_eval import add_eval_parser

    add_eval_parser(commands)

    def model_options(command: argparse.ArgumentParser, default_model: str) -> None:
        command.add_argument("--model", default=default_model,
                             help="timm model name (default: %(default)s)")
        source = command.add_mutually_exclusive_group()
        source.add_argument("--checkpoint", metavar="FILE", help="load weights from this file")
        source.add_argument("--pretrained", action="store_true",
                            help="download pretrained weights from the Hugging Face hub")
        command.add_argument("--ratio", type=float, default=DEFAULT_RATIO,
                             help="fraction of tokens each block keeps (default: %(default)s)")

    flops = commands.add_parser(
        "flops", help="per-block FLOPs of a merged model, cross-checked with torch's counter",
        description="Analytic multiply-accumulates per block (attention, MLP, merge overhead "
                    "apart) and the total as torch.utils.flop_counter counts it.")
    model_options(flops, DEFAULT_MODEL)
    flops.add_argument("--algo", default="pitome", help="algorithm, or 'none' (default: %(default)s)")

    spectrum = commands.add_parser(
        "spectrum", help="spectral distance of each block's merges on real images (SPEC §8)",
        description="For each block: the token graph before the merge against the lifted "
                    "graph of the merge; mean and spread over images, per algorithm.")
    model_options(spectrum, "vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    spectrum.add_argument("--images", required=True, help="an ImageNet-style image folder")
    spectrum.add_argument("--algos", default="pitome,tome", help="comma-separated algorithms")
    spectrum.add_argument("--limit", type=int, default=20, help="images to use (default: 20)")
    spectrum.add_argument("--protocol", choices=("merged", "single"), default="merged",
                          help="'merged': the merged model's own merges; 'single': one merge "
                               "of --r tokens on each block of the unmerged model")
    spectrum.add_argument("--r", type=int, default=19, help="tokens merged per block, 'single'")
    spectrum.add_argument("--weighting", choices=("relu", "margin"), default="relu",
                          help="graph weights: max(0, cos), or cos above --margin")
    spectrum.add_argument("--margin", type=float, default=0.0)
    spectrum.add_argument("--plot", metavar="PNG", help="also plot distance per block")

    visualize = commands.add_parser(
        "visualize", help="paint each merged group of patches over an image",
        description="Writes a PNG: the image, then one panel per algorithm where every group "
                    "of merged patches is filled with its mean colour.")
    visualize.add_argument("image", help="an image file")
    model_options(visualize, "vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    visualize.add_argument("--algos", default="pitome,tome", help="comma-separated algorithms")
    visualize.add_argument("--block", type=int, default=-1,
                           help="show the groups after this block (default: the last)")
    visualize.add_argument("--out", default="merges.png", help="output PNG (default: %(default)s)")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    from .bench import BenchSetup, benchmark, format_table, pick_device, pick_dtype

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    batch = args.batch or (256 if device.type == "cuda" else 8)
    algos = algorithm_list(args.algos, extra=("none", "oracle"))
    if args.oracle and "oracle" not in algos:
        algos.insert(1 if algos[:1] == ["none"] else 0, "oracle")
    if args.batch is not None and args.batch < 1:
        raise SystemExit("pitome bench: --batch must be at least 1")
    if args.rounds < 1:
        raise SystemExit("pitome bench: --rounds must be at least 1")
    if args.cuda_graph and device.type != "cuda":
        raise SystemExit(f"pitome bench: --cuda-graph needs a CUDA device, not {device}")

    model = _model(args)
    weights = args.checkpoint or ("pretrained" if args.pretrained else "random weights")
    setup = BenchSetup(model=args.model, device=str(device), dtype=str(dtype).split(".")[-1],
                       batch=batch, weights=weights, cuda_graph=args.cuda_graph)
    progress = None if args.json else (
        lambda algo: print(f"timing {algo} ...", file=sys.stderr, flush=True))
    rows = benchmark(model, algos, args.ratio, batch, device, dtype, warmup=args.warmup,
                     repeats=args.repeats, progress=progress, cuda_graph=args.cuda_graph,
                     rounds=args.rounds)
    if args.json:
        print(json.dumps({"setup": setup.__dict__, "rows": [row.as_dict() for row in rows],
                          "torch": torch.__version__}, indent=2))
    else:
        print(format_table(rows, setup))
    return 0


def _model(args: argparse.Namespace):
    from .models import create_timm_model

    return create_timm_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)


def run_flops(args: argparse.Namespace) -> int:
    from .analysis.flops import counted_flops, flops
    from .api import patch

    model = _model(args)
    if args.algo != "none":
        algorithm_list(args.algo)
        patch(model, algo=args.algo, ratio=args.ratio)
    inputs = torch.randn(1, 3, *model.patch_embed.img_size)
    report = flops(model, inputs)
    print(f"{args.model}, algo {args.algo}, ratio {args.ratio:g}: MACs per image "
          "(FLOPs = 2 x MACs)")
    print(f"{'block':>5} {'tokens in':>9} {'out':>5} {'attn GMACs':>10} {'MLP GMACs':>9} "
          f"{'merge MMACs':>11}")
    for block in report.blocks:
        print(f"{block.block:>5} {block.tokens_in:>9} {block.tokens_out:>5} "
              f"{block.attention_macs / 1e9:>10.3f} {block.mlp_macs / 1e9:>9.3f} "
              f"{block.merge_macs / 1e6:>11.2f}")
    counted = counted_flops(model, inputs)
    print(f"embedding {report.embed_macs / 1e9:.3f} GMACs, head {report.head_macs / 1e9:.4f} GMACs")
    print(f"total {report.total_macs / 1e9:.3f} GMACs = {report.total_flops / 1e9:.3f} GFLOPs "
          f"(merge {report.merge_macs / 1e6:.1f} MMACs); torch.utils.flop_counter: "
          f"{counted / 1e9:.3f} GFLOPs ({report.total_flops / counted - 1:+.2%})")
    return 0


def run_spectrum(args: argparse.Namespace) -> int:
    from .analysis.spectrum import block_distances, single_merge_distances
    from .tasks.image_classification import load_images, model_transform, read_image_folder

    algos = algorithm_list(args.algos)
    model = _model(args)
    items = read_image_folder(args.images)[: args.limit]
    images, _ = load_images(items, model_transform(model))
    results, cumulative = {}, {}
    for algo in algos:
        print(f"measuring {algo} ...", file=sys.stderr, flush=True)
        if args.protocol == "single":
            results[algo] = single_merge_distances(model, images, algo, args.r, args.weighting,
                                                   args.margin)
        else:
            results[algo], cumulative[algo] = block_distances(
                model, images, algo, args.ratio, args.weighting, args.margin)
    setting = f"r={args.r} once per block" if args.protocol == "single" else f"ratio {args.ratio:g}"
    print(f"spectral distance per block, {len(items)} images, {setting}, weights "
          f"{args.weighting}: mean ± std of each block's own merge"
          + ("; 'from input': mean distance of all merges so far" if cumulative else ""))
    header = [f"{algo:>16}" for algo in algos]
    header += [f"{algo + ' from input':>18}" for algo in cumulative]
    print("block  " + "  ".join(header))
    for block in range(len(model.blocks)):
        cells = [f"{results[a][:, block].mean():8.3f} ± {results[a][:, block].std():5.3f}"
                 for a in algos]
        cells = [f"{cell:>16}" for cell in cells]
        cells += [f"{cumulative[a][:, block].mean():>18.3f}" for a in cumulative]
        print(f"{block:>5}  " + "  ".join(cells))
    if args.plot:
        from .analysis.spectrum import plot_distances

        plot_distances(results, args.plot)
        print(f"plot written to {args.plot}")
    return 0


def run_visualize(args: argparse.Namespace) -> int:
    from .analysis.visualize import visualize

    out = visualize(_model(args), args.image, algorithm_list(args.algos), args.ratio, args.out,
                    block=args.block)
    print(f"wrote {out}")
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
    if args.command == "flops":
        return run_flops(args)
    if args.command == "spectrum":
        return run_spectrum(args)
    if args.command == "visualize":
        return run_visualize(args)
    if args.command == "eval":
        from .cli_eval import run_eval

        return run_eval(args)
    parser.print_help()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
