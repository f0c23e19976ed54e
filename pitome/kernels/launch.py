"""Launch settings shared by the kernels."""

from __future__ import annotations

import torch

from .backend import interpreting, use_triton

MAX_METRIC_DIM = 256  # wider metrics (e.g. hidden states) take the PyTorch path
# Up to this batch a block's merge costs launches and latency more than bandwidth, so the
# kernels fuse steps and spread work over more programs even where that re-reads data:
# the metric kernels average per-head keys as they read them (saving the mean's launch),
# and PiToMe's energy is split by column block. Larger batches take the mean first, in
# one pass, instead of re-reading every head.
SMALL_BATCH = 16
# Bytes of one row's keys over all heads the kernels may load at once: a 64-row block of
# them must fit in shared memory (ViT-L/16 in bf16: 16 heads × 64 × 2 bytes).
MAX_HEAD_ROW_BYTES = 2048
# Up to SMALL_BATCH items, PiToMe plans an item of up to TILE_TOKENS tokens, over metric
# rows up to TILE_DIM wide, in one program that keeps their TILE_TOKENS × TILE_TOKENS
# similarities in registers (``jit.tile_plan.energy_tile_plan_kernel``). Wider rows do not fit
# an H200's shared memory at 128 tokens.
TILE_TOKENS = 128
TILE_DIM = 64
# Warps of a one-tile plan, at every tile size: with fewer, a thread holds too many heads'
# rows to have their loads in flight at once (H200, batch 1, 12 heads: 4 warps 12-23 µs
# a plan, 8 warps 11.7-12.2, 16 warps 15.5).
TILE_WARPS = 8
# Heads of a one-tile plan's keys loaded ahead through shared memory (``cp.async``) while
# earlier ones are summed. Loaded into registers instead, 12 or 16 heads' rows spill (H200,
# batch 1, 104 tokens, 12 heads: 13.3 µs a plan unpipelined, 10.7 with 3 stages).
TILE_HEAD_STAGES = 3


def is_small_batch(batch: int) -> bool:
    """Whether kernels should take their small-batch form (see ``SMALL_BATCH``)."""
    return batch <= SMALL_BATCH


def fits_one_tile(batch: int, tokens: int, dim: int) -> bool:
    """Whether a plan over ``tokens`` metric rows ``dim`` wide should be made in one tile
    per item (see ``TILE_TOKENS``)."""
    return is_small_batch(batch) and tokens <= TILE_TOKENS and dim <= TILE_DIM


def fuses_head_mean(head_keys: torch.Tensor) -> bool:
    """Whether the metric kernels should take these ``B×H×T×d`` keys per head rather than
    their mean (see :func:`metric_rows`)."""
    batch, heads, _, dim = head_keys.shape
    return (use_triton(head_keys) and is_small_batch(batch) and heads > 1
            and dim <= MAX_METRIC_DIM
            and _head_row_bytes(heads, dim, head_keys) <= MAX_HEAD_ROW_BYTES)


def _head_row_bytes(heads: int, dim: int, keys: torch.Tensor) -> int:
    return heads * metric_block(dim) * keys.element_size()


def metric_rows(metric: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """A metric as the kernels read it: ``B×T×d``, or per-head ``B×T×H×d`` rows whose mean is
    the metric (averaged first where a row's heads are too wide to load at once); with unit
    stride along ``d``. Returns it, its heads and their stride."""
    if metric.dim() == 4 and _head_row_bytes(*metric.shape[2:], metric) > MAX_HEAD_ROW_BYTES:
        metric = metric.mean(dim=2)
    if metric.stride(-1) != 1:
        metric = metric.contiguous()
    if metric.dim() == 3:
        return metric, 1, 0
    return metric, metric.shape[2], metric.stride(2)


def metric_stages(heads: int) -> int:
    """Software-pipelining stages of a metric kernel's loop. Per-head rows are loaded head by
    head, and pipelining would keep ``stages × heads`` tiles in shared memory."""
    return 1 if heads > 1 else 3


def row_block(length: int) -> int:
    """Lanes of a one-program-per-item kernel that holds a whole row of ``length`` at once."""
    return max(16, next_power_of_2(length))


def row_warps(lanes: int) -> int:
    """Warps of a one-program-per-item kernel whose rows are ``lanes`` wide."""
    return 4 if lanes <= 256 else 8


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def metric_block(dim: int) -> int:
    """Padded width of one metric row (``tl.dot`` needs at least 16)."""
    return max(16, next_power_of_2(dim))


def dot_precision() -> str:
    """fp32 products on tensor cores with fp32 accuracy (three tf32 products); the
    interpreter computes them in fp32 directly."""
    return "ieee" if interpreting() else "tf32x3"
