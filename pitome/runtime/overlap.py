"""Planning a block's merge while its attention runs.

A merge plan needs only the attention keys, but it used to be made after the attention, in
series with it. At small batches one block's attention fills a fraction of a large GPU, and
the plan's few small kernels then cost as much as the attention saved. On CUDA the plan is
launched on a second stream as soon as the keys exist, and the merge waits for it; replayed
as a CUDA graph, the two become parallel branches of the graph.

By default (``PITOME_PLAN_AHEAD=auto``) plans run ahead only while a CUDA graph is being
captured. Run eagerly, the side stream's host work (stream switches, waits, keeping tensors
alive across streams) costs more than the overlap gives back: HF CLIPVisionModel ViT-L/14-336,
batch 32, bf16, eager on an H200 ran ToMe in 30.8 ms planning ahead and 18.0 ms in series
(PiToMe 35.3 and 21.5 ms), against 31.2 ms unpatched. ``on`` plans ahead in eager mode too,
``off`` never (as on CPU and under ``torch.compile``).
"""

from __future__ import annotations

import os

import torch

MODES = ("auto", "on", "off")
_streams: dict[tuple[str, int], torch.cuda.Stream] = {}


def plan_ahead_enabled(keys: torch.Tensor) -> bool:
    """Whether the plan for ``keys`` may run on a side stream."""
    choice = os.environ.get("PITOME_PLAN_AHEAD", "auto")
    if choice not in MODES:
        raise ValueError(f"PITOME_PLAN_AHEAD must be one of {', '.join(MODES)}, got {choice!r}")
    if choice == "off" or not keys.is_cuda or torch.compiler.is_compiling():
        return False
    return choice == "on" or torch.cuda.is_current_stream_capturing()


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
