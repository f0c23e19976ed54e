"""Throughput of merging on Hugging Face and open_clip vision models, against their oracles.

The runtime issue's grid: HF CLIPVisionModel ViT-L/14-336 (LLaVA's tower) at batch 32, HF
ViTForImageClassification ViT-B/16 at 256, open_clip ViT-B-16's tower at 256, and each at
batch 1; ρ 0.9, random weights (speed does not depend on them), bf16 on a GPU. Every
variant runs in one process: the unpatched model, the token-slicing ``oracle`` (each layer
runs its attention on the tokens entering it and keeps the first ones leaving it before
its MLP, as a merging layer does, at zero merge cost: the speed limit of the schedule,
docs/method.md §9), two looser bounds (each layer's input sliced to the count entering it,
``oracle-in``, or leaving it, ``oracle-out``), ToMe and PiToMe. With ``--cuda-graph`` (the default on a GPU) every variant is captured,
then the variants take turns over ``--rounds``; eager rows are measured too.

    python benchmarks/families.py --json docs/families-h200.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import platform
import statistics
import sys
from collections.abc import Callable

import torch
from torch import nn

import pitome
from pitome.adapters.hf import HuggingFaceAdapter
from pitome.bench import inference_run, launch_time, time_forward
from pitome.core.schedule import TokenSchedule, token_counts
from pitome.cuda_graph import CudaGraphForward

VARIANTS = ("none", "oracle", "oracle-in", "oracle-out", "tome", "pitome")


def hf_clip_l336() -> tuple[nn.Module, nn.ModuleList, int, int]:
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096,
                                           num_hidden_layers=24, num_attention_heads=16,
                                           image_size=336, patch_size=14,
                                           attn_implementation="sdpa")
    model = transformers.CLIPVisionModel(config)
    return model, HuggingFaceAdapter().stack(model), 336, 1


def hf_vit_b16() -> tuple[nn.Module, nn.ModuleList, int, int]:
    import transformers

    config = transformers.ViTConfig(attn_implementation="sdpa")
    model = transformers.ViTForImageClassification(config)
    return model, HuggingFaceAdapter().stack(model), 224, 1


def open_clip_b16() -> tuple[nn.Module, nn.ModuleList, int, int]:
    import open_clip

    model = open_clip.create_model("ViT-B-16").visual
    return model, model.transformer.resblocks, 224, 1


MODELS: dict[str, Callable[[], tuple[nn.Module, nn.ModuleList, int, int]]] = {
    "hf-clip-vit-l14-336": hf_clip_l336,
    "hf-vit-b16-224": hf_vit_b16,
    "open_clip-vit-b16": open_clip_b16,
}
GRID = [("hf-clip-vit-l14-336", 32), ("hf-vit-b16-224", 256), ("open_clip-vit-b16", 256),
        ("hf-clip-vit-l14-336", 1), ("hf-vit-b16-224", 1), ("open_clip-vit-b16", 1)]


def call(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """One tensor in, one tensor out, as CUDA graphs want it."""
    if "open_clip" in type(model).__module__ or hasattr(model, "transformer"):
        return model

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        out = model(pixel_values=pixels)
        return out.logits if hasattr(out, "logits") else out.pooler_output

    return forward


@contextlib.contextmanager
def eager_mask_shortcut(model: nn.Module):
    """While active, ``model``'s transformers module builds no mask when none is given, as
    it does in eager mode: during CUDA-graph capture transformers' ``create_bidirectional_mask``
    skips that shortcut and materialises an all-valid additive mask, which sends SDPA to its
    slower masked kernel (docs/performance.md). Every variant of a model is captured under
    the same rule, so the rows compare like with like."""
    module = importlib.import_module(type(model).__module__)
    original = getattr(module, "create_bidirectional_mask", None)
    if original is None:
        yield
        return

    def shortcut(*args, **kwargs):
        given = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
        return None if given is None else original(*args, **kwargs)

    module.create_bidirectional_mask = shortcut
    try:
        yield
    finally:
        module.create_bidirectional_mask = original


def slicing_hooks(layers: nn.ModuleList, counts: list[int]) -> list:
    """Pre-hooks keeping the first ``counts[i]`` tokens of layer ``i``'s input (and of the
    all-valid mask some transformers versions hand vision layers)."""
    def slicer(keep: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            rest = list(args[1:])
            if rest and isinstance(rest[0], torch.Tensor) and rest[0].dim() == 4:
                rest[0] = rest[0][..., :keep, :keep]
            return (args[0][:, :keep], *rest), kwargs
        return hook
    return [layer.register_forward_pre_hook(slicer(keep), with_kwargs=True)
            for layer, keep in zip(layers, counts)]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def split_layer(layer: nn.Module) -> tuple[Callable, Callable]:
    """The layer as its two residual halves: ``attention(x, *args, **kwargs)`` and
    ``mlp(x)``, each returning the residual stream (pre-norm HF CLIP/ViT, open_clip)."""
    if hasattr(layer, "layer_norm1"):  # HF CLIP / SigLIP
        return (lambda x, mask=None, *a, **k: x + _first(layer.self_attn(
                    hidden_states=layer.layer_norm1(x), attention_mask=mask)),
                lambda x: x + layer.mlp(layer.layer_norm2(x)))
    if hasattr(layer, "layernorm_before"):  # HF ViT / DeiT, either transformers layout
        def vit_mlp(x):
            if hasattr(layer, "mlp"):
                return x + layer.mlp(layer.layernorm_after(x))
            return layer.output(layer.intermediate(layer.layernorm_after(x)), x)
        return (lambda x, mask=None, *a, **k: x + _first(layer.attention(
                    layer.layernorm_before(x), mask) if mask is not None
                    else layer.attention(layer.layernorm_before(x))), vit_mlp)
    if hasattr(layer, "ln_1"):  # open_clip ResidualAttentionBlock
        return (lambda x, *a, **k: x + layer.ls_1(layer.attention(q_x=layer.ln_1(x))),
                lambda x: x + layer.ls_2(layer.mlp(layer.ln_2(x))))
    raise TypeError(f"no exact oracle for {type(layer).__name__}")


class ExactOracle:
    """Each layer runs attention on the tokens entering it, keeps the first ``leaving``
    of them, then runs its MLP: a merging layer's shapes at zero merge cost."""

    def __init__(self, layers: nn.ModuleList, entering: list[int], leaving: list[int]) -> None:
        self.layers = layers
        for layer, keep_in, keep_out in zip(layers, entering, leaving):
            attention, mlp = split_layer(layer)
            layer.forward = self._forward(attention, mlp, keep_in, keep_out)

    @staticmethod
    def _forward(attention, mlp, keep_in: int, keep_out: int):
        def forward(x, *args, **kwargs):
            mask = args[0] if args else kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 4:
                mask = mask[..., :keep_in, :keep_in]
            return mlp(attention(x[:, :keep_in], mask)[:, :keep_out])
        return forward

    def remove(self) -> None:
        for layer in self.layers:
            del layer.forward


@torch.no_grad()
def check_oracle(model: nn.Module, layers: nn.ModuleList, pixels: torch.Tensor,
                 tokens: int) -> None:
    """The exact oracle's split layers, slicing nothing, must compute the model itself."""
    forward = call(model)
    expected = forward(pixels).float()
    oracle = ExactOracle(layers, [tokens] * len(layers), [tokens] * len(layers))
    try:
        got = forward(pixels).float()
    finally:
        oracle.remove()
    error = (got - expected).abs().max().item() / expected.abs().max().clamp_min(1e-6).item()
    if error > 2e-2:
        raise AssertionError(f"the oracle's split layers do not compute the model: "
                             f"relative error {error:.3g}")


def measure(name: str, batch: int, ratio: float, device: torch.device, dtype: torch.dtype,
            rounds: int, repeats: int, cuda_graph: bool, mask_shortcut: bool = True
            ) -> list[dict]:
    model, layers, size, prefix = MODELS[name]()
    model = model.to(device, dtype).eval()
    with eager_mask_shortcut(model) if mask_shortcut else contextlib.nullcontext():
        rows = _measure(model, layers, size, prefix, name, batch, ratio, device, dtype, rounds,
                        repeats, cuda_graph)
    for row in rows:
        row["mask_shortcut"] = mask_shortcut
    return rows


def _measure(model: nn.Module, layers: nn.ModuleList, size: int, prefix: int, name: str,
             batch: int, ratio: float, device: torch.device, dtype: torch.dtype, rounds: int,
             repeats: int, cuda_graph: bool) -> list[dict]:
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(device, dtype)
    tokens = (size // (14 if "l14" in name else 16)) ** 2 + prefix
    counts = token_counts(tokens, TokenSchedule(ratio=ratio).plan(tokens, prefix, len(layers)))
    check_oracle(model, layers, pixels[:2], tokens)
    runs: dict[str, Callable[[], None]] = {}
    rows: list[dict] = []
    for variant in VARIANTS:
        pitome.unpatch(model)
        hooks = []
        if variant == "oracle":
            hooks = [ExactOracle(layers, counts[:-1], counts[1:])]
        elif variant == "oracle-in":
            hooks = slicing_hooks(layers, counts[:-1])
        elif variant == "oracle-out":
            hooks = slicing_hooks(layers, counts[1:])
        elif variant in ("tome", "pitome"):
            pitome.patch(model, algo=variant, ratio=ratio)
        forward = call(model)
        if cuda_graph:
            graph = CudaGraphForward(forward, pixels)
            runs[variant] = lambda graph=graph: graph(pixels)
        eager = inference_run(forward, pixels)
        eager()
        seconds = time_forward(eager, device, 3, repeats)
        host = launch_time(eager, device, repeats)
        rows.append({"model": name, "batch": batch, "ratio": ratio, "variant": variant,
                     "mode": "eager", "forward_ms": seconds * 1e3,
                     "host_ms": None if host is None else host * 1e3,
                     "tokens_out": counts[-1] if variant != "none" else tokens})
        for hook in hooks:
            hook.remove()
        if variant in ("tome", "pitome"):
            assert pitome.merge_info(model).token_counts == counts, (variant, counts)
    pitome.unpatch(model)
    if cuda_graph:
        timings: dict[str, list[float]] = {variant: [] for variant in runs}
        for _ in range(rounds):
            for variant, run in runs.items():
                timings[variant].append(time_forward(run, device, 3, repeats))
        for variant in runs:
            rows.append({"model": name, "batch": batch, "ratio": ratio, "variant": variant,
                         "mode": "cuda-graph",
                         "forward_ms": statistics.median(timings[variant]) * 1e3,
                         "host_ms": None,
                         "tokens_out": counts[-1] if variant != "none" else tokens})
    for mode in ("eager", "cuda-graph"):
        base = next((r for r in rows if r["mode"] == mode and r["variant"] == "none"), None)
        if base is None:
            continue
        for row in rows:
            if row["mode"] == mode:
                row["speedup"] = base["forward_ms"] / row["forward_ms"]
    del model, runs
    if device.type == "cuda":
        torch.cuda.synchronize()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def table(rows: list[dict]) -> str:
    lines = [f"{'model':22} {'batch':>5} {'mode':10} {'variant':10} {'ms':>8} {'host ms':>8} "
             f"{'speedup':>8} {'of oracle':>9} {'of oracle-in':>12} {'of oracle-out':>13}"]
    for row in rows:
        group = [r for r in rows if r["model"] == row["model"] and r["batch"] == row["batch"]
                 and r["mode"] == row["mode"]]
        oracle = {r["variant"]: r["speedup"] for r in group if r["variant"].startswith("oracle")}
        host = "" if row["host_ms"] is None else f"{row['host_ms']:.2f}"
        exact = row["speedup"] / oracle["oracle"] if "oracle" in oracle else float("nan")
        of_in = row["speedup"] / oracle["oracle-in"] if "oracle-in" in oracle else float("nan")
        of_out = row["speedup"] / oracle["oracle-out"] if "oracle-out" in oracle else float("nan")
        lines.append(f"{row['model']:22} {row['batch']:>5} {row['mode']:10} {row['variant']:10} "
                     f"{row['forward_ms']:8.2f} {host:>8} {row['speedup']:7.2f}x "
                     f"{exact:9.3f} {of_in:12.3f} {of_out:13.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ratio", type=float, default=0.9)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    parser.add_argument("--no-cuda-graph", action="store_true")
    parser.add_argument("--transformers-mask", choices=("eager-shortcut", "as-is"),
                        default="eager-shortcut",
                        help="eager-shortcut (default): no all-valid mask is built under CUDA-graph "
                             "capture either, as in eager mode; as-is: transformers' own "
                             "behaviour, which slows the unpatched HF ViT's graph (see the docs)")
    parser.add_argument("--json", help="write the rows here (refuses to overwrite)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("benchmarks/families.py measures GPU speed; no CUDA device is available")
    device, dtype = torch.device("cuda"), torch.bfloat16
    rows: list[dict] = []
    grid = [(name, batch) for name, batch in GRID if args.models is None or name in args.models]
    for index, (name, batch) in enumerate(grid, 1):
        print(f"[{index}/{len(grid)}] {name} batch {batch}", file=sys.stderr, flush=True)
        rows += measure(name, batch, args.ratio, device, dtype, args.rounds, args.repeats,
                        not args.no_cuda_graph, args.transformers_mask == "eager-shortcut")
    print(table(rows))
    if args.json:
        from pathlib import Path

        if Path(args.json).exists():
            sys.exit(f"{args.json} exists; give another --json path")
        environment = {"python": platform.python_version(), "torch": torch.__version__,
                       "gpu": torch.cuda.get_device_name(device)}
        Path(args.json).write_text(json.dumps({"environment": environment, "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
