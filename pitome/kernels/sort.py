"""Stable argsort of many short rows in one launch.

Merging sorts a few hundred scores per image in every block. PyTorch's segmented radix
sort takes tens of microseconds for that; counting, for each element, how many elements
of its row come before it takes one small kernel.
"""

from __future__ import annotations

import torch

from .backend import use_triton
from .launch import row_block, row_warps

MAX_LENGTH = 1024


def argsort_rows(values: torch.Tensor, descending: bool = False) -> torch.Tensor:
    """Stable ``values.argsort(dim=-1, descending=descending)`` of a ``B×n`` tensor."""
    batch, length = values.shape
    if torch.compiler.is_exporting() and length > 0:
        # ONNX has no stable sort; its TopK breaks ties by the lower index, which is one.
        return values.topk(length, dim=-1, largest=descending, sorted=True).indices
    if length > MAX_LENGTH or length == 0 or not use_triton(values):
        return values.argsort(dim=-1, descending=descending, stable=True)
    from .jit.ranks import row_ranks_kernel

    values = values.contiguous()
    order = torch.empty(batch, length, dtype=torch.long, device=values.device)
    block = row_block(length)
    row_ranks_kernel[(batch,)](values, order, length, DESCENDING=descending,
                                       BLOCK=block, CHUNK=32, num_warps=row_warps(block))
    return order
