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

if "PYTEST_XDIST_WORKER" in os.environ:
    # Each worker is a process of its own: one thread each keeps the cores from
    # oversubscribing (the tests' models are too small to gain from more).
    torch.set_num_threads(1)

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


def tiny_clip_vision() -> torch.nn.Module:
    """A 4-layer Hugging Face ``CLIPVisionModel`` on 64-pixel images (64 patches + CLS)."""
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, intermediate_size=128,
                                           image_size=64, patch_size=8)
    return transformers.CLIPVisionModel(config).eval()


def word_tokenizer(words: list[str], **special: str):
    """A BERT-style word-level fast tokenizer: ``[PAD] [UNK] [CLS] [SEP]`` (ids 0-3), then
    ``words``; each sentence is wrapped in ``[CLS] … [SEP]``. ``special`` passes further
    tokenizer settings (e.g. ``mask_token``, ``model_max_length``)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {word: index
             for index, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", **special)


def need_shared() -> None:
    if not (VIT_TINY.is_file() and IMAGENET_SAMPLE.is_dir()):
        pytest.skip(f"shared ViT-Tiny weights and ImageNet sample not found under {SHARED}")


def image_folder(root: Path, classes: int = 2, per_class: int = 3,
                 broken: str | None = None) -> Path:
    """An ImageFolder tree of small random PNGs (``n0000000{label}/img{i}.png``), plus a file
    named ``broken`` in the first class that no image library can decode."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for label in range(classes):
        folder = root / f"n0000000{label}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            pixels = (torch.rand(40, 48, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"img{index}.png")
    if broken:
        (root / "n00000000" / broken).write_bytes(b"\xff\xd8\xff not an image")
    return root
