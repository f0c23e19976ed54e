"""VisionZip: dominant tokens by CLS attention, contextual merging of the rest, one shot."""

from __future__ import annotations

import pytest
import torch
from conftest import build, images, tiny_clip_vision

import pitome
from pitome.algorithms import VisionZip
from pitome.algorithms.visionzip import split_counts
from pitome.core.registry import MergeContext


def constructed(batch: int = 2, tokens: int = 21, width: int = 8):
    """CLS plus ``tokens - 1`` tokens with a known attention ranking."""
    generator = torch.Generator().manual_seed(0)
    metric = torch.randn(batch, tokens, width, generator=generator)
    attention = torch.rand(batch, tokens, generator=generator)
    return metric, attention


def test_dominant_tokens_are_the_most_cls_attended_and_the_rest_merge_into_targets():
    metric, attention = constructed()
    ctx = MergeContext(r=12, num_prefix=1, block=3, num_blocks=4, margin=0.0,
                       attention=attention)
    plan = VisionZip(contextual=0.25)(metric, ctx)  # 8 kept: 6 dominant + 2 contextual
    assert plan.num_out == 9 and plan.src.shape[1] == 12 and not plan.drop_src
    dominant = plan.keep[:, 1:7] - 1
    expected = attention[:, 1:].topk(6, dim=1).indices.sort(dim=1).values
    assert torch.equal(dominant, expected)
    assert (plan.keep[:, 0] == 0).all()  # CLS stays first
    # Every remaining token either is a target or merges into its most similar target.
    unit = torch.nn.functional.normalize(metric, dim=-1)
    for item in range(2):
        targets = plan.keep[item, 7:]
        rest = sorted(set(range(1, 21)) - set(plan.keep[item, 1:7].tolist()))
        assert set(targets.tolist()) | set(plan.src[item].tolist()) == set(rest)
        assert targets.tolist() == [rest[0], rest[7]]  # evenly spaced among the rest
        for source, slot in zip(plan.src[item], plan.dst[item]):
            similarity = unit[item, source] @ unit[item, targets].T
            assert plan.keep[item, slot] == targets[similarity.argmax()]
    sizes = plan.apply(torch.ones(2, 21, 1), "sum")
    assert (sizes.sum(dim=1) == 21).all() and (sizes[:, :7] == 1).all()


def test_only_dominant_tokens_without_contextual_ones():
    metric, attention = constructed()
    ctx = MergeContext(r=15, num_prefix=1, block=0, num_blocks=1, margin=0.0,
                       attention=attention)
    plan = VisionZip(contextual=0.0)(metric, ctx)
    assert plan.drop_src and plan.num_out == 6
    assert split_counts(64, 10 / 64) == (54, 10) and split_counts(192, 10 / 64) == (162, 30)
    with pytest.raises(ValueError, match="contextual"):
        VisionZip(contextual=1.0)


@pytest.mark.parametrize("spec", [dict(tokens=7), dict(ratio=0.8)])
def test_visionzip_on_timm_reduces_once_in_the_last_block(spec):
    model = build("vit")
    pitome.patch(model, "visionzip", **spec, trace_source=True)
    with torch.no_grad():
        features = model.forward_features(images(2))
    info = pitome.merge_info(model)
    reached = 7 if "tokens" in spec else 28  # what ratio 0.8 reaches: 64, 52, 42, 34, 28
    assert info.merges[:3] == [0, 0, 0] and features.shape[1] == reached + 1
    assert torch.equal(info.sizes.sum(dim=1).squeeze(-1), torch.full((2,), 65.0))
    assert (info.source.sum(dim=1) == 1).all()  # every input token is in one output token


def test_visionzip_on_hf_clip_vision_keeps_the_exact_count():
    pytest.importorskip("transformers")
    model = tiny_clip_vision()
    pitome.patch(model, "visionzip", tokens=5)
    with torch.no_grad():
        out = model(pixel_values=images(2)).last_hidden_state
    assert out.shape[1] == 6 and pitome.merge_info(model).merges == [0, 0, 0, 59]
