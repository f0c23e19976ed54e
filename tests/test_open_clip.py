"""open_clip's VisionTransformer, built from arguments (no pretrained download)."""

from __future__ import annotations

import pytest
import torch

import pitome

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402


def tower(pool_type: str = "tok", dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = VisionTransformer(image_size=64, patch_size=8, width=64, layers=4, heads=4,
                              mlp_ratio=2.0, output_dim=32, pool_type=pool_type)
    return model.to(dtype).eval()


def images(batch: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("pool_type", ["tok", "avg"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ratio_one_is_identity_and_unpatch_exact(pool_type, batch, dtype):
    model, x = tower(pool_type, dtype), images(batch, dtype)
    with torch.no_grad():
        reference = model(x)
        pitome.patch(model, ratio=1.0)
        assert torch.equal(model(x), reference)
        pitome.patch(model, ratio=0.8)
        assert not torch.equal(model(x), reference)
        pitome.unpatch(model)
        assert torch.equal(model(x), reference)


@pytest.mark.parametrize("algo", ["pitome", "pitome_paper", "tome", "diffrate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_invariants(algo, dtype):
    model = tower(dtype=dtype)
    pitome.patch(model, algo=algo, ratio=0.8, trace_source=True)
    with torch.no_grad():
        assert torch.isfinite(model(images(2, dtype)).float()).all()
    info = pitome.merge_info(model)
    assert info.token_counts == [65, 53, 43, 35, 29]
    assert torch.equal(info.sizes.sum(dim=1).flatten(), torch.full((2,), 65.0))
    assert torch.equal(info.source.sum(dim=1), torch.ones(2, 65))
    assert torch.equal(info.source[:, 0], torch.eye(65)[0].expand(2, -1))  # CLS untouched


def test_average_pooling_weighs_merged_tokens_by_size():
    model = tower("avg")
    captured = []
    model.ln_post.register_forward_hook(lambda module, args, out: captured.append(out))
    pitome.patch(model, algo="tome", ratio=0.8)
    with torch.no_grad():
        pooled = model(images(2))
    tokens, sizes = captured[-1][:, 1:], pitome.merge_info(model).sizes[:, 1:]
    expected = (tokens * sizes).sum(dim=1) / sizes.sum(dim=1)
    torch.testing.assert_close(pooled, expected @ model.proj)


def test_train_mode_backpropagates():
    model = tower().train()
    pitome.patch(model, ratio=0.8)
    model(images(2)).sum().backward()
    assert model.conv1.weight.grad is not None and torch.isfinite(model.conv1.weight.grad).all()


def test_create_model_clip_merges_its_image_tower():
    model = open_clip.create_model("ViT-B-32").eval()  # random weights: nothing downloaded
    x = images(1).new_empty(1, 3, 224, 224).normal_(generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model.encode_image(x)
        pitome.patch(model, ratio=1.0)
        assert torch.equal(model.encode_image(x), reference)
        pitome.patch(model, algo="pitome", ratio=0.9)
        merged = model.encode_image(x)
    assert pitome.merge_info(model).token_counts[-1] == 18
    assert torch.cosine_similarity(merged, reference).item() > 0.5
