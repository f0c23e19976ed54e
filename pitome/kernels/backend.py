"""Which implementation of the fused merge operations runs: Triton kernels or PyTorch.

``auto`` (the default) runs the Triton kernels on CUDA tensors when Triton is installed (it
ships with PyTorch's CUDA wheels) and PyTorch everywhere else. ``torch`` always runs the
PyTorch twin; ``triton`` always runs the kernels, which on CPU tensors needs Triton's
interpreter (``TRITON_INTERPRET=1`` set before the first kernel is used; slow, for tests).
Choose with the ``PITOME_KERNELS`` environment variable or :func:`kernel_backend`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Iterator
from typing import Literal

import torch

Backend = Literal["auto", "torch", "triton"]
BACKENDS = ("auto", "torch", "triton")
_override: list[Backend] = []


def _chosen() -> Backend:
    if _override:
        return _override[-1]
    choice = os.environ.get("PITOME_KERNELS", "auto")
    if choice not in BACKENDS:
        raise ValueError(f"PITOME_KERNELS must be one of {', '.join(BACKENDS)}, got {choice!r}")
    return choice  # type: ignore[return-value]


_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether Triton can be imported."""
    return _TRITON_INSTALLED


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@contextlib.contextmanager
def kernel_backend(backend: Backend) -> Iterator[None]:
    """Run the fused merge operations on ``backend`` inside the ``with`` block."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    _override.append(backend)
    try:
        yield
    finally:
        _override.pop()


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether an operation on ``tensors`` should run its Triton kernel.

    Never when a result needs gradients (the kernels have no backward pass), nor while
    ``torch.export`` traces (an exported program must run without pitome's kernels: in
    onnxruntime, on another device).
    """
    choice = _chosen()
    on_gpu = all(t.is_cuda for t in tensors)
    if choice == "torch" or choice == "auto" and not (on_gpu and _TRITON_INSTALLED):
        return False  # the common answers first: this runs several times per merging block
    if torch.compiler.is_exporting():
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    if choice == "auto":
        return True
    if not triton_available():
        raise RuntimeError("PITOME_KERNELS=triton needs Triton: pip install triton")
    if not on_gpu and not interpreting():
        raise RuntimeError("Triton kernels on CPU tensors need its interpreter: set "
                           "TRITON_INTERPRET=1 before the first kernel runs")
    return True
