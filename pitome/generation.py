"""Greedy generation with a static KV cache whose decoding steps never wait for the host.

transformers' ``generate`` asks the GPU after every token whether all rows have finished, so
each step's host work (its Python, the compiled step's launch) is added to the GPU's work
instead of overlapping it. Merging shrinks the GPU's share of a decoding step (a LLaVA
prompt's KV cache falls ~5x at ρ 0.9) but not the host's, so in ``generate`` a shorter cache
buys little decode throughput. :class:`GreedyDecoder` runs the same greedy decoding with the
step (forward and argmax) compiled into CUDA graphs, queues steps without reading results
back, and checks for end-of-sequence only every ``check_every`` tokens.

Its tokens are those of ``model.generate(..., do_sample=False)`` with the model's default
generation config (no logits processors), for transformers' decoder-only and LLaVA models.
A patched LLaVA's prompt is fitted to the merged image-token count first
(:func:`pitome.llava.fit_image_placeholders`).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Decoding", "GreedyDecoder", "greedy_generate"]

COMPILE_DEFAULTS = {"mode": "reduce-overhead", "fullgraph": True, "dynamic": False}


@dataclass
class Decoding:
    """A prompt after its prefill: what :meth:`GreedyDecoder.decode` continues from."""

    prompt: torch.Tensor        # input_ids as given (B×T)
    first: torch.Tensor         # the first new token of every row (B)
    length: int                 # the fitted prompt's length (the cache's first free slot)
    positions: torch.Tensor     # the last prompt token's position id per row (B×1)
    mask: torch.Tensor          # the attention mask, as wide as the cache
    max_new_tokens: int


class GreedyDecoder:
    """Greedy decoding of ``model`` (a transformers generation model) with a static KV cache.

    Args:
        model: e.g. a patched or unpatched ``LlavaForConditionalGeneration``.
        compile: compile the decoding step (default: on CUDA); a mapping gives the options
            of ``torch.compile`` instead of ``mode="reduce-overhead", fullgraph=True,
            dynamic=False``.
        check_every: decoding steps between checks whether every row has finished (each
            check waits for the GPU).
        cache_multiple: a new cache's length (prompt and new tokens) is rounded up to a
            multiple of this, so prompts of nearby lengths share one cache and one compiled
            step.

    The cache is kept for the next prompt of the same batch size that fits it (a compiled
    step then replays its graphs instead of compiling again) and replaced otherwise.
    """

    def __init__(self, model: nn.Module, compile: bool | Mapping[str, Any] | None = None,
                 check_every: int = 16, cache_multiple: int = 1) -> None:
        if not hasattr(model, "generation_config"):
            raise TypeError(f"model of type {type(model).__name__} is not a transformers "
                            "generation model (it has no generation_config)")
        for name, value in (("check_every", check_every), ("cache_multiple", cache_multiple)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self._start(model, compile, check_every, cache_multiple)

    def _start(self, model: nn.Module, compile: bool | Mapping[str, Any] | None,
               check_every: int, cache_multiple: int) -> None:
        self.model, self.check_every, self.cache_multiple = model, check_every, cache_multiple
        self._compile = compile
        self._step: Any = None  # made at the first prefill (a copy's model may be half-built now)
        self._cache: Any = None
        self._cache_shape: tuple[int, int] | None = None

    def __reduce__(self) -> tuple:
        # A copy or unpickled decoder starts afresh: no cache, its step compiled anew.
        return (_restarted, (type(self), self.model, self._compile, self.check_every,
                             self.cache_multiple))

    def _prepare(self) -> None:
        model, compile = self.model, self._compile
        parameters = inspect.signature(type(model).forward).parameters
        self._cache_name = "past_key_values" if "past_key_values" in parameters else "cache"
        self._takes = set(parameters)
        if compile is None:
            compile = next(model.parameters()).device.type == "cuda"
        options = dict(COMPILE_DEFAULTS, **compile) if isinstance(compile, Mapping) else \
            dict(COMPILE_DEFAULTS) if compile else None
        self._graphs = options is not None and options.get("mode") in (
            "reduce-overhead", "max-autotune")
        self._step = torch.compile(self._forward_step, **options) if options else \
            self._forward_step

    def generate(self, max_new_tokens: int, ignore_eos: bool = False,
                 **inputs: Any) -> torch.Tensor:
        """The prompt as given followed by up to ``max_new_tokens`` greedy tokens (B×(T+n));
        rows that finish early are padded like ``generate``'s, and decoding stops once every
        row has finished unless ``ignore_eos``."""
        return self.decode(self.prefill(max_new_tokens, **inputs), ignore_eos=ignore_eos)

    @torch.no_grad()
    def prefill(self, max_new_tokens: int, **inputs: Any) -> Decoding:
        """Run the prompt (eagerly) into a fresh static cache; the first new tokens are in
        the result's ``first``."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if self._step is None:
            self._prepare()
        prompt = inputs.get("input_ids")
        if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2:
            raise ValueError("input_ids must be a B×T tensor of token ids, got "
                             f"{_shape(prompt)}")
        fitted = _fitted(self.model, inputs)
        ids = fitted["input_ids"]
        mask = fitted.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask must be per token, shaped like input_ids "
                             f"{tuple(ids.shape)}; got {_shape(mask)}")
        batch, length = ids.shape
        cache = self._fresh_cache(batch, length + max_new_tokens)
        wide = torch.cat([mask, mask.new_ones(batch, self._cache_shape[1] - length)], dim=1)
        positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
        extra = {name: value for name, value in fitted.items()
                 if name not in ("input_ids", "attention_mask", "position_ids")}
        logits = self.model(**self._arguments(ids, positions, wide[:, :length], cache,
                                              torch.arange(length, device=ids.device),
                                              **extra)).logits
        first = logits[:, -1].argmax(-1)
        return Decoding(prompt=prompt, first=first, length=length, mask=wide,
                        positions=positions[:, -1:].clone(), max_new_tokens=max_new_tokens)

    @torch.no_grad()
    def decode(self, decoding: Decoding, ignore_eos: bool = False) -> torch.Tensor:
        """Continue a :meth:`prefill`; returns the prompt as given and the new tokens."""
        eos = None if ignore_eos else _eos_ids(self.model, decoding.first.device)
        pad = _pad_id(self.model, eos)
        batch, count = decoding.first.shape[0], decoding.max_new_tokens
        tokens = decoding.first.new_empty(batch, count)
        finished_after = torch.zeros(count, dtype=torch.bool, device=tokens.device)
        alive = torch.ones(batch, dtype=torch.bool, device=tokens.device)
        ids = decoding.first.view(batch, 1).clone()
        positions = decoding.positions.clone()
        slot = torch.tensor([decoding.length], device=tokens.device)
        token = decoding.first
        made = count
        for step in range(count):
            if step:
                if self._graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                token = self._step(ids, positions, decoding.mask, self._cache, slot)
            if eos is not None:
                token = torch.where(alive, token, pad)
                alive = alive & ~torch.isin(token, eos)
                finished_after[step] = ~alive.any()
            tokens[:, step] = token
            ids.copy_(token.view(batch, 1))
            positions += 1
            slot += 1
            if eos is not None and (step + 1) % self.check_every == 0 \
                    and bool(finished_after[step]):
                made = step + 1
                break
        if eos is not None:
            done = finished_after[:made].nonzero()
            if len(done):
                made = int(done[0]) + 1
        return torch.cat([decoding.prompt, tokens[:, :made].to(decoding.prompt.device)], dim=1)

    def _forward_step(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                      cache: Any, slot: torch.Tensor) -> torch.Tensor:
        # forward without the module's hooks: a patched LLaVA's placeholder fitting has
        # nothing to do without an image, and patching anew would change the hooks a
        # compiled step is guarded on.
        named = self._arguments(ids, positions, mask, cache, slot)
        return self.model.forward(**named).logits[:, -1].argmax(-1)

    def _arguments(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
                   cache: Any, slot: torch.Tensor, **extra: Any) -> dict[str, Any]:
        """The model's arguments for one call, named as its transformers version names them."""
        named = {"input_ids": ids, "attention_mask": mask, self._cache_name: cache,
                 "use_cache": True, **extra}
        if "position_ids" in self._takes:
            named["position_ids"] = positions
        if "cache_position" in self._takes:
            named["cache_position"] = slot
        for name in ("logits_to_keep", "num_logits_to_keep"):
            if name in self._takes:
                named[name] = 1
                break
        return named

    def _fresh_cache(self, batch: int, length: int) -> Any:
        if self._cache is not None and self._cache_shape[0] == batch \
                and self._cache_shape[1] >= length:
            self._cache.reset()
            return self._cache
        length = -(-length // self.cache_multiple) * self.cache_multiple
        self._cache = None  # the old cache's memory goes before the new one is made
        self._cache, self._cache_shape = _static_cache(self.model, batch, length), (batch, length)
        return self._cache


def greedy_generate(model: nn.Module, max_new_tokens: int, ignore_eos: bool = False,
                    **inputs: Any) -> torch.Tensor:
    """One call of :meth:`GreedyDecoder.generate`; the decoder, its cache and its compiled
    step are kept on ``model`` for its next call (a copy of the model gets a fresh one)."""
    decoder = model.__dict__.get("_pitome_decoder")
    if decoder is None:
        decoder = model.__dict__["_pitome_decoder"] = GreedyDecoder(model)
    return decoder.generate(max_new_tokens, ignore_eos=ignore_eos, **inputs)


def _restarted(cls: type, model: nn.Module, compile: Any, check_every: int,
               cache_multiple: int) -> GreedyDecoder:
    decoder = cls.__new__(cls)
    decoder._start(model, compile, check_every, cache_multiple)
    return decoder


def _static_cache(model: nn.Module, batch: int, length: int) -> Any:
    from transformers import StaticCache

    parameter = next(model.parameters())
    offered = {"config": model.config, "max_cache_len": length, "max_batch_size": batch,
               "batch_size": batch, "device": parameter.device, "dtype": parameter.dtype}
    takes = inspect.signature(StaticCache.__init__).parameters
    return StaticCache(**{name: value for name, value in offered.items() if name in takes})


def _fitted(model: nn.Module, inputs: Mapping[str, Any]) -> dict[str, Any]:
    if getattr(model.config, "image_token_id", None) is None:
        return dict(inputs)
    from .adapters.llava import fit_image_placeholders

    return fit_image_placeholders(model, inputs)


def _eos_ids(model: nn.Module, device: torch.device) -> torch.Tensor | None:
    eos = model.generation_config.eos_token_id
    if eos is None:
        return None
    ids = [eos] if isinstance(eos, int) else list(eos)
    return torch.tensor(ids, device=device) if ids else None


def _pad_id(model: nn.Module, eos: torch.Tensor | None) -> int:
    pad = model.generation_config.pad_token_id
    if pad is None and eos is not None:
        return int(eos[0])  # as generate does, with a warning
    return 0 if pad is None else int(pad)


def _shape(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
