"""The shared ViT-Tiny on the 500 shared ImageNet images reproduces SPEC §10.

Skipped with a reason when ../shared is absent. One module-scoped fixture decodes the images
and runs the unmerged model once (about 25 s on two CPU cores); each row adds about 8 s.
"""

from __future__ import annotations

import pytest
import torch
from conftest import IMAGENET_SAMPLE, VIT_TINY, need_shared

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
