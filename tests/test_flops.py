"""MAC counts against known published values and hand arithmetic."""

from __future__ import annotations

import pytest
import timm

from pitome.algorithms import PiToMe, ToMe
from pitome.algorithms.pitome import tome_then_pitome
from pitome.analysis.flops import VitShape, block_macs, similarity_macs, vit_macs
from pitome.core.schedule import TokenSchedule, token_counts


def test_vit_base_matches_the_published_17_6_gmacs():
    shape = VitShape.of(timm.create_model("vit_base_patch16_224"))
    assert vit_macs(shape, [197] * 13, 196) / 1e9 == pytest.approx(17.56, abs=0.01)


def test_ratio_09_saves_about_40_percent_on_12_blocks():
    shape = VitShape.of(timm.create_model("vit_base_patch16_224"))
    counts = token_counts(197, TokenSchedule(ratio=0.9).plan(197, 1, 12))
    assert counts == [197, 178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60]
    saved = 1 - vit_macs(shape, counts, 196) / vit_macs(shape, [197] * 13, 196)
    assert 0.38 < saved < 0.46


def test_block_macs_by_hand():
    assert block_macs(10, 6, width=4, mlp_hidden=16) == 4 * 10 * 16 + 2 * 100 * 4 + 2 * 6 * 4 * 16


def test_pitome_similarity_is_about_four_times_tomes():
    counts = [197, 178]
    paper, tome = PiToMe(), ToMe()
    ratio = similarity_macs(paper, counts, 1, 64) / similarity_macs(tome, counts, 1, 64)
    assert ratio == pytest.approx(4.0, rel=0.01)
    assert similarity_macs(tome, [197, 197], 1, 64) == 0
    # The default hybrid counts ToMe's pairs in the first half of the blocks, PiToMe's after.
    counts = [197, 178, 161, 145, 131]
    hybrid = similarity_macs(tome_then_pitome(), counts, 1, 64)
    assert hybrid == similarity_macs(tome, counts[:3], 1, 64) + similarity_macs(
        paper, counts[2:], 1, 64)


def test_wrong_number_of_counts():
    shape = VitShape.of(timm.create_model("vit_tiny_patch16_224"))
    with pytest.raises(ValueError, match="13 token counts"):
        vit_macs(shape, [197] * 12, 196)


@pytest.mark.parametrize("name,algo", [
    ("vit_small_patch16_224", None), ("vit_small_patch16_224", "tome"),
    ("vit_small_patch16_224", "pitome"), ("vit_small_patch16_224", "mctf"),
    ("vit_base_patch16_224", None), ("vit_base_patch16_224", "pitome"),
    ("vit_large_patch16_224", None), ("vit_large_patch16_224", "pitome")])
def test_analytic_flops_match_torch_flop_counter(name, algo):
    import torch

    import pitome
    from pitome.analysis.flops import counted_flops, flops

    model = timm.create_model(name).eval()
    if algo is not None:
        pitome.patch(model, algo=algo, ratio=0.9)
    inputs = torch.randn(1, 3, 224, 224)
    report = flops(model, inputs)
    assert report.total_flops == pytest.approx(counted_flops(model, inputs), rel=0.02)
    if algo is None:
        assert report.merge_macs == 0 and report.blocks[-1].tokens_out == 197
    else:
        assert report.blocks[-1].tokens_out < 100 and report.merge_macs > 0


@pytest.mark.parametrize("cls_name,algo", [
    ("ViTForImageClassification", None), ("ViTForImageClassification", "pitome"),
    ("DeiTForImageClassificationWithTeacher", None),
    ("DeiTForImageClassificationWithTeacher", "tome")])
def test_analytic_flops_match_the_counter_on_hugging_face_models(cls_name, algo):
    import torch

    import pitome
    from pitome.analysis.flops import counted_flops, flops

    transformers = pytest.importorskip("transformers")
    config_cls = transformers.DeiTConfig if cls_name.startswith("DeiT") else transformers.ViTConfig
    config = config_cls(hidden_size=192, num_hidden_layers=6, num_attention_heads=3,
                        intermediate_size=768, num_labels=1000)  # a ViT-Tiny-sized, 224 px
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(config).eval()
    if algo is not None:
        pitome.patch(model, algo=algo, ratio=0.9)
    inputs = torch.randn(1, 3, 224, 224)
    report = flops(model, inputs)
    assert report.total_flops == pytest.approx(counted_flops(model, inputs), rel=0.02)
    prefix = 2 if cls_name.startswith("DeiT") else 1
    assert report.blocks[0].tokens_in == 196 + prefix
    assert (report.merge_macs > 0) == (algo is not None)
