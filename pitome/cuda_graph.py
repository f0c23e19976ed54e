"""Replaying a model's forward as one CUDA graph, to remove per-kernel launch overhead.

Merging adds a few small kernels per block, launched from Python. At large batches the GPU
hides their launch cost; at small batches, or on a slow host, launching them costs more
than running them. The merge path has no host synchronisation and fixed shapes for a fixed input shape,
so a whole patched forward can be captured once and replayed.
"""

from __future__ import annotations

from collections.abc import Callable

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
        side = named_stream("graph warm-up", example.device)
        side.wait_stream(torch.cuda.current_stream(example.device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):
                forward(self.static_input)
        torch.cuda.current_stream(example.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.static_output = forward(self.static_input)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape != self.static_input.shape or x.dtype != self.static_input.dtype:
            raise ValueError(f"this graph was captured for {tuple(self.static_input.shape)} "
                             f"{self.static_input.dtype} inputs, got {tuple(x.shape)} {x.dtype}")
        self.static_input.copy_(x)
        self.graph.replay()
        return self.static_output
