"""Planning a block's merge while its attention runs.

A merge plan needs only the attention keys, but it used to be made after the attention, in
series with it. At small batches one block's attention fills a fraction of a large GPU, and
the plan's few small kernels then cost as much as the attention saved. On CUDA the plan is
launched on a second stream as soon as the keys exist, and the merge waits for it; replayed
as a CUDA graph, the two become parallel branches of the graph.

``PITOME_PLAN_AHEAD=off`` plans in series (as on CPU and under ``torch.compile``).
"""

from __future__ import annotations

import os

import torch

MODES = ("auto", "off")
_streams: dict[tuple[str, int], torch.cuda.Stream] = {}


def plan_ahead_enabled(keys: torch.Tensor) -> bool:
    """Whether the plan for ``keys`` may run on a side stream."""
    choice = os.environ.get("PITOME_PLAN_AHEAD", "auto")
    if choice not in MODES:
        raise ValueError(f"PITOME_PLAN_AHEAD must be one of {', '.join(MODES)}, got {choice!r}")
    return choice == "auto" and keys.is_cuda and not torch.compiler.is_compiling()


def named_stream(name: str, device: torch.device) -> torch.cuda.Stream:
    """One lasting CUDA stream per ``name`` and device. Made once, not per call: cuBLAS
    keeps a workspace (32 MiB on Hopper) for every stream it has run on."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if (name, index) not in _streams:
        _streams[name, index] = torch.cuda.Stream(device=index)
    return _streams[name, index]


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream plans run on, one per device."""
    return named_stream("plan ahead", device)
