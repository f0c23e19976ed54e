"""What every ``pitome eval`` task shares: the (algorithm, ratio) grid, resumable results,
sharding over processes, and the table, JSON, CSV and plot it writes.

A task evaluates one *cell* (an algorithm at a ratio) at a time. Each process evaluates its
shard of the examples and returns per-example records; rank 0 gathers them in example
order and computes the metrics, so one process and several give the same numbers. Finished
cells are saved at once, and a rerun with the same output folder skips them.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import textwrap
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._optional import require

UNMERGED = "none"


@dataclass(frozen=True)
class Cell:
    """One point of the grid; ``algo == "none"`` is the unmerged model (ratio 1). A cell
    with ``tokens`` keeps that many tokens (``pitome.patch(..., tokens=N)``), its ratio None."""

    algo: str
    ratio: float | None
    tokens: int | None = None

    @property
    def key(self) -> str:
        if self.algo == UNMERGED:
            return UNMERGED
        return f"{self.algo}@{self.tokens}t" if self.tokens is not None else \
            f"{self.algo}@{self.ratio:g}"

    @property
    def setting(self) -> str:
        """The ratio, or the token count as ``64t``, as tables show it."""
        return f"{self.tokens}t" if self.tokens is not None else f"{self.ratio:g}"


def grid(algos: Sequence[str], ratios: Sequence[float],
         tokens: Sequence[int] = ()) -> list[Cell]:
    """The unmerged model once, then every algorithm at every ratio and token count."""
    cells = [Cell(UNMERGED, 1.0)] if UNMERGED in algos else []
    merged = [algo for algo in algos if algo != UNMERGED]
    return cells + [Cell(algo, ratio) for algo in merged for ratio in ratios] + \
        [Cell(algo, None, count) for algo in merged for count in tokens]


# ----------------------------------------------------------------------------- processes
@dataclass(frozen=True)
class Processes:
    """This process's place among ``world`` evaluating processes (1 without a launcher)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence) -> list[int]:
        """Indices of the examples this process evaluates (every world-th, from its rank)."""
        return list(range(self.rank, len(items), self.world))

    def gather(self, records: list) -> list:
        """Every process's records, concatenated on rank 0 (others get an empty list)."""
        if self.world == 1:
            return records
        distributed = torch.distributed
        everything: list = [None] * self.world
        distributed.all_gather_object(everything, records)
        return [record for part in everything for record in part] if self.is_main else []

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def start_processes(device: str | None = None) -> Processes:
    """Join the process group that ``torchrun`` or ``accelerate launch`` set up, if any.

    The launcher's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` decide the shard; each process
    takes the GPU of its local rank (NCCL), or the CPU (gloo) when there is none.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if world == 1:
        return Processes(device=torch.device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    on_gpu = device.startswith("cuda")
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo")
    return Processes(rank, world, torch.device(f"cuda:{local_rank}" if on_gpu else "cpu"))


def open_rgb(path: str | Path):
    """The image at ``path`` as RGB, or a one-line reason why it cannot be read."""
    image_module = require("PIL.Image", "eval")
    try:
        with image_module.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        return f"{type(error).__name__}: {error}"


def read_pictures(paths: Sequence[str | Path]) -> tuple[list, list[bool]]:
    """The readable images among ``paths`` and which ones they were; the others are
    reported on stderr (one bad sample must not end a long evaluation)."""
    pictures, readable = [], []
    for path in paths:
        picture = open_rgb(path)
        readable.append(not isinstance(picture, str))
        if isinstance(picture, str):
            print(f"pitome: skipped {path} ({picture})", file=sys.stderr)
        else:
            pictures.append(picture)
    return pictures, readable


def progress(items: Iterable, processes: Processes, description: str, total: int | None = None):
    """A progress bar on rank 0's stderr (plain iteration elsewhere or without tqdm)."""
    if not processes.is_main:
        return items
    try:
        tqdm = require("tqdm", "eval").tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, total=total, file=sys.stderr, leave=False)


# ----------------------------------------------------------------------------- results
class ResultStore:
    """``results.json`` in the output folder: the setup and one entry per finished cell.

    A folder holding another setup's results is refused, never overwritten; with
    ``fresh=True`` the old file is kept as ``results.previous-N.json`` and a new one begun.
    Only the ``owner`` process (rank 0) moves files and reports.
    """

    def __init__(self, out: str | Path, setup: dict[str, Any], fresh: bool = False,
                 owner: bool = True) -> None:
        self.folder = Path(out)
        self.path = self.folder / "results.json"
        self.setup = json.loads(json.dumps(setup))  # as it reads back: tuples become lists
        self.cells: dict[str, dict[str, Any]] = {}
        if not self.path.is_file():
            return
        if fresh:
            if owner:
                kept = self._keep_previous()
                print(f"pitome: --fresh: the earlier results are kept as {kept}",
                      file=sys.stderr)
            return
        saved = self._read()
        if saved.get("setup") != self.setup:
            raise ValueError(f"{self.path} holds the results of another setup ("
                             f"{_differences(saved.get('setup') or {}, self.setup)}); give "
                             "another --out, or --fresh to start anew (the old file is kept)")
        self.cells = saved.get("cells", {})

    def _read(self) -> dict[str, Any]:
        try:
            saved = json.loads(self.path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{self.path} is not a pitome results file ({error}); move it "
                             "away, or give --fresh to set it aside") from None
        if not isinstance(saved, dict) or not isinstance(saved.get("cells", {}), dict):
            raise ValueError(f"{self.path} is not a pitome results file (no setup and cells)")
        return saved

    def _keep_previous(self) -> Path:
        number = 1
        while (kept := self.folder / f"results.previous-{number}.json").exists():
            number += 1
        self.path.rename(kept)
        return kept

    def done(self, cell: Cell) -> bool:
        return cell.key in self.cells

    def save(self, cell: Cell, metrics: dict[str, Any]) -> None:
        tokens = {} if cell.tokens is None else {"tokens": cell.tokens}
        self.cells[cell.key] = {"algo": cell.algo, "ratio": cell.ratio, **tokens, **metrics}
        self.folder.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"setup": self.setup, "cells": self.cells}, indent=1))
        temporary.replace(self.path)

    def rows(self, cells: Sequence[Cell]) -> list[dict[str, Any]]:
        return [self.cells[cell.key] for cell in cells if cell.key in self.cells]


def _differences(saved: dict[str, Any], setup: dict[str, Any], shown: int = 3) -> str:
    keys = [key for key in dict.fromkeys([*setup, *saved]) if saved.get(key) != setup.get(key)]
    text = "; ".join(f"{key}: {saved.get(key)!r} there, {setup.get(key)!r} now"
                     for key in keys[:shown])
    return text + ("; ..." if len(keys) > shown else "")


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A plain-text table; ``columns`` are (key, header, format spec)."""
    headers = ["algo", "ratio"] + [header for _, header, _ in columns]
    lines = []
    for row in rows:
        cells = [row["algo"], f"{row['tokens']}t" if row.get("tokens") is not None
                 else f"{row['ratio']:g}"]
        for key, _, spec in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, spec))
        lines.append(cells)
    widths = [max(len(str(item)) for item in column) for column in zip(headers, *lines)]
    render = lambda items: "  ".join(str(item).rjust(width)  # noqa: E731
                                     for item, width in zip(items, widths))
    return "\n".join([render(headers), "-" * len(render(headers))] + [render(l) for l in lines])


def write_outputs(store: ResultStore, cells: Sequence[Cell], columns: Sequence[tuple[str, str, str]],
                  metric: str, metric_label: str, title: str, plot: bool = True) -> str:
    """Print nothing; write ``results.csv`` (and ``results.png``), return the table text."""
    rows = store.rows(cells)
    counted = ["tokens"] if any(row.get("tokens") is not None for row in rows) else []
    keys = ["algo", "ratio", *counted] + [key for key, _, _ in columns]
    with (store.folder / "results.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    if plot:
        try:
            plot_metric(rows, metric, metric_label, title, store.folder / "results.png")
        except ImportError as error:
            print(f"pitome: no plot ({error})", file=sys.stderr)
    return f"{title}\n{format_table(rows, columns)}"


def plot_metric(rows: Sequence[dict[str, Any]], metric: str, label: str, title: str,
                path: Path) -> None:
    """``metric`` against GFLOPs, one line per algorithm, the unmerged model as a star."""
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    pyplot = require("matplotlib.pyplot", "plot")
    figure, axis = pyplot.subplots(figsize=(6.5, 4.2))
    for algo in dict.fromkeys(row["algo"] for row in rows):
        points = sorted((row["gflops"], row[metric]) for row in rows
                        if row["algo"] == algo and row.get("gflops") is not None)
        if not points:
            continue
        x, y = zip(*points)
        if algo == UNMERGED:
            axis.plot(x, y, "k*", markersize=12, label="no merging")
        else:
            axis.plot(x, y, marker="o", label=algo)
    axis.set_xlabel("GFLOPs per example")
    axis.set_ylabel(label)
    axis.set_title(textwrap.fill(title, 90), fontsize=8)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    pyplot.close(figure)


def run_grid(evaluate: Callable[[Cell], dict[str, Any]], cells: Sequence[Cell],
             store: ResultStore, processes: Processes) -> None:
    """Evaluate every cell not in ``store`` (all processes take part); rank 0 saves each."""
    for cell in cells:
        if store.done(cell):
            if processes.is_main:
                print(f"pitome: {cell.key} already in {store.path}, skipped", file=sys.stderr)
            continue
        metrics = evaluate(cell)
        if processes.is_main:
            store.save(cell, metrics)
        processes.barrier()


def apply_cell(model: torch.nn.Module, cell: Cell, **options: Any) -> None:
    """Patch ``model`` for ``cell`` (or unpatch it for the unmerged cell)."""
    from ..api import patch, unpatch

    if cell.algo == UNMERGED:
        unpatch(model)
    else:
        patch(model, algo=cell.algo, ratio=cell.ratio, tokens=cell.tokens, **options)


class Stopwatch:
    """Wall time of the model's forward passes only (synchronised on GPUs)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds, self.examples = device, 0.0, 0

    def __call__(self, run: Callable[[], Any], examples: int) -> Any:
        import time

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        out = run()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.examples += examples
        return out


@dataclass
class Batch:
    """What a task's step made of one batch of example indices."""

    records: list  # one tuple per evaluated example, starting with its index
    skipped: list[str] = field(default_factory=list)  # examples that could not be read
    example: Any = None  # the inputs of one example, to count FLOPs on


@dataclass
class Gathered:
    """Every process's share of a cell, on rank 0: records in example order."""

    records: list
    skipped: list[str]
    examples_per_second: float | None  # the processes' rates added up
    example: Any


def evaluate_shard(processes: Processes, items: Sequence, batch_size: int, label: str,
                   step: Callable[[list[int], Stopwatch], Batch]) -> Gathered | None:
    """Run ``step`` over this process's share of ``items`` in batches (with a progress bar)
    and gather the results on rank 0; other ranks get None."""
    shard = processes.shard(items)
    stopwatch = Stopwatch(processes.device)
    records, skipped, example = [], [], None
    starts = range(0, len(shard), batch_size)
    for start in progress(starts, processes, label, total=len(starts)):
        batch = step(shard[start:start + batch_size], stopwatch)
        records += batch.records
        skipped += batch.skipped
        example = batch.example if example is None else example
    parts = processes.gather([(records, skipped, stopwatch.examples, stopwatch.seconds, example)])
    if not processes.is_main:
        return None
    records = sorted((r for part in parts for r in part[0]), key=lambda record: record[0])
    if not records:
        raise ValueError(f"{label}: no example could be evaluated (none was readable)")
    rates = [part[2] / part[3] for part in parts if part[3] > 0]
    return Gathered(records, sorted(s for part in parts for s in part[1]),
                    sum(rates) if rates else None,
                    next((part[4] for part in parts if part[4] is not None), None))
