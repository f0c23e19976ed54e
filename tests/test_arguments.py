"""Every ``pitome.patch`` argument is checked at patch time: one clear error naming the
argument, the value and what is allowed; numpy and 0-d tensor scalars are numbers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import build, images

import pitome


def merges(**arguments) -> list[int]:
    model = build("vit")
    pitome.patch(model, algo="tome", **arguments)
    with torch.no_grad():
        model(images(1))
    return pitome.merge_info(model).merges


def test_a_two_tuple_is_r_and_inflection_never_a_per_block_list():
    assert merges(r=(8, 0)) == [8, 8, 8, 8]
    assert merges(r=(4, 1)) == [0, 2, 5, 8]  # linear from r·(1−1) to r·(1+1)
    assert merges(r=[8, 1]) == [8, 1, 0, 0]  # a list is per block


@pytest.mark.parametrize("scalar", [np.int64(8), np.int32(8), torch.tensor(8)])
def test_integer_scalars_of_numpy_and_torch_are_r(scalar):
    assert merges(r=scalar) == [8, 8, 8, 8]


@pytest.mark.parametrize("scalar", [np.float32(0.9), np.float64(0.9), torch.tensor(0.9)])
def test_real_scalars_of_numpy_and_torch_are_ratios(scalar):
    assert merges(ratio=scalar) == merges(ratio=0.9)


@pytest.mark.parametrize("arguments,error,message", [
    (dict(r="16"), TypeError, r"r must be an int, a list of ints .* got '16'"),
    (dict(r=8.5), TypeError, r"r must be .* got 8.5"),
    (dict(r=True), TypeError, r"r must be .* got True"),
    (dict(r=[8, 1.5]), ValueError, r"r=\[8, 1.5\]: a per-block list holds non-negative ints"),
    (dict(r=(8, 3.0)), ValueError, r"r=\(8, 3.0\): a 2-tuple is \(r, inflection\)"),
    (dict(r=-2), ValueError, r"r must be non-negative, got -2"),
    (dict(ratio="0.9"), TypeError, r"ratio must be a number in \[0.5, 1\] or a list of them "
                                   r".* got '0.9'"),
    (dict(ratio=[0.9, 0.4]), ValueError, r"ratio=\[0.9, 0.4\]: block 1 has 0.4; a per-block "
                                         r"list holds keep ratios in \[0.5, 1\]"),
    (dict(ratio=[0.9, "x"]), ValueError, r"ratio=\[0.9, 'x'\]: block 1 has 'x'"),
    (dict(ratio=[]), ValueError, r"ratio=\[\]: a per-block list needs at least one"),
    (dict(ratio=[0.9] * 5), ValueError, r"ratio lists 5 keep ratios but the model has 4 blocks"),
    (dict(ratio=np.float32(0.3)), ValueError, r"ratio=0.3.* is out of range"),
    (dict(merge_blocks=[100]), ValueError, r"merge_blocks=\[100\] names block\(s\) \[100\], "
                                           r"but the model has 4 blocks"),
    (dict(merge_blocks=[-1]), ValueError, r"merge_blocks=\[-1\]: block indices are ints"),
    (dict(merge_blocks=[0.5]), ValueError, r"merge_blocks=\[0.5\]: block indices are ints"),
    (dict(merge_blocks="012"), TypeError, r"merge_blocks must be a list of block indices"),
    (dict(margin=[0.5, 0.4]), ValueError, r"margin lists 2 values but the model has 4 blocks"),
    (dict(margin="0.5"), TypeError, r"margin must be a number in \[-1, 1\].* got '0.5'"),
    (dict(margin=math.nan), ValueError, r"margin=nan: a margin is a cosine similarity"),
    (dict(margin=[0.5, 0.5, 2.0, 0.5]), ValueError, r"margin=\[.*\]: a margin is a cosine"),
    (dict(margin=lambda block, blocks: 3.0), ValueError, r"margin gives block 0 the value 3.0"),
    (dict(algo=None), TypeError, r"algo must be a registered algorithm's name .* got None"),
    (dict(algo="tomme"), ValueError, r"unknown algorithm 'tomme'; available: "),
    (dict(prop_attn="yes"), TypeError, r"prop_attn must be True or False, got 'yes'"),
    (dict(trace_source=1), TypeError, r"trace_source must be True or False, got 1"),
    (dict(count_prefix="no"), TypeError, r"count_prefix must be True or False, got 'no'"),
])
def test_bad_arguments_fail_at_patch_time_naming_themselves(arguments, error, message):
    model = build("vit")
    arguments.setdefault("algo", "pitome")
    with pytest.raises(error, match=message):
        pitome.patch(model, **arguments)
    assert pitome.merge_config(model) is None
    assert not any("Merging" in type(module).__name__ for module in model.modules())


@pytest.mark.parametrize("refused", [dict(merge_blocks=[9]), dict(margin=[0.5, 0.4]),
                                     dict(r=40), dict(ratio=0.2)])
def test_a_refused_patch_keeps_the_earlier_one(refused):
    # Some checks need the model (its depth, its token count) and run as the adapter
    # patches; the earlier patch must survive them as it survives the others.
    model = build("vit")
    pitome.patch(model, algo="tome", ratio=0.8)
    x = images(2)
    with torch.no_grad():
        before = model(x)
    with pytest.raises((ValueError, TypeError)):
        pitome.patch(model, algo="pitome", **refused)
    config = pitome.merge_config(model)
    assert config is not None and config.algo == "tome" and config.schedule.ratio == 0.8
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
