"""Label-free calibrated merge schedules (docs/calibration.md).

A uniform keep ratio spends a FLOPs budget the same way in every block, though blocks are
not equally hurt by merging. :func:`calibrate` finds per-block merge counts (vision) or
per-block keep ratios (BERT-family text encoders, whose sentences each have their own
length) for a budget (a fraction of the unmerged model's MACs, counted by
:mod:`pitome.analysis.flops`; for text, over the calibration sentences' lengths) that keep
the merged model's outputs closest to the unmerged model's on unlabeled inputs:
KL(unmerged ‖ merged) of the class probabilities, or ``1 − cos`` of the pooled output of
an encoder without a head.

Both spaces are searched as whole steps per block: tokens merged (vision), or steps of
``grid`` below a keep ratio of 1 (text: 4 steps of the default 0.005 are ρ = 0.98).

The search starts from the best of four simple shapes that fill the budget (uniform
ratio, constant ``r``, early-heavy, late-heavy), then exchanges merges between blocks: it
measures, for every block, how much the loss changes per MAC when that block merges
``step`` fewer tokens (``rates="probe"``: one forward per block; or, for vision models,
``rates="gradient"``: the derivatives of a merge relaxed to a fraction of one token more in
every block, one forward with gradients, :mod:`pitome.core.relaxed`), and moves merges from
the block where they hurt most per MAC to the ones where they hurt least until the budget
is met again (at the optimum of this budget-constrained problem, every block's marginal
harm per MAC is equal). A move is kept only when the measured loss falls; ``step`` halves when no
move helps. Part of the inputs is held out of the search: of the schedules the search
accepted, the one with the lowest held-out loss is returned, so a search that only fits
its own inputs returns its starting shape.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._optional import require
from .adapters import find_adapter
from .analysis.flops import TextShape, length_macs, schedule_macs, token_layout
from .api import merge_config, merge_info, patch, pooling_weights, unpatch
from .core.schedule import MIN_RATIO, TokenSchedule, linear_r, scalar
from .runtime.state import relaxed_merges

Batch = Union[torch.Tensor, Mapping[str, Any]]
OBJECTIVES = ("auto", "kl", "cosine")
RATES = ("probe", "gradient", "gradient-then-probe")
SHAPES = ("uniform", "constant", "early-heavy", "late-heavy")
TEXT_SHAPES = ("uniform", "first-3", "early-heavy", "late-heavy")
SHAPE_INFLECTION = {"constant": 0.0, "uniform": 0.0, "first-3": 0.0, "early-heavy": -0.5,
                    "late-heavy": 0.5}
FORMAT = "pitome.calibration/1"
DEFAULT_GRID = 0.005


@dataclass
class Calibration:
    """A calibrated schedule: apply it with ``c.apply(model)``, or
    ``pitome.patch(model, c.algo, r=c.r)`` (vision) /
    ``pitome.patch(model, c.algo, ratio=c.ratio)`` (text).

    Attributes:
        r: tokens merged in each block (vision; None for text).
        algo: the algorithm it was calibrated for.
        flops: the MACs of the schedule as a fraction of the unmerged model's (text: the
            mean over the calibration sentences' lengths).
        budget: the fraction asked for (``flops <= budget``).
        objective: ``"kl"`` or ``"cosine"``.
        loss: the objective on the search inputs.
        holdout_loss: the objective on the held-out inputs (None without any).
        start: the simple shape the search started from.
        shapes: every simple shape at the budget: ``r`` (or ``ratio``), ``flops``,
            ``loss``, ``holdout_loss``.
        history: the schedules the search accepted, in order, with their losses and the
            evaluations spent when each was found.
        evaluations: forward passes over the search inputs (or the held-out ones) spent.
        seconds: wall time of the calibration.
        model: a name of the model calibrated.
        examples: inputs searched on and held out, ``{"search": n, "holdout": m}``.
        options: the keyword options given to ``pitome.patch`` (``margin``, ...).
        ratio: the keep ratio of each block (text; None for vision), 1 where a block does
            not merge; a per-block list, so the model's default ``merge_blocks`` does not
            apply to it.
        rates: how the search measured each block's harm per MAC: ``"probe"`` (one
            forward per block), ``"gradient"`` (a relaxed merge's derivatives) or
            ``"gradient-then-probe"``.
    """

    r: list[int] | None
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
    ratio: list[float] | None = None
    rates: str = "probe"

    def apply(self, model: nn.Module) -> nn.Module:
        """Patch ``model`` with this schedule (its algorithm and options); returns it."""
        if self.ratio is not None:
            return patch(model, self.algo, ratio=list(self.ratio), **self.options)
        return patch(model, self.algo, r=list(self.r or []), **self.options)

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write the calibration as JSON; an existing file is kept unless ``overwrite``."""
        path = Path(path)
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True (--overwrite) to "
                                  "replace it")
        fields = asdict(self)
        if fields["ratio"] is None:  # a vision file stays what readers before ratio read
            del fields["ratio"]
        if fields["rates"] == "probe":  # ... and before rates
            del fields["rates"]
        path.write_text(json.dumps({"format": FORMAT, **fields}, indent=2) + "\n")
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
        _check_schedule_fields(path, data.get("r"), data.get("ratio"))
        try:
            return cls(**data)
        except TypeError as error:
            raise ValueError(f"{path}: {error}") from None


def _check_schedule_fields(path: Path, r: Any, ratio: Any) -> None:
    """Raise ValueError unless exactly one of ``r`` (non-negative ints) and ``ratio`` (keep
    ratios in [0.5, 1]) holds a per-block list (files from before ``ratio`` hold ``r``)."""
    if ratio is None:
        if not isinstance(r, list) or not all(isinstance(v, int) and not isinstance(v, bool)
                                              and v >= 0 for v in r):
            raise ValueError(f"{path}: r must be a list of non-negative ints, got {r!r}")
        return
    if r is not None:
        raise ValueError(f"{path}: holds both r and ratio; a calibration has one of them")
    if not isinstance(ratio, list) or not ratio or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and MIN_RATIO <= v <= 1
            for v in ratio):
        raise ValueError(f"{path}: ratio must be a list of keep ratios in [{MIN_RATIO}, 1], "
                         f"got {ratio!r}")


# ----------------------------------------------------------------------------- the budget
class StepSpace:
    """What the search needs of a schedule space whose schedules are whole steps per block
    (a list, one per block): their cost in MACs, and moves that keep them within a budget.
    Subclasses give the members declared here: ``cost`` of a schedule, ``clamp`` (each
    block cut to what it can take), the ``most_merged`` schedule, the simple ``shape`` of a
    name within a budget (or None), and ``describe``: the schedule as it is recorded and as
    ``pitome.patch`` takes it, ``{"r": [...]}`` or ``{"ratio": [...]}``."""

    blocks: int
    mergeable_blocks: tuple[int, ...]
    shape_names: tuple[str, ...] = SHAPES
    cost: Callable[[Sequence[int]], int]
    clamp: Callable[[Sequence[int]], list[int]]
    most_merged: Callable[[], list[int]]
    shape: Callable[[str, int], list[int] | None]
    describe: Callable[[Sequence[int]], dict[str, list]]

    @property
    def unmerged(self) -> int:
        return self.cost([0] * self.blocks)

    def fraction(self, steps: Sequence[int]) -> float:
        return self.cost(steps) / self.unmerged

    def _line(self, count: int, inflection: float,
              blocks: Sequence[int] | None = None) -> list[int]:
        blocks = self.mergeable_blocks if blocks is None else blocks
        line = linear_r(count, len(blocks), inflection)
        steps = [0] * self.blocks
        for block, value in zip(blocks, line):
            steps[block] = value
        return steps

    def _line_shape(self, inflection: float, budget: int, limit: int,
                    blocks: Sequence[int] | None = None) -> list[int] | None:
        """The line of ``inflection`` over ``blocks`` that merges the least while within
        ``budget`` MACs (None if even its most merged form costs more)."""
        most = [count if blocks is None or block in blocks else 0
                for block, count in enumerate(self.most_merged())]
        for count in range(limit + 2):
            steps = self.clamp(self._line(count, inflection, blocks))
            if self.cost(steps) <= budget:
                return steps
            if steps == most:
                return None
        return None

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


@dataclass(frozen=True)
class ScheduleSpace(StepSpace):
    """The per-block merge counts a vision model can take and what each costs (MACs per
    input)."""

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
                            f"timm VisionTransformers, Hugging Face ViT/DeiT and BERT-family "
                            f"text encoders; a {type(model).__name__} is none of these") \
                from None
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

    def describe(self, steps: Sequence[int]) -> dict[str, list]:
        return {"r": list(steps)}

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
        return self._line_shape(SHAPE_INFLECTION[name], budget, self.tokens)


@dataclass(frozen=True)
class RatioSpace(StepSpace):
    """Per-block keep ratios of a BERT-family text encoder on a grid, as whole steps of
    ``grid`` below 1 (0 steps: the block does not merge; the most: ρ = 0.5), and what each
    costs: the total MACs of the calibration sentences, each merged by the schedule of its
    own length (:func:`pitome.analysis.flops.length_macs`)."""

    blocks: int
    mergeable_blocks: tuple[int, ...]
    default_blocks: tuple[int, ...] | None
    grid: float
    count_prefix: bool
    total: Callable[[TokenSchedule | None], int]
    sentences: int
    shape_names: tuple[str, ...] = TEXT_SHAPES
    costs: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, model: nn.Module, algo: str, options: Mapping[str, Any],
           lengths: Sequence[int], grid: float = DEFAULT_GRID) -> RatioSpace:
        """The space of ``model`` merged by ``algo``, costed over sentences of ``lengths``
        real tokens (read from an identity patch)."""
        shape = TextShape.of(model)
        by_length = Counter(int(length) for length in lengths)
        if not by_length or min(by_length) < 1:
            raise ValueError("calibrating a text model needs sentences of at least one token")
        patch(model, algo, ratio=[1.0] * shape.num_blocks, **options)
        try:
            config = merge_config(model)
        finally:
            unpatch(model)
        assert config is not None
        algorithm, allowed = config.algorithm, config.schedule.merge_blocks
        default = options.get("merge_blocks") or find_adapter(model).merge_blocks_for(model)
        return cls(shape.num_blocks,
                   tuple(range(shape.num_blocks)) if allowed is None else tuple(allowed),
                   None if default is None else tuple(default), grid,
                   config.schedule.count_prefix,
                   lambda schedule: length_macs(shape, schedule, by_length, algorithm),
                   sum(by_length.values()))

    @property
    def most_steps(self) -> int:
        return math.floor((1 - MIN_RATIO) / self.grid + 1e-9)

    def ratios(self, steps: Sequence[int]) -> list[float]:
        """The keep ratio of each block: ``1 − steps·grid``."""
        return [round(1 - count * self.grid, 10) for count in steps]

    def describe(self, steps: Sequence[int]) -> dict[str, list]:
        return {"ratio": self.ratios(steps)}

    def schedule(self, steps: Sequence[int]) -> TokenSchedule:
        return TokenSchedule(ratio=self.ratios(steps), count_prefix=self.count_prefix)

    def cost(self, steps: Sequence[int]) -> int:
        key = tuple(steps)
        if key not in self.costs:
            self.costs[key] = self.total(self.schedule(steps))
        return self.costs[key]

    def ratio_cost(self, ratio: float, blocks: Sequence[int] | None) -> int:
        """The cost of one keep ``ratio`` in ``blocks`` (None: all), off the grid."""
        return self.total(TokenSchedule(ratio=ratio, merge_blocks=blocks,
                                        count_prefix=self.count_prefix))

    def equal_cost_ratio(self, budget: int, blocks: Sequence[int] | None) -> float | None:
        """The largest keep ratio in ``blocks`` costing at most ``budget`` MACs (to 1e-6),
        or None if even 0.5 costs more."""
        if self.ratio_cost(1.0, blocks) <= budget:
            return 1.0
        if self.ratio_cost(MIN_RATIO, blocks) > budget:
            return None
        low, high = MIN_RATIO, 1.0
        while high - low > 1e-6:
            middle = (low + high) / 2
            low, high = (middle, high) if self.ratio_cost(middle, blocks) <= budget else \
                (low, middle)
        return low

    def clamp(self, steps: Sequence[int]) -> list[int]:
        """``steps`` cut to [0, the most], 0 outside the mergeable blocks."""
        return [max(0, min(int(count), self.most_steps)) if block in self.mergeable_blocks
                else 0 for block, count in enumerate(steps)]

    def most_merged(self) -> list[int]:
        return self.clamp([self.most_steps] * self.blocks)

    def shape(self, name: str, budget: int) -> list[int] | None:
        """The simple shape ``name`` that merges the least while within ``budget`` MACs:
        ``uniform`` (one ratio in every mergeable block), ``first-3`` (one ratio in blocks
        0-2, the authors' text schedule), ``early-heavy`` / ``late-heavy`` (steps falling /
        rising linearly); None if even its most merged form costs more."""
        blocks = None
        if name == "first-3":
            blocks = [block for block in self.mergeable_blocks if block < 3]
            if not blocks or tuple(blocks) == self.mergeable_blocks:
                return None  # no such blocks, or the same shape as uniform
        return self._line_shape(SHAPE_INFLECTION[name], budget, 3 * self.most_steps, blocks)

def _depth(model: nn.Module) -> int:
    if hasattr(model, "blocks"):
        return len(model.blocks)
    return int(model.config.num_hidden_layers)


def is_text_model(model: nn.Module) -> bool:
    """Whether ``model`` is a BERT-family text encoder whose FLOPs are counted per sentence
    (:class:`pitome.analysis.flops.TextShape`)."""
    try:
        TextShape.of(model)
    except TypeError:
        return False
    return True


def sentence_lengths(batches: torch.Tensor | Iterable[Batch]) -> list[int]:
    """The real tokens of every sentence in text batches: each row's attention-mask sum,
    or the batch's width where a batch has no mask (a tensor of ``input_ids``)."""
    lengths: list[int] = []
    for batch in _as_batches(batches, 2 ** 62):
        if isinstance(batch, torch.Tensor):
            lengths += [batch.shape[-1]] * batch.shape[0]
            continue
        mask = batch.get("attention_mask")
        if mask is not None:
            lengths += [int(v) for v in torch.as_tensor(mask).sum(-1).tolist()]
        else:
            ids = batch.get("input_ids")
            if not isinstance(ids, torch.Tensor):
                raise ValueError("a text batch needs input_ids or an attention_mask to read "
                                 "its sentence lengths from")
            lengths += [ids.shape[-1]] * ids.shape[0]
    return lengths


def _text_lengths(lengths: Sequence[int] | None, batches: Any) -> Sequence[int]:
    if (lengths is None) == (batches is None):
        raise ValueError("a text model's FLOPs depend on its sentences' lengths: give "
                         "lengths= (real tokens per sentence) or batches= (one of them)")
    return sentence_lengths(batches) if lengths is None else lengths


def uniform_flops(model: nn.Module, ratio: float, algo: str = "pitome", *,
                  lengths: Sequence[int] | None = None, batches: Any = None,
                  **options: Any) -> float:
    """MACs of ``model`` merged by ``algo`` at a uniform keep ``ratio``, as a fraction of
    the unmerged model's: the budget to calibrate for to match that ratio's cost.

    A text encoder merges in its default blocks (BERT-family: the first three) unless
    ``merge_blocks`` is given, and is costed over sentences of ``lengths`` real tokens (or
    those of ``batches``, see :func:`sentence_lengths`)."""
    if is_text_model(model):
        space = RatioSpace.of(model, algo, options, _text_lengths(lengths, batches))
        return space.ratio_cost(ratio, space.default_blocks) / space.unmerged
    space = ScheduleSpace.of(model, algo, options)
    return space.fraction(space.uniform(ratio))


def schedule_space(model: nn.Module, algo: str, options: Mapping[str, Any],
                   batches: Sequence[Batch] | None = None,
                   grid: float | None = None) -> StepSpace:
    """The space :func:`calibrate` searches: per-block keep ratios on ``grid`` for a text
    encoder (costed over the sentences of ``batches``), per-block counts for a ViT."""
    if is_text_model(model):
        return RatioSpace.of(model, algo, options, sentence_lengths(batches or []),
                             DEFAULT_GRID if grid is None else grid)
    if grid is not None:
        raise ValueError(f"grid={grid!r} is the step of a text model's keep ratios; a "
                         f"{type(model).__name__} is calibrated in whole tokens per block")
    return ScheduleSpace.of(model, algo, options)


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


def _takes_one_dict(model: nn.Module) -> bool:
    """Whether ``model`` takes its inputs as one dict (a sentence-transformers model)."""
    return any(klass.__name__ == "SentenceTransformer" for klass in type(model).__mro__)


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

    def _forward(self, batch: Batch, gradients: bool = False) -> tuple[Any, Batch]:
        if isinstance(batch, torch.Tensor):
            batch = batch.to(self.device)
        else:
            batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v
                     for k, v in batch.items()}
        with torch.set_grad_enabled(gradients), torch.autocast(
                self.device.type, self.dtype or torch.float32, enabled=self.dtype is not None):
            output = self.model(**batch) if isinstance(batch, Mapping) and \
                not _takes_one_dict(self.model) else self.model(batch)
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

    def _loss(self, merged: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        if self.kind == "kl":
            return F.kl_div(merged, reference, log_target=True, reduction="none").sum(-1)
        return 1 - F.cosine_similarity(merged, reference, dim=-1)

    def losses(self) -> torch.Tensor:
        """Per-example loss of the model as it is patched now."""
        losses = []
        for batch, reference in zip(self.batches, self.reference):
            output, moved = self._forward(batch)
            losses.append(self._loss(self._target(output, moved), reference).cpu())
        return torch.cat(losses)

    def merge_derivatives(self, blocks: Sequence[int], seed: int = 0
                          ) -> dict[int, tuple[float, float]]:
        """Per block, how the mean loss changes as the block merges a fraction of one token
        more than the model as it is patched now (:func:`pitome.runtime.state.relaxed_merges`;
        one forward with gradients and two backward passes per batch): ``(g, h)`` at
        fraction 0, so merging one more changes the loss by about ``g + h/2``.

        ``g`` is the loss's derivative, ``h`` its Gauss-Newton curvature (the curvature of
        the outputs themselves left out),
        estimated per example from one random probe: for KL, the squared derivative of
        ``log q_y`` with ``y`` drawn from the merged model's classes (whose covariance
        is the KL's Hessian in the logits); for ``1 − cos``, of ``v·m`` with ``v`` a
        Gaussian projected off the output ``m`` and scaled by ``1/|m|``."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        first = torch.zeros(len(blocks), dtype=torch.float64)
        second = torch.zeros(len(blocks), dtype=torch.float64)
        for batch, reference in zip(self.batches, self.reference):
            fractions = {block: torch.zeros(self._count(batch), device=self.device,
                                            requires_grad=True) for block in blocks}
            with relaxed_merges(fractions):
                output, moved = self._forward(batch, gradients=True)
            with torch.enable_grad():
                merged = self._target(output, moved)
                loss = self._loss(merged, reference)
                probe = self._curvature_probe(merged.detach(), generator)
                score = (merged * probe).sum(-1)
            inputs = list(fractions.values())
            slopes = torch.autograd.grad(loss.sum(), inputs, retain_graph=True,
                                         allow_unused=True)
            probes = torch.autograd.grad(score.sum(), inputs, allow_unused=True)
            for index, (slope, probed) in enumerate(zip(slopes, probes)):
                if slope is not None:
                    first[index] += slope.double().sum().cpu()
                if probed is not None:
                    second[index] += probed.double().square().sum().cpu()
        return {block: (float(first[index] / self.examples),
                        float(second[index] / self.examples))
                for index, block in enumerate(blocks)}

    def _curvature_probe(self, merged: torch.Tensor, generator: torch.Generator
                         ) -> torch.Tensor:
        """A random ``v`` per example with ``E[v vᵀ]`` the loss's Gauss-Newton Hessian in
        the outputs (see :meth:`merge_derivatives`)."""
        if self.kind == "kl":
            probabilities = merged.exp()
            drawn = torch.multinomial(probabilities, 1, generator=generator)
            return torch.zeros_like(merged).scatter_(1, drawn, 1.0)  # ∂(v·log q) = ∂ log q_y
        norm = merged.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        unit = merged / norm
        noise = torch.randn(merged.shape, generator=generator, device=merged.device,
                            dtype=merged.dtype)
        return (noise - (noise * unit).sum(-1, keepdim=True) * unit) / norm


# ----------------------------------------------------------------------------- the search
def calibrate(model: nn.Module, batches: torch.Tensor | Iterable[Batch], algo: str = "pitome",
              flops: float = 0.6, *, objective: str = "auto", holdout: float = 0.25,
              max_evaluations: int = 150, batch_size: int = 32,
              dtype: torch.dtype | None = None, progress: bool = False,
              name: str | None = None, grid: float | None = None, rates: str = "probe",
              **options: Any) -> Calibration:
    """Per-block merge counts (vision) or keep ratios (text) for ``model`` under a FLOPs
    budget, found without labels.

    Args:
        model: an unpatched timm or Hugging Face ViT/DeiT (FLOPs are counted by
            :func:`pitome.analysis.flops.schedule_macs`), or a Hugging Face BERT, RoBERTa or
            DistilBERT encoder (MiniLM is a ``BertModel``), alone or inside
            sentence-transformers (:func:`pitome.analysis.flops.text_macs`, over the
            lengths of the calibration sentences); left unpatched.
        batches: unlabeled inputs: a tensor or a dict of them (split into ``batch_size``
            rows) or batches (tensors, or dicts of keyword inputs: text batches hold
            ``input_ids`` and an ``attention_mask``, padded on the right). Sample them across
            classes: a class-sorted folder's first images make a narrow calibration set.
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
        grid: the step of a text model's keep ratios (default 0.005): each block keeps
            ``1 − k·grid`` of its tokens, ``k`` from 0 (no merge) to ρ = 0.5.
        rates: how the search measures each block's harm per MAC at a schedule:
            ``"probe"``, one forward per mergeable block with that block changed;
            ``"gradient"`` (vision models, algorithms that plan merges), one forward with
            gradients through a relaxed merge of one token more in every block and two
            backward passes (:meth:`Objective.merge_derivatives`), counted as
            ``_Search.GRADIENT_EVALUATIONS`` evaluations; or ``"gradient-then-probe"``,
            derivatives first and probes where the moves they suggest do not help, before
            the step shrinks (docs/calibration.md compares the three).
        **options: keyword options for ``pitome.patch`` (``margin``, ``prop_attn``, ...),
            used in every evaluation and kept in the result.

    Returns:
        A :class:`Calibration` with ``flops <= budget`` that is never worse on the search
        inputs than the best simple shape at the budget: ``r`` set for a vision model,
        ``ratio`` for a text one.
    """
    started = time.perf_counter()
    if not isinstance(algo, str):
        raise TypeError(f"algo must be a registered algorithm's name, got {algo!r}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if rates not in RATES:
        raise ValueError(f"rates must be one of {', '.join(RATES)}, got {rates!r}")
    holdout_value = scalar(holdout)
    if holdout_value is None or not 0 <= holdout_value < 1:
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    for label, value in (("max_evaluations", max_evaluations), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{label} must be a whole number >= 1, got {value!r}")
    if merge_config(model) is not None:
        raise ValueError("calibrate needs the unmerged model to compare with; call "
                         "pitome.unpatch(model) first")
    listed = _as_batches(batches, batch_size)
    space = schedule_space(model, algo, options, listed, grid)
    budget = _check_budget(flops, space)
    if rates != "probe" and not isinstance(space, ScheduleSpace):
        raise ValueError(f"rates={rates!r} relaxes a vision model's per-block token counts; "
                         "a text model's keep ratios are searched with rates='probe'")
    search_batches, held_batches = _split(listed, holdout_value)
    search = Objective(model, search_batches, objective, dtype)
    held = Objective(model, held_batches, search.kind, dtype) if held_batches else None
    bar = _progress_bar(progress, max_evaluations)
    searcher = _Search(model, algo, options, space, budget, search, held, max_evaluations, bar,
                       rates)
    try:
        shapes, starts = {}, {}
        for shape in space.shape_names:
            steps = space.shape(shape, budget)
            if steps is not None:
                starts[shape] = steps
                shapes[shape] = {**space.describe(steps), "flops": space.fraction(steps),
                                 "loss": searcher.loss(steps),
                                 "holdout_loss": searcher.holdout_loss(steps)}
        start = min(shapes, key=lambda shape: shapes[shape]["loss"])
        best = searcher.run(starts[start])
    finally:
        unpatch(model)
        if bar is not None:
            bar.close()
    schedule = space.describe(best)
    return Calibration(
        r=schedule.get("r"), ratio=schedule.get("ratio"), algo=algo,
        flops=space.fraction(best), budget=float(flops),
        objective=search.kind, loss=searcher.loss(best), holdout_loss=searcher.holdout_loss(best),
        start=start, shapes=shapes, history=searcher.history, evaluations=searcher.evaluations,
        seconds=time.perf_counter() - started, model=name or type(model).__name__,
        examples={"search": search.examples, "holdout": held.examples if held else 0},
        options=dict(options), rates=rates)


def _check_budget(flops: Any, space: StepSpace) -> int:
    value = scalar(flops)
    lowest = space.fraction(space.most_merged())
    if value is None or not lowest < value <= 1:
        raise ValueError(f"flops={flops!r}: the budget is a fraction of the unmerged model's "
                         f"MACs in ({lowest:.4f}, 1]; {lowest:.4f} is what merging half of "
                         "every block's tokens costs")
    # A fraction read back from a schedule's cost (uniform_flops) lets that schedule fit.
    return math.floor(value * space.unmerged * (1 + 1e-12))


def _as_batches(batches: Any, batch_size: int) -> list[Batch]:
    if isinstance(batches, torch.Tensor):
        if batches.ndim == 0 or batches.shape[0] == 0:
            raise ValueError("batches holds no inputs")
        return list(batches.split(batch_size))
    if isinstance(batches, Mapping):
        return _split_rows(batches, batch_size)
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


def _split_rows(batch: Mapping[str, Any], batch_size: int) -> list[Batch]:
    """A dict of keyword inputs split into ``batch_size`` rows (its tensors along dim 0)."""
    rows = [v.shape[0] for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim]
    if not rows:
        return [batch]
    if rows[0] == 0:
        raise ValueError("batches holds no inputs")
    return [{key: value[start:start + batch_size]
             if isinstance(value, torch.Tensor) and value.ndim else value
             for key, value in batch.items()} for start in range(0, rows[0], batch_size)]


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
    GRADIENT_EVALUATIONS = 4  # its wall time: 3.2-3.3 forwards (ViT-Tiny, CPU)

    def __init__(self, model, algo, options, space: StepSpace, budget: int,
                 search: Objective, held: Objective | None, max_evaluations: int, bar,
                 rates: str = "probe") -> None:
        self.model, self.algo, self.options, self.rates = model, algo, options, rates
        self.space, self.budget, self.search, self.held = space, budget, search, held
        self.max_evaluations, self.bar = max_evaluations, bar
        self.evaluations = 0
        self.losses: dict[tuple[int, ...], float] = {}
        self.held_losses: dict[tuple[int, ...], float] = {}
        self.gradient_rates: dict[tuple[int, ...], tuple[dict[int, float], dict[int, float]]] = {}
        self.history: list[dict[str, Any]] = []
        self.accepted: list[list[int]] = []

    @property
    def spent(self) -> bool:
        return self.evaluations >= self.max_evaluations

    def _evaluate(self, objective: Objective, r: Sequence[int]) -> float:
        patch(self.model, self.algo, **self.space.describe(r), **self.options)
        loss = objective.losses().mean().item()
        self._spend(1)
        return loss

    def _spend(self, evaluations: int) -> None:
        self.evaluations += evaluations
        if self.bar is not None:
            self.bar.update(evaluations)

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
        self.accepted.append(list(r))
        self.history.append({"evaluations": self.evaluations, **self.space.describe(r),
                             "flops": self.space.fraction(r), "loss": self.loss(r),
                             "holdout_loss": self.holdout_loss(r)})
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.loss(r):.4f}")

    def run(self, start: list[int]) -> list[int]:
        current = list(start)
        self._accept(current)
        step, rates, fresh = max(1, max(current) // 4), None, False
        first = "probe" if self.rates == "probe" else "gradient"
        measure = first
        while step >= 1 and not self.spent:
            if rates is None:
                rates, fresh = self._rates(current, step, measure), True
            better = self._exchange(current, step, rates)
            if better is not None:  # the rates measured at the last schedule serve again
                current, fresh, measure = better, False, first
                self._accept(current)
            elif fresh and measure == "gradient" and self.rates == "gradient-then-probe":
                rates, measure = None, "probe"  # the estimate found nothing: measure
            elif fresh:
                step, rates, measure = step // 2, None, first
            else:
                rates = None
        if self.held is None:
            return current
        last = len(self.history) - 1  # on a tie, the latest
        best = min(range(len(self.history)),
                   key=lambda index: (self.history[index]["holdout_loss"], last - index))
        return self.accepted[best]

    def _rates(self, r: list[int], step: int, measure: str = "probe"
               ) -> tuple[dict[int, float], dict[int, float]]:
        """Per block, the loss's change per MAC of merging there: measured by merging
        ``step`` fewer steps (or ``step`` more where the block merges none), one probe per
        block. Returned twice: as the cost of merging more there and the gain of merging
        less (a first-order search uses one rate for both). ``measure="gradient"`` takes
        them from derivatives instead (:meth:`_gradient_rates`), once per schedule."""
        if measure == "gradient":
            key = tuple(r)  # a step halved at the same schedule needs no new derivatives
            if key not in self.gradient_rates:
                self.gradient_rates[key] = self._gradient_rates(r)
            return self.gradient_rates[key]
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

    def _gradient_rates(self, r: list[int]) -> tuple[dict[int, float], dict[int, float]]:
        """The rates of :meth:`_rates` from derivatives instead of probes: each block's
        loss change of merging one token more, ``g + h/2``, and its fall when merging one
        fewer, ``g − h/2`` (:meth:`Objective.merge_derivatives`), per MAC that token costs. One
        forward with gradients and two backward passes, counted as
        ``GRADIENT_EVALUATIONS`` evaluations."""
        base_cost, macs = self.space.cost(r), {}
        for block in self.space.mergeable_blocks:
            more = list(r)
            more[block] += 1
            if self.space.clamp(more) == more:
                saved = base_cost - self.space.cost(more)
                if saved > 0:
                    macs[block] = saved
        if not macs:
            return {}, {}
        patch(self.model, self.algo, **self.space.describe(r), **self.options)
        derivatives = self.search.merge_derivatives(list(macs), seed=self.evaluations)
        self._spend(self.GRADIENT_EVALUATIONS)
        rise = {block: (slope + curvature / 2) / macs[block]
                for block, (slope, curvature) in derivatives.items()}
        fall = {block: (slope - curvature / 2) / macs[block]
                for block, (slope, curvature) in derivatives.items()}
        return rise, fall

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
