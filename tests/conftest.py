"""Shared fixtures: tiny timm models of every supported variant, and the real shared data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels are tested in Triton's interpreter, which must be
    # chosen before Triton is first imported (timm imports it).
    os.environ.setdefault("TRITON_INTERPRET", "1")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VIT_TINY = SHARED / "models" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
IMAGENET_SAMPLE = SHARED / "data" / "imagenet-sample"

timm = pytest.importorskip("timm")
from timm.models.deit import VisionTransformerDistilled  # noqa: E402
from timm.models.vision_transformer import ResPostBlock, VisionTransformer  # noqa: E402

TINY = dict(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=3, num_classes=10)

# Every timm VisionTransformer variant the adapter promises to support.
VARIANTS = {
    "vit": lambda: VisionTransformer(**TINY),
    "deit_distilled": lambda: VisionTransformerDistilled(**TINY),
    "deit3_layerscale": lambda: VisionTransformer(**TINY, init_values=1e-2, no_embed_class=True),
    "qk_norm": lambda: VisionTransformer(**TINY, qk_norm=True),
    "registers": lambda: VisionTransformer(**TINY, reg_tokens=4, no_embed_class=True),
    "avgpool_no_cls": lambda: VisionTransformer(**TINY, class_token=False, global_pool="avg",
                                                fc_norm=True),
    "clip_prenorm": lambda: VisionTransformer(**TINY, pre_norm=True),
    "res_post": lambda: VisionTransformer(**TINY, block_fn=ResPostBlock),
}


def build(variant: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return VARIANTS[variant]().eval()


@pytest.fixture(params=sorted(VARIANTS))
def variant(request) -> str:
    return request.param


def images(batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, TINY["img_size"], TINY["img_size"], generator=generator)


def need_shared() -> None:
    if not (VIT_TINY.is_file() and IMAGENET_SAMPLE.is_dir()):
        pytest.skip(f"shared ViT-Tiny weights and ImageNet sample not found under {SHARED}")
