"""Token schedules (how many tokens each block merges away) and margin schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Union

RSpec = Union[int, Sequence[int], tuple[int, float]]
MarginSpec = Union[float, Sequence[float], Callable[[int, int], float]]

MIN_RATIO = 0.5


def check_ratio(ratio: float) -> float:
    """Validate ``ratio``, the fraction of tokens kept per block (SPEC §1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise TypeError(f"ratio must be a number in [{MIN_RATIO}, 1], got {ratio!r}")
    if not MIN_RATIO <= ratio <= 1.0:
        raise ValueError(
            f"ratio={ratio} is out of range: it is the fraction of tokens kept per block and must "
            f"lie in [{MIN_RATIO}, 1] (below {MIN_RATIO} a bipartite matching cannot remove enough "
            "tokens; 1 disables merging)")
    return float(ratio)


def tokens_to_merge(num_tokens: int, ratio: float) -> int:
    """``r = ⌊T′ − T′·ρ⌋`` merged away from ``T′`` mergeable tokens at keep-ratio ``ρ``.

    Computed exactly (a tiny tolerance absorbs binary rounding, so 130 tokens at ρ = 0.9 give
    r = 13, not 12).
    """
    return max(0, math.floor(num_tokens - num_tokens * ratio + 1e-9))


def linear_r(r: int, num_blocks: int, inflection: float = 0.0) -> list[int]:
    """ToMe's per-block ``r`` with an inflection: linear from ``r·(1−i)`` to ``r·(1+i)``.

    ``inflection`` 0 gives a constant ``r``; positive values merge more in later blocks.
    """
    if num_blocks == 1:
        return [int(r)]
    low = int(r * (1.0 - inflection))
    high = 2 * r - low
    step = (high - low) / (num_blocks - 1)
    return [int(low + step * i) for i in range(num_blocks)]


@dataclass(frozen=True)
class TokenSchedule:
    """The number of tokens to merge in each block, given the token count entering it.

    Exactly one of ``ratio`` (fraction kept per block) and ``r`` (ToMe's fixed count: int,
    per-block list, or ``(r, inflection)``) is set. ``merge_blocks`` optionally restricts
    merging to a set of block indices (the text models' first-three-blocks schedule).
    ``count_prefix`` reproduces the convention in which ``r`` is computed from all tokens,
    prefix tokens included (the PiToMe authors' ToMe baseline).
    """

    ratio: float | None = None
    r: RSpec | None = None
    merge_blocks: tuple[int, ...] | None = None
    count_prefix: bool = False

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.r is None):
            raise ValueError("give exactly one of ratio (fraction of tokens kept) and r "
                             "(tokens merged per block)")
        if self.ratio is not None:
            check_ratio(self.ratio)

    @property
    def is_identity(self) -> bool:
        if self.ratio is not None:
            return self.ratio >= 1.0
        if isinstance(self.r, int):
            return self.r == 0
        if isinstance(self.r, tuple) and len(self.r) == 2 and isinstance(self.r[1], float):
            return self.r[0] == 0
        return all(v == 0 for v in self.r)  # type: ignore[union-attr]

    def _fixed_r(self, num_blocks: int) -> list[int]:
        spec = self.r
        if isinstance(spec, bool):
            raise TypeError(f"r must be an int, a list of ints or (r, inflection), got {spec!r}")
        if isinstance(spec, int):
            values = [spec] * num_blocks
        elif isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[1], float):
            values = linear_r(int(spec[0]), num_blocks, spec[1])
        else:
            values = [int(v) for v in spec]  # type: ignore[union-attr]
            if len(values) > num_blocks:
                raise ValueError(f"r lists {len(values)} values but the model has {num_blocks} blocks")
            values += [0] * (num_blocks - len(values))
        if any(v < 0 for v in values):
            raise ValueError(f"r must be non-negative, got {values}")
        return values

    def plan(self, num_tokens: int, num_prefix: int, num_blocks: int,
             clamp: bool = False) -> list[int]:
        """Per-block ``r`` for an input of ``num_tokens`` tokens (prefix included).

        Raises ValueError when a block would have to merge more than half of its mergeable
        tokens, which bipartite matching cannot do; with ``clamp`` such a block merges half
        instead (short sentences in a padded batch).
        """
        fixed = None if self.ratio is not None else self._fixed_r(num_blocks)
        counts, tokens = [], num_tokens
        for block in range(num_blocks):
            mergeable = tokens - num_prefix
            if self.merge_blocks is not None and block not in self.merge_blocks:
                r = 0
            elif fixed is None:
                base = tokens if self.count_prefix else mergeable
                r = min(tokens_to_merge(base, self.ratio), mergeable // 2)  # type: ignore[arg-type]
            else:
                r = fixed[block]
            if clamp:
                r = min(r, max(mergeable, 0) // 2)
            if 2 * r > mergeable:
                raise ValueError(
                    f"block {block} cannot merge r={r} tokens: only {mergeable} mergeable tokens "
                    f"remain ({tokens} minus {num_prefix} prefix), and at most half of them can "
                    "merge in one block. Use a smaller r or a ratio.")
            counts.append(r)
            tokens -= r
        return counts


def token_counts(num_tokens: int, merges: Sequence[int]) -> list[int]:
    """Tokens entering each block and leaving the last one: ``[T0, T1, …, T_L]``."""
    counts = [num_tokens]
    for r in merges:
        counts.append(counts[-1] - r)
    return counts


@dataclass(frozen=True)
class LinearMargin:
    """Margin falling linearly with depth: ``m_i = start − drop·i/L`` (SPEC §3)."""

    start: float
    drop: float

    def __call__(self, block: int, num_blocks: int) -> float:
        return self.start - self.drop * block / num_blocks


def resolve_margin(margin: MarginSpec, block: int, num_blocks: int) -> float:
    """The margin of ``block`` from a float, a per-block sequence or a callable."""
    if callable(margin):
        return float(margin(block, num_blocks))
    if isinstance(margin, (int, float)):
        return float(margin)
    values = list(margin)
    if len(values) != num_blocks:
        raise ValueError(f"margin lists {len(values)} values but the model has {num_blocks} blocks")
    return float(values[block])
