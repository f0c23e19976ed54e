"""The merge point for blocks that a model's own forward loops over (Hugging Face, open_clip).

The model stays in charge of its loop and output classes. Its first patched layer opens the
forward's :class:`~pitome.runtime.session.Session` (reading the padding from the mask the
model built), every layer merges between its attention and MLP, and the last one closes the
session (as does any layer that raises). Taps on the key (and query) projections hand the
keys to the session as soon as they exist, so the plan can start on a side stream while the
attention runs. With gradient checkpointing on, a merging layer checkpoints itself, handing
its session to the recomputation explicitly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..core.attention import received_attention, split_heads
from .session import Runtime, Session
from .state import MergeState, synchronisation_free

RUNTIME_ATTR = "_pitome_runtime"
INDEX_ATTR = "_pitome_index"
TUPLE_ATTR = "_pitome_returns_tuple"  # the layer's callers expect ``(hidden_states,)``


def real_tokens(attention_mask: torch.Tensor | None, tokens: int) -> torch.Tensor | None:
    """``B×T`` True for real tokens, from a 2-D 0/1 mask or a 4-D boolean or additive mask."""
    if attention_mask is None:
        return None
    flat = attention_mask.dim() == 2
    mask = attention_mask if flat else attention_mask[:, 0, 0, :]
    if mask.shape[-1] != tokens:
        raise ValueError(f"attention mask covers {mask.shape[-1]} tokens, the input has {tokens}")
    if mask.dtype == torch.bool:
        return mask
    if flat and synchronisation_free():  # a 2-D mask is 0/1 (transformers' convention)
        return mask != 0
    return mask.bool() if flat and mask.max() <= 1 else mask == 0


class ProjectionTap:
    """A forward hook on a key or query projection that hands its ``B×T×C`` output to the
    running session (keys through :meth:`Session.hand_keys`, which starts the block's plan).

    ``part`` picks the queries (0) or keys (1) out of a fused ``qkv`` projection.
    """

    def __init__(self, runtime: Runtime, what: str, part: int | None = None) -> None:
        self.runtime, self.what, self.part = runtime, what, part

    def __call__(self, module: nn.Module, args: Any, out: torch.Tensor) -> None:
        session = self.runtime.current()
        if session is None or session.state is None:
            return
        if self.part is not None:
            out = out.chunk(3, dim=-1)[self.part]
        if self.what == "queries":
            session.queries = out
        else:
            session.hand_keys(out)


def checkpointing(layer: nn.Module) -> bool:
    """Whether ``layer`` should run under activation checkpointing now (transformers'
    ``gradient_checkpointing_enable`` sets the flag on each layer)."""
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training \
        and torch.is_grad_enabled()


class MergingLayer:
    """Shared by every layer kind: the session's lifecycle and the merge point.

    A layer kind implements ``_pitome_layer(session, *args, **kwargs)``, the layer's forward
    with a merge between attention and MLP, returning the hidden states. A kind with
    ``packs = True`` runs a padded batch packed when its state has :attr:`MergeState.packed`:
    each such layer packs its padded input, runs its projections, merge and MLP on the real
    tokens alone and pads its output again (see :mod:`pitome.runtime.packed`).
    """

    packs = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        runtime: Runtime = self.__dict__[RUNTIME_ATTR]
        index = self.__dict__[INDEX_ATTR]
        session = runtime.open() if index == 0 else runtime.current()
        if session is None:
            raise RuntimeError(
                f"merging layer {index} of a {type(self).__name__} ran outside its model's "
                "forward (layer 0 starts each merged forward); call the whole model, or "
                "pitome.unpatch it first")
        try:
            if checkpointing(self):
                out = checkpoint(self._pitome_bound, session, *args, use_reentrant=False,
                                 **kwargs)
            else:
                out = self._pitome_layer(session, *args, **kwargs)
        except BaseException:
            runtime.close(session, completed=False)
            raise
        if index == runtime.num_layers - 1:
            runtime.close(session)
        return (out,) if self.__dict__.get(TUPLE_ATTR) else out

    def _pitome_bound(self, session: Session, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The layer with ``session`` current (a recomputation may run on another thread)."""
        runtime: Runtime = self.__dict__[RUNTIME_ATTR]
        previous = runtime.bind(session)
        try:
            return self._pitome_layer(session, *args, **kwargs)
        finally:
            runtime.bind(previous)

    def _pitome_state(self, session: Session, x: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> MergeState:
        """The forward's merge state, started by the first layer, entered for this one."""
        if session.state is None:
            session.begin(x, real_tokens(attention_mask, x.shape[1]), packs=self.packs)
        state: MergeState = session.state  # type: ignore[assignment]
        session.block = self.__dict__[INDEX_ATTR]
        state.enter(session.block)
        session.keys = session.queries = session.metric = None
        return state

    def _pitome_packed_merge(self, session: Session, x: torch.Tensor,
                             padded_keys: torch.Tensor) -> torch.Tensor:
        """The packed ``1×N×C`` tokens ``x`` merged by this block's schedule of each sentence,
        planned on the padded ``B×W×C`` attention keys (or on ``x`` with ``metric="hidden"``)."""
        state: MergeState = session.state  # type: ignore[assignment]
        block = self.__dict__[INDEX_ATTR]
        run = state.packed
        if not run.merges(block):
            return x
        if state.config.metric == "keys":
            metric = split_heads(padded_keys, session.runtime.heads).mean(dim=1)
        else:
            metric = run.layout.pad(x)
        return state.merge(x, metric, block)

    def _pitome_unmerged(self, session: Session, x: torch.Tensor) -> bool:
        """Whether no token has merged yet, so the mask the model built still fits ``x``."""
        return x.shape[1] == session.tokens_in

    def _pitome_merge(self, session: Session, x: torch.Tensor, bias: torch.Tensor | None,
                      scale: float, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (plus ``residual``, added inside the merge kernel) with this block's
        scheduled merge applied. ``bias`` is the block's key bias if the layer made one
        (None: made here, only if an algorithm reads the attention)."""
        try:
            return self._pitome_merged(session, x, bias, scale, residual)
        finally:  # the keys and queries (views of the whole q/k/v) must not outlive the merge
            session.keys = session.queries = session.metric = None

    def _pitome_merged(self, session: Session, x: torch.Tensor, bias: torch.Tensor | None,
                       scale: float, residual: torch.Tensor | None) -> torch.Tensor:
        state: MergeState = session.state  # type: ignore[assignment]
        block = self.__dict__[INDEX_ATTR]
        if not state.merging(block):
            return x if residual is None else x + residual
        received = self._pitome_received(session, bias, scale) if state.needs_attention else None
        if residual is not None:
            return state.merge_residual(x, residual, session.metric, block, received)
        metric = session.metric if state.config.metric == "keys" else x
        return state.merge(x, metric, block, received)

    def _pitome_received(self, session: Session, bias: torch.Tensor | None,
                         scale: float) -> torch.Tensor:
        heads = session.runtime.heads
        if bias is None:
            bias = session.state.attention_bias(session.queries.dtype)  # type: ignore[union-attr]
        q = split_heads(session.queries, heads)  # type: ignore[arg-type]
        k = split_heads(session.keys, heads)  # type: ignore[arg-type]
        return received_attention(q, k, scale, bias, session.runtime.num_prefix)
