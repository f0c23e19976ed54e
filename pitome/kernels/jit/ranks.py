"""Ranking the values of a row: each value's place, counted in registers."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def row_ranks_kernel(values_ptr, order_ptr, length, DESCENDING: tl.constexpr,
                     BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Stable argsort of one short row by counting: an element's place is the number of
    elements that come before it (larger, or equal and earlier, when descending)."""
    item = tl.program_id(0).to(tl.int64)
    mine = tl.arange(0, BLOCK)
    valid = mine < length
    value = tl.load(values_ptr + item * length + mine, mask=valid, other=0)
    place = _places(values_ptr, item, length, mine, value, DESCENDING, CHUNK)
    tl.store(order_ptr + item * length + place, mine.to(tl.int64), mask=valid)


@triton.jit
def _places(values_ptr, item, length, mine, value, DESCENDING: tl.constexpr,
            CHUNK: tl.constexpr):
    """Where elements ``mine`` (holding ``value``) of row ``item`` go in its stable sort:
    the number of elements that come before each."""
    place = tl.zeros(mine.shape, dtype=tl.int32)
    for start in range(0, length, CHUNK):
        others = start + tl.arange(0, CHUNK)
        other = tl.load(values_ptr + item * length + others, mask=others < length, other=0)
        place += _count_before(value, mine, other, others, others < length, DESCENDING)
    return place


@triton.jit
def _count_before(value, member, other, other_member, other_valid, DESCENDING: tl.constexpr):
    """For each ``value``: how many valid ``other`` elements come before it in a stable
    sort (larger, or smaller when ascending; or equal with a smaller member index)."""
    if DESCENDING:
        ahead = other[None, :] > value[:, None]
    else:
        ahead = other[None, :] < value[:, None]
    ahead |= (other[None, :] == value[:, None]) & (other_member[None, :] < member[:, None])
    ahead &= other_valid[None, :]
    return tl.sum(ahead.to(tl.int32), axis=1)


@triton.jit
def _ranks(value, member, valid):
    """Each element's place in the stable descending sort of ``value`` over the ``valid``
    elements, all held in registers."""
    return _count_before(value, member, value, member, valid, True)
