"""Bad input gets an error that names the problem, never a shape error."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import build, images
from torch import nn

import pitome
from pitome._optional import MissingDependencyError, require


@pytest.mark.parametrize("ratio", [0.49, 1.01, -1.0, float("nan")])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match="ratio"):
        pitome.patch(build("vit"), ratio=ratio)


def test_impossible_r_is_refused_at_patch_time():
    model = build("vit")  # 64 patches
    with pytest.raises(ValueError, match="cannot merge r=40"):
        pitome.patch(model, r=40)
    assert pitome.merge_info(model) is None
    assert type(model).__name__ == "VisionTransformer"


def test_ratio_and_r_together_are_refused():
    with pytest.raises(ValueError, match="exactly one"):
        pitome.patch(build("vit"), ratio=0.9, r=4)


def test_unknown_algorithm_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown algorithm 'tomato'.*pitome"):
        pitome.patch(build("vit"), algo="tomato")


def test_unknown_option_names_the_accepted_ones():
    with pytest.raises(TypeError, match="does not take option.*'poool'.*pool"):
        pitome.patch(build("vit"), algo="pitome_paper", poool=2)


def test_unknown_metric():
    with pytest.raises(ValueError, match="metric"):
        pitome.patch(build("vit"), metric="queries")


def test_unsupported_model_names_what_is_supported():
    with pytest.raises(pitome.UnsupportedModelError, match="(?s)cannot patch a Linear.*VisionTransformer"):
        pitome.patch(nn.Linear(3, 3))


def test_unsupported_attention_names_the_block():
    model = build("vit")

    class MyAttention(nn.Module):
        def forward(self, x):
            return x

    model.blocks[2].attn = MyAttention()
    with pytest.raises(pitome.UnsupportedModelError, match="block 2 uses MyAttention"):
        pitome.patch(model)


def test_missing_optional_dependency_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what an absent package looks like
    with pytest.raises(MissingDependencyError, match=r"pip install 'pitome\[hf\]'"):
        require("transformers", "hf")


def test_patch_returns_the_model_and_info_after_forward():
    model = build("vit")
    assert pitome.patch(model) is model
    assert pitome.merge_info(model) is None
    model(images(1))
    info = pitome.merge_info(model)
    assert info.algo == "pitome" and info.token_counts[0] == 65
    assert info.source is None


def test_supported_models_and_algorithms_are_listed():
    assert any("VisionTransformer" in line for line in pitome.supported_models())
    assert {"pitome", "pitome_paper", "pitome_deit", "bsm_pitome", "tome"} <= set(
        pitome.available_algorithms())


def test_margin_float_and_schedule_are_accepted():
    model = build("vit")
    x = images(1)
    with torch.no_grad():
        pitome.patch(model, algo="pitome_paper", ratio=0.8, margin=0.5)
        fixed = model(x)
        pitome.patch(model, algo="pitome_paper", ratio=0.8, margin=[0.9, 0.5, 0.2, 0.0])
        scheduled = model(x)
    assert not torch.allclose(fixed, scheduled)


def test_cuda_graph_refuses_a_cpu_input():
    from pitome.cuda_graph import CudaGraphForward

    with pytest.raises(ValueError, match="CUDA input"):
        CudaGraphForward(build("vit"), images(1))
