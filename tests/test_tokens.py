"""``pitome.patch(model, algo, tokens=N)``: every registered algorithm leaves exactly N tokens
(prefix not counted) on timm and Hugging Face vision models, or is refused at patch time."""

from __future__ import annotations

import pytest
import torch
from conftest import build, images, tiny_clip_vision

import pitome

ALGORITHMS = sorted(pitome.available_algorithms())


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_reaches_the_token_count_on_timm(algo):
    model = build("vit")  # 64 patches and CLS, 4 blocks
    pitome.patch(model, algo, tokens=10)
    with torch.no_grad():
        features = model.forward_features(images(2))
    assert features.shape[1] == 11  # ten tokens and CLS
    assert pitome.merge_info(model).token_counts[-1] == 11


def test_hf_clip_vision_reaches_the_token_count_and_refuses_the_unreachable():
    pytest.importorskip("transformers")
    model = tiny_clip_vision()
    pitome.patch(model, "pitome", tokens=12)
    with torch.no_grad():
        out = model(pixel_values=images(2)).last_hidden_state
    assert out.shape[1] == 13
    with pytest.raises(ValueError, match=r"tokens=3 is out of reach.*tokens >= 4"):
        pitome.patch(model, "tome", tokens=3)  # refused at patch time, the patch kept
    assert pitome.merge_config(model).schedule.tokens == 12
    with pytest.raises(ValueError, match="exactly one of ratio"):
        pitome.patch(model, "tome", ratio=0.9, tokens=12)
