"""Applying a merge plan to the features in one kernel, fused with the residual add."""

from __future__ import annotations

import torch

from ..core.plan import MergePlan
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


def merge_padded_rows(place: torch.Tensor, x: torch.Tensor, sizes: torch.Tensor | None,
                      width_out: int, residual: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``x + residual`` (``B×W×C``, padded) merged into ``B×W′×C``: output place ``j`` of row
    ``b`` is the size-weighted mean of the row's tokens ``i`` with ``place[b, i] == j``
    (``place`` in ``[0, W′]``; ``W′`` drops a token), a place nobody joins is zeros.
    ``sizes`` (``B×W×1``, None: ones) weigh the tokens. Returns the tokens and their
    ``B×W′×1`` sizes (1 where nobody joins), or None where the kernel does not run.

    Sorting each row's places groups every output's members (one launch) and a search
    finds where each group starts (another); the kernel then reads every input token once
    and writes every output once, where the scatter of the PyTorch twin takes some ten
    passes over float32 copies of the tokens.
    """
    operands = (x,) if residual is None else (x, residual)
    if not use_triton(*operands, place):
        return None
    from .jit.merge import merge_padded_rows_kernel

    batch, width, channels = x.shape
    ordered, order = place.sort(dim=1, stable=True)
    starts = torch.arange(width_out + 1, device=place.device).expand(batch, -1).contiguous()
    bounds = torch.searchsorted(ordered, starts)
    x = x.contiguous()
    residual = x if residual is None else residual.to(x.dtype).contiguous()
    out = torch.empty(batch, width_out, channels, dtype=x.dtype, device=x.device)
    new_sizes = torch.empty(batch, width_out, 1, dtype=torch.float32, device=x.device)
    block = next_power_of_2(channels)
    merge_padded_rows_kernel[(batch * width_out,)](
        x, residual, new_sizes if sizes is None else sizes.float().contiguous(), order, bounds,
        out, new_sizes, channels, width, width_out, HAS_RESIDUAL=residual is not x,
        HAS_SIZES=sizes is not None, BLOCK_C=block, num_warps=max(1, min(8, block // 256)))
    return out, new_sizes
