"""Fine-tuning a (possibly merged) classifier, optionally distilled from its unmerged self.

The model is trained as it is given: patch it with :func:`pitome.patch` first to train
through merging (the paper's retrained rows), or leave it unpatched for the unmerged
baseline. A merged model trains like any module: the merge runs PyTorch's differentiable
path whenever gradients are needed, and dropout behaves as in train mode.

    import pitome
    pitome.patch(model, algo="pitome", ratio=0.7)
    result = pitome.finetune(model, batches, epochs=1, lr=5e-5, distill=0.5)
    pitome.evaluate_classifier(model, dev_batches)

``batches`` is any re-iterable of ``(inputs, labels)``: ``inputs`` a tensor (timm image
models: ``model(inputs)``) or a mapping of tensors (Hugging Face: ``model(**inputs)``, its
``.logits``); ``labels`` class indices, or None where only distillation trains the model.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import nn

from .._optional import require
from ..api import unpatch

Inputs = Union[torch.Tensor, Mapping[str, torch.Tensor]]
Batch = tuple[Inputs, Union[torch.Tensor, None]]


@dataclass
class FinetuneResult:
    """What one :func:`finetune` run did: the loss of every step and how long it took."""

    steps: int
    losses: list[float] = field(repr=False)
    seconds: float
    lr: float
    distill: float
    temperature: float

    def mean_loss(self, first: bool = False, window: int | None = None) -> float:
        """Mean loss over the first (``first=True``) or last ``window`` steps (default: a
        quarter of them, at most 20)."""
        window = window or max(1, min(20, len(self.losses) // 4))
        part = self.losses[:window] if first else self.losses[-window:]
        return sum(part) / len(part)

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "seconds": self.seconds, "lr": self.lr,
                "distill": self.distill, "temperature": self.temperature,
                "loss_first": self.mean_loss(first=True), "loss_last": self.mean_loss()}


def logits_of(model: nn.Module, inputs: Inputs) -> torch.Tensor:
    """The class logits of ``model`` for ``inputs`` (a tensor, or a mapping of keyword
    tensors for Hugging Face models, whose output's ``.logits`` is taken)."""
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if hasattr(out, "logits"):
        return out.logits
    return out[0] if isinstance(out, (tuple, list)) else out


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor,
                      temperature: float = 1.0) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))``, the mean over the batch (Hinton
    et al.'s soft-target loss; the ``T²`` keeps its gradients' scale independent of ``T``)."""
    teacher_log = (teacher.float() / temperature).log_softmax(-1)
    student_log = (student.float() / temperature).log_softmax(-1)
    kl = F.kl_div(student_log, teacher_log, log_target=True, reduction="batchmean")
    return kl * temperature ** 2


def unmerged_teacher(model: nn.Module) -> nn.Module:
    """A frozen, unmerged copy of ``model`` in eval mode: the self-distillation teacher."""
    teacher = unpatch(copy.deepcopy(model)).eval()
    return teacher.requires_grad_(False)


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """The learning-rate factor at ``step``: linear warmup over ``warmup`` steps, then a
    cosine decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def finetune(model: nn.Module, batches: Iterable[Batch], *, epochs: float = 1.0,
             steps: int | None = None, lr: float = 5e-5, weight_decay: float = 0.01,
             warmup: float = 0.1, distill: float = 0.0, temperature: float = 1.0,
             teacher: nn.Module | None = None, max_grad_norm: float | None = 1.0,
             device: str | torch.device | None = None, dtype: torch.dtype | None = None,
             seed: int = 0, progress: bool = False) -> FinetuneResult:
    """Train ``model`` in place (merged if it is patched) on ``batches``.

    The loss is ``(1 − distill) · cross-entropy(labels) + distill · T² · KL(teacher ‖
    student)`` at temperature ``T``; with ``distill=1`` labels are not needed. AdamW
    (no weight decay on biases and norms), linear warmup then cosine decay, gradients clipped
    to ``max_grad_norm``; bf16 autocast on CUDA unless ``dtype`` says otherwise.

    Args:
        model: a classifier returning logits (or an output with ``.logits``).
        batches: a re-iterable of ``(inputs, labels)`` (see the module docstring); it is
            iterated again for each epoch.
        epochs: passes over ``batches`` (a fraction stops part way); ignored if ``steps``.
        steps: optimizer steps in all, cycling over ``batches`` as needed.
        lr: peak learning rate. weight_decay: AdamW's decoupled weight decay.
        warmup: fraction of the steps spent warming the learning rate up, in [0, 1).
        distill: weight in [0, 1] of the distillation term.
        temperature: the distillation temperature, > 0.
        teacher: the model to distil from; default an unmerged frozen copy of ``model``
            made before training (self-distillation; it needs the same inputs).
        device: where to train (default: the model's device).
        dtype: autocast precision (default bf16 on CUDA, none on CPU; float32 turns it off).
        seed: seeds dropout and anything else random during training.
        progress: show a progress bar (tqdm) with the running loss.

    Returns:
        A :class:`FinetuneResult` with the loss of every step.
    """
    _check_unit("distill", distill, closed=True)
    _check_unit("warmup", warmup, closed=False)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
    if steps is None and not (isinstance(epochs, (int, float)) and epochs > 0):
        raise ValueError(f"epochs must be a positive number, got {epochs!r}")
    if steps is None:
        steps = max(1, round(epochs * _count(batches)))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if distill > 0 and teacher is None:
        teacher = unmerged_teacher(model)
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    parameters = [p for p in model.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError("model has no trainable parameters (all have requires_grad=False)")
    optimizer = torch.optim.AdamW(_parameter_groups(model, weight_decay), lr=lr)
    warmup_steps = round(warmup * steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, steps, warmup_steps))
    autocast = _autocast(device, dtype)
    bar = _bar(steps, progress)
    losses: list[float] = []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for inputs, labels in _cycle(batches, steps):
            inputs, labels = _to(inputs, device), _to(labels, device)
            with autocast:
                logits = logits_of(model, inputs)
                loss = _loss(logits, labels, teacher, inputs, distill, temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
    if bar is not None:
        bar.close()
    model.eval()
    return FinetuneResult(steps, losses, time.perf_counter() - start, lr, distill, temperature)


def _loss(logits: torch.Tensor, labels: torch.Tensor | None, teacher: nn.Module | None,
          inputs: Inputs, distill: float, temperature: float) -> torch.Tensor:
    loss = logits.new_zeros((), dtype=torch.float32)
    if distill < 1:
        if labels is None:
            raise ValueError("a batch has no labels; give labels, or distill=1 to train "
                             "from the teacher alone")
        loss = loss + (1 - distill) * F.cross_entropy(logits.float(), labels)
    if distill > 0:
        with torch.no_grad():
            reference = logits_of(teacher, inputs)  # type: ignore[arg-type]
        loss = loss + distill * distillation_loss(logits, reference, temperature)
    return loss


@dataclass(frozen=True)
class ClassifierScore:
    """Accuracy (%) on labelled examples and, against a reference model, top-1 agreement
    (%) and mean KL(reference ‖ model) in nats."""

    accuracy: float | None
    examples: int
    agreement: float | None = None
    kl: float | None = None


@torch.no_grad()
def evaluate_classifier(model: nn.Module, batches: Iterable[Batch],
                        reference: nn.Module | None = None,
                        device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None,
                        progress: bool = False) -> ClassifierScore:
    """Score ``model`` (in eval mode) on ``batches``; with ``reference``, also how closely it
    follows that model (e.g. the unmerged one). Labels of None are left out of accuracy."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.to(device).eval()
    if reference is not None:
        reference.to(device).eval()
    correct = labelled = total = agree = 0
    kl = 0.0
    items = batches
    if progress:
        items = require("tqdm", "eval").tqdm(batches, desc="evaluating", unit="batch",
                                             file=sys.stderr, leave=False)
    for inputs, labels in items:
        inputs = _to(inputs, device)
        with _autocast(device, dtype):
            logits = logits_of(model, inputs).float()
            other = None if reference is None else logits_of(reference, inputs).float()
        predictions = logits.argmax(-1)
        total += predictions.shape[0]
        if labels is not None:
            correct += int((predictions.cpu() == labels.cpu()).sum())
            labelled += predictions.shape[0]
        if other is not None:
            agree += int((predictions == other.argmax(-1)).sum())
            kl += distillation_loss(logits, other).item() * predictions.shape[0]
    model.train(was_training)
    if total == 0:
        raise ValueError("batches yielded no examples to evaluate")
    return ClassifierScore(100.0 * correct / labelled if labelled else None, total,
                           None if reference is None else 100.0 * agree / total,
                           None if reference is None else kl / total)


def _check_unit(name: str, value: Any, closed: bool) -> None:
    ok = isinstance(value, (int, float)) and 0 <= value and (value <= 1 if closed else value < 1)
    if not ok:
        raise ValueError(f"{name} must be a number in [0, 1{']' if closed else ')'}, "
                         f"got {value!r}")


def _parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: biases, norms and embeddings-as-vectors keep theirs."""
    decay, plain = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else plain).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": plain, "weight_decay": 0.0}]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.autocast(device.type, dtype, enabled=dtype != torch.float32)


def _count(batches: Iterable[Batch]) -> int:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("batches has no len(); give steps= instead of epochs=") from None


def _cycle(batches: Iterable[Batch], steps: int) -> Iterator[Batch]:
    done = 0
    while True:
        empty = True
        for batch in batches:
            empty = False
            yield batch
            done += 1
            if done == steps:
                return
        if empty:
            raise ValueError("batches yielded no batch to train on")


def _to(value, device: torch.device):
    if value is None:
        return None
    if isinstance(value, Mapping):
        return {key: tensor.to(device) for key, tensor in value.items()}
    return value.to(device)


def _bar(steps: int, progress: bool):
    if not progress:
        return None
    try:
        return require("tqdm", "eval").tqdm(total=steps, desc="fine-tuning", unit="step",
                                            file=sys.stderr)
    except ImportError:
        return None
