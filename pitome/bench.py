"""``pitome bench``: tokens, FLOPs and measured throughput of merging methods on one model."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from .analysis.flops import VitShape, similarity_macs, vit_macs
from .api import merge_config, merge_info, patch, unpatch
from .core.schedule import TokenSchedule, token_counts
from .cuda_graph import CudaGraphForward

BASELINE = "none"
ORACLE = "oracle"
MODES = ("eager", "compile", "cuda-graph")
# How to run a model the way each mode measured it.
HOW_TO_RUN = {
    "eager": "call the patched model as it is",
    "compile": "torch.compile(model) (or mode=\"reduce-overhead\" for CUDA graphs inside)",
    "cuda-graph": "pitome.cuda_graph.CudaGraphForward(model, example_batch)",
}
# A row whose host needs this much of the forward's time to launch it measures the host:
# the GPU waits for kernels rather than running them (eager mode at small batches).
HOST_BOUND = 0.8


@dataclass(frozen=True)
class BenchRow:
    """One method's result. ``speedup`` is throughput relative to the unmerged model;
    ``forward_ms`` is one forward of the whole batch, and ``host_ms`` how long the host
    takes to launch it on a GPU (None elsewhere)."""

    algo: str
    ratio: float
    tokens_out: int
    gflops: float
    merge_gflops: float
    images_per_s: float
    speedup: float
    forward_ms: float
    peak_memory_mib: float | None = None
    host_ms: float | None = None
    mode: str = "eager"

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)

    @property
    def host_bound(self) -> bool:
        """Whether launching the forward took most of its time (see ``HOST_BOUND``)."""
        return self.host_ms is not None and self.host_ms >= HOST_BOUND * self.forward_ms

    @property
    def host_cell(self) -> str:
        """``host_ms`` for a table, starred where the row is host-bound (see
        :func:`host_bound_note`); "-" where there is none."""
        if self.host_ms is None:
            return "-"
        return f"{self.host_ms:.2f}" + ("*" if self.host_bound else "")


@dataclass(frozen=True)
class BenchSetup:
    model: str
    device: str
    dtype: str
    batch: int
    weights: str
    cuda_graph: bool = False


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
    """Median seconds of one call of ``run`` after ``warmup`` calls (CUDA events on a GPU)."""
    for _ in range(warmup):
        run()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            begin = time.perf_counter()
            run()
            times.append(time.perf_counter() - begin)
    return statistics.median(times)


def launch_time(run: Callable[[], object], device: torch.device, repeats: int) -> float | None:
    """Median seconds the host takes to return from ``run`` on a GPU, each call started on
    an idle device so that none waits for room in the launch queue; None off CUDA."""
    if device.type != "cuda":
        return None
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def oracle_forward(model: nn.Module, counts: Sequence[int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The token-slicing oracle: the model with the schedule ``counts`` and zero merge cost.

    After each block's attention it keeps the first ``n`` tokens, a free slice, so it runs
    the same shapes as a merged model without any merging work: the speed limit of the
    schedule (docs/method.md §9). Its outputs are meaningless.
    """
    for index, block in enumerate(model.blocks):
        if type(block).__name__ != "Block":
            raise ValueError(f"the oracle supports pre-norm timm Blocks; block {index} is a "
                             f"{type(block).__name__}")

    def forward(images: torch.Tensor) -> torch.Tensor:
        x = model.norm_pre(model._pos_embed(model.patch_embed(images)))
        for block, keep in zip(model.blocks, counts[1:]):
            x = x + block.drop_path1(block.ls1(block.attn(block.norm1(x))))
            x = x[:, :keep]
            x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        return model.forward_head(model.norm(x))

    return forward


class _PeakMemory:
    """Peak memory a block of work allocates on ``device`` over what was allocated when it
    began, plus ``base``: what one variant needs with the weights and inputs (``base``),
    whatever earlier variants still hold. None off CUDA."""

    def __init__(self, device: torch.device, base: int) -> None:
        self.device, self.base = device, base
        self.mib: float | None = None

    def __enter__(self) -> _PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            grown = torch.cuda.max_memory_allocated(self.device) - self._before
            self.mib = (self.base + grown) / 2 ** 20


@dataclass
class _Variant:
    algo: str
    counts: list[int]
    merge_macs: int
    run: Callable[[], None]
    peak_memory_mib: float | None
    seconds: list[float]
    host_seconds: float | None = None


def benchmark(model: nn.Module, algos: Sequence[str], ratio: float, batch: int,
              device: torch.device, dtype: torch.dtype, warmup: int = 2, repeats: int = 5,
              progress: Callable[[str], None] | None = None,
              cuda_graph: bool = False, compile: bool = False,
              rounds: int = 1) -> list[BenchRow]:
    """Measure every algorithm in ``algos`` on ``model``.

    ``"none"`` is the unmerged model and ``"oracle"`` the token-slicing oracle (see
    :func:`oracle_forward`); speedups are relative to the first of ``algos``. The model is
    moved to ``device`` and ``dtype``; inputs are random images of the model's own input size
    (throughput depends on shapes, not on pixel values). ``cuda_graph`` replays every
    variant, the unmerged model included, as a captured CUDA graph (no launch overhead);
    ``compile`` runs every variant through ``torch.compile`` (both may be combined).

    Each variant's time is the median over ``rounds`` of the median of ``repeats`` calls.
    With ``cuda_graph`` the variants are captured first and then timed in turn, round after
    round, so that a drift of the GPU's clock over the run lands on every variant alike
    (eager variants share the one model, so each is timed while it is patched in). Peak
    memory is the weights and inputs plus what the variant itself allocates at its peak,
    capture included. On a GPU each row also holds the host's time to launch one forward,
    measured after the timing.
    """
    model = model.to(device=device, dtype=dtype).eval()
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, *model.patch_embed.img_size, generator=generator)
    images = images.to(device, dtype)
    shape = VitShape.of(model)
    num_patches = model.patch_embed.num_patches
    unmerged = [num_patches + model.num_prefix_tokens] * (shape.num_blocks + 1)
    schedule = TokenSchedule(ratio=ratio).plan(unmerged[0], model.num_prefix_tokens,
                                               shape.num_blocks)
    base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0

    def timed(run: Callable[[], None]) -> float:
        return time_forward(run, device, warmup, repeats)

    variants: list[_Variant] = []
    for algo in algos:
        if progress is not None:
            progress(algo)
        unpatch(model)
        merge_macs = 0
        if algo == BASELINE:
            counts, forward = unmerged, model
        elif algo == ORACLE:
            counts = token_counts(unmerged[0], schedule)
            forward = oracle_forward(model, counts)
        else:
            patch(model, algo=algo, ratio=ratio)
            with torch.inference_mode():
                model(images[:1])
            counts, forward = merge_info(model).token_counts, model
            merge_macs = similarity_macs(merge_config(model).algorithm, counts,
                                         model.num_prefix_tokens, model.blocks[0].attn.head_dim)

        with _PeakMemory(device, base) as peak:
            if compile:
                forward = torch.compile(forward)
            if cuda_graph:
                forward = CudaGraphForward(forward, images)
            run = inference_run(forward, images)
            run()
        variant = _Variant(algo, counts, merge_macs, run, peak.mib, seconds=[])
        if not cuda_graph:  # eager variants share the model: measured while patched in
            variant.seconds = [timed(run) for _ in range(rounds)]
            variant.host_seconds = launch_time(run, device, repeats)
        variants.append(variant)
    if cuda_graph:
        for _ in range(rounds):
            for variant in variants:
                variant.seconds.append(timed(variant.run))
        for variant in variants:
            variant.host_seconds = launch_time(variant.run, device, repeats)
    unpatch(model)

    rows: list[BenchRow] = []
    for variant in variants:
        seconds = statistics.median(variant.seconds)
        reference = rows[0].images_per_s if rows else batch / seconds
        rows.append(BenchRow(
            algo=variant.algo, ratio=1.0 if variant.algo == BASELINE else ratio,
            tokens_out=variant.counts[-1],
            gflops=vit_macs(shape, variant.counts, num_patches) / 1e9,
            merge_gflops=variant.merge_macs / 1e9, images_per_s=batch / seconds,
            speedup=batch / seconds / reference, forward_ms=seconds * 1e3,
            peak_memory_mib=variant.peak_memory_mib,
            host_ms=None if variant.host_seconds is None else variant.host_seconds * 1e3))
    return rows


def benchmark_modes(model: nn.Module, algos: Sequence[str], ratio: float, batch: int,
                    device: torch.device, dtype: torch.dtype, modes: Sequence[str],
                    **options) -> list[BenchRow]:
    """:func:`benchmark` once per mode of ``modes`` (see ``MODES``: eager, ``torch.compile``
    in its default mode, CUDA-graph replay); every row says its mode, and its speedup is
    against the first of ``algos`` in the same mode."""
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes {list(modes)!r}: choose from {', '.join(MODES)}")
    if "cuda-graph" in modes and device.type != "cuda":
        raise ValueError(f"the cuda-graph mode needs a CUDA device, not {device}")
    rows: list[BenchRow] = []
    for mode in modes:
        measured = benchmark(model, algos, ratio, batch, device, dtype,
                             cuda_graph=mode == "cuda-graph", compile=mode == "compile",
                             **options)
        rows += [replace(row, mode=mode) for row in measured]
    return rows


def recommendation(rows: Sequence[BenchRow]) -> str | None:
    """Which way of running the fastest merged row's algorithm to use, and how; None when
    no row merges."""
    merged = [row for row in rows if row.algo not in (BASELINE, ORACLE)]
    if not merged:
        return None
    best = max(merged, key=lambda row: row.images_per_s)
    line = (f"fastest here: {best.algo} in {best.mode} mode, {best.images_per_s:.1f} img/s "
            f"({best.speedup:.2f}x the unmerged model run the same way)")
    unmerged = [row for row in rows if row.algo == BASELINE]
    if unmerged:
        fastest_unmerged = max(unmerged, key=lambda row: row.images_per_s)
        line += (f", {best.images_per_s / fastest_unmerged.images_per_s:.2f}x the fastest "
                 f"unmerged row ({fastest_unmerged.mode})")
    return f"{line}. To run it so: {HOW_TO_RUN[best.mode]}."


def inference_run(forward: Callable[[torch.Tensor], torch.Tensor],
                  images: torch.Tensor) -> Callable[[], None]:
    """``forward(images)`` under inference mode, as a call of no arguments to time."""

    def run() -> None:
        with torch.inference_mode():
            forward(images)
    return run


def format_table(rows: Sequence[BenchRow], setup: BenchSetup) -> str:
    """A plain-text table of ``rows`` under a one-line description of the setup."""
    header: tuple[str, ...] = ("algo", "ratio", "tokens out", "GFLOPs", "merge GFLOPs",
                               "img/s", "speedup")
    lines = [[row.algo, f"{row.ratio:g}", str(row.tokens_out), f"{row.gflops:.2f}",
              f"{row.merge_gflops:.3f}", f"{row.images_per_s:.1f}", f"{row.speedup:.2f}x"]
             for row in rows]
    modes = {row.mode for row in rows}
    if len(modes) > 1:
        header = header[:1] + ("mode",) + header[1:]
        for line, row in zip(lines, rows):
            line.insert(1, row.mode)
    if all(row.peak_memory_mib is not None for row in rows):
        header += ("peak MiB",)
        for line, row in zip(lines, rows):
            line.append(f"{row.peak_memory_mib:.0f}")
    if all(row.host_ms is not None for row in rows):
        header += ("ms/forward", "host ms")
        for line, row in zip(lines, rows):
            line += [f"{row.forward_ms:.2f}", row.host_cell]
    widths = [max(len(cell) for cell in column) for column in zip(header, *lines)]

    def render(cells: Sequence[str]) -> str:
        return "  ".join(cell.rjust(width) if i else cell.ljust(width)
                         for i, (cell, width) in enumerate(zip(cells, widths)))

    graph = ", CUDA graphs" if setup.cuda_graph or modes == {"cuda-graph"} else ""
    title = (f"{setup.model} ({setup.weights}) on {setup.device}, {setup.dtype}, "
             f"batch {setup.batch}{graph}; GFLOPs are multiply-accumulates per image")
    rule = "-" * len(render(header))
    table = [title, render(header), rule, *map(render, lines)]
    if any(row.host_bound for row in rows):
        table.append(host_bound_note(setup.cuda_graph or "cuda-graph" in modes))
    if len(modes) > 1:
        advice = recommendation(rows)
        if advice is not None:
            table.append(advice)
    return "\n".join(table)


def host_bound_note(cuda_graph: bool) -> str:
    """What a starred host time means, and what to do about it."""
    note = ("* host-bound: launching the forward's kernels took most of its time, so the "
            "row measures the host, not the GPU")
    return note + ("." if cuda_graph else "; --cuda-graph replays it without the host.")
