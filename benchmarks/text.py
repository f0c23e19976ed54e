"""Throughput of merging on BERT-family text encoders over padded batches, against a packing oracle.

BERT-base (hidden 768, 12 layers, 12 heads, FFN 3072) and MiniLM-L6 (384, 6, 12, 1536) built
from configs with random weights (speed depends on shapes only), SDPA attention, eval mode,
bf16 on a GPU (fp32 on the CPU). Each batch's sentence lengths are drawn, seeded, from
``uniform`` [32, 256] (the headline), ``short-skew`` (lognormal, median 24, clipped to
[8, 256]: most short, a few long) or ``unpadded`` (all 256); the batch is right-padded to its
longest sentence, with random token ids and a 0/1 attention mask (none when no sentence is
padded).

Variants of every batch, in one process: the unpatched model (``none``); pitome patched at
ρ 1 (``pitome@1``: nothing merges, the runtime's cost alone); PiToMe and ToMe at ρ 0.7 in
the first three layers (``@0.7/first3``, the library's default layers for BERT families)
and at ρ 0.9 in every layer (``@0.9/all``); and the **text oracle** of each schedule: every
sentence keeps the token count pitome's schedule gives a sentence of its length, at zero
merge cost. The oracle packs all sentences' real tokens into one ``1×N×C`` tensor; each layer
runs its projections, output and FFN on the packed tokens and its attention per sentence by
re-padding q/k/v to the longest sentence entering it (SDPA with a key-padding bias), then
keeps each sentence's first tokens before its FFN, as a merging layer would (``oracle@1``
is packing alone). It is built from the unpatched ``BertLayer``'s own submodules and checked,
before timing, to reproduce the unpatched model on real tokens.

Modes: ``eager`` (a loop of forwards, one sync), ``cuda-graph`` (every variant replayed as
a captured graph; padded batches that pitome plans on the host may not capture, and the row
then records why) and ``compile`` (``torch.compile``, default mode; a failed or too slow
compile is a failed row). Variants take turns over ``--rounds``; each row is the median
round's ms per forward, the host's time to launch one forward from an idle GPU (``host
ms``), the speedup over ``none`` of the same batch and mode, and ``of oracle``: its
throughput over its schedule's oracle's.

    python benchmarks/text.py --quick --json text-h200.json     # ~4 min on an H200
    python benchmarks/text.py --json text-h200-grid.json        # the whole grid
    python benchmarks/text.py --quick --tiny                    # a tiny model on the CPU
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import platform
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pitome  # noqa: E402
from families import eager_mask_shortcut  # noqa: E402
from pitome.bench import HOST_BOUND, launch_time  # noqa: E402
from pitome.core.schedule import TokenSchedule, token_counts  # noqa: E402
from pitome.cuda_graph import CudaGraphForward  # noqa: E402

NUM_PREFIX = 1  # BERT families keep [CLS] (pitome's Family "BERT"); checked by check_counts
MAX_LENGTH = 256
DISTRIBUTIONS = ("uniform", "short-skew", "unpadded")
BATCHES = (1, 16, 64, 256)
QUICK = (("uniform", 64), ("unpadded", 64), ("uniform", 1))
TINY_BATCHES = (1, 8)  # --tiny: the same grid at CPU sizes
TINY_QUICK = (("uniform", 8), ("unpadded", 8), ("uniform", 1))
MODES = ("eager", "cuda-graph", "compile")
VOCAB_SIZE = 30522


@dataclass(frozen=True)
class BertShape:
    hidden: int
    layers: int
    heads: int
    intermediate: int

    def config(self):
        import transformers

        return transformers.BertConfig(hidden_size=self.hidden, num_hidden_layers=self.layers,
                                       num_attention_heads=self.heads,
                                       intermediate_size=self.intermediate,
                                       vocab_size=VOCAB_SIZE, attn_implementation="sdpa")


MODELS = {"bert-base": BertShape(768, 12, 12, 3072), "minilm-l6": BertShape(384, 6, 12, 1536),
          "tiny": BertShape(32, 4, 4, 64)}


@dataclass(frozen=True)
class Variant:
    """How a batch runs: ``none``, or ``ALGO@RATIO[/first3|/all][:LAYOUT]`` with ALGO
    ``pitome``, ``tome`` or ``oracle`` (``/first3``: the library's default layers for BERT
    families; ``/all``: every layer) and LAYOUT pitome's ``padded_layout`` (``auto`` when
    not given; ``packed`` or ``padded``)."""

    label: str = field(compare=False)
    algo: str
    ratio: float = 1.0
    every_layer: bool = False
    layout: str = "auto"

    @classmethod
    def parse(cls, text: str) -> Variant:
        if text == "none":
            return cls(text, "none")
        algo, _, rest = text.partition("@")
        rest, _, layout = rest.partition(":")
        ratio, _, layers = rest.partition("/")
        if (algo not in ("pitome", "tome", "oracle") or not ratio
                or layers not in ("", "first3", "all")
                or layout not in ("", "packed", "padded") or algo == "oracle" and layout):
            raise ValueError(f"variant {text!r}: write none or ALGO@RATIO[/first3|/all][:LAYOUT], "
                             "ALGO one of pitome, tome, oracle; LAYOUT packed or padded (not "
                             "for the oracle)")
        return cls(text, algo, float(ratio), layers == "all", layout or "auto")

    @property
    def schedule(self) -> str:
        """The token schedule, shared by the variants an oracle bounds."""
        if self.ratio == 1:
            return "1"
        return f"{self.ratio:g}/{'all' if self.every_layer else 'first3'}"

    @property
    def pitome_twin(self) -> Variant:
        """PiToMe at this variant's schedule: whose schedule its oracle follows."""
        return Variant(f"pitome@{self.schedule}", "pitome", self.ratio, self.every_layer)

    def patch(self, model: nn.Module) -> nn.Module:
        """``model`` (a copy of the unpatched one) patched as this variant merges."""
        algo = "pitome" if self.algo == "oracle" else self.algo
        layers = list(range(model.config.num_hidden_layers)) if self.every_layer else None
        return pitome.patch(model, algo=algo, ratio=self.ratio, merge_blocks=layers,
                            padded_layout=self.layout)


VARIANTS = tuple(Variant.parse(text) for text in (
    "none", "pitome@1", "oracle@1",
    "oracle@0.7/first3", "pitome@0.7/first3", "pitome@0.7/first3:padded", "tome@0.7/first3",
    "oracle@0.9/all", "pitome@0.9/all", "pitome@0.9/all:padded", "tome@0.9/all"))


def build_model(shape: BertShape, device: torch.device, dtype: torch.dtype) -> nn.Module:
    import transformers

    torch.manual_seed(0)
    model = transformers.BertModel(shape.config(), add_pooling_layer=False)
    return model.to(device, dtype).eval()


# ----- batches ------------------------------------------------------------------------------

def draw_lengths(distribution: str, batch: int, seed: int = 0) -> list[int]:
    """``batch`` sentence lengths (tokens, [CLS] and [SEP] included), drawn seeded."""
    generator = torch.Generator().manual_seed(seed)
    if distribution == "unpadded":
        return [MAX_LENGTH] * batch
    if distribution == "uniform":
        return torch.randint(32, MAX_LENGTH + 1, (batch,), generator=generator).tolist()
    if distribution == "short-skew":
        drawn = torch.empty(batch).log_normal_(math.log(24), 0.9, generator=generator)
        return drawn.round().clamp(8, MAX_LENGTH).long().tolist()
    raise ValueError(f"unknown length distribution {distribution!r}; choose from "
                     f"{', '.join(DISTRIBUTIONS)}")


@dataclass
class TextBatch:
    """A right-padded batch: ``attention_mask`` is None when no sentence is padded."""

    lengths: list[int]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None

    @classmethod
    def of(cls, lengths: Sequence[int], device: torch.device, seed: int = 0) -> TextBatch:
        width = max(lengths)
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(1000, VOCAB_SIZE, (len(lengths), width), generator=generator)
        real = torch.arange(width) < torch.tensor(lengths)[:, None]
        mask = None if bool(real.all()) else real.long().to(device)
        return cls(list(lengths), (ids * real).to(device), mask)

    def model_forward(self, model: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
        """``input_ids -> last hidden state`` of a BertModel (or its compiled form), one
        tensor in and out as CUDA graphs want."""
        mask = self.attention_mask

        def forward(input_ids: torch.Tensor) -> torch.Tensor:
            return model(input_ids=input_ids, attention_mask=mask).last_hidden_state
        return forward


def sentence_counts(schedule: TokenSchedule, lengths: Sequence[int],
                    num_layers: int) -> list[list[int]]:
    """Tokens entering each layer (and leaving the last) of every sentence, each following
    the schedule of its own length, as pitome merges padded batches."""
    return [token_counts(n, schedule.plan(n, NUM_PREFIX, num_layers, clamp=True))
            for n in lengths]


@torch.no_grad()
def check_counts(model: nn.Module, batch: TextBatch, counts: list[list[int]]) -> None:
    """The patched ``model`` merges each sentence to ``counts``: alone (the shortest, a
    middle and the longest sentence) and in the padded batch (its real tokens left)."""
    order = sorted(range(len(batch.lengths)), key=batch.lengths.__getitem__)
    for row in {order[0], order[len(order) // 2], order[-1]}:
        model(input_ids=batch.input_ids[row:row + 1, :batch.lengths[row]])
        got = pitome.merge_info(model).token_counts
        if got != counts[row]:
            raise AssertionError(f"a sentence of {batch.lengths[row]} tokens merged as {got}, "
                                 f"the oracle's schedule says {counts[row]}")
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    info = pitome.merge_info(model)
    if batch.attention_mask is None:
        left = [info.token_counts[-1]] * len(counts)
    elif getattr(info, "padding", None) is not None:
        left = info.padding.sum(dim=1).tolist()
    else:
        return  # nothing merged, or no padding reported: the single sentences were checked
    if left != [c[-1] for c in counts]:
        raise AssertionError(f"the padded batch kept {left} real tokens per sentence, the "
                             f"oracle's schedule {[c[-1] for c in counts]}")


# ----- the text oracle ------------------------------------------------------------------------

@dataclass
class PackedStep:
    """Where one layer's tokens sit. ``pad_index`` places the packed tokens entering it in a
    ``batch × width`` grid and ``key_bias`` (``batch×1×1×width``) masks the grid's padding,
    both None where every sentence fills the grid; ``keep`` picks each sentence's first
    tokens leaving the layer out of the packed ones (None where nothing is dropped)."""

    width: int
    pad_index: torch.Tensor | None
    key_bias: torch.Tensor | None
    keep: torch.Tensor | None


def packed_steps(counts: list[list[int]], device: torch.device,
                 dtype: torch.dtype) -> list[PackedStep]:
    """Every layer's :class:`PackedStep` for sentences merged to ``counts``."""
    steps = []
    for layer in range(len(counts[0]) - 1):
        entering = torch.tensor([c[layer] for c in counts])
        leaving = torch.tensor([c[layer + 1] for c in counts])
        width = int(entering.max())
        positions = torch.arange(width)
        real = positions < entering[:, None]
        pad_index = key_bias = keep = None
        if not bool(real.all()):
            pad_index = real.flatten().nonzero().squeeze(1).to(device)
            key_bias = torch.zeros(real.shape, dtype=dtype)
            key_bias.masked_fill_(~real, torch.finfo(dtype).min)
            key_bias = key_bias[:, None, None, :].to(device)
        if not torch.equal(entering, leaving):
            keep = (positions < leaving[:, None])[real].nonzero().squeeze(1).to(device)
        steps.append(PackedStep(width, pad_index, key_bias, keep))
    return steps


def packed_attention(layer: nn.Module, x: torch.Tensor, step: PackedStep,
                     batch: int) -> torch.Tensor:
    """``layer``'s attention sub-block (with its residual norm) on the packed ``1×N×C``
    tokens: projections packed, attention per sentence in the padded grid."""
    attention = layer.attention.self
    heads, size = attention.num_attention_heads, attention.attention_head_size

    def gridded(projection: nn.Module) -> torch.Tensor:
        y = projection(x)[0]
        if step.pad_index is not None:
            y = y.new_zeros(batch * step.width, y.shape[-1]).index_copy_(0, step.pad_index, y)
        return y.view(batch, step.width, heads, size).transpose(1, 2)

    h = F.scaled_dot_product_attention(gridded(attention.query), gridded(attention.key),
                                       gridded(attention.value), attn_mask=step.key_bias,
                                       scale=size ** -0.5)
    h = h.transpose(1, 2).reshape(batch * step.width, heads * size)
    if step.pad_index is not None:
        h = h.index_select(0, step.pad_index)
    return layer.attention.output(h[None], x)


def packed_oracle(model: nn.Module, counts: list[list[int]]
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The text oracle of the unpatched BertModel ``model``: ``input_ids`` (the padded batch)
    to the ``1×N×C`` packed hidden states of every sentence's kept tokens, each layer's
    attention on the tokens entering it and its FFN on those leaving it (``counts``)."""
    device, dtype = model.device, model.dtype
    steps = packed_steps(counts, device, dtype)
    batch, first = len(counts), steps[0]
    real = torch.arange(first.width) < torch.tensor([c[0] for c in counts])[:, None]
    positions = torch.arange(first.width).expand_as(real)[real][None].to(device)
    token_types = torch.zeros_like(positions)
    layers = list(model.encoder.layer)

    def forward(input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.reshape(1, -1)
        if first.pad_index is not None:
            ids = ids.index_select(1, first.pad_index)
        x = model.embeddings(input_ids=ids, token_type_ids=token_types, position_ids=positions)
        for layer, step in zip(layers, steps):
            x = packed_attention(layer, x, step, batch)
            if step.keep is not None:
                x = x.index_select(1, step.keep)
            x = layer.output(layer.intermediate(x), x)
        return x
    return forward


@torch.no_grad()
def check_oracle(model: nn.Module, batch: TextBatch) -> float:
    """The oracle's split layers, merging nothing, must compute the unpatched ``model`` on
    every real token; returns the relative error (raises AssertionError above tolerance)."""
    expected = batch.model_forward(model)(batch.input_ids)
    if batch.attention_mask is not None:
        expected = expected[batch.attention_mask.bool()]
    expected = expected.reshape(-1, expected.shape[-1]).float()
    oracle = packed_oracle(model, [[n] * (model.config.num_hidden_layers + 1)
                                   for n in batch.lengths])
    got = oracle(batch.input_ids)[0].float()
    error = ((got - expected).norm() / expected.norm()).item()
    tolerance = 1e-4 if model.dtype == torch.float32 else 2e-2
    if not error <= tolerance:
        raise AssertionError(f"the text oracle's split layers do not compute the model: "
                             f"relative error {error:.3g} > {tolerance:g}")
    return error


# ----- timing ---------------------------------------------------------------------------------

def loop_time(run: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call of ``run`` over ``repeats`` calls back to back, synchronised once at
    the end (CUDA events on a GPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
        start.record()
        for _ in range(repeats):
            run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / repeats
    begin = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - begin) / repeats


@contextlib.contextmanager
def time_budget(seconds: float | None) -> Iterator[None]:
    """Raise TimeoutError in the block after ``seconds`` (main thread on Unix; else none)."""
    if seconds is None or not hasattr(signal, "setitimer") \
            or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"took more than {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def describe(error: BaseException) -> str:
    """One line: the error and, where it was raised while handling another, that one too
    (a failed CUDA-graph capture raises again as it ends)."""
    text = f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}"
    cause = error.__cause__ or error.__context__
    if cause is not None:
        text += f" (after {describe(cause)})"
    return text[:500]


def cuda_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return torch.ones(1, device=device).add_(1).item() == 2
    except Exception:  # noqa: BLE001 - any error means the context is gone
        return False


def prepare(mode: str, forward: Callable[[torch.Tensor], torch.Tensor], module: Callable,
            batch: TextBatch) -> Callable[[], object]:
    """The variant's call of no arguments in ``mode``, after its first calls (where it
    compiles or captures). ``forward`` takes the input ids; ``module`` is what compile mode
    compiles: the model behind ``forward``, or ``forward`` itself (the oracle)."""
    ids = batch.input_ids
    if mode == "compile":
        compiled = torch.compile(module)
        forward = batch.model_forward(compiled) if isinstance(module, nn.Module) else compiled
    if mode == "cuda-graph":
        graph = CudaGraphForward(forward, ids)
        forward = graph.__call__

    def run():
        with torch.inference_mode():
            return forward(ids)
    run()
    run()  # a compiled forward may compile again once (e.g. dynamic shapes)
    return run


class Deadline:
    """``--time-limit``: how long the run may still start new work."""

    def __init__(self, seconds: float | None) -> None:
        self.started, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float | None:
        return None if self.seconds is None else self.seconds - self.elapsed()

    def passed(self) -> bool:
        left = self.left()
        return left is not None and left <= 0


@dataclass
class Group:
    """One batch of one model, with its variants' forwards (``input_ids -> output``) and the
    modules behind them (compiled in compile mode)."""

    model: str
    lengths: str
    batch: TextBatch
    forwards: dict[Variant, tuple[Callable[[torch.Tensor], torch.Tensor], Callable]]
    tokens_out: dict[Variant, int]
    oracle_error: float

    def row(self, variant: Variant, mode: str) -> dict:
        lengths = self.batch.lengths
        return {"model": self.model, "lengths": self.lengths, "batch": len(lengths),
                "mode": mode, "variant": variant.label, "algo": variant.algo,
                "schedule": variant.schedule, "ratio": variant.ratio,
                "mean_length": sum(lengths) / len(lengths), "padded_width": max(lengths),
                "real_tokens": sum(lengths), "tokens_out": self.tokens_out[variant],
                "padded": self.batch.attention_mask is not None,
                "oracle_check_error": self.oracle_error, "forward_ms": None, "host_ms": None,
                "speedup": None, "of_oracle": None, "setup_s": None, "repeats": None,
                "rounds": 0, "error": None}


def build_group(name: str, models: dict[Variant, nn.Module], base: nn.Module, lengths_name: str,
                batch_size: int, variants: Sequence[Variant]) -> Group:
    """The batch, the oracle's check at ρ 1, each patched model's counts checked against the
    oracle's schedule, and every variant's forward."""
    batch = TextBatch.of(draw_lengths(lengths_name, batch_size), base.device)
    error = check_oracle(base, batch)
    num_layers = base.config.num_hidden_layers
    forwards, tokens_out = {}, {}
    for variant in variants:
        if variant.algo == "none":
            forwards[variant] = (batch.model_forward(base), base)
            tokens_out[variant] = sum(batch.lengths)
            continue
        schedule = pitome.merge_config(models[variant.pitome_twin]).schedule
        counts = sentence_counts(schedule, batch.lengths, num_layers)
        tokens_out[variant] = sum(c[-1] for c in counts)
        if variant.algo == "oracle":
            oracle = packed_oracle(base, counts)
            forwards[variant] = (oracle, oracle)
        else:
            check_counts(models[variant], batch, counts)
            forwards[variant] = (batch.model_forward(models[variant]), models[variant])
    return Group(name, lengths_name, batch, forwards, tokens_out, error)


class DeviceLost(RuntimeError):
    """The CUDA context failed after a variant did (e.g. a failed capture): the run stops,
    keeping ``rows``."""

    def __init__(self, message: str, rows: list[dict]) -> None:
        super().__init__(message)
        self.rows = rows


def measure(group: Group, mode: str, device: torch.device, args: argparse.Namespace,
            deadline: Deadline, progress: Callable[[str], None]) -> list[dict]:
    """Every variant of ``group`` in ``mode``: prepared in turn (a failure is a row with its
    error), then timed in turns over the rounds."""
    if mode == "compile":
        import torch._dynamo

        torch._dynamo.reset()  # each batch compiles afresh, at its own static shapes
    rows = {variant: group.row(variant, mode) for variant in group.forwards}
    runs = {}
    for variant, (forward, module) in group.forwards.items():
        row = rows[variant]
        budget = deadline.left()
        if budget is not None and budget <= 0:
            row["error"] = "skipped: --time-limit reached"
            progress(f"{variant.label}: skipped (time limit)")
            continue
        budget = min(args.compile_timeout, budget or math.inf) if mode == "compile" else None
        began = time.perf_counter()
        try:
            with time_budget(budget):
                runs[variant] = prepare(mode, forward, module, group.batch)
        except Exception as error:  # noqa: BLE001 - a variant that cannot run is a row
            row["error"] = describe(error)
            progress(f"{variant.label}: failed: {row['error'][:200]}")
            if not cuda_usable(device):
                for other in rows.values():
                    other["error"] = other["error"] or "skipped: the CUDA context was lost"
                raise DeviceLost(f"the CUDA context was unusable after {where(row)} failed",
                                 list(rows.values())) from error
            continue
        row["setup_s"] = time.perf_counter() - began
        seconds = loop_time(runs[variant], device, 1)
        row["repeats"] = max(2, min(args.repeats, int(args.round_seconds / max(seconds, 1e-6))))
        progress(f"{variant.label}: ready in {row['setup_s']:.1f} s, "
                 f"{seconds * 1e3:.2f} ms/forward, {row['repeats']} per round")
    timings: dict[Variant, list[float]] = {variant: [] for variant in runs}
    for _ in range(args.rounds):
        for variant, run in runs.items():
            run()
            timings[variant].append(loop_time(run, device, rows[variant]["repeats"]))
    for variant, run in runs.items():
        row = rows[variant]
        row["forward_ms"] = statistics.median(timings[variant]) * 1e3
        row["rounds"] = len(timings[variant])
        host = launch_time(run, device, min(row["repeats"], 10))
        row["host_ms"] = None if host is None else host * 1e3
    compare(list(rows.values()))
    return list(rows.values())


def where(row: dict) -> str:
    return f"{row['mode']} {row['model']} {row['lengths']} batch {row['batch']} {row['variant']}"


def compare(rows: list[dict]) -> None:
    """Fill ``speedup`` (over ``none``) and ``of_oracle`` (over the oracle of the same
    schedule) in the rows of one batch and mode."""
    base = next((r["forward_ms"] for r in rows if r["variant"] == "none"), None)
    oracles = {r["schedule"]: r["forward_ms"] for r in rows if r["algo"] == "oracle"}
    for row in rows:
        if row["forward_ms"] is None:
            continue
        if base is not None:
            row["speedup"] = base / row["forward_ms"]
        if oracles.get(row["schedule"]) is not None:
            row["of_oracle"] = oracles[row["schedule"]] / row["forward_ms"]


# ----- output ---------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    header = ("model", "lengths", "batch", "mode", "variant", "speedup", "of oracle", "ms",
              "host ms", "note")

    def number(value, spec: str, suffix: str = "") -> str:
        return "-" if value is None else format(value, spec) + suffix

    def host(row: dict) -> str:
        if row["host_ms"] is None:
            return "-"
        bound = row["forward_ms"] and row["host_ms"] >= HOST_BOUND * row["forward_ms"]
        return f"{row['host_ms']:.2f}" + ("*" if bound else "")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = (row["model"], row["lengths"], str(row["batch"]), row["mode"], row["variant"],
                 number(row["speedup"], ".2f", "x"), number(row["of_oracle"], ".2f"),
                 number(row["forward_ms"], ".2f"), host(row), (row["error"] or "")[:90])
        lines.append("| " + " | ".join(cells) + " |")
    if any(host(row).endswith("*") for row in rows):
        lines.append("\n\\* host-bound: launching the forward took at least "
                     f"{HOST_BOUND:.0%} of its time, so the row measures the host, not the GPU")
    return "\n".join(lines)


def output_path(requested: str | None) -> Path | None:
    if requested is None:
        return None
    path = Path(requested)
    if path.exists():
        sys.exit(f"{path} exists; give another --json path (results are never overwritten)")
    return path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="BERT-base: uniform batch 64, unpadded 64x256 and batch 1")
    parser.add_argument("--tiny", action="store_true",
                        help="a tiny BERT on the CPU in fp32, batches of at most 8 (implied "
                             "without CUDA): checks the script in seconds")
    parser.add_argument("--models", default=None,
                        help=f"comma-separated of {', '.join(MODELS)} (default bert-base,"
                             "minilm-l6; --quick bert-base; --tiny tiny)")
    parser.add_argument("--lengths", default=None,
                        help=f"comma-separated of {', '.join(DISTRIBUTIONS)} (default all)")
    parser.add_argument("--batches", default=None,
                        help=f"comma-separated batch sizes (default {','.join(map(str, BATCHES))})")
    parser.add_argument("--modes", default=None,
                        help=f"comma-separated of {', '.join(MODES)}, run in this order "
                             "(default all on a GPU, eager on the CPU)")
    parser.add_argument("--variants", default=",".join(v.label for v in VARIANTS),
                        help="comma-separated: none, ALGO@RATIO[/first3|/all] (default "
                             "%(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="turns each variant takes")
    parser.add_argument("--repeats", type=int, default=20,
                        help="most forwards timed per variant and round")
    parser.add_argument("--round-seconds", type=float, default=0.25,
                        help="forwards per round: as many as take about this long "
                             "(at least 2, at most --repeats)")
    parser.add_argument("--compile-timeout", type=float, default=90.0,
                        help="a variant's compile failing after this many seconds")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="start no new variant after this many seconds (later rows are "
                             "marked skipped)")
    parser.add_argument("--json", help="write the rows here (refuses an existing file)")
    args = parser.parse_args(argv)
    args.tiny = args.tiny or not torch.cuda.is_available()
    models = args.models or ("tiny" if args.tiny else "bert-base" if args.quick
                             else "bert-base,minilm-l6")
    args.models = models.split(",")
    args.modes = (args.modes or (",".join(MODES) if not args.tiny else "eager")).split(",")
    choices = {"--models": (args.models, MODELS), "--modes": (args.modes, MODES)}
    if args.lengths:
        args.lengths = args.lengths.split(",")
        choices["--lengths"] = (args.lengths, DISTRIBUTIONS)
    for flag, (given, known) in choices.items():
        unknown = sorted(set(given) - set(known))
        if unknown:
            parser.error(f"{flag} {unknown}: choose from {', '.join(known)}")
    args.batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    try:
        args.variants = [Variant.parse(text) for text in args.variants.split(",")]
    except ValueError as error:
        parser.error(str(error))
    return args


def batch_grid(args: argparse.Namespace) -> list[tuple[str, int]]:
    if args.quick:
        grid = list(TINY_QUICK if args.tiny else QUICK)
    else:
        grid = [(lengths, batch) for lengths in DISTRIBUTIONS
                for batch in (TINY_BATCHES if args.tiny else BATCHES)]
    return [(lengths, batch) for lengths, batch in grid
            if (args.lengths is None or lengths in args.lengths)
            and (args.batches is None or batch in args.batches)]


def patched_models(base: nn.Module, variants: Sequence[Variant]) -> dict[Variant, nn.Module]:
    """A patched copy of ``base`` per merging variant, and per schedule one pitome copy that
    the oracle reads its schedule from."""
    needed = {v for v in variants if v.algo in ("pitome", "tome")}
    needed |= {v.pitome_twin for v in variants if v.algo != "none"}
    return {variant: variant.patch(copy.deepcopy(base)) for variant in sorted(
        needed, key=lambda v: v.label)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    path = output_path(args.json)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    if "cuda-graph" in args.modes and device.type != "cuda":
        print("cuda-graph mode needs a GPU; skipped", file=sys.stderr)
        args.modes.remove("cuda-graph")
    if "compile" in args.modes:
        import torch._dynamo as dynamo

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):  # the variants share the model's code
            if hasattr(dynamo.config, name):
                setattr(dynamo.config, name, max(getattr(dynamo.config, name), 256))
    deadline = Deadline(args.time_limit)
    environment = describe_environment(device, dtype, args, argv)
    rows: list[dict] = []
    notes: list[str] = []

    def write() -> None:
        if path is not None:  # written as it comes, so a run cut short keeps its rows
            environment["seconds"] = round(deadline.elapsed(), 1)
            path.write_text(json.dumps({"environment": environment, "rows": rows,
                                        "notes": notes}, indent=1))

    try:
        for name in args.models:
            base = build_model(MODELS[name], device, dtype)
            with eager_mask_shortcut(base):
                for measured in run_model(name, base, batch_grid(args), args, device,
                                          deadline):
                    rows += measured
                    write()
            del base
    except DeviceLost as error:  # keep what was measured
        rows += error.rows
        notes.append(f"stopped: {error} ({describe(error.__cause__)})")
        print(notes[-1], file=sys.stderr)
    if deadline.passed():
        notes.append(f"--time-limit {args.time_limit:g} s reached: later rows are skipped")
    write()
    print(f"BERT-family encoders, random weights, {str(dtype).replace('torch.', '')} on "
          f"{environment['device']}; speedup over the unpatched model of the same batch and "
          "mode; of oracle: throughput over the text oracle's of the same schedule\n")
    print(table(rows))
    for note in notes:
        print(f"\nnote: {note}")
    if path is not None:
        print(f"\nwrote {path}", file=sys.stderr)
    return 0


def describe_environment(device: torch.device, dtype: torch.dtype, args: argparse.Namespace,
                         argv: list[str] | None) -> dict:
    import transformers

    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or "cpu", "dtype": str(dtype),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "tiny": args.tiny,
            "rounds": args.rounds, "round_seconds": args.round_seconds,
            "command": " ".join(sys.argv if argv is None else ["benchmarks/text.py", *argv])}


def run_model(name: str, base: nn.Module, grid: list[tuple[str, int]], args: argparse.Namespace,
              device: torch.device, deadline: Deadline) -> Iterator[list[dict]]:
    """Every batch of ``grid`` on one model, mode after mode in ``--modes`` order; yields the
    rows of each batch and mode as they are measured."""
    started = time.perf_counter()
    models = patched_models(base, args.variants)
    groups = []
    for lengths, batch in grid:
        groups.append(build_group(name, models, base, lengths, batch, args.variants))
        print(f"[{deadline.elapsed():.0f} s] {name} {lengths} batch {batch}: oracle checked "
              f"(relative error {groups[-1].oracle_error:.2g}), merge counts checked",
              file=sys.stderr, flush=True)
    print(f"{name}: {len(models)} patched copies and {len(groups)} batches ready in "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    for mode in args.modes:
        ordered = sorted(groups, key=lambda g: g.batch.attention_mask is not None) \
            if mode == "cuda-graph" else groups  # captures that may fail come last
        for group in ordered:
            place = f"{mode} {name} {group.lengths} batch {len(group.batch.lengths)}"

            def progress(text: str, place: str = place) -> None:
                print(f"[{deadline.elapsed():.0f} s] {place}: {text}", file=sys.stderr,
                      flush=True)
            yield measure(group, mode, device, args, deadline, progress)
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
