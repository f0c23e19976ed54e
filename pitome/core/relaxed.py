"""A block's merge made continuous: its scheduled merges, then a fraction of the next one.

Merge counts are whole numbers, so the loss of a schedule has no derivative in them. Here a
block that merges ``r`` tokens merges them, and then the token its algorithm would merge
next (the one the plan for ``r + 1`` merges that the plan for ``r`` does not) moves a
fraction ``f`` of its size into the token it would join: the destination becomes the
size-weighted mean of itself and ``f·s`` of the source, the source keeps ``(1 − f)·s``
(with proportional attention, its attention weight shrinks by ``log(1 − f)``). At ``f = 0``
this is the hard merge of ``r`` tokens, exactly; towards ``f = 1`` the source's weight
leaves it, as merging it would. ``∂loss/∂f`` at 0 is then the first-order change of the
loss when the block merges one token more (:mod:`pitome.calibration`, ``rates="gradient"``).
"""

from __future__ import annotations

import torch

from .plan import MergePlan


def next_merge(done: MergePlan | None, following: MergePlan, tokens: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per item, where the merge ``following`` makes and ``done`` does not lands after
    ``done``: the output rows (of ``done``, or of the ``tokens`` inputs when ``done`` is
    None) holding the token that would merge next and the token it would join (``B``
    each; the same row when ``following`` prunes, so nothing joins).

    Both plans are the algorithm's for the same input, removing ``r`` and ``r + 1`` tokens.
    """
    batch = following.src.shape[0]
    device = following.src.device
    if done is None:
        row_of = torch.arange(tokens, device=device).expand(batch, tokens)
        removed = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
    else:
        if done.drop_src != following.drop_src:
            raise ValueError("the plans for r and r + 1 tokens must both merge or both prune")
        row_of = torch.zeros(batch, tokens, dtype=torch.long, device=device)
        row_of.scatter_(1, done.keep, torch.arange(done.num_out, device=device)
                        .expand(batch, done.num_out))
        if not done.drop_src:
            row_of.scatter_(1, done.src, done.dst)
        removed = torch.zeros(batch, tokens, dtype=torch.bool, device=device)
        removed.scatter_(1, done.src, True)
    fresh = ~removed.gather(1, following.src)  # B×(r+1): merges ``done`` does not make
    first = fresh.to(torch.int8).argmax(dim=1, keepdim=True)
    source = following.src.gather(1, first)
    source_row = row_of.gather(1, source).squeeze(1)
    if following.drop_src:
        return source_row, source_row
    target = following.keep.gather(1, following.dst.gather(1, first))
    return source_row, row_of.gather(1, target).squeeze(1)


def move_fraction(x: torch.Tensor, sizes: torch.Tensor | None, source: torch.Tensor,
                  target: torch.Tensor, fraction: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Move ``fraction`` (``B``) of token ``source``'s size into token ``target`` (``B``
    row indices each) of the ``B×T×C`` tokens ``x`` with ``B×T×1`` ``sizes`` (None: ones).

    Returns new tokens and sizes (out of place, so gradients reach ``fraction``): the
    target is the size-weighted mean of itself and the moved part of the source; the source
    keeps its features and ``(1 − fraction)`` of its size. Where ``source`` equals
    ``target`` (a pruning plan) only the size shrinks.
    """
    batch = x.shape[0]
    if sizes is None:
        sizes = x.new_ones(batch, x.shape[1], 1, dtype=torch.float32)
    items = torch.arange(batch, device=x.device)
    source_size = sizes[items, source]
    moved = fraction.to(sizes.dtype).unsqueeze(1) * source_size
    merges = (source != target).unsqueeze(1)
    new_sizes = sizes.index_put((items, source), source_size - moved)
    target_size = sizes[items, target]
    total = target_size + torch.where(merges, moved, torch.zeros_like(moved))
    new_sizes = new_sizes.index_put((items, target), torch.where(merges, total, target_size - moved))
    compute = torch.promote_types(x.dtype, torch.float32)
    joined, leaving = x[items, target].to(compute), x[items, source].to(compute)
    weight = torch.where(merges, moved / total, torch.zeros_like(moved))
    x = x.index_put((items, target), (joined + weight * (leaving - joined)).to(x.dtype))
    return x, new_sizes
