"""Label-free calibrated merge schedules (docs/calibration.md).

A uniform keep ratio spends a FLOPs budget the same way in every block, though blocks are
not equally hurt by merging. :func:`calibrate` finds per-block merge counts for a budget
(a fraction of the unmerged model's MACs, counted by :mod:`pitome.analysis.flops`) that
keep the merged model's outputs closest to the unmerged model's on unlabeled inputs:
KL(unmerged ‖ merged) of the class probabilities, or ``1 − cos`` of the pooled output of
an encoder without a head.

The search is forward-only. It starts from the best of four simple shapes that fill the
budget (uniform ratio, constant ``r``, early-heavy, late-heavy), then exchanges merges
between blocks: it measures, for every block, how much the loss changes per MAC when that
block merges ``step`` fewer tokens (one probe per block), and moves merges from the block
where they hurt most per MAC to the ones where they hurt least until the budget is met
again (at the optimum of this budget-constrained problem, every block's marginal harm per
MAC is equal). A move is kept only when the measured loss falls; ``step`` halves when no
move helps. Part of the inputs is held out of the search: of the schedules the search
accepted, the one with the lowest held-out loss is returned, so a search that only fits
its own inputs returns its starting shape.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._optional import require
from .analysis.flops import schedule_macs, token_layout
from .api import merge_config, merge_info, patch, pooling_weights, unpatch
from .core.schedule import TokenSchedule, linear_r, scalar

Batch = Union[torch.Tensor, Mapping[str, Any]]
OBJECTIVES = ("auto", "kl", "cosine")
SHAPES = ("uniform", "constant", "early-heavy", "late-heavy")
SHAPE_INFLECTION = {"constant": 0.0, "early-heavy": -0.5, "late-heavy": 0.5}
FORMAT = "pitome.calibration/1"


@dataclass
class Calibration:
    """A calibrated schedule: apply it with ``pitome.patch(model, c.algo, r=c.r)`` or
    ``c.apply(model)``.

    Attributes:
        r: tokens merged in each block.
        algo: the algorithm it was calibrated for.
        flops: the MACs of the schedule as a fraction of the unmerged model's.
        budget: the fraction asked for (``flops <= budget``).
        objective: ``"kl"`` or ``"cosine"``.
        loss: the objective on the search inputs.
        holdout_loss: the objective on the held-out inputs (None without any).
        start: the simple shape the search started from.
        shapes: every simple shape at the budget: ``r``, ``flops``, ``loss``, ``holdout_loss``.
        history: the schedules the search accepted, in order, with their losses and the
            evaluations spent when each was found.
        evaluations: forward passes over the search inputs (or the held-out ones) spent.
        seconds: wall time of the calibration.
        model: a name of the model calibrated.
        examples: inputs searched on and held out, ``{"search": n, "holdout": m}``.
        options: the keyword options given to ``pitome.patch`` (``margin``, ...).
    """

    r: list[int]
    algo: str
    flops: float
    budget: float
    objective: str
    loss: float
    holdout_loss: float | None = None
    start: str = "uniform"
    shapes: dict[str, dict[str, Any]] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluations: int = 0
    seconds: float = 0.0
    model: str = ""
    examples: dict[str, int] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)

    def apply(self, model: nn.Module) -> nn.Module:
        """Patch ``model`` with this schedule (its algorithm and options); returns it."""
        return patch(model, self.algo, r=list(self.r), **self.options)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the calibration as JSON; an existing file is kept unless ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to "
                                  "replace it")
        path.write_text(json.dumps({"format": FORMAT, **asdict(self)}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is not JSON ({error})") from None
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT:
            raise ValueError(f"{path} is not a pitome calibration (no \"format\": "
                             f"\"{FORMAT}\")")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path} has unknown field(s) {', '.join(unknown)}")
        r = data.get("r")
        if not isinstance(r, list) or not all(isinstance(v, int) and v >= 0 for v in r):
            raise ValueError(f"{path}: r must be a list of non-negative ints, got {r!r}")
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"{path}: {error}") from None


# ----------------------------------------------------------------------------- the budget
@dataclass(frozen=True)
class ScheduleSpace:
    """The per-block merge counts a model can take and what each costs (MACs per input)."""

    tokens: int
    prefix: int
    blocks: int
    mergeable_blocks: tuple[int, ...]
    count_prefix: bool
    cost: Callable[[Sequence[int]], int]

    @classmethod
    def of(cls, model: nn.Module, algo: str, options: Mapping[str, Any]) -> ScheduleSpace:
        """The space of ``model`` merged by ``algo`` (read from an identity patch)."""
        try:
            tokens, prefix = token_layout(model)
        except TypeError:
            raise TypeError(f"calibrate counts FLOPs with pitome.analysis.flops, which reads "
                            f"timm VisionTransformers and Hugging Face ViT/DeiT; a "
                            f"{type(model).__name__} is neither") from None
        patch(model, algo, r=0, **options)
        try:
            config = merge_config(model)
        finally:
            unpatch(model)
        assert config is not None
        algorithm = config.algorithm
        blocks = _depth(model)
        allowed = config.schedule.merge_blocks
        return cls(tokens, prefix, blocks,
                   tuple(range(blocks)) if allowed is None else tuple(allowed),
                   config.schedule.count_prefix,
                   lambda r: schedule_macs(model, list(r), algorithm))

    @property
    def unmerged(self) -> int:
        return self.cost([0] * self.blocks)

    def fits(self, r: Sequence[int]) -> bool:
        """Whether every block can merge its count (at most half its mergeable tokens)."""
        tokens = self.tokens
        for block, count in enumerate(r):
            if count < 0 or count and block not in self.mergeable_blocks or \
                    2 * count > tokens - self.prefix:
                return False
            tokens -= count
        return True

    def clamp(self, r: Sequence[int]) -> list[int]:
        """``r`` with each block's count cut to what it can merge."""
        out, tokens = [], self.tokens
        for block, count in enumerate(r):
            count = 0 if block not in self.mergeable_blocks else \
                max(0, min(int(count), (tokens - self.prefix) // 2))
            out.append(count)
            tokens -= count
        return out

    def most_merged(self) -> list[int]:
        return self.clamp([self.tokens] * self.blocks)

    def fraction(self, r: Sequence[int]) -> float:
        return self.cost(r) / self.unmerged

    def uniform(self, ratio: float) -> list[int]:
        """The schedule of a uniform keep ratio (what ``pitome.patch(ratio=...)`` merges)."""
        schedule = TokenSchedule(ratio=ratio, merge_blocks=self.mergeable_blocks,
                                 count_prefix=self.count_prefix)
        return schedule.plan(self.tokens, self.prefix, self.blocks)

    def shape(self, name: str, budget: int) -> list[int] | None:
        """The simple shape ``name`` that merges the least while within ``budget`` MACs
        (None if even its most merged form costs more)."""
        if name == "uniform":
            if self.cost(self.uniform(1.0)) <= budget:
                return self.uniform(1.0)
            if self.cost(self.uniform(0.5)) > budget:
                return None
            low, high = 0.5, 1.0  # cost(low) <= budget < cost(high)
            for _ in range(40):
                middle = (low + high) / 2
                low, high = (middle, high) if self.cost(self.uniform(middle)) <= budget else \
                    (low, middle)
            return self.uniform(low)
        most, count = self.most_merged(), 0
        while True:
            r = self.clamp(self._line(count, SHAPE_INFLECTION[name]))
            if self.cost(r) <= budget:
                return r
            if r == most or count > self.tokens:
                return None
            count += 1

    def _line(self, count: int, inflection: float) -> list[int]:
        line = linear_r(count, len(self.mergeable_blocks), inflection)
        r = [0] * self.blocks
        for block, value in zip(self.mergeable_blocks, line):
            r[block] = value
        return r

    def meet(self, r: Sequence[int], budget: int, order: Sequence[int]) -> list[int] | None:
        """``r`` with merges added, block by block in ``order``, until it costs at most
        ``budget`` MACs (later blocks cut to what they can still merge); None if those
        blocks cannot merge enough."""
        r = self.clamp(r)
        for block in order:
            while self.cost(r) > budget:
                more = list(r)
                more[block] += 1
                more = self.clamp(more)
                if more[block] == r[block]:
                    break
                r = more
        return r if self.cost(r) <= budget else None

    def trim(self, r: Sequence[int], budget: int, order: Sequence[int]) -> list[int]:
        """``r`` with merges taken back, block by block in ``order``, while it still costs
        at most ``budget`` MACs (merging less than the budget asks never helps)."""
        r = list(r)
        for block in order:
            while r[block] > 0:
                r[block] -= 1
                if self.cost(r) > budget:
                    r[block] += 1
                    break
        return r


def _depth(model: nn.Module) -> int:
    if hasattr(model, "blocks"):
        return len(model.blocks)
    return int(model.config.num_hidden_layers)


def uniform_flops(model: nn.Module, ratio: float, algo: str = "pitome",
                  **options: Any) -> float:
    """MACs of ``model`` merged by ``algo`` at a uniform keep ``ratio``, as a fraction of
    the unmerged model's: the budget to calibrate for to match that ratio's cost."""
    space = ScheduleSpace.of(model, algo, options)
    return space.fraction(space.uniform(ratio))


# ----------------------------------------------------------------------------- the objective
def _prediction(output: Any) -> tuple[torch.Tensor, str]:
    """The tensor an output is judged by and the objective it suggests."""
    if hasattr(output, "logits"):
        return output.logits, "kl"
    if isinstance(output, Mapping) and "sentence_embedding" in output:
        return output["sentence_embedding"], "cosine"
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state, "cosine"
    if isinstance(output, (tuple, list)):
        output = output[0]
    if not isinstance(output, torch.Tensor):
        raise TypeError(f"calibrate reads logits or hidden states from the model's output, "
                        f"not a {type(output).__name__}")
    return output, "kl" if output.ndim == 2 else "cosine"


class Objective:
    """Mean loss of a merge schedule against the unmerged model's outputs on fixed inputs
    (computed once, when this is built on the unpatched model)."""

    def __init__(self, model: nn.Module, batches: Sequence[Batch], kind: str,
                 dtype: torch.dtype | None = None) -> None:
        self.model, self.batches, self.dtype = model, list(batches), dtype
        self.device = next(model.parameters()).device
        outputs = [self._forward(batch) for batch in self.batches]
        if kind == "auto":
            kind = "cosine" if getattr(model, "num_classes", None) == 0 else \
                _prediction(outputs[0][0])[1]
        self.kind = kind
        self.examples = sum(self._count(batch) for batch in self.batches)
        self.reference = [self._target(output, batch) for output, batch in outputs]

    @staticmethod
    def _count(batch: Batch) -> int:
        if isinstance(batch, torch.Tensor):
            return batch.shape[0]
        return next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]

    def _forward(self, batch: Batch) -> tuple[Any, Batch]:
        if isinstance(batch, torch.Tensor):
            batch = batch.to(self.device)
        else:
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
        with torch.no_grad(), torch.autocast(self.device.type, self.dtype or torch.float32,
                                             enabled=self.dtype is not None):
            output = self.model(**batch) if isinstance(batch, Mapping) else self.model(batch)
        return output, batch

    def _target(self, output: Any, batch: Batch) -> torch.Tensor:
        prediction = _prediction(output)[0].float()
        if self.kind == "kl":
            if prediction.ndim != 2:
                raise ValueError(f"objective 'kl' needs class logits (batch × classes), the "
                                 f"model gives a {tuple(prediction.shape)} tensor; use "
                                 "objective='cosine'")
            return prediction.log_softmax(-1)
        if prediction.ndim == 3:
            mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
            info = merge_info(self.model) if merge_config(self.model) is not None else None
            if info is not None and info.sizes is not None:
                weights = pooling_weights(self.model, mask)
            elif mask is not None:
                weights = mask.unsqueeze(-1).float()
            else:
                weights = torch.ones_like(prediction[..., :1])
            prediction = (prediction * weights).sum(1) / weights.sum(1)
        return prediction

    def losses(self) -> torch.Tensor:
        """Per-example loss of the model as it is patched now."""
        losses = []
        for batch, reference in zip(self.batches, self.reference):
            output, moved = self._forward(batch)
            merged = self._target(output, moved)
            if self.kind == "kl":
                loss = F.kl_div(merged, reference, log_target=True, reduction="none").sum(-1)
            else:
                loss = 1 - F.cosine_similarity(merged, reference, dim=-1)
            losses.append(loss.cpu())
        return torch.cat(losses)


# ----------------------------------------------------------------------------- the search
def calibrate(model: nn.Module, batches: torch.Tensor | Iterable[Batch], algo: str = "pitome",
              flops: float = 0.6, *, objective: str = "auto", holdout: float = 0.25,
              max_evaluations: int = 150, batch_size: int = 32,
              dtype: torch.dtype | None = None, progress: bool = False,
              name: str | None = None, **options: Any) -> Calibration:
    """Per-block merge counts for ``model`` under a FLOPs budget, found without labels.

    Args:
        model: an unpatched timm or Hugging Face ViT/DeiT (FLOPs are counted by
            :func:`pitome.analysis.flops.schedule_macs`); left unpatched.
        batches: unlabeled inputs: a tensor (split into ``batch_size`` rows) or batches
            (tensors, or dicts of keyword inputs). Sample them across classes: a class-sorted
            folder's first images make a narrow calibration set.
        algo: the registered algorithm to calibrate for.
        flops: the budget, a fraction of the unmerged model's MACs, above what merging
            the most each block can (half its tokens) costs and at most 1;
            :func:`uniform_flops` gives a uniform ratio's.
        objective: ``"kl"`` (KL(unmerged ‖ merged) of the class probabilities),
            ``"cosine"`` (``1 − cos`` of the mean-pooled output, for encoders without a
            head) or ``"auto"`` (``"kl"`` for 2-D outputs of a model with classes).
        holdout: fraction of the batches held out of the search to choose among the
            schedules it accepts (0 keeps none; needs two batches or more).
        max_evaluations: forward passes over the inputs the search may spend.
        batch_size: rows per batch when ``batches`` is one tensor.
        dtype: autocast precision of the forwards (None: the model's own).
        progress: show a progress bar (tqdm) on stderr.
        name: what to call the model in the result (default: its class name).
        **options: keyword options for ``pitome.patch`` (``margin``, ``prop_attn``, ...),
            used in every evaluation and kept in the result.

    Returns:
        A :class:`Calibration` with ``flops <= budget`` that is never worse on the search
        inputs than the best simple shape at the budget.
    """
    started = time.perf_counter()
    if not isinstance(algo, str):
        raise TypeError(f"algo must be a registered algorithm's name, got {algo!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    holdout_value = scalar(holdout)
    if holdout_value is None or not 0 <= holdout_value < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    for label, value in (("max_evaluations", max_evaluations), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a whole number >= 1, got {value!r}")
    if merge_config(model) is not None:
        raise ValueError("calibrate needs the unmerged model to compare with; call "
                         "pitome.unpatch(model) first")
    space = ScheduleSpace.of(model, algo, options)
    budget = _check_budget(flops, space)
    search_batches, held_batches = _split(_as_batches(batches, batch_size), holdout_value)
    search = Objective(model, search_batches, objective, dtype)
    held = Objective(model, held_batches, search.kind, dtype) if held_batches else None
    bar = _progress_bar(progress, max_evaluations)
    searcher = _Search(model, algo, options, space, budget, search, held, max_evaluations, bar)
    try:
        shapes = {}
        for shape in SHAPES:
            r = space.shape(shape, budget)
            if r is not None:
                shapes[shape] = {"r": r, "flops": space.fraction(r), "loss": searcher.loss(r),
                                 "holdout_loss": searcher.holdout_loss(r)}
        start = min(shapes, key=lambda shape: shapes[shape]["loss"])
        best = searcher.run(shapes[start]["r"])
    finally:
        unpatch(model)
        if bar is not None:
            bar.close()
    return Calibration(
        r=best, algo=algo, flops=space.fraction(best), budget=float(flops),
        objective=search.kind, loss=searcher.loss(best), holdout_loss=searcher.holdout_loss(best),
        start=start, shapes=shapes, history=searcher.history, evaluations=searcher.evaluations,
        seconds=time.perf_counter() - started, model=name or type(model).__name__,
        examples={"search": search.examples, "holdout": held.examples if held else 0},
        options=dict(options))


def _check_budget(flops: Any, space: ScheduleSpace) -> int:
    value = scalar(flops)
    lowest = space.fraction(space.most_merged())
    if value is None or not lowest < value <= 1:
        raise ValueError(f"flops={flops!r}: the budget is a fraction of the unmerged model's "
                         f"MACs in ({lowest:.4f}, 1]; {lowest:.4f} is what merging half of "
                         "every block's tokens costs")
    return math.floor(value * space.unmerged)


def _as_batches(batches: Any, batch_size: int) -> list[Batch]:
    if isinstance(batches, torch.Tensor):
        if batches.ndim == 0 or batches.shape[0] == 0:
            raise ValueError("batches holds no inputs")
        return list(batches.split(batch_size))
    if isinstance(batches, Mapping):
        return [batches]
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"batches must be a tensor or an iterable of batches, got "
                        f"{type(batches).__name__}")
    listed = list(batches)
    if not listed:
        raise ValueError("batches holds no inputs")
    for batch in listed:
        if not isinstance(batch, (torch.Tensor, Mapping)):
            raise TypeError(f"each batch must be a tensor or a dict of keyword inputs, got "
                            f"{type(batch).__name__}")
    return listed


def _split(batches: list[Batch], holdout: float) -> tuple[list[Batch], list[Batch]]:
    """Held-out batches at evenly spread positions, so both parts span the inputs."""
    count = math.floor(len(batches) * holdout + 0.5) if len(batches) > 1 and holdout else 0
    count = min(count, len(batches) - 1)
    held = {int((index + 0.5) * len(batches) / count) for index in range(count)} if count else set()
    return ([b for i, b in enumerate(batches) if i not in held],
            [b for i, b in enumerate(batches) if i in held])


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    import sys

    tqdm = require("tqdm", "eval").tqdm
    return tqdm(total=total, desc="calibrating", unit="eval", file=sys.stderr, leave=False)


class _Search:
    """The exchange search over per-block counts (module docstring), memoising losses."""

    TRIES = 3

    def __init__(self, model, algo, options, space: ScheduleSpace, budget: int,
                 search: Objective, held: Objective | None, max_evaluations: int, bar) -> None:
        self.model, self.algo, self.options = model, algo, options
        self.space, self.budget, self.search, self.held = space, budget, search, held
        self.max_evaluations, self.bar = max_evaluations, bar
        self.evaluations = 0
        self.losses: dict[tuple[int, ...], float] = {}
        self.held_losses: dict[tuple[int, ...], float] = {}
        self.history: list[dict[str, Any]] = []

    @property
    def spent(self) -> bool:
        return self.evaluations >= self.max_evaluations

    def _evaluate(self, objective: Objective, r: Sequence[int]) -> float:
        patch(self.model, self.algo, r=list(r), **self.options)
        loss = objective.losses().mean().item()
        self.evaluations += 1
        if self.bar is not None:
            self.bar.update(1)
        return loss

    def loss(self, r: Sequence[int]) -> float:
        key = tuple(r)
        if key not in self.losses:
            self.losses[key] = self._evaluate(self.search, r)
        return self.losses[key]

    def holdout_loss(self, r: Sequence[int]) -> float | None:
        if self.held is None:
            return None
        key = tuple(r)
        if key not in self.held_losses:
            self.held_losses[key] = self._evaluate(self.held, r)
        return self.held_losses[key]

    def _accept(self, r: list[int]) -> None:
        self.history.append({"evaluations": self.evaluations, "r": list(r),
                             "flops": self.space.fraction(r), "loss": self.loss(r),
                             "holdout_loss": self.holdout_loss(r)})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.loss(r):.4f}")

    def run(self, start: list[int]) -> list[int]:
        current = list(start)
        self._accept(current)
        step, rates, fresh = max(1, max(current) // 4), None, False
        while step >= 1 and not self.spent:
            if rates is None:
                rates, fresh = self._rates(current, step), True
            better = self._exchange(current, step, rates)
            if better is not None:  # the rates measured at the last schedule serve again
                current, fresh = better, False
                self._accept(current)
            elif fresh:
                step, rates = step // 2, None
            else:
                rates = None
        if self.held is None:
            return current
        best = min(reversed(self.history), key=lambda entry: entry["holdout_loss"])
        return best["r"]

    def _rates(self, r: list[int], step: int) -> tuple[dict[int, float], dict[int, float]]:
        """Per block, the loss's change per MAC of merging there: measured by merging
        ``step`` fewer tokens (or ``step`` more where the block merges none), one probe per
        block. Returned twice: as the cost of merging more there and the gain of merging
        less (a first-order search uses one rate for both)."""
        base_loss, base_cost = self.loss(r), self.space.cost(r)
        rates = {}
        for block in self.space.mergeable_blocks:
            if self.spent:
                break
            probe = list(r)
            sign = -1 if probe[block] else 1
            probe[block] += sign * min(step, probe[block]) if sign < 0 else step
            probe = self.space.clamp(probe)  # later blocks cut to what they can merge
            macs = sign * (base_cost - self.space.cost(probe))
            if probe[block] != r[block] and macs > 0:
                rates[block] = sign * (self.loss(probe) - base_loss) / macs
        return rates, rates

    def _exchange(self, r: list[int], step: int,
                  rates: tuple[dict[int, float], dict[int, float]]) -> list[int] | None:
        """A schedule within budget with a lower loss than ``r``, or None."""
        rise, fall = rates
        order = sorted(rise, key=rise.get)  # where merging more hurts least per MAC
        giving = sorted(fall, key=fall.get, reverse=True)  # where merging less helps most
        pairs = sorted(((fall[donor] - rise[taker], donor, taker) for donor in fall
                        for taker in rise if donor != taker and fall[donor] > rise[taker]
                        and r[donor] > 0),
                       reverse=True)
        tried = 0
        for _, donor, taker in pairs:
            if tried >= self.TRIES or self.spent:
                break
            candidate = list(r)
            candidate[donor] -= min(step, candidate[donor])
            candidate = self.space.meet(candidate, self.budget,
                                        [b for b in [taker, *order] if b != donor])
            if candidate is None:
                continue
            candidate = self.space.trim(candidate, self.budget, giving)
            if candidate == r or tuple(candidate) in self.losses and \
                    self.losses[tuple(candidate)] >= self.loss(r):
                continue
            tried += 1
            if self.loss(candidate) < self.loss(r):
                return candidate
        return None
