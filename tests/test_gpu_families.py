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


def hf_clip(**shape):
    config = transformers.CLIPVisionConfig(**{**SMALL, **shape}, attn_implementation="sdpa")
    model = transformers.CLIPVisionModel(config)
    return model, lambda m, x: m(pixel_values=x).last_hidden_state


def hf_vit(**shape):
    config = transformers.ViTConfig(**{**SMALL, **shape}, attn_implementation="sdpa")
    model = transformers.ViTModel(config, add_pooling_layer=False)
    return model, lambda m, x: m(pixel_values=x).last_hidden_state


def open_clip_tower(**shape):
    open_clip = pytest.importorskip("open_clip")
    from open_clip.transformer import VisionTransformer

    shape = {**SMALL, **shape}
    model = VisionTransformer(image_size=224, patch_size=16, width=shape["hidden_size"],
                              layers=shape["num_hidden_layers"],
                              heads=shape["num_attention_heads"],
                              mlp_ratio=shape["intermediate_size"] / shape["hidden_size"],
                              output_dim=64)
    return model, lambda m, x: m(x)


FAMILIES = {"hf-clip": hf_clip, "hf-vit": hf_vit, "open_clip": open_clip_tower}


def pixels(batch: int, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=generator).cuda().to(dtype)


def built(name: str, dtype: torch.dtype = torch.bfloat16, **shape):
    torch.manual_seed(0)
    model, run = FAMILIES[name](**shape)
    return model.cuda().to(dtype).eval(), run


def summary(output: torch.Tensor) -> torch.Tensor:
    """What does not depend on the order of the merged tokens: the class token (HF) or the
    pooled embedding (open_clip)."""
    return output[:, 0] if output.dim() == 3 else output


@pytest.mark.parametrize("algo", ["pitome", "tome"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fused_kernels_agree_with_the_pytorch_twins_in_fp32(name, algo, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model, run = built(name, torch.float32)
    pitome.patch(model, algo=algo, ratio=0.9, prop_attn=True)
    x = pixels(8, dtype=torch.float32)
    with torch.inference_mode():
        fused = run(model, x)
        fused_counts = pitome.merge_info(model).token_counts
        with kernel_backend("torch"):
            twin = run(model, x)
    assert pitome.merge_info(model).token_counts == fused_counts
    assert fused_counts[-1] < fused_counts[0]
    torch.testing.assert_close(fused, twin, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("algo", ["pitome", "tome"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fused_bf16_kernels_agree_with_the_pytorch_twins(name, algo):
    # In bf16 many similarities tie, and the kernels may break a tie the other way than
    # torch's sort: the merged tokens can come out in another order, so compare what does
    # not depend on it. The bf16 proportional-attention kernel runs here (197 tokens).
    model, run = built(name)
    pitome.patch(model, algo=algo, ratio=0.9, prop_attn=True)
    x = pixels(8)
    with torch.inference_mode():
        fused = summary(run(model, x)).float()
        with kernel_backend("torch"):
            twin = summary(run(model, x)).float()
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


# ViT-B's width: at toy widths (128) one block's similarity matrix (B·T² floats) outweighs
# its activations, which no real model's do.
VIT_B = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=3, num_attention_heads=12)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_peak_memory_not_above_unpatched(name):
    model, run = built(name, **VIT_B)
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
