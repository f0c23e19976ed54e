"""Property-based checks (hypothesis) of ``pitome.patch`` over its arguments and input shapes.

Every combination of arguments either works, with the merge invariants intact, or is refused
with a ValueError or TypeError whose message says what is wrong; no other exception ever
escapes. Values are drawn with a verdict (valid by the documented contract, invalid, or either),
so that a valid call must run, an invalid one must be refused, and a refusal of exactly one
bad argument must name it. Tiny models keep every example to a few milliseconds.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, example, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pitome  # noqa: E402
from pitome.adapters import find_adapter  # noqa: E402
from pitome.algorithms import DCT, PiToMe, ToMe  # noqa: E402
from pitome.core.registry import Algorithm, get_method  # noqa: E402
from pitome.core.schedule import (TokenSchedule, check_margin, check_merge_blocks,  # noqa: E402
                                  check_r, check_ratio, linear_r, tokens_to_merge)
from pitome.runtime.patcher import patch_of  # noqa: E402

from conftest import VARIANTS, build as build_timm, images as timm_images  # noqa: E402

try:  # the tiny Hugging Face and open_clip models of the adapter contract
    from test_contract import TABLE as CONTRACT_ROWS
except (ImportError, pytest.skip.Exception):
    CONTRACT_ROWS = {}

DEPTH = 4  # every tiny model has four blocks
ALGORITHMS = sorted(pitome.available_algorithms())
DROPPING = {"prune", "tofu"}  # algorithms that discard tokens instead of merging them all
SETTINGS = dict(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
# CI runs the example counts below (well under a minute); a longer local hunt scales them,
# e.g. PITOME_PROPERTY_SCALE=20 pytest tests/test_properties.py
SCALE = float(os.environ.get("PITOME_PROPERTY_SCALE", "1"))


def examples(count: int) -> int:
    return max(1, int(count * SCALE))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The models are tiny: one thread runs them several times faster than a pool (far
    faster when other processes share the cores). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- drawn values with a verdict ------------------------------------------------------------

OMIT = object()  # the argument is not passed at all


class Arg:
    """A drawn argument: ``ok`` is True when the contract accepts it, False when ``patch``
    must refuse it, None when either is fine; ``meaning`` is the accepted value, normalised."""

    def __init__(self, value: Any, ok: bool | None, meaning: Any = None) -> None:
        self.value, self.ok, self.meaning = value, ok, meaning

    def __repr__(self) -> str:  # how hypothesis shows a failing example
        if self.value is OMIT:
            return "OMIT"
        verdict = {True: "ok", False: "bad", None: "either"}[self.ok]
        return f"{_show(self.value)} ({verdict})"


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"torch.tensor({value.tolist()!r}, dtype={value.dtype})"
    if isinstance(value, np.ndarray):
        return f"np.array({value.tolist()!r}, dtype={value.dtype})"
    if isinstance(value, np.generic):
        return f"np.{type(value).__name__}({value.item()!r})"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_show(item) for item in value)
        if isinstance(value, list):
            return f"[{inner}]"
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if hasattr(value, "_shown"):
        return value._shown
    return repr(value)


def returning(value: Any) -> Callable[[int, int], Any]:
    """A margin callable giving every block ``value``."""
    def margin(block: int, num_blocks: int) -> Any:
        return value

    margin._shown = f"lambda block, num_blocks: {_show(value)}"
    return margin


def omitted() -> st.SearchStrategy[Arg]:
    return st.just(Arg(OMIT, True, None))


HUGE = [2 ** 63, 10 ** 308, 10 ** 400, -10 ** 400]  # past int64, and past float range


@st.composite
def integral(draw, min_value: int | None = None, max_value: int | None = None):
    """``(raw, n)``: the int ``n`` as a Python, numpy, 0-d tensor or 0-d array integer."""
    huge = [n for n in HUGE if (min_value is None or n >= min_value)
            and (max_value is None or n <= max_value)]
    n = draw(st.one_of(st.integers(min_value, max_value), *([st.sampled_from(huge)] if huge
                                                             else [])))
    forms: list[Callable[[int], Any]] = [int]
    if -2 ** 63 <= n < 2 ** 63:
        forms += [np.int64, torch.tensor, np.array]
    if -2 ** 31 <= n < 2 ** 31:
        forms.append(np.int32)
    if 0 <= n < 256:
        forms.append(np.uint8)
    return draw(st.sampled_from(forms))(n), n


def _real_forms(x: float) -> list[Callable[[float], Any]]:
    forms: list[Callable[[float], Any]] = [
        float, np.float64, np.float32, np.float16, torch.tensor, np.array,
        lambda v: torch.tensor(v, dtype=torch.bfloat16),
        lambda v: torch.tensor(v, dtype=torch.float64)]
    if math.isfinite(x):
        forms.append(Fraction)
    return forms


@st.composite
def real(draw, min_value: float | None = None, max_value: float | None = None,
         allow_nan: bool = True):
    """``(raw, x)``: a real number as a Python, numpy, 0-d tensor, 0-d array or Fraction
    number; ``x`` is its value as the library reads it (float16 and bf16 round)."""
    x = draw(st.floats(min_value, max_value, allow_nan=allow_nan and min_value is None
                       and max_value is None, allow_infinity=min_value is None
                       or max_value is None))
    with warnings.catch_warnings(), np.errstate(over="ignore"):
        warnings.simplefilter("ignore")
        raw = draw(st.sampled_from(_real_forms(x)))(x)
    return raw, float(raw)


def booleans_of_every_kind() -> st.SearchStrategy[Any]:
    return st.sampled_from([True, False, np.bool_(True), np.bool_(False), torch.tensor(True),
                            np.array(False)])


JUNK = st.one_of(
    st.none(), st.text(max_size=6), st.binary(max_size=3), st.just(object()),
    st.sampled_from([1j, complex(0.9, 0), {"a": 1}, {0.9}, [], [0.9], (0.9,), [[1]],
                     torch.tensor([0.9]), np.array([0.9, 0.8]), "0.9", "nan", b"1", ...]),
)


def _not_none(value: Any) -> bool:
    return value is not None


def _not_a_keep_ratio_list(value: Any) -> bool:
    """False for JUNK that is a valid per-block ``ratio`` ([0.9], (0.9,), a 1-d tensor or
    array of keep ratios)."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim != 1 or not len(value)
    if isinstance(value, (list, tuple)) and value:
        return not all(isinstance(v, float) and 0.5 <= v <= 1.0 for v in value)
    return True


# --- per-argument strategies ----------------------------------------------------------------

def ratios(valid: bool | None = None) -> st.SearchStrategy[Arg]:
    def verdict(pair):
        raw, x = pair
        return Arg(raw, 0.5 <= x <= 1.0, x)

    in_range = real(0.5, 1.0).map(verdict)
    integers = integral().map(lambda p: Arg(p[0], p[1] == 1, 1.0 if p[1] == 1 else None))
    anything = real().map(verdict)
    bad = st.one_of(
        anything.filter(lambda a: not a.ok), integers.filter(lambda a: not a.ok),
        booleans_of_every_kind().map(lambda v: Arg(v, False)),
        JUNK.filter(_not_none).filter(_not_a_keep_ratio_list).map(lambda v: Arg(v, False)),
        st.sampled_from([Fraction(1, 3), Fraction(3, 2), 10 ** 400, -10 ** 400]).map(
            lambda v: Arg(v, False)))
    good = st.one_of(in_range, st.just(Arg(1, True, 1.0)), st.just(Arg(np.int64(1), True, 1.0)),
                     st.just(Arg(Fraction(3, 4), True, 0.75)))
    return {True: good, False: bad, None: st.one_of(good, bad, anything, integers)}[valid]


def r_values(valid: bool | None = None, safe: bool = False) -> st.SearchStrategy[Arg]:
    """``r`` as an int, a 2-tuple ``(r, inflection)`` or a per-block list; ``meaning`` is
    ``("list", values)`` or ``("linear", r, inflection)``. Valid values may still be more
    than a model can merge (the schedule oracle decides); ``safe`` ones never are."""
    top = 4 if safe else 12
    ints = integral(0, top).map(lambda p: Arg(p[0], True, ("list", [p[1]] * DEPTH)))
    big = integral(13)
    huge = big.map(lambda p: Arg(p[0], True, ("list", [p[1]] * DEPTH)))
    inflections = real(-1.0, 1.0).map(lambda p: p if -1 <= p[1] <= 1 else (0.0, 0.0))
    inflections = st.one_of(inflections, integral(-1, 1).map(lambda p: (p[0], float(p[1]))))
    pair = st.tuples(integral(0, 3 if safe else 12), inflections).map(
        lambda t: Arg((t[0][0], t[1][0]), True, ("linear", t[0][1], t[1][1])))
    huge_pair = st.tuples(big, inflections).map(
        lambda t: Arg((t[0][0], t[1][0]), True, ("linear", t[0][1], t[1][1])))

    @st.composite
    def per_block(draw, max_len: int = DEPTH, top: int = top):
        entries = draw(st.lists(integral(0, top), max_size=max_len))
        raw = [e[0] for e in entries]
        kind = draw(st.sampled_from(["list", "tuple", "range"] if not entries else
                                    ["list", "list", "tuple"]))
        if kind == "tuple" and len(raw) != 2:
            raw = tuple(raw)
        elif kind == "range":
            stop = draw(st.integers(0, 3))
            raw, entries = range(stop), [(i, i) for i in range(stop)]
        values = [e[1] for e in entries]
        return Arg(raw, True, ("list", values + [0] * (DEPTH - len(values))))

    too_long = st.lists(integral(0, 3).map(lambda p: p[0]), min_size=DEPTH + 1,
                        max_size=DEPTH + 3).map(lambda v: Arg(v, False))
    negative = integral(max_value=-1).map(lambda p: Arg(p[0], False))
    bad_entry = st.one_of(integral(max_value=-1).map(lambda p: p[0]),
                          real().map(lambda p: p[0]), booleans_of_every_kind(),
                          st.sampled_from(["1", None, [1]]))
    bad_list = st.tuples(st.lists(integral(0, 3).map(lambda p: p[0]), max_size=2), bad_entry,
                         st.sampled_from([list, tuple])).map(
        lambda t: Arg(t[2]([*t[0], t[1]]) if len(t[0]) != 1 or t[2] is list
                      else [*t[0], t[1]], False))
    bad_pair = st.one_of(
        st.tuples(st.one_of(integral(max_value=-1).map(lambda p: p[0]), real().map(lambda p: p[0]),
                            booleans_of_every_kind(), st.just("8")),
                  inflections.map(lambda p: p[0])),
        st.tuples(integral(0, 12).map(lambda p: p[0]),
                  st.one_of(real().filter(lambda p: not -1 <= p[1] <= 1).map(lambda p: p[0]),
                            integral().filter(lambda p: not -1 <= p[1] <= 1).map(lambda p: p[0]),
                            booleans_of_every_kind(), st.just("0.5"), st.none())),
    ).map(lambda t: Arg(t, False))
    bad = st.one_of(
        negative, real().map(lambda p: Arg(p[0], False)),
        booleans_of_every_kind().map(lambda v: Arg(v, False)), too_long, bad_list, bad_pair,
        st.sampled_from(["16", b"8", {8}, {"r": 8}, np.array([8, 8]), torch.tensor([8]),
                         8.0, np.float64(8.0), [[8]]]).map(lambda v: Arg(v, False)))
    good = st.one_of(ints, pair, per_block()) if safe else \
        st.one_of(ints, ints, pair, per_block(), huge, huge_pair)
    return {True: good, False: bad, None: st.one_of(good, bad)}[valid]


def margins(valid: bool | None = None) -> st.SearchStrategy[Arg]:
    def verdict(pair):
        raw, x = pair
        return Arg(raw, -1.0 <= x <= 1.0, x)

    scalar = st.one_of(real(-1.0, 1.0), integral(-1, 1)).map(verdict)

    @st.composite
    def per_block(draw, length=st.just(DEPTH), entry=scalar):
        n = draw(length)
        items = draw(st.lists(entry, min_size=n, max_size=n))
        kind = draw(st.sampled_from([list, tuple]))
        ok = all(item.ok for item in items) and n == DEPTH
        return Arg(kind(item.value for item in items), ok,
                   [item.meaning for item in items] if ok else None)

    @st.composite
    def callables(draw, result=scalar):
        value = draw(result)
        return Arg(returning(value.value), value.ok, value.meaning)

    anything = st.one_of(real(), integral()).map(verdict)
    bad = st.one_of(
        anything.filter(lambda a: not a.ok),
        per_block(length=st.integers(0, 7).filter(lambda n: n != DEPTH)),
        per_block(entry=st.one_of(scalar, anything)).filter(lambda a: not a.ok),
        per_block(entry=st.one_of(scalar, JUNK.map(lambda v: Arg(v, False)),
                                  booleans_of_every_kind().map(lambda v: Arg(v, False)))
                  ).filter(lambda a: not a.ok),
        callables(anything).filter(lambda a: not a.ok),
        callables(st.one_of(JUNK, booleans_of_every_kind()).map(lambda v: Arg(v, False))),
        booleans_of_every_kind().map(lambda v: Arg(v, False)),
        JUNK.filter(_not_none).map(lambda v: Arg(v, False)))
    good = st.one_of(scalar, per_block(), callables())
    return {True: good, False: bad, None: st.one_of(good, bad)}[valid]


def merge_blocks_values(valid: bool | None = None) -> st.SearchStrategy[Arg]:
    @st.composite
    def indices(draw, entry):
        """``meaning`` is the sorted indices, or "beyond" when only indices past the depth
        are wrong (refused against the model, not by ``check_merge_blocks``)."""
        items = draw(st.lists(entry, max_size=5))
        ints = all(isinstance(item[1], int) and item[1] >= 0 for item in items)
        ok = ints and all(item[1] < DEPTH for item in items)
        # sets only of valid entries: {1, True} or {1, 1.0} would collapse to {1}
        hashable = not any(isinstance(item[0], np.ndarray) for item in items)
        kind = draw(st.sampled_from([list, tuple, set, frozenset] if ok and hashable
                                    else [list, tuple]))
        raw = kind(item[0] for item in items)
        meaning = tuple(sorted({item[1] for item in items})) if ok else \
            "beyond" if ints else None
        return Arg(raw, ok, meaning)

    good = st.one_of(indices(integral(0, DEPTH - 1)),
                     st.integers(0, DEPTH).map(lambda n: Arg(range(n), True, tuple(range(n)))))
    bad_entry = st.one_of(integral(max_value=-1), integral(min_value=DEPTH),
                          real().map(lambda p: (p[0], None)),
                          booleans_of_every_kind().map(lambda v: (v, None)),
                          st.sampled_from([("0", None), (None, None), ([0], None)]))
    bad = st.one_of(
        indices(st.one_of(integral(0, DEPTH - 1), bad_entry)).filter(lambda a: not a.ok),
        st.sampled_from(["012", b"0", 0, 2, {0: 1}, np.array([0, 1]), torch.tensor([0]), 0.5]
                        ).map(lambda v: Arg(v, False)))
    return {True: good, False: bad, None: st.one_of(good, bad)}[valid]


def flags(name: str, valid: bool | None = None) -> st.SearchStrategy[Arg]:
    defaultable = name in ("prop_attn", "count_prefix")
    good = st.sampled_from([True, False]).map(lambda v: Arg(v, True, v))
    if defaultable:
        good = st.one_of(good, st.just(Arg(None, True, None)))
    bad = st.one_of(
        st.sampled_from([0, 1, 2, 0.0, 1.0, "yes", "", "False", torch.tensor(True), [True]]
                        ).map(lambda v: Arg(v, False)),
        st.sampled_from([np.bool_(True), np.bool_(False)]).map(lambda v: Arg(v, None)))
    if not defaultable:  # None is not a bool, but reads as False
        bad = st.one_of(bad, st.just(Arg(None, None)))
    return {True: good, False: bad, None: st.one_of(good, bad)}[valid]


def metrics(valid: bool | None = None) -> st.SearchStrategy[Arg]:
    good = st.sampled_from(["keys", "hidden"]).map(lambda v: Arg(v, True, v))
    bad = st.one_of(st.text(max_size=6).filter(lambda s: s not in ("keys", "hidden")),
                    st.sampled_from([None, 0, "Keys", "HIDDEN", b"keys", ["keys"]])
                    ).map(lambda v: Arg(v, False))
    return {True: good, False: bad, None: st.one_of(good, bad)}[valid]


def _canonical(name: str) -> str:
    return name.lower().replace("-", "_")


@st.composite
def spelled(draw, name: str) -> str:
    """``name`` in any case, with any of its underscores written as hyphens."""
    out = []
    for char in name:
        if char == "_" and draw(st.booleans()):
            char = "-"
        elif char.isalpha() and draw(st.integers(0, 3)) == 0:
            char = char.upper()
        out.append(char)
    return "".join(out)


ALGORITHM_INSTANCES = [ToMe, PiToMe, DCT]


def algos(valid: bool | None = None) -> st.SearchStrategy[Arg]:
    """``meaning`` is the canonical registered name, or the instance."""
    names = st.sampled_from(ALGORITHMS).flatmap(
        lambda name: st.one_of(st.just(name), spelled(name)).map(
            lambda text: Arg(text, True, name)))
    instances = st.sampled_from(ALGORITHM_INSTANCES).map(lambda cls: cls()).map(
        lambda a: Arg(a, True, a))
    good = st.one_of(names, names, instances)
    unknown = st.one_of(
        st.text(max_size=12), st.sampled_from(ALGORITHMS).map(lambda n: f" {n}"),
        st.sampled_from(ALGORITHMS).map(lambda n: n + "s"),
        st.sampled_from(ALGORITHMS).map(lambda n: n.replace("_", " ")),
    ).filter(lambda s: _canonical(s) not in ALGORITHMS)
    bad = st.one_of(unknown, st.sampled_from([None, 0, 1, 3.5, b"tome", ["tome"], ("tome",),
                                              ToMe, {"tome"}, True])).map(lambda v: Arg(v, False))
    return {True: good, False: bad, None: st.one_of(good, bad)}[valid]


def options(valid: bool | None = None) -> st.SearchStrategy[Arg]:
    """Algorithm options: a valid set of them is empty (the algorithms' own options are
    checked by their constructors, a separate contract); unknown names are refused."""
    good = st.just(Arg({}, True, {}))
    bad = st.dictionaries(st.sampled_from(["bogus", "ratio_", "rr", "energy_kind"]),
                          st.integers(), min_size=1, max_size=2).map(lambda v: Arg(v, False))
    return {True: good, False: bad, None: st.one_of(good, bad)}[valid]


# --- direct checks of the validators: many cheap examples -----------------------------------

ANYTHING = st.one_of(real().map(lambda p: p[0]), integral().map(lambda p: p[0]),
                     booleans_of_every_kind(), JUNK,
                     st.lists(st.one_of(integral(-3, 9).map(lambda p: p[0]),
                                        real().map(lambda p: p[0])), max_size=6),
                     st.tuples(integral().map(lambda p: p[0]), real().map(lambda p: p[0])))


def _refusal(error: BaseException, name: str) -> None:
    assert isinstance(error, (ValueError, TypeError)), repr(error)
    message = str(error)
    assert message.strip(), f"{type(error).__name__} with an empty message"
    assert re.search(NAMES[name], message), f"{message!r} does not name {name}"


NAMES = {"algo": r"algo", "ratio": r"ratio", "r": r"(?<![\w])r(?![\w])", "margin": r"margin",
         "merge_blocks": r"merge_blocks", "metric": r"metric", "options": r"option",
         "prop_attn": r"prop_attn", "trace_source": r"trace_source", "keep_plans": r"keep_plans",
         "count_prefix": r"count_prefix"}


def _validator_property(check: Callable[[Any], Any], name: str, arg: Arg | Any) -> Any:
    value = arg.value if isinstance(arg, Arg) else arg
    ok = arg.ok if isinstance(arg, Arg) else None
    try:
        result = check(value)
    except Exception as error:  # noqa: BLE001 (any other type is the failure checked here)
        _refusal(error, name)
        assert ok is not True, f"{name}={value!r} is valid but was refused: {error}"
        return None
    assert ok is not False, f"{name}={value!r} is invalid but was accepted as {result!r}"
    return result


@settings(max_examples=examples(300), **SETTINGS)
@given(st.one_of(ratios(), ANYTHING))
@example(10 ** 400)  # was an OverflowError (float() before the range check)
@example(Arg(np.float32(1.00000001), True, 1.0))
def test_check_ratio_accepts_exactly_the_numbers_in_range(arg):
    result = _validator_property(check_ratio, "ratio", arg)
    if result is not None:
        assert type(result) is float and 0.5 <= result <= 1.0
        if isinstance(arg, Arg):
            assert result == arg.meaning


def _r_meaning(result) -> tuple:
    if isinstance(result, int):
        return ("list", [result] * DEPTH)
    if isinstance(result, tuple):
        return ("linear", *result)
    return ("list", list(result) + [0] * (DEPTH - len(result)))


@settings(max_examples=examples(300), **SETTINGS)
@given(st.one_of(r_values(), ANYTHING))
def test_check_r_accepts_ints_pairs_and_lists_of_non_negative_ints(arg):
    if isinstance(arg, Arg) and isinstance(arg.value, list) and len(arg.value) > DEPTH:
        arg = Arg(arg.value, None)  # too long for a model, not for check_r
    result = _validator_property(check_r, "r", arg)
    if result is not None and isinstance(arg, Arg) and arg.ok:
        assert _r_meaning(result) == arg.meaning


@settings(max_examples=examples(300), **SETTINGS)
@given(st.one_of(margins(), ANYTHING))
def test_check_margin_accepts_numbers_in_range_lists_and_callables(arg):
    if isinstance(arg, Arg) and isinstance(arg.value, (list, tuple)) and arg.ok is False \
            and len(arg.value) != DEPTH:
        arg = Arg(arg.value, None)  # the length is checked against the model later
    if isinstance(arg, Arg) and callable(arg.value):
        arg = Arg(arg.value, True)  # a callable's values are checked against the model later
    _validator_property(check_margin, "margin", arg)


@settings(max_examples=examples(300), **SETTINGS)
@given(st.one_of(merge_blocks_values(), ANYTHING))
def test_check_merge_blocks_accepts_non_negative_indices(arg):
    if isinstance(arg, Arg) and arg.meaning == "beyond":
        arg = Arg(arg.value, True)  # indices beyond the depth are checked against the model
    result = _validator_property(check_merge_blocks, "merge_blocks", arg)
    if result is not None:
        assert result == tuple(sorted(set(result)))
        assert all(type(index) is int and index >= 0 for index in result)


@settings(max_examples=examples(300), **SETTINGS)
@given(schedule=st.one_of(ratios(True).map(lambda a: {"ratio": a.value}),
                          r_values(True).map(lambda a: {"r": a.value})),
       blocks=st.one_of(st.none(), st.lists(st.integers(0, 30), max_size=6)),
       count_prefix=st.booleans(), clamp=st.booleans(),
       shape=st.integers(1, 400).flatmap(lambda tokens: st.tuples(
           st.just(tokens), st.integers(0, min(tokens - 1, 5)), st.integers(1, 30))))
@example(schedule={"r": (10 ** 400, 1.0)}, blocks=None, count_prefix=False, clamp=False,
         shape=(65, 1, 4))  # was an OverflowError in linear_r
@example(schedule={"r": (10 ** 308, -1.0)}, blocks=[3], count_prefix=False, clamp=False,
         shape=(65, 1, 4))
def test_token_schedule_plans_never_merge_more_than_half(schedule, blocks, count_prefix, clamp,
                                                        shape):
    tokens, prefix, depth = shape
    plan = TokenSchedule(**schedule, merge_blocks=blocks, count_prefix=count_prefix)
    try:
        plan.check_depth(depth)
        counts = plan.plan(tokens, prefix, depth, clamp=clamp)
    except Exception as error:  # noqa: BLE001
        _refusal(error, "merge_blocks" if "merge_blocks" in str(error) else "r")
        assert "ratio" not in schedule or "merge_blocks" in str(error)
        return
    assert len(counts) == depth
    remaining = tokens
    for block, r in enumerate(counts):
        assert type(r) is int and 0 <= r and 2 * r <= remaining - prefix
        if blocks is not None and block not in blocks:
            assert r == 0
        remaining -= r


# --- the model families ---------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    """A tiny model, its inputs and its output."""

    build: Callable[[], torch.nn.Module]
    inputs: Callable[[int], dict]
    output: Callable[[torch.nn.Module, dict], torch.Tensor]
    tokens: int  # tokens entering the first block
    num_prefix: int
    text: bool = False


def _timm(variant: str) -> Family:
    prefix = VARIANTS[variant]().num_prefix_tokens
    return Family(lambda: build_timm(variant), lambda b: {"x": timm_images(b)},
                  lambda m, kw: m(kw["x"]), 64 + prefix, prefix)


FAMILIES = {f"timm-{variant}": _timm(variant) for variant in VARIANTS}
for _name in ("hf-ViTModel", "hf-DeiTModel", "hf-SiglipVisionModel", "hf-BertModel",
              "hf-DistilBertModel", "open_clip-tok", "open_clip-avg"):
    if _name in CONTRACT_ROWS:
        _row = CONTRACT_ROWS[_name]
        FAMILIES[_name] = Family(_row.build, _row.inputs, _row.output, _row.tokens,
                                 _row.num_prefix, _row.text)
FAMILY_NAMES = sorted(FAMILIES)


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    if hasattr(model, "blocks"):  # timm
        return list(model.blocks)
    if hasattr(model, "transformer") and hasattr(model.transformer, "resblocks"):  # open_clip
        return list(model.transformer.resblocks)
    return list(find_adapter(model).stack(model))  # Hugging Face


def _cast(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def _merging_modules(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if type(module).__name__.startswith("Merging")]


@dataclass
class Trial:
    family: Family
    model: torch.nn.Module
    inputs: dict
    reference: torch.Tensor
    block_tokens: list[int] = field(default_factory=list)

    def run(self) -> torch.Tensor:
        self.block_tokens.clear()
        with torch.no_grad():
            return self.family.output(self.model, self.inputs)


_BUILT: dict[tuple[str, torch.dtype], tuple[torch.nn.Module, list[int], dict]] = {}


@contextlib.contextmanager
def trial_of(name: str, batch: int, dtype: torch.dtype) -> Iterator[Trial]:
    """A tiny model (built once per family and dtype: examples share it, each unpatching
    it after itself), its inputs and its unpatched output. A model that an example leaves
    patched, or any other way than clean, is dropped, so the next example builds it anew."""
    key = (name, dtype)
    family = FAMILIES[name]
    if key not in _BUILT:
        model = family.build().to(dtype).eval()
        block_tokens: list[int] = []

        def count(module, args, out):
            out = out[0] if isinstance(out, (tuple, list)) else out
            block_tokens.append(out.shape[1])

        for block in blocks_of(model):
            block.register_forward_hook(count)
        _BUILT[key] = model, block_tokens, {}
    model, block_tokens, references = _BUILT[key]
    if batch not in references:
        inputs = _cast(family.inputs(batch), dtype)
        with torch.no_grad():
            references[batch] = inputs, family.output(model, inputs)
    inputs, reference = references[batch]
    clean = False
    try:
        yield Trial(family, model, inputs, reference, block_tokens)
        clean = True
    finally:
        pitome.unpatch(model)
        if not clean or _merging_modules(model) or any(
                patch_of(module) is not None for module in model.modules()):
            del _BUILT[key]


# --- the schedule oracle --------------------------------------------------------------------

def expected_merges(ratio: float | None, r: tuple | None, merge_blocks: tuple[int, ...] | None,
                    count_prefix: bool, tokens: int, prefix: int,
                    clamp: bool = False, one_shot: bool = False) -> list[int] | None:
    """Tokens each block merges (SPEC: ``r = ⌊T′ − T′ρ⌋`` capped at half of the mergeable
    tokens, or the fixed ``r``), or None when a fixed ``r`` is more than a block can merge.
    A one-shot algorithm (VisionZip) removes their sum in the last merging block, and may
    remove more than half there.
    UNKNOWN when a huge ``(r, inflection)`` gives a merging block a small count, which binary
    rounding of ``linear_r`` may make zero or not."""
    if r is None:
        fixed = None
    elif r[0] == "linear" and r[1] > 2 ** 40:
        exact = _exact_linear_r(r[1], DEPTH, r[2])
        merging = [k for block, k in enumerate(exact)
                   if merge_blocks is None or block in merge_blocks]
        return None if any(k > tokens for k in merging) else UNKNOWN if merging else [0] * DEPTH
    elif r[0] == "linear":
        fixed = linear_r(r[1], DEPTH, r[2])
    else:
        fixed = r[1]
    counts, remaining = [], tokens
    for block in range(DEPTH):
        mergeable = remaining - prefix
        if merge_blocks is not None and block not in merge_blocks:
            k = 0
        elif fixed is None:
            k = min(tokens_to_merge(remaining if count_prefix else mergeable, ratio),
                    mergeable // 2)
        else:
            k = fixed[block]
        if clamp:
            k = min(k, max(mergeable, 0) // 2)
        if 2 * k > mergeable and not (one_shot and k < mergeable):
            return None
        counts.append(k)
        remaining -= k
    if one_shot:
        merging = [block for block in range(DEPTH) if merge_blocks is None or block in merge_blocks]
        total, counts = sum(counts), [0] * DEPTH
        if merging:
            counts[merging[-1]] = total
    return counts


UNKNOWN = "unknown"


def _exact_linear_r(r: int, num_blocks: int, inflection: float) -> list[int]:
    """``linear_r`` in exact arithmetic (for an ``r`` past what floats hold exactly)."""
    low = math.trunc(r * (1 - Fraction(inflection)))
    step = Fraction(2 * r - 2 * low, num_blocks - 1)
    return [math.trunc(low + step * i) for i in range(num_blocks)]


class Call:
    """The drawn arguments of one ``patch`` call, by name."""

    def __init__(self, args: dict[str, Arg]) -> None:
        self.args = args

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={arg!r}" for name, arg in self.args.items()
                          if arg.value is not OMIT and not (name == "options" and not arg.value))
        return f"patch(model, {shown})"

    def kwargs(self) -> dict[str, Any]:
        out = {}
        for name, arg in self.args.items():
            if arg.value is OMIT:
                continue
            if name == "options":
                out.update(arg.value)
            else:
                out[name] = arg.value
        return out

    def verdict(self) -> bool | None:
        """True when every argument is valid (and they go together), False when one is
        invalid, None when the outcome is left open."""
        oks = [arg.ok for arg in self.args.values()]
        if False in oks or self.conflict():
            return False
        return None if None in oks else True

    def conflict(self) -> str | None:
        """The argument a combination of valid ones is refused for, if any."""
        a = self.args
        if a["ratio"].value is not OMIT and a["ratio"].value is not None \
                and a["r"].value is not OMIT and a["r"].value is not None:
            return "ratio"
        algo = a["algo"].meaning
        if a["trace_source"].value is True and a["algo"].ok and not (
                algo.traceable if isinstance(algo, Algorithm) else algo != "dct"):
            return "trace_source"
        if isinstance(algo, Algorithm) and a["options"].value:
            return "options"
        return None


def resolved_algo(call: Call, model: torch.nn.Module) -> str | Algorithm:
    algo = call.args["algo"].meaning
    if isinstance(algo, Algorithm):
        return algo
    return get_method(find_adapter(model).preset_for(model, algo)).name


def oracle(call: Call, trial: Trial, tokens: int | None = None,
           clamp: bool = False) -> list[int] | None:
    a, model = call.args, trial.model
    algo = resolved_algo(call, model)
    ratio, r = a["ratio"].meaning, a["r"].meaning
    if a["ratio"].value is OMIT or a["ratio"].value is None:
        ratio = None
    if a["r"].value is OMIT:
        r = None
    if ratio is None and r is None:
        ratio = 0.9
    # a per-block r list is a whole schedule: the model's default merge_blocks do not apply
    per_block = r is not None and isinstance(a["r"].value, (list, tuple, range)) \
        and r[0] == "list"
    blocks = a["merge_blocks"].meaning if a["merge_blocks"].value is not OMIT else \
        find_adapter(model).merge_blocks_for(model, per_block=per_block)
    count_prefix = a["count_prefix"].meaning
    if count_prefix is None:
        count_prefix = False if isinstance(algo, Algorithm) else \
            get_method(algo).defaults.get("count_prefix", False)
    return expected_merges(ratio, r, blocks, count_prefix,
                           trial.family.tokens if tokens is None else tokens,
                           trial.family.num_prefix, clamp, one_shot(algo))


def one_shot(algo: str | Algorithm) -> bool:
    """Whether the algorithm reduces once, in the last merging block (VisionZip)."""
    return bool(getattr(algo if isinstance(algo, Algorithm) else get_method(algo).factory,
                        "one_shot", False))


# --- one patch call, checked ----------------------------------------------------------------

def attempt(call: Call, trial: Trial,
            earlier: dict | None = None) -> tuple[BaseException | None, str]:
    """Patch the trial's unpatched model (patched with ``earlier`` first, if given) and run
    it. Returns the ValueError or TypeError raised (if any) and where it was raised; any
    other exception propagates and fails the test."""
    if earlier is not None:
        pitome.patch(trial.model, **earlier)
    stage = "patch"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pitome.patch(trial.model, **call.kwargs())
            stage = "forward"
            trial.output = trial.run()
    except (ValueError, TypeError) as error:
        note(f"refused at {stage}: {type(error).__name__}: {error}")
        return error, stage
    return None, stage


def check_refusal(trial: Trial, error: BaseException, stage: str, earlier: dict | None) -> None:
    assert str(error).strip(), f"{type(error).__name__} with an empty message"
    model = trial.model
    if stage == "forward":  # the forward raised: no session is left behind, nothing recorded
        patch = patch_of(model)
        assert patch is not None and patch.runtime.current() is None
        assert pitome.merge_info(model) is None
    elif earlier is None:  # a refused patch changes nothing
        assert pitome.merge_config(model) is None
        assert not _merging_modules(model)
    else:  # the earlier patch is kept whole, and works
        assert pitome.merge_config(model).algo == get_method(earlier["algo"]).name
        trial.run()
        assert pitome.merge_info(model).token_counts[0] == trial.family.tokens
    pitome.unpatch(model)  # then the model is the unpatched one, bit for bit
    assert not _merging_modules(model)
    assert torch.equal(trial.run(), trial.reference)


def check_invariants(call: Call, trial: Trial, expected: list[int] | None) -> None:
    """The forward ran: the merge record matches the model's tokens and the schedule."""
    model, family, out = trial.model, trial.family, trial.output
    batch = next(iter(trial.inputs.values())).shape[0]
    info = pitome.merge_info(model)
    config = pitome.merge_config(model)
    algo = resolved_algo(call, model)
    if not isinstance(algo, Algorithm):
        assert config.algo == algo, "the algorithm's spelling changed what it resolved to"
    assert info is not None and len(info.merges) == DEPTH
    counts = info.token_counts
    assert counts[0] == family.tokens
    assert all(counts[i + 1] == counts[i] - info.merges[i] for i in range(DEPTH))
    assert trial.block_tokens == counts[1:], "the blocks' outputs disagree with merge_info"
    if expected is not None:
        assert info.merges == expected, "the merges do not follow the schedule"
    if not one_shot(algo):
        assert all(2 * r <= counts[i] - family.num_prefix for i, r in enumerate(info.merges))
    assert torch.isfinite(out.float()).all()
    if not any(info.merges):  # nothing merged: the unpatched model's output, bit for bit
        assert torch.equal(out, trial.reference)
        assert info.sizes is None
        return
    name = algo if isinstance(algo, str) else type(algo).__name__.lower()
    drops = name in DROPPING
    sizes = info.sizes[..., 0].float()
    assert sizes.shape == (batch, counts[-1])
    real = torch.ones_like(sizes, dtype=torch.bool) if info.padding is None else info.padding
    assert (sizes[real] > 0).all()
    assert torch.equal(sizes[:, :family.num_prefix], torch.ones(batch, family.num_prefix))
    held = (sizes * real).sum(dim=1)
    if family.text:
        lengths = trial.inputs["mask"].sum(dim=1)
        if info.padding is not None:  # right-padded still, each row on its own schedule
            kept = info.padding.sum(dim=1)
            positions = torch.arange(info.padding.shape[1])
            assert torch.equal(info.padding, positions < kept[:, None])
            for row, length in enumerate(lengths.tolist()):
                if expected is not None:
                    row_merges = oracle(call, trial, tokens=length, clamp=True)
                    assert kept[row] == length - sum(row_merges)
    else:
        lengths = torch.full((batch,), family.tokens)
    if drops:
        assert (held <= lengths).all()
    else:
        torch.testing.assert_close(held, lengths.float(), rtol=0, atol=1e-3)
    if info.source is not None:
        source = info.source
        assert source.shape == (batch, counts[-1], family.tokens)
        assert ((source == 0) | (source == 1)).all()
        covered = source.sum(dim=1)
        assert (covered <= 1).all(), "an input token is in two output tokens"
        if not drops:  # every real input token is in one output token (padding may go)
            inputs_real = trial.inputs["mask"].bool() if family.text else \
                torch.ones_like(covered, dtype=torch.bool)
            assert (covered[inputs_real] == 1).all(), "the sources do not cover the input"
        assert torch.equal(source.sum(dim=-1)[real], sizes[real])
        prefix = family.num_prefix
        assert torch.equal(source[:, :prefix], torch.eye(family.tokens)[:prefix].expand(
            batch, -1, -1))
    if config.keep_plans and info.padding is None:
        assert sorted(info.plans) == [i for i, r in enumerate(info.merges) if r]
        for block, plan in info.plans.items():
            assert plan.num_out == counts[block + 1]


def check_call(call: Call, trial: Trial, earlier: dict | None = None) -> None:
    error, stage = attempt(call, trial, earlier)
    verdict = call.verdict()
    expected = oracle(call, trial) if verdict else None
    if expected == UNKNOWN:
        verdict, expected = None, None
    if error is None:
        assert verdict is not False, f"an invalid call ran: {call}"
        if verdict:
            assert expected is not None, "r is more than the model can merge, yet it ran"
        check_invariants(call, trial, expected)
        pitome.unpatch(trial.model)
        assert not _merging_modules(trial.model) and pitome.merge_info(trial.model) is None
        assert torch.equal(trial.run(), trial.reference), "unpatch is not exact"
        return
    check_refusal(trial, error, stage, earlier)
    if verdict:  # every argument valid: only an r too large for this input, or DCT on padding
        merges = expected
        batch = next(iter(trial.inputs.values())).shape[0]
        dct_on_padding = resolved_algo(call, trial.model) == "dct" or isinstance(
            call.args["algo"].meaning, DCT)
        dct_on_padding = dct_on_padding and trial.family.text and batch > 1 and \
            merges is not None and any(merges)
        assert merges is None or dct_on_padding, f"a valid call was refused: {error}"
        if merges is None:
            _refusal(error, "r")


ARGUMENTS = ("algo", "ratio", "r", "margin", "merge_blocks", "prop_attn", "trace_source",
             "keep_plans", "count_prefix", "metric", "options")


def valid_arguments(safe: bool) -> dict[str, st.SearchStrategy[Arg]]:
    """Valid values for every argument, each often left out. ``ratio`` and ``r`` are drawn
    together: one of them, or neither."""
    return {
        "algo": st.one_of(omitted().map(lambda _: Arg(OMIT, True, "pitome")), algos(True)),
        "schedule": st.one_of(
            st.tuples(omitted(), omitted()), st.tuples(ratios(True), omitted()),
            st.tuples(omitted(), r_values(True, safe=safe))),
        "margin": st.one_of(omitted(), margins(True)),
        "merge_blocks": st.one_of(omitted(), omitted(), merge_blocks_values(True)),
        "prop_attn": st.one_of(omitted(), flags("prop_attn", True)),
        "trace_source": st.one_of(omitted(), flags("trace_source", True)),
        "keep_plans": st.one_of(omitted(), flags("keep_plans", True)),
        "count_prefix": st.one_of(omitted(), flags("count_prefix", True)),
        "metric": st.one_of(omitted(), metrics(True)),
        "options": options(True),
    }


def _fill(args: dict[str, Arg]) -> Call:
    ratio, r = args.pop("schedule")
    args = {**args, "ratio": ratio, "r": r}
    for flag in ("prop_attn", "count_prefix"):
        if args[flag].value is OMIT:
            args[flag] = Arg(OMIT, True, None)
    if args["trace_source"].value is OMIT:
        args["trace_source"] = Arg(OMIT, True, False)
    return Call(args)


def call_of(**given: Arg) -> Call:
    """A call of the given arguments, the others left out (for pinned examples)."""
    args = {name: given.get(name, Arg(OMIT, True)) for name in ARGUMENTS}
    if "algo" not in given:
        args["algo"] = Arg(OMIT, True, "pitome")
    args["options"] = given.get("options", Arg({}, True, {}))
    args["schedule"] = (args.pop("ratio"), args.pop("r"))
    return _fill(args)


def pinned(*examples: dict) -> Callable:
    """``hypothesis.example`` for each example whose model family is installed."""
    def decorate(test):
        for pin in reversed(examples):
            if pin["name"] in FAMILIES:
                test = example(**pin)(test)
        return test
    return decorate


HUGE_R = 10 ** 400
REGRESSIONS = (  # minimal failing examples the properties found, fixed since
    # the text preset was looked up before the name's case was folded: the vision default
    dict(call=call_of(algo=Arg("PITOME", True, "pitome")), name="hf-BertModel", batch=1,
         dtype=torch.float32),
    # linear_r overflowed on an r past float range (OverflowError, not ValueError)
    dict(call=call_of(r=Arg((HUGE_R, 1.0), True, ("linear", HUGE_R, 1.0))),
         name="hf-BertModel", batch=1, dtype=torch.float32),
    dict(call=call_of(r=Arg((HUGE_R, 1.0), True, ("linear", HUGE_R, 1.0)),
                      merge_blocks=Arg([0], True, (0,))), name="timm-vit", batch=2,
         dtype=torch.float32),
)


@st.composite
def valid_calls(draw, safe: bool = False) -> Call:
    call = _fill({name: draw(strategy) for name, strategy in valid_arguments(safe).items()})
    if call.conflict():  # a valid combination is wanted here
        call.args["trace_source"] = Arg(False, True, False)
    return call


INVALID = {name: strategy.filter(lambda a: a.ok is False) for name, strategy in {
    "algo": algos(False), "ratio": ratios(False), "r": r_values(False), "margin": margins(False),
    "merge_blocks": merge_blocks_values(False), "prop_attn": flags("prop_attn", False),
    "trace_source": flags("trace_source", False), "keep_plans": flags("keep_plans", False),
    "count_prefix": flags("count_prefix", False), "metric": metrics(False),
    "options": options(False)}.items()}
COMBINATIONS = ("ratio and r", "trace_source on dct")


@st.composite
def calls_with_one_fault(draw) -> tuple[Call, str]:
    """A valid call (with a schedule every model can follow) but for one bad argument, or
    one bad combination of valid ones; returns it and the argument its error must name."""
    call = draw(valid_calls(safe=True))
    fault = draw(st.sampled_from(sorted(INVALID) + list(COMBINATIONS)))
    args = call.args
    if fault == "ratio and r":
        args["ratio"], args["r"] = draw(ratios(True)), draw(r_values(True, safe=True))
        return call, "ratio"
    if fault == "trace_source on dct":
        args["algo"] = draw(st.sampled_from([Arg("dct", True, "dct"), Arg("DCT", True, "dct"),
                                             Arg(DCT(), True, DCT())]))
        args["trace_source"], args["options"] = Arg(True, True, True), Arg({}, True, {})
        return call, "trace_source"
    args[fault] = draw(INVALID[fault])
    if fault in ("ratio",):
        args["r"] = Arg(OMIT, True, None)
    if fault == "r":
        args["ratio"] = Arg(OMIT, True, None)
    if fault != "algo" and call.conflict():
        args["trace_source"] = Arg(False, True, False)
    return call, fault


@st.composite
def any_calls(draw) -> Call:
    """Every argument from valid and invalid values alike, ratio and r independently."""
    args = {
        "algo": draw(st.one_of(omitted().map(lambda _: Arg(OMIT, True, "pitome")), algos())),
        "schedule": (draw(st.one_of(omitted(), ratios())), draw(st.one_of(omitted(),
                                                                          r_values()))),
        "margin": draw(st.one_of(omitted(), margins())),
        "merge_blocks": draw(st.one_of(omitted(), merge_blocks_values())),
        "prop_attn": draw(st.one_of(omitted(), flags("prop_attn"))),
        "trace_source": draw(st.one_of(omitted(), flags("trace_source"))),
        "keep_plans": draw(st.one_of(omitted(), flags("keep_plans"))),
        "count_prefix": draw(st.one_of(omitted(), flags("count_prefix"))),
        "metric": draw(st.one_of(omitted(), metrics())),
        "options": draw(st.one_of(options(True), options())),
    }
    return _fill(args)


SHAPES = dict(name=st.sampled_from(FAMILY_NAMES), batch=st.integers(1, 3),
              dtype=st.sampled_from([torch.float32] * 4 + [torch.bfloat16]))  # bf16: 1 in 5


# --- the properties over models -------------------------------------------------------------

@settings(max_examples=examples(200), **SETTINGS)
@given(call=valid_calls(), **SHAPES)
@pinned(*REGRESSIONS)
def test_valid_arguments_merge_by_the_schedule_with_the_invariants(call, name, batch, dtype):
    """Valid arguments always run (unless ``r`` is more than the input can merge, a
    ValueError naming r), and the merge record matches the model and the schedule."""
    with trial_of(name, batch, dtype) as trial:
        check_call(call, trial)


@settings(max_examples=examples(160), **SETTINGS)
@given(fault=calls_with_one_fault(), **SHAPES)
@pinned(*(dict(fault=(call_of(margin=Arg(returning(value), False)), "margin"), name="timm-vit",
               batch=1, dtype=torch.float32)
          # was float()'s TypeError not naming margin, an OverflowError, and accepted
          for value in (None, 10 ** 400, "0.5")))
def test_one_bad_argument_is_refused_naming_it_and_changes_nothing(fault, name, batch, dtype):
    call, argument = fault
    with trial_of(name, batch, dtype) as trial:
        error, stage = attempt(call, trial)
        assert error is not None, f"{argument}={call.args[argument]!r} was accepted"
        _refusal(error, argument)
        check_refusal(trial, error, stage, None)


@settings(max_examples=examples(120), **SETTINGS)
@given(call=any_calls(), earlier=st.sampled_from([None, dict(algo="tome", ratio=0.8)]),
       **SHAPES)
def test_any_arguments_run_correctly_or_raise_value_or_type_error(call, earlier, name, batch,
                                                                 dtype):
    """Any mix of arguments, on a fresh or an already patched model: a ValueError or
    TypeError with a message, or a forward whose merge record holds the invariants."""
    with trial_of(name, batch, dtype) as trial:
        check_call(call, trial, earlier)
