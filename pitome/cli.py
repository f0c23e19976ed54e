"""The ``pitome`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

import torch

from . import __version__
from .cli_common import (METHOD_DOC, HelpFormatter, UsageError, add_algos, add_device, add_model,
                         algorithm_list, at_least, weights_label)
from .core.registry import available_algorithms

DEFAULT_MODEL = "vit_base_patch16_224"
DEFAULT_ALGOS = ("none", "tome", "pitome")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pitome", formatter_class=HelpFormatter,
        description="Token merging for pretrained transformers (PiToMe, ToMe, ...). "
                    f"The method is described in {METHOD_DOC}.")
    parser.add_argument("--version", action="version", version=f"pitome {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error, not one line")

    def command(name: str, **kwargs) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[shared], formatter_class=HelpFormatter,
                                   **kwargs)

    bench = command(
        "bench", help="compare tokens, FLOPs and throughput of merging methods on one model",
        description="Compare no merging, ToMe and PiToMe on a timm ViT: tokens after the last "
                    "block, GFLOPs per image and measured images/s. Offline by default "
                    "(random weights; throughput does not depend on them).")
    add_model(bench, DEFAULT_MODEL, random_by_default=True)
    add_algos(bench, ",".join(DEFAULT_ALGOS))
    bench.add_argument("--batch-size", "--batch", dest="batch_size", type=at_least(1),
                       help="images per forward (default: 256 on CUDA, 8 on CPU)")
    add_device(bench)
    bench.add_argument("--dtype", choices=("fp32", "bf16", "fp16"),
                       help="model precision (default: bf16 on CUDA, fp32 on CPU)")
    bench.add_argument("--warmup", type=at_least(0), default=2, help="untimed forwards per method")
    bench.add_argument("--repeats", type=at_least(1), default=5,
                       help="timed forwards per method (the median counts)")
    bench.add_argument("--rounds", type=at_least(1), default=1,
                       help="times every method this many times, the median counts; with "
                            "--cuda-graph the methods take turns, so clock drift hits all alike")
    bench.add_argument("--oracle", action="store_true",
                       help="add the token-slicing oracle: the same schedule with zero merge "
                            f"cost, the speed limit of merging ({METHOD_DOC} §9)")
    bench.add_argument("--modes", metavar="LIST",
                       help="comma-separated ways to run every variant: eager, compile "
                            "(torch.compile), cuda-graph (replayed); the table then says which "
                            "to use (default: all three on CUDA, eager elsewhere)")
    bench.add_argument("--cuda-graph", action="store_true",
                       help="replay every variant as a CUDA graph (removes launch overhead); "
                            "the same as --modes cuda-graph")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")

    command("algorithms", help="list the registered merging algorithms")

    from .cli_eval import add_eval_parser

    add_eval_parser(commands, shared)

    from .cli_finetune import add_finetune_parser

    add_finetune_parser(commands, shared)

    from .cli_calibrate import add_calibrate_parser

    add_calibrate_parser(commands, shared)

    flops = command(
        "flops", help="per-block FLOPs of a merged model, cross-checked with torch's counter",
        description="Analytic multiply-accumulates per block (attention, MLP, merge overhead "
                    f"apart, {METHOD_DOC} §7) and the total as torch.utils.flop_counter "
                    "counts it. FLOPs do not depend on the weights: random by default.")
    add_model(flops, DEFAULT_MODEL, random_by_default=True)
    add_algos(flops, "pitome")

    spectrum = command(
        "spectrum", help=f"spectral distance of each block's merges on real images ({METHOD_DOC} §8)",
        description="For each block: the token graph before the merge against the lifted "
                    "graph of the merge; mean and spread over images, per algorithm. Only "
                    "methods that merge tokens into groups have one (not dct).")
    add_model(spectrum, "vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    spectrum.add_argument("--data", "--images", dest="data", required=True,
                          help="an ImageNet-style image folder")
    add_algos(spectrum, "pitome,tome", none=False)
    spectrum.add_argument("--limit", type=at_least(1), default=20, help="images to use")
    spectrum.add_argument("--protocol", choices=("merged", "single"), default="merged",
                          help="'merged': the merged model's own merges; 'single': one merge "
                               "of --r tokens on each block of the unmerged model")
    spectrum.add_argument("--r", type=at_least(1), default=19,
                          help="tokens merged per block with --protocol single")
    spectrum.add_argument("--weighting", choices=("relu", "margin"), default="relu",
                          help="graph weights: max(0, cos), or cos above --margin")
    spectrum.add_argument("--margin", type=float, default=0.0,
                          help="the cosine threshold of --weighting margin")
    spectrum.add_argument("--plot", metavar="PNG", help="also plot distance per block")

    visualize = command(
        "visualize", help="paint each merged group of patches over an image",
        description="Writes a PNG: the image, then one panel per algorithm where every group "
                    "of merged patches is filled with its mean colour.")
    visualize.add_argument("image", help="an image file")
    add_model(visualize, "vit_tiny_patch16_224.augreg_in21k_ft_in1k")
    add_algos(visualize, "pitome,tome", none=False)
    visualize.add_argument("--block", type=int, default=-1,
                           help="show the groups after this block; negative counts from the end")
    visualize.add_argument("--out", default="merges.png", help="output PNG")
    return parser


def run_bench(args: argparse.Namespace) -> int:
    from .bench import BenchSetup, benchmark_modes, format_table, pick_device, pick_dtype

    algos = algorithm_list(args.algos, extra=("none", "oracle"))
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    batch = args.batch_size or (256 if device.type == "cuda" else 8)
    if args.oracle and "oracle" not in algos:
        algos.insert(1 if algos[:1] == ["none"] else 0, "oracle")
    modes = bench_modes(args, device)

    weights = weights_label(args)
    model = _model(args)
    setup = BenchSetup(model=args.model, device=str(device), dtype=str(dtype).split(".")[-1],
                       batch=batch, weights=weights, cuda_graph=args.cuda_graph)
    progress = None if args.json else (
        lambda algo: print(f"timing {algo} ...", file=sys.stderr, flush=True))
    rows = benchmark_modes(model, algos, args.ratio, batch, device, dtype, modes,
                           warmup=args.warmup, repeats=args.repeats, progress=progress,
                           rounds=args.rounds)
    if args.json:
        print(json.dumps({"setup": {**setup.__dict__, "modes": modes},
                          "rows": [row.as_dict() for row in rows],
                          "torch": torch.__version__}, indent=2))
    else:
        print(format_table(rows, setup))
    return 0


def bench_modes(args: argparse.Namespace, device: torch.device) -> list[str]:
    """The modes ``pitome bench`` runs: ``--modes``, else ``--cuda-graph``'s one, else all
    three on CUDA and eager elsewhere."""
    from .bench import MODES

    if args.modes is not None and args.cuda_graph:
        raise UsageError("give --modes or --cuda-graph, not both")
    if args.modes is None:
        if args.cuda_graph and device.type != "cuda":
            raise UsageError(f"--cuda-graph needs a CUDA device, not {device}")
        if args.cuda_graph:
            return ["cuda-graph"]
        return list(MODES) if device.type == "cuda" else ["eager"]
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise UsageError(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    if len(set(modes)) != len(modes):
        raise UsageError(f"--modes {args.modes!r} names a mode more than once")
    if "cuda-graph" in modes and device.type != "cuda":
        raise UsageError(f"--modes cuda-graph needs a CUDA device, not {device}")
    return modes


def _model(args: argparse.Namespace):
    from .models import create_timm_model

    return create_timm_model(args.model, checkpoint=args.checkpoint, pretrained=args.pretrained)


def run_flops(args: argparse.Namespace) -> int:
    from .analysis.flops import counted_flops, flops
    from .api import patch, unpatch

    algos = algorithm_list(args.algos, extra=("none",))
    weights_label(args)
    model = _model(args)
    inputs = torch.randn(1, 3, *model.patch_embed.img_size)
    for index, algo in enumerate(algos):
        unpatch(model)
        if algo != "none":
            patch(model, algo=algo, ratio=args.ratio)
        print(("\n" if index else "") + _flops_table(model, inputs, f"{args.model}, algo {algo}, "
                                                      f"ratio {args.ratio:g}", flops, counted_flops))
    return 0


def _flops_table(model, inputs, title: str, flops, counted_flops) -> str:
    report = flops(model, inputs)
    lines = [f"{title}: MACs per image (FLOPs = 2 x MACs)",
             f"{'block':>5} {'tokens in':>9} {'out':>5} {'attn GMACs':>10} {'MLP GMACs':>9} "
             f"{'merge MMACs':>11}"]
    for block in report.blocks:
        lines.append(f"{block.block:>5} {block.tokens_in:>9} {block.tokens_out:>5} "
                     f"{block.attention_macs / 1e9:>10.3f} {block.mlp_macs / 1e9:>9.3f} "
                     f"{block.merge_macs / 1e6:>11.2f}")
    counted = counted_flops(model, inputs)
    lines.append(f"embedding {report.embed_macs / 1e9:.3f} GMACs, head "
                 f"{report.head_macs / 1e9:.4f} GMACs")
    lines.append(f"total {report.total_macs / 1e9:.3f} GMACs = {report.total_flops / 1e9:.3f} "
                 f"GFLOPs (merge {report.merge_macs / 1e6:.1f} MMACs); torch.utils.flop_counter: "
                 f"{counted / 1e9:.3f} GFLOPs ({report.total_flops / counted - 1:+.2%})")
    return "\n".join(lines)


def run_spectrum(args: argparse.Namespace) -> int:
    from .analysis.spectrum import block_distances, check_spectrum_algorithm, \
        single_merge_distances
    from .tasks.image_classification import load_readable_images, model_transform, \
        read_image_folder

    algos = algorithm_list(args.algos)
    weights = weights_label(args)
    model = _model(args)
    items = read_image_folder(args.data)[: args.limit]
    images = load_readable_images(items, model_transform(model))
    for algo in algos:
        check_spectrum_algorithm(model, images[:1], algo)
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
    print(("RANDOM WEIGHTS, the distances mean little: " if weights == "random weights" else "")
          + f"spectral distance per block, {images.shape[0]} images, {setting}, weights "
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

    algos = algorithm_list(args.algos)
    weights = weights_label(args)
    model = _model(args)
    depth = len(model.blocks)
    if not -depth <= args.block < depth:
        raise UsageError(f"--block {args.block} is outside {args.model}'s {depth} blocks "
                         f"(0 to {depth - 1}, or -{depth} to -1 from the end)")
    out = visualize(model, args.image, algos, args.ratio, args.out, block=args.block,
                    caption=None if weights != "random weights" else "RANDOM WEIGHTS")
    print(f"wrote {out}")
    return 0


def run_algorithms() -> int:
    algorithms = available_algorithms()
    width = max(map(len, algorithms))
    for name, summary in algorithms.items():
        print(f"{name.ljust(width)}  {summary}")
    return 0


COMMANDS = {"bench": run_bench, "flops": run_flops, "spectrum": run_spectrum,
            "visualize": run_visualize}
USER_ERRORS = (ValueError, TypeError, OSError, ImportError, NotImplementedError)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user error is one line on stderr and a non-zero exit (``--debug``
    raises it instead, with its traceback)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    name = " ".join(filter(None, ["pitome", args.command, getattr(args, "task", None)]))
    try:
        if args.command == "algorithms":
            return run_algorithms()
        if args.command == "calibrate":
            from .cli_calibrate import run_calibrate

            return run_calibrate(args)
        if args.command == "eval":
            from .cli_eval import run_eval

            return run_eval(args)
        if args.command == "finetune":
            from .cli_finetune import run_finetune

            return run_finetune(args)
        return COMMANDS[args.command](args)
    except UsageError as error:
        if args.debug:
            raise
        print(f"{name}: error: {error}", file=sys.stderr)
        return 2
    except USER_ERRORS as error:
        if args.debug:
            raise
        print(f"{name}: error: {error} (--debug shows where)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
