"""Applying a merge plan to the features in one kernel, fused with the residual add."""

from __future__ import annotations

import torch

from ..core.plan import MergePlan
from ..core.ragged import RowPlan
from .backend import use_triton
from .launch import next_power_of_2
from .sort import argsort_rows


def merge_tokens(plan: MergePlan, x: torch.Tensor, sizes: torch.Tensor | None,
                 residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x + residual`` merged by ``plan``: the size-weighted mean of every group, and the
    new ``B×K×1`` sizes (``sizes`` None means all ones).

    Equal to ``plan.weighted_mean(x + residual, sizes)`` up to rounding, which is what runs
    where the Triton kernel does not, and for plans the kernel does not cover (pooling
    weights, ToFu's norm rule, plans of other types). The kernel reads each input row once
    and writes each output row once: the residual add, the gathers and the scatter of the
    reference become one pass over the tokens.
    """
    operands = (x,) if residual is None else (x, residual)
    fused = (type(plan) is MergePlan and plan.weights is None and not plan.max_norm
             and use_triton(*operands))
    if not fused:
        if residual is not None:
            x = x + residual
        return plan.weighted_mean(x, sizes)
    from .jit.merge import merge_rows_kernel

    batch, _, channels = x.shape
    rows = batch * plan.num_out
    offsets, sources = sources_by_destination(plan, rows)
    x = x.contiguous()
    tokens_in = x.shape[1]
    residual = x if residual is None else residual.to(x.dtype).contiguous()
    out = torch.empty(batch, plan.num_out, channels, dtype=x.dtype, device=x.device)
    new_sizes = torch.empty(batch, plan.num_out, 1, dtype=torch.float32, device=x.device)
    block = next_power_of_2(channels)
    merge_rows_kernel[(rows,)](
        x, residual, new_sizes if sizes is None else sizes.contiguous(), plan.keep.contiguous(),
        offsets, sources, out, new_sizes, channels, tokens_in, plan.num_out,
        HAS_RESIDUAL=residual is not x,
        HAS_SIZES=sizes is not None, BLOCK_C=block, num_warps=max(1, min(8, block // 256)))
    return out, new_sizes


def sources_by_destination(plan: MergePlan, num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The plan's merges grouped by output row: the input rows merged into output row ``o``
    are ``sources[offsets[o]:offsets[o + 1]]`` (compressed sparse rows), each group in the
    order of ``plan.src``."""
    if plan.grouped_sources is not None:
        return plan.grouped_sources
    device = plan.keep.device
    if plan.drop_src or plan.src.shape[1] == 0:
        return torch.zeros(num_rows + 1, dtype=torch.long, device=device), plan.src_rows[:0]
    # Output rows of item b come after those of item b − 1, so sorting each item's
    # destinations sorts them all.
    batch, merged = plan.dst.shape
    order = argsort_rows(plan.dst) + torch.arange(0, batch * merged, merged,
                                                  device=device).unsqueeze(1)
    order = order.flatten()
    destinations = plan.dst_rows[order]
    offsets = torch.searchsorted(destinations, torch.arange(num_rows + 1, device=device))
    return offsets, plan.src_rows[order]


MAX_PADDED_WIDTH = 4096  # a row's plan is held in registers
PLACES_PER_PROGRAM = 8


def merge_padded_rows(plan: RowPlan, x: torch.Tensor, sizes: torch.Tensor | None,
                      width_out: int, residual: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``x + residual`` (``B×W×C``, padded) merged by ``plan`` into ``B×W′×C``: output place
    ``j`` of row ``b`` is the size-weighted mean of the row's token whose slot is ``j`` and
    the tokens whose target is (``drop_src``: no targets), a place nobody joins is zeros.
    ``sizes`` (``B×W×1``, None: ones) weigh the tokens. Returns the tokens and their
    ``B×W′×1`` sizes (1 where nobody joins), or None where the kernel does not run (ToFu's
    norm rule, gradients, rows wider than ``MAX_PADDED_WIDTH``).

    One launch: each program reads its row's plan once, finds each output's members in it
    and reads every member once, where the scatter of the PyTorch twin takes some ten passes
    over float32 copies of the tokens (and a sort would be needed to group them).
    """
    operands = (x,) if residual is None else (x, residual)
    batch, width, channels = x.shape
    if plan.max_norm or width > MAX_PADDED_WIDTH or not use_triton(*operands):
        return None
    from .jit.merge import merge_padded_rows_kernel

    x = x.contiguous()
    residual = x if residual is None else residual.to(x.dtype).contiguous()
    out = torch.empty(batch, width_out, channels, dtype=x.dtype, device=x.device)
    new_sizes = torch.empty(batch, width_out, 1, dtype=torch.float32, device=x.device)
    block = next_power_of_2(channels)
    grid = (batch, -(-width_out // PLACES_PER_PROGRAM))
    merge_padded_rows_kernel[grid](
        x, residual, new_sizes if sizes is None else sizes.float().contiguous(),
        plan.slot.contiguous(), plan.target.contiguous(), out, new_sizes, channels, width,
        width_out, HAS_RESIDUAL=residual is not x, HAS_SIZES=sizes is not None,
        DROP_SRC=plan.drop_src, PLACES=PLACES_PER_PROGRAM, BLOCK_W=next_power_of_2(width),
        BLOCK_C=block, num_warps=max(1, min(8, block // 256)))
    return out, new_sizes
