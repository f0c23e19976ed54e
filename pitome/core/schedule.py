"""Token schedules (how many tokens each block merges away) and margin schedules."""

from __future__ import annotations

import ast
import dataclasses
import math
import numbers
from fractions import Fraction
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Union

RSpec = Union[int, Sequence[int], tuple[int, float]]
RatioSpec = Union[float, Sequence[float]]
MarginSpec = Union[float, Sequence[float], Callable[[int, int], float]]

MIN_RATIO = 0.5


R_FORMS = "an int, a list of ints (one per block) or a 2-tuple (r, inflection)"


def scalar(value: Any) -> int | float | None:
    """``value`` as a Python int or float if it is a real scalar (a Python, numpy or 0-d
    tensor number, bools excluded), else None."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d tensor or array
        value = value.item()
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _whole(value: Any) -> int | None:
    """``value`` as an int if it is an integral scalar (``8``, ``np.int64(8)``), else None."""
    number = scalar(value)
    return number if isinstance(number, int) else None


def check_ratio(ratio: Any) -> float:
    """Validate ``ratio``, the fraction of tokens kept per block; returns it as a float."""
    number = scalar(ratio)
    if number is None:
        raise TypeError(f"ratio must be a number in [{MIN_RATIO}, 1], got {ratio!r}")
    if not MIN_RATIO <= number <= 1.0:  # compared before float(): 10**400 has no float
        raise ValueError(
            f"ratio={number} is out of range: it is the fraction of tokens kept per block and must "
            f"lie in [{MIN_RATIO}, 1] (below {MIN_RATIO} a bipartite matching cannot remove enough "
            "tokens; 1 disables merging)")
    return float(number)


RATIO_FORMS = (f"a number in [{MIN_RATIO}, 1] or a list of them (one keep ratio per block; 1 "
               "= the block does not merge)")


def check_ratios(ratio: Any) -> float | tuple[float, ...]:
    """Validate ``ratio``: one keep ratio for every merging block, or a per-block sequence
    of them (each in [0.5, 1], 1 = that block does not merge); returns a float or a tuple."""
    if scalar(ratio) is not None:
        return check_ratio(ratio)
    if isinstance(ratio, (str, bytes)) or not isinstance(ratio, Sequence) \
            and not (hasattr(ratio, "tolist") and getattr(ratio, "ndim", 0) == 1):
        raise TypeError(f"ratio must be {RATIO_FORMS}, got {ratio!r}")
    values = ratio.tolist() if hasattr(ratio, "tolist") else list(ratio)
    if not values:
        raise ValueError(f"ratio={values!r}: a per-block list needs at least one keep ratio")
    numbers_ = [scalar(value) for value in values]
    for block, (given, number) in enumerate(zip(values, numbers_)):
        if number is None or not MIN_RATIO <= number <= 1.0:
            raise ValueError(
                f"ratio={values!r}: block {block} has {given!r}; a per-block list holds keep "
                f"ratios in [{MIN_RATIO}, 1] (1 = the block does not merge)")
    return tuple(float(number) for number in numbers_)  # type: ignore[arg-type]


def check_r(r: Any) -> int | list[int] | tuple[int, float]:
    """Validate ToMe's ``r``: tokens merged per block as an int, a list (one int per block),
    or a 2-tuple ``(r, inflection)`` with ``inflection`` in [-1, 1]; returns it normalised."""
    whole = _whole(r)
    if whole is not None:
        if whole < 0:
            raise ValueError(f"r must be non-negative, got {r!r}")
        return whole
    if isinstance(r, tuple) and len(r) == 2:
        count, inflection = _whole(r[0]), scalar(r[1])
        if count is None or count < 0 or inflection is None or not -1.0 <= inflection <= 1.0:
            raise ValueError(f"r={r!r}: a 2-tuple is (r, inflection), a non-negative int and a "
                             "number in [-1, 1]; give a per-block schedule as a list")
        return count, float(inflection)
    if isinstance(r, (str, bytes)) or not isinstance(r, Sequence):
        raise TypeError(f"r must be {R_FORMS}, got {r!r}")
    values = [_whole(value) for value in r]
    if any(value is None or value < 0 for value in values):
        raise ValueError(f"r={r!r}: a per-block list holds non-negative ints (tokens merged "
                         "in each block)")
    return values  # type: ignore[return-value]


def check_merge_blocks(blocks: Any) -> tuple[int, ...] | None:
    """Validate ``merge_blocks``: None, or block indices (ints ≥ 0); returns a sorted tuple."""
    if blocks is None:
        return None
    if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) \
            and not isinstance(blocks, (set, frozenset)):
        raise TypeError(f"merge_blocks must be a list of block indices, got {blocks!r}")
    indices = [_whole(block) for block in blocks]
    if any(index is None or index < 0 for index in indices):
        raise ValueError(f"merge_blocks={list(blocks)!r}: block indices are ints from 0 (the "
                         "first block)")
    return tuple(sorted(set(indices)))  # type: ignore[arg-type]


def check_margin(margin: Any) -> MarginSpec:
    """Validate PiToMe's ``margin``: a number in [-1, 1], a per-block list of them, or a
    callable ``(block, num_blocks) -> margin``; returns it normalised."""
    if callable(margin):
        return margin
    number = scalar(margin)
    if number is not None:
        return _margin_value(number, margin)
    if isinstance(margin, (str, bytes)) or not isinstance(margin, Sequence):
        raise TypeError("margin must be a number in [-1, 1], a list of them (one per block) or "
                        f"a callable (block, num_blocks) -> margin, got {margin!r}")
    values = [scalar(value) for value in margin]
    if any(value is None for value in values):
        raise TypeError(f"margin={margin!r}: a per-block margin list holds numbers")
    return [_margin_value(value, margin) for value in values]  # type: ignore[arg-type]


def _margin_value(value: float, given: Any) -> float:
    if not -1.0 <= value <= 1.0:  # also refuses nan
        raise ValueError(f"margin={given!r}: a margin is a cosine similarity threshold in "
                         "[-1, 1]")
    return float(value)


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
    try:
        low = int(r * (1.0 - inflection))
        high = 2 * r - low
        step = (high - low) / (num_blocks - 1)
        return [int(low + step * i) for i in range(num_blocks)]
    except OverflowError:  # an r past float range: the same line in exact arithmetic
        low = math.trunc(r * (1 - Fraction(inflection)))
        step = Fraction(2 * r - 2 * low, num_blocks - 1)
        return [math.trunc(low + step * i) for i in range(num_blocks)]


def check_tokens(tokens: Any) -> int:
    """Validate ``tokens``, the mergeable tokens to keep; returns it as an int ≥ 1."""
    whole = _whole(tokens)
    if whole is None:
        raise TypeError(f"tokens must be a whole number of tokens to keep (at least 1), got "
                        f"{tokens!r}")
    if whole < 1:
        raise ValueError(f"tokens={tokens!r}: at least one token must remain")
    return whole


def fewest_tokens(mergeable: int, blocks: int) -> int:
    """The fewest of ``mergeable`` tokens that ``blocks`` bipartite merges can leave (each
    merges at most half of what enters it)."""
    for _ in range(blocks):
        mergeable -= mergeable // 2
    return mergeable


def merges_for_tokens(mergeable: int, target: int, blocks: Sequence[int], num_blocks: int,
                      clamp: bool = False) -> list[int]:
    """Per-block ``r`` that merges ``mergeable`` tokens down to exactly ``target`` over the
    given ``blocks`` (indices below ``num_blocks``), each keeping the same fraction as near
    as whole tokens allow (a geometric schedule, like a ratio's), none merging more than
    half of what enters it.

    Raises ValueError when ``target`` is out of reach (with ``clamp`` the fewest reachable
    tokens are kept instead).
    """
    merges = [0] * num_blocks
    if target >= mergeable or not blocks:
        if target < mergeable and not clamp:
            raise ValueError(f"tokens={target} needs merging, but no block merges")
        return merges
    floor = fewest_tokens(mergeable, len(blocks))
    if target < floor:
        if not clamp:
            raise ValueError(
                f"tokens={target} is out of reach: {len(blocks)} merging blocks can take "
                f"{mergeable} mergeable tokens down to {floor} at the fewest (each merges at "
                f"most half of its tokens); ask for tokens >= {floor}")
        target = floor
    keep = (target / mergeable) ** (1 / len(blocks))
    tokens = mergeable
    for step, block in enumerate(blocks, start=1):
        left = len(blocks) - step
        want = target if left == 0 else round(mergeable * keep ** step)
        # Never more than half in one block, never so few that the rest cannot reach target.
        count = min(max(want, target, tokens - tokens // 2), tokens, target * 2 ** left)
        merges[block] = tokens - count
        tokens = count
    return merges


@dataclass(frozen=True)
class TokenSchedule:
    """The number of tokens to merge in each block, given the token count entering it.

    Exactly one of ``ratio`` (fraction kept per block: one for every merging block, or a
    per-block sequence, 1 where a block does not merge; blocks past its end keep all),
    ``r`` (ToMe's fixed count: int, per-block list, or ``(r, inflection)``) and ``tokens`` (mergeable tokens left after the
    last merging block, prefix tokens not counted; reached by :func:`merges_for_tokens`) is
    set. ``merge_blocks`` optionally restricts merging to a set of block indices (the text
    models' first-three-blocks schedule). ``count_prefix`` reproduces the convention in
    which ``r`` is computed from all tokens, prefix tokens included (the PiToMe authors' ToMe
    baseline). ``one_shot`` removes everything the schedule would remove in its last merging
    block at once, for algorithms that are not bounded by a bipartite split (VisionZip).
    """

    ratio: float | tuple[float, ...] | None = None
    r: RSpec | None = None
    merge_blocks: tuple[int, ...] | None = None
    count_prefix: bool = False
    tokens: int | None = None
    one_shot: bool = False

    def __post_init__(self) -> None:
        if sum(value is not None for value in (self.ratio, self.r, self.tokens)) != 1:
            raise ValueError("give exactly one of ratio (fraction of tokens kept), r (tokens "
                             "merged per block) and tokens (tokens left)")
        if self.ratio is not None:
            object.__setattr__(self, "ratio", check_ratios(self.ratio))
        elif self.r is not None:
            object.__setattr__(self, "r", check_r(self.r))
        else:
            object.__setattr__(self, "tokens", check_tokens(self.tokens))
        object.__setattr__(self, "merge_blocks", check_merge_blocks(self.merge_blocks))
        for name in ("count_prefix", "one_shot"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        object.__setattr__(self, "_key", repr(
            tuple(getattr(self, name.name) for name in dataclasses.fields(self))))

    @property
    def key(self) -> str:
        """The schedule as a string, ``TokenSchedule.from_key(schedule.key) == schedule``:
        what ``torch.compile`` can hold as a constant (a float field, traced, becomes a
        symbol under ``dynamic=True``, and not every dynamo version takes a frozen
        dataclass as a constant)."""
        return self._key

    @classmethod
    def from_key(cls, key: str) -> TokenSchedule:
        """The schedule :attr:`key` was taken from."""
        return cls(*ast.literal_eval(key))

    def check_depth(self, num_blocks: int) -> None:
        """Raise ValueError unless the schedule fits a model of ``num_blocks`` blocks."""
        outside = [block for block in self.merge_blocks or () if block >= num_blocks]
        if outside:
            raise ValueError(f"merge_blocks={list(self.merge_blocks)!r} names block(s) "
                             f"{outside}, but the model has {num_blocks} blocks (0 to "
                             f"{num_blocks - 1})")
        if self.r is not None:
            self._fixed_r(num_blocks)
        if isinstance(self.ratio, tuple) and len(self.ratio) > num_blocks:
            raise ValueError(f"ratio lists {len(self.ratio)} keep ratios but the model has "
                             f"{num_blocks} blocks: give at most one per block")

    @property
    def is_identity(self) -> bool:
        """Whether the schedule merges nothing, whatever the input (False for ``tokens``,
        which merges inputs longer than it)."""
        if self.tokens is not None:
            return False
        if isinstance(self.ratio, tuple):
            return all(value >= 1.0 for value in self.ratio)
        if self.ratio is not None:
            return self.ratio >= 1.0
        if isinstance(self.r, int):
            return self.r == 0
        if isinstance(self.r, tuple):
            return self.r[0] == 0
        return all(v == 0 for v in self.r)  # type: ignore[union-attr]

    def _fixed_r(self, num_blocks: int) -> list[int]:
        spec = self.r
        if isinstance(spec, int):
            values = [spec] * num_blocks
        elif isinstance(spec, tuple):
            values = linear_r(spec[0], num_blocks, spec[1])
        else:
            values = [int(v) for v in spec]  # type: ignore[union-attr]
            if len(values) > num_blocks:
                raise ValueError(f"r lists {len(values)} values but the model has {num_blocks} blocks")
            values += [0] * (num_blocks - len(values))
        if any(v < 0 for v in values):
            raise ValueError(f"r must be non-negative, got {values}")
        return values

    def block_ratio(self, block: int) -> float:
        """The keep ratio of ``block`` (1 past the end of a per-block list); needs ``ratio``."""
        if isinstance(self.ratio, tuple):
            return self.ratio[block] if block < len(self.ratio) else 1.0
        assert self.ratio is not None
        return self.ratio

    def merging_blocks(self, num_blocks: int) -> list[int]:
        """The blocks allowed to merge, in order."""
        return [block for block in range(num_blocks)
                if self.merge_blocks is None or block in self.merge_blocks]

    def plan(self, num_tokens: int, num_prefix: int, num_blocks: int,
             clamp: bool = False) -> list[int]:
        """Per-block ``r`` for an input of ``num_tokens`` tokens (prefix included).

        Raises ValueError when a block would have to merge more than half of its mergeable
        tokens, which bipartite matching cannot do (unless ``one_shot``), or ``tokens`` is
        out of reach; with ``clamp`` such a block merges what it can instead (short
        sentences in a padded batch).
        """
        if self.tokens is not None:
            blocks = self.merging_blocks(num_blocks)
            mergeable = num_tokens - num_prefix
            if self.one_shot:
                return self._at_once([max(0, mergeable - self.tokens)], blocks, num_blocks)
            return merges_for_tokens(mergeable, self.tokens, blocks, num_blocks, clamp)
        fixed = None if self.ratio is not None else self._fixed_r(num_blocks)
        counts, tokens = [], num_tokens
        for block in range(num_blocks):
            mergeable = tokens - num_prefix
            if self.merge_blocks is not None and block not in self.merge_blocks:
                r = 0
            elif fixed is None:
                base = tokens if self.count_prefix else mergeable
                r = min(tokens_to_merge(base, self.block_ratio(block)), mergeable // 2)
            else:
                r = fixed[block]
            if clamp:
                r = min(r, max(mergeable, 0) // 2)
            if 2 * r > mergeable and not (self.one_shot and r < mergeable):
                raise ValueError(
                    f"block {block} cannot merge r={r} tokens: only {mergeable} mergeable tokens "
                    f"remain ({tokens} minus {num_prefix} prefix), and at most half of them can "
                    "merge in one block. Use a smaller r or a ratio.")
            counts.append(r)
            tokens -= r
        if self.one_shot:
            return self._at_once(counts, self.merging_blocks(num_blocks), num_blocks)
        return counts

    def sentence_plan(self, length: int, num_prefix: int, num_blocks: int) -> list[int]:
        """Per-block ``r`` of one sentence of ``length`` real tokens (prefix included) in a
        padded batch, as the text runtime merges it: :meth:`plan` with ``clamp``; a sentence
        with at most one token besides the prefix merges nothing."""
        if length <= num_prefix + 1:
            return [0] * num_blocks
        return self.plan(length, num_prefix, num_blocks, clamp=True)

    @staticmethod
    def _at_once(counts: list[int], blocks: list[int], num_blocks: int) -> list[int]:
        """Everything ``counts`` removes, removed in the last of ``blocks``."""
        merges = [0] * num_blocks
        if blocks:
            merges[blocks[-1]] = sum(counts)
        return merges


def token_counts(num_tokens: int, merges: Sequence[int]) -> list[int]:
    """Tokens entering each block and leaving the last one: ``[T0, T1, …, T_L]``."""
    counts = [num_tokens]
    for r in merges:
        counts.append(counts[-1] - r)
    return counts


@dataclass(frozen=True)
class LinearMargin:
    """Margin falling linearly with depth: ``m_i = start − drop·i/L`` (docs/method.md §3)."""

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
        raise ValueError(f"margin lists {len(values)} values but the model has {num_blocks} "
                         "blocks: give one per block")
    return float(values[block])


def check_margin_depth(margin: MarginSpec, num_blocks: int) -> None:
    """Raise ValueError unless ``margin`` gives every one of ``num_blocks`` blocks a margin
    in [-1, 1] (a callable is asked for each, and TypeError if it returns no number)."""
    for block in range(num_blocks):
        if callable(margin):
            returned = margin(block, num_blocks)
            value = scalar(returned)
            if value is None:
                raise TypeError(f"margin({block}, {num_blocks}) returned {returned!r}; a margin "
                                "callable returns a number in [-1, 1] for each block")
        else:
            value = resolve_margin(margin, block, num_blocks)
        if not -1.0 <= value <= 1.0:
            raise ValueError(f"margin gives block {block} the value {value}; margins lie in "
                             "[-1, 1]")
