"""Replaying a model's forward as one CUDA graph, to remove per-kernel launch overhead.

Merging adds a few small kernels per block, launched from Python. At large batches the GPU
hides their launch cost; at small batches, or on a slow host, launching them costs more
than running them. The merge path has no host synchronisation and fixed shapes for a fixed input shape,
so a whole patched forward can be captured once and replayed.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch

from .runtime.overlap import named_stream


class CudaGraphForward:
    """``forward(x)`` captured as a CUDA graph for inputs shaped like ``example``.

    Calling it copies ``x`` into the captured input buffer, replays the graph and returns
    the captured output buffer, which the next call overwrites (clone it to keep it).
    Inference only: the capture runs under ``torch.inference_mode``.

    Args:
        forward: a model or any callable of one tensor (e.g. a patched timm ViT).
        example: an input with the shape, dtype and CUDA device of every later input.
        warmup: eager calls on a side stream before capture (lazy initialisation, autotuning).
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor,
                 warmup: int = 3) -> None:
        if example.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA input, got one on {example.device}")
        self.static_input = example.detach().clone()
        self.graph, self.static_output = _record(forward, self.static_input, warmup,
                                                 torch.inference_mode)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_input.shape or x.dtype != self.static_input.dtype:
            raise ValueError(f"this graph was captured for {tuple(self.static_input.shape)} "
                             f"{self.static_input.dtype} inputs, got {tuple(x.shape)} {x.dtype}")
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output


def _record(call: Callable[[torch.Tensor], Any], static_input: torch.Tensor, warmup: int,
            mode: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
            ) -> tuple[torch.cuda.CUDAGraph, Any]:
    """``call(static_input)`` run ``warmup`` times on a side stream (lazy initialisation,
    autotuning), then captured, all inside ``mode()``: the graph and its output buffers."""
    current = torch.cuda.current_stream(static_input.device)
    side = named_stream("graph warm-up", static_input.device)
    side.wait_stream(current)
    with torch.cuda.stream(side), mode():
        for _ in range(warmup):
            call(static_input)
    current.wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with mode(), torch.cuda.graph(graph):
        output = call(static_input)
    return graph, output


class ShapeGraphs:
    """A module's ``forward`` replayed as CUDA graphs, one captured per input shape, where
    that is safe; the plain forward everywhere else.

    Installed by :func:`capture_forward`. A call replays a graph when its one positional
    argument is a CUDA tensor, the others are hashable keywords, gradients are off, the module
    is in eval mode and nothing is being compiled, captured or watched by a dispatch mode
    (such as a FLOP counter); other calls run eagerly. The first call of each shape, dtype
    and keyword set runs the forward twice on a side stream (lazy initialisation,
    autotuning) and captures it. Graphs are keyed also on the merge
    patch of ``owner`` (see :func:`pitome.patch`), so patching again captures anew; the
    ``max_graphs`` most recently used are kept.

    A replay returns the captured outputs, which the next replay of that graph overwrites:
    use them (or clone them) before calling again.
    """

    def __init__(self, forward: Callable[..., Any], owner: torch.nn.Module | None = None,
                 max_graphs: int = 4) -> None:
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be at least 1, got {max_graphs}")
        self.forward, self.owner, self.max_graphs = forward, owner, max_graphs
        self.graphs: OrderedDict[tuple, _Captured] = OrderedDict()

    def __reduce__(self):  # a copy or pickle starts without graphs
        return type(self), (self.forward, self.owner, self.max_graphs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        key = self._key(args, kwargs)
        if key is None:
            return self.forward(*args, **kwargs)
        x = args[0]
        captured = self.graphs.get(key)
        if captured is None:
            captured = _Captured(self.forward, x, kwargs)
            self.graphs[key] = captured
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        return captured(x)

    def must_run_eagerly(self) -> bool:
        """Whether a call now must run the plain forward whatever its input: gradients on,
        the module training, ``torch.compile`` tracing, a capture in progress, or a
        dispatch mode watching the operators (a FLOP counter would see none replayed)."""
        from torch.utils._python_dispatch import _get_current_dispatch_mode

        module = getattr(self.forward, "__self__", None)
        return (torch.is_grad_enabled() or bool(getattr(module, "training", False))
                or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
                or (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()))

    def _key(self, args: tuple, kwargs: dict) -> tuple | None:
        """What a graph of this call is captured for; None where the call must run eagerly."""
        x = args[0] if len(args) == 1 else None
        if not isinstance(x, torch.Tensor) or not x.is_cuda or self.must_run_eagerly():
            return None
        try:
            options = tuple(sorted(kwargs.items()))
            hash(options)
        except TypeError:
            return None
        from .runtime.patcher import patch_of

        patch = None if self.owner is None else patch_of(self.owner)
        return tuple(x.shape), x.dtype, x.device, options, id(patch), patch


class _Captured:
    """One graph of :class:`ShapeGraphs`: its input buffer, graph and outputs."""

    def __init__(self, forward: Callable[..., Any], example: torch.Tensor,
                 kwargs: dict) -> None:
        self.input = example.detach().clone()
        self.graph, self.output = _record(lambda x: forward(x, **kwargs), self.input, 2)

    def __call__(self, x: torch.Tensor) -> Any:
        self.input.copy_(x)
        self.graph.replay()
        return self.output


def capture_forward(module: torch.nn.Module, owner: torch.nn.Module | None = None,
                    max_graphs: int = 4) -> torch.nn.Module:
    """Make ``module`` replay its forward as CUDA graphs, one per input shape (see
    :class:`ShapeGraphs`); returns ``module``. :func:`release_forward` undoes it."""
    if isinstance(module.__dict__.get("forward"), ShapeGraphs):
        return module
    module.forward = ShapeGraphs(module.forward, owner, max_graphs)
    return module


def release_forward(module: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`capture_forward` (its graphs are freed); returns ``module``."""
    graphs = module.__dict__.get("forward")
    if isinstance(graphs, ShapeGraphs):
        if getattr(graphs.forward, "__func__", None) is type(module).forward:
            del module.__dict__["forward"]  # the class's own forward again
        else:
            module.forward = graphs.forward
    return module
