"""On a CUDA device, Hugging Face and open_clip models: the fused kernels (proportional
attention, energy, merge) agree with their PyTorch twins, CUDA graphs replay the merged
forward, and merging never raises peak memory above the unpatched model's.

Skipped without CUDA; the shapes are small but long enough (197 tokens) for every kernel
to run rather than fall back.
"""

from __future__ import annotations

import pytest
import torch

import pitome
from pitome.cuda_graph import CudaGraphForward
from pitome.kernels.backend import kernel_backend

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
             image_size=224, patch_size=16)


def hf_clip():
    config = transformers.CLIPVisionConfig(**SMALL, attn_implementation="sdpa")
    model = transformers.CLIPVisionModel(config)
    return model, lambda m, x: m(pixel_values=x).last_hidden_state


def hf_vit():
    config = transformers.ViTConfig(**SMALL, attn_implementation="sdpa")
    model = transformers.ViTModel(config, add_pooling_layer=False)
    return model, lambda m, x: m(pixel_values=x).last_hidden_state


def open_clip_tower():
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    model = VisionTransformer(image_size=224, patch_size=16, width=128, layers=4, heads=4,
                              mlp_ratio=2.0, output_dim=64)
    return model, lambda m, x: m(x)


FAMILIES = {"hf-clip": hf_clip, "hf-vit": hf_vit, "open_clip": open_clip_tower}


def pixels(batch: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=generator).cuda().to(torch.bfloat16)


def built(name: str):
    torch.manual_seed(0)
    model, run = FAMILIES[name]()
    return model.cuda().to(torch.bfloat16).eval(), run


@pytest.mark.parametrize("algo", ["pitome", "tome"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fused_kernels_agree_with_the_pytorch_twins(name, algo):
    model, run = built(name)
    pitome.patch(model, algo=algo, ratio=0.9, prop_attn=True)
    x = pixels(8)
    with torch.inference_mode():
        fused = run(model, x).float()
        fused_counts = pitome.merge_info(model).token_counts
        with kernel_backend("torch"):
            twin = run(model, x).float()
        twin_counts = pitome.merge_info(model).token_counts
    assert fused_counts == twin_counts and fused_counts[-1] < fused_counts[0]
    assert (fused - twin).norm() / twin.norm() < 3e-2


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_cuda_graph_replays_the_merged_forward(name):
    model, run = built(name)
    pitome.patch(model, algo="pitome", ratio=0.9, prop_attn=True)
    x = pixels(4)
    with torch.inference_mode():
        eager = run(model, x)
    graphed = CudaGraphForward(lambda inputs: run(model, inputs), x)
    torch.testing.assert_close(graphed(x), eager)
    other = pixels(4, seed=3)
    with torch.inference_mode():
        torch.testing.assert_close(graphed(other), run(model, other))


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_peak_memory_not_above_unpatched(name):
    model, run = built(name)
    x = pixels(64)

    def peak() -> int:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            run(model, x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    unpatched = peak()
    for algo in ("pitome", "tome"):
        pitome.patch(model, algo=algo, ratio=0.9)
        assert peak() <= unpatched, algo
