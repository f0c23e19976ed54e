"""The merging of one patched model: its fixed settings, and the forward passes in flight.

A :class:`Runtime` is made by ``pitome.patch`` and shared by the model's patched blocks. It
holds nothing of any one forward: each forward pass gets its own :class:`Session` (and in it
one :class:`~pitome.runtime.state.MergeState`), kept per thread while the forward runs, so
concurrent forwards from several threads never see each other's tokens. A session ends with
its forward, also when the forward raises; what it merged is then kept, per thread, for
:func:`pitome.merge_info`.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from ..core.attention import split_heads
from ..core.schedule import check_margin_depth
from .state import MergeConfig, MergeInfo, MergeState


class Session:
    """One forward pass: its merge state, and the attention keys and queries of the block
    that is running, as the adapter's taps on the projections hand them over."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.state: MergeState | None = None
        self.tokens_in = 0
        self.keys: torch.Tensor | None = None
        self.queries: torch.Tensor | None = None
        self.metric: torch.Tensor | None = None  # what the running block's merge plans on
        self.block = 0  # the running block

    def begin(self, x: torch.Tensor, padding: torch.Tensor | None = None,
              packs: bool = False) -> MergeState:
        """Start merging ``x`` (``B×T×C``, the first block's input); ``packs``: the blocks
        can run a padded batch packed (see :class:`MergeState`)."""
        runtime = self.runtime
        self.tokens_in = x.shape[1]
        self.state = MergeState(runtime.config, x, runtime.num_prefix, runtime.num_layers,
                                padding=padding, packs=packs,
                                count_tables=runtime.count_tables)
        return self.state

    def hand_keys(self, keys: torch.Tensor) -> None:
        """The running block's ``B×T×C`` attention keys, as soon as they exist: kept (for
        the attention some algorithms read), and the block's plan started from them."""
        self.keys = keys
        state = self.state
        if state.packed is not None:
            return  # packed keys: the block plans on them once re-padded
        if state.config.metric == "keys" and state.merging(self.block):
            self.metric = state.keys_metric(split_heads(keys, self.runtime.heads), self.block)


class Runtime:
    """What the patched blocks of one model share: the config, the stack's shape, and the
    sessions of the forwards in flight (one per thread).

    Attributes:
        config: everything ``pitome.patch`` decided.
        num_prefix: leading tokens that never merge (CLS, distillation, registers).
        num_layers: blocks in the patched stack.
        heads: attention heads per block (for the keys' head mean).
    """

    def __init__(self, config: MergeConfig, num_prefix: int, num_layers: int,
                 heads: int = 1) -> None:
        config.schedule.check_depth(num_layers)
        check_margin_depth(config.margin, num_layers)
        self.config, self.num_prefix, self.num_layers, self.heads = \
            config, num_prefix, num_layers, heads
        self.latest: MergeInfo | None = None
        self.count_tables: dict = {}  # padded batches' token counts (pitome.runtime.padded)
        self._local = threading.local()

    def open(self) -> Session:
        """Start this thread's session for a new forward (dropping any a failed one left)."""
        if torch.jit.is_tracing():
            raise NotImplementedError(
                "a merged model cannot be traced by torch.jit.trace or the TorchScript ONNX "
                "exporter (torch.onnx.export with dynamo=False): the trace would record one "
                "batch's merge indices and be wrong at any other batch; use torch.export.export "
                "or torch.onnx.export(..., dynamo=True), which keep the batch dynamic")
        session = Session(self)
        self._local.session = session
        return session

    def current(self) -> Session | None:
        """This thread's session, or None outside a forward."""
        return getattr(self._local, "session", None)

    def bind(self, session: Session | None) -> Session | None:
        """Make ``session`` this thread's current one; returns the one it replaces (how a
        block recomputed by activation checkpointing, maybe on another thread, finds it)."""
        previous = self.current()
        self._local.session = session
        return previous

    def close(self, session: Session, completed: bool = True) -> None:
        """End ``session``; a completed one's merges become this thread's :meth:`info`."""
        if completed and session.state is not None:
            info = session.state.info(session.tokens_in)
            self._local.info = info
            self.latest = info
        session.keys = session.queries = session.metric = None
        if self.current() is session:
            self._local.session = None

    def end_forward(self, module: Any, args: Any, output: Any) -> None:
        """A forward hook (``always_call=True``) on the module whose forward loops over the
        blocks: ends a session its blocks left open, as a forward that raised between two
        blocks does (one that ran its last block has closed it already)."""
        session = self.current()
        if session is not None:
            self.close(session, completed=False)

    def info(self) -> MergeInfo | None:
        """What the last forward of this thread merged (of any thread, if this one ran none)."""
        return getattr(self._local, "info", None) or self.latest

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        del state["_local"]  # sessions in flight belong to this process's threads
        state["latest"] = None
        state["count_tables"] = {}  # device tensors, made again on use
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("count_tables", {})
        self._local = threading.local()
