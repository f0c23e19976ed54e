"""``pitome bench``: tokens, FLOPs and measured throughput of merging methods on one model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .adapters.base import CONFIG_ATTR
from .analysis.flops import VitShape, similarity_macs, vit_macs
from .api import merge_info, patch, unpatch

BASELINE = "none"


@dataclass(frozen=True)
class BenchRow:
    """One method's result. ``speedup`` is throughput relative to the unmerged model."""

    algo: str
    ratio: float
    tokens_out: int
    gflops: float
    merge_gflops: float
    images_per_s: float
    speedup: float

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


@dataclass(frozen=True)
class BenchSetup:
    model: str
    device: str
    dtype: str
    batch: int
    weights: str


def pick_device(requested: str | None) -> torch.device:
    if requested:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(requested: str | None, device: torch.device) -> torch.dtype:
    names = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if requested is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in names:
        raise ValueError(f"dtype must be one of {sorted(names)}, got {requested!r}")
    return names[requested]


def time_forward(run: Callable[[], object], device: torch.device, warmup: int,
                 repeats: int) -> float:
    """Median seconds of one call of ``run`` after ``warmup`` calls."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        run()
    synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def benchmark(model: nn.Module, algos: Sequence[str], ratio: float, batch: int,
              device: torch.device, dtype: torch.dtype, warmup: int = 2, repeats: int = 5,
              progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Measure every algorithm in ``algos`` (``"none"`` is the unmerged model) on ``model``.

    The model is moved to ``device`` and ``dtype``; inputs are random images of the model's
    own input size (throughput does not depend on pixel values, only on shapes).
    """
    model = model.to(device=device, dtype=dtype).eval()
    image_size = model.patch_embed.img_size
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, *image_size, generator=generator).to(device, dtype)
    shape = VitShape.of(model)
    num_patches = model.patch_embed.num_patches
    metric_width = model.blocks[0].attn.head_dim

    rows: list[BenchRow] = []
    baseline_seconds = None
    for algo in algos:
        if progress is not None:
            progress(algo)
        if algo == BASELINE:
            unpatch(model)
            counts = [num_patches + model.num_prefix_tokens] * (shape.num_blocks + 1)
        else:
            patch(model, algo=algo, ratio=ratio)
            with torch.inference_mode():
                model(images[:1])
            counts = merge_info(model).token_counts

        def forward() -> None:
            with torch.inference_mode():
                model(images)

        seconds = time_forward(forward, device, warmup, repeats)
        if algo == BASELINE or baseline_seconds is None:
            baseline_seconds = baseline_seconds or seconds
        merge = 0 if algo == BASELINE else similarity_macs(
            model.__dict__[CONFIG_ATTR].algorithm, counts, model.num_prefix_tokens, metric_width)
        rows.append(BenchRow(
            algo=algo, ratio=1.0 if algo == BASELINE else ratio, tokens_out=counts[-1],
            gflops=vit_macs(shape, counts, num_patches) / 1e9, merge_gflops=merge / 1e9,
            images_per_s=batch / seconds, speedup=baseline_seconds / seconds))
    unpatch(model)
    return rows


def format_table(rows: Sequence[BenchRow], setup: BenchSetup) -> str:
    """A plain-text table of ``rows`` under a one-line description of the setup."""
    header = ("algo", "ratio", "tokens out", "GFLOPs", "merge GFLOPs", "img/s", "speedup")
    lines = [[row.algo, f"{row.ratio:g}", str(row.tokens_out), f"{row.gflops:.2f}",
              f"{row.merge_gflops:.3f}", f"{row.images_per_s:.1f}", f"{row.speedup:.2f}x"]
             for row in rows]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(width) if i else cell.ljust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths)))

    title = (f"{setup.model} ({setup.weights}) on {setup.device}, {setup.dtype}, "
             f"batch {setup.batch}; GFLOPs are multiply-accumulates per image")
    rule = "-" * len(render(header))
    return "\n".join([title, render(header), rule, *map(render, lines)])
