"""Launch settings shared by the kernels."""

from __future__ import annotations

from .backend import interpreting

MAX_METRIC_DIM = 256  # wider metrics (e.g. hidden states) take the PyTorch path


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def metric_block(dim: int) -> int:
    """Padded width of one metric row (``tl.dot`` needs at least 16)."""
    return max(16, next_power_of_2(dim))


def dot_precision() -> str:
    """fp32 products on tensor cores with fp32 accuracy (three tf32 products); the
    interpreter computes them in fp32 directly."""
    return "ieee" if interpreting() else "tf32x3"
