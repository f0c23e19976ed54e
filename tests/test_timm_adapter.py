"""The timm adapter on every VisionTransformer variant it promises (random weights, offline)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import TINY, build, images

import pitome

NUM_PATCHES = (TINY["img_size"] // TINY["patch_size"]) ** 2
ALGOS = ["pitome", "tome"]
BASELINES = ["pitome_paper", "pitome_deit", "tofu", "dct", "diffrate", "mctf", "crossget",
             "random", "prune"]
PRUNING = {"tofu", "prune"}  # some tokens are discarded: sources cover only part of the input
# Every variant has 64 mergeable tokens (the patches) at ρ = 0.8: r = ⌊64 − 51.2⌋ = 12,
# then ⌊52 − 41.6⌋ = 10, ⌊42 − 33.6⌋ = 8, ⌊34 − 27.2⌋ = 6.
MERGES_AT_0_8 = [12, 10, 8, 6]


def outputs(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def test_ratio_one_is_the_identity(variant):
    model = build(variant)
    x = images(2)
    expected = outputs(model, x)
    for algo in ALGOS + BASELINES:
        pitome.patch(model, algo=algo, ratio=1.0, trace_source=algo != "dct")
        torch.testing.assert_close(outputs(model, x), expected, atol=1e-5, rtol=0)
        assert pitome.merge_info(model).merges == [0] * TINY["depth"]


def test_unpatch_restores_exactly_and_patching_twice_is_safe(variant):
    model = build(variant)
    x = images(2)
    expected = outputs(model, x)
    state = copy.deepcopy(model.state_dict())
    pitome.patch(model, ratio=0.8)
    merged_once = outputs(model, x)
    pitome.patch(model, ratio=0.8)
    torch.testing.assert_close(outputs(model, x), merged_once, atol=0, rtol=0)
    assert not torch.allclose(merged_once, expected)
    pitome.unpatch(model)
    assert torch.equal(outputs(model, x), expected)
    assert type(model) is type(build(variant))
    assert all(type(b).__name__ in ("Block", "ResPostBlock") for b in model.blocks)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert pitome.merge_info(model) is None
    pitome.unpatch(model)  # a no-op on an unpatched model


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_invariants_below_ratio_one(variant, algo, dtype, batch):
    model = build(variant).to(dtype)
    prefix = model.num_prefix_tokens
    tokens = NUM_PATCHES + prefix
    pitome.patch(model, algo=algo, ratio=0.8, trace_source=True, keep_plans=True)
    logits = outputs(model, images(batch).to(dtype))
    assert logits.shape == (batch, TINY["num_classes"]) and logits.dtype == dtype
    assert torch.isfinite(logits.float()).all()

    info = pitome.merge_info(model)
    assert info.merges == MERGES_AT_0_8
    expected_counts = [tokens - sum(MERGES_AT_0_8[:b]) for b in range(TINY["depth"] + 1)]
    assert info.token_counts == expected_counts

    final = expected_counts[-1]
    assert info.sizes.shape == (batch, final, 1)
    assert torch.equal(info.sizes.sum(dim=1).flatten(), torch.full((batch,), float(tokens)))
    assert info.source.shape == (batch, final, tokens)
    # Every input token belongs to exactly one output token, and sizes count them.
    assert torch.equal(info.source.sum(dim=1), torch.ones(batch, tokens))
    assert torch.equal(info.source.sum(dim=2, keepdim=True), info.sizes)
    # Prefix tokens stay first, unmerged.
    assert torch.equal(info.source[:, :prefix, :prefix], torch.eye(prefix).expand(batch, -1, -1))
    assert torch.equal(info.sizes[:, :prefix], torch.ones(batch, prefix, 1))
    for plan in info.plans.values():
        assert torch.equal(plan.keep[:, :prefix], torch.arange(prefix).expand(batch, -1))
        assert (plan.src >= prefix).all()


def test_bf16_autocast_matches_fp32_closely(variant):
    model = build(variant)
    pitome.patch(model, ratio=0.9)
    x = images(2)
    reference = outputs(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = outputs(model, x)
    assert low.dtype == torch.bfloat16
    assert torch.isfinite(low.float()).all()
    assert (low.float() - reference).abs().max() < 0.25 * reference.abs().max() + 0.1


@pytest.mark.parametrize("algo", ALGOS)
def test_train_mode_gradients_reach_every_parameter(variant, algo):
    model = build(variant).train()
    pitome.patch(model, algo=algo, ratio=0.8, prop_attn=True)
    model(images(2)).square().mean().backward()
    missing = [name for name, p in model.named_parameters()
               if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    # timm's distilled DeiT returns the average of both heads only in eval mode.
    if variant == "deit_distilled":
        missing = [n for n in missing if not n.startswith("head_dist")]
    assert missing == []


def test_size_weighted_average_pooling():
    model = build("avgpool_no_cls")
    pitome.patch(model, ratio=0.7, trace_source=True)
    x = images(2)
    logits = outputs(model, x)
    features = model.forward_features(x)
    sizes = pitome.merge_info(model).sizes
    pooled = (features * sizes).sum(1) / sizes.sum(1)
    expected = model.head(model.fc_norm(pooled))
    torch.testing.assert_close(logits, expected)
    unweighted = model.head(model.fc_norm(features.mean(1)))
    assert not torch.allclose(logits, unweighted)


def test_proportional_attention_changes_the_output_only_after_a_merge():
    model = build("vit")
    x = images(2)
    unmerged = outputs(model, x)

    def run(prop_attn: bool, **schedule) -> torch.Tensor:
        pitome.patch(model, algo="tome", prop_attn=prop_attn, **schedule)
        return outputs(model, x)

    # Merging in block 1: blocks 2 and 3 attend over merged tokens, so log s changes them.
    assert not torch.allclose(run(True, r=8, merge_blocks=[1]), run(False, r=8, merge_blocks=[1]))
    # Merging in the last block only: it merges after its attention and no attention runs
    # after it, so with and without proportional attention the outputs are the same.
    torch.testing.assert_close(run(True, r=8, merge_blocks=[3]), run(False, r=8, merge_blocks=[3]),
                               atol=0, rtol=0)
    # Nothing merged: every size is 1, log s = 0, and the output is the unmerged model's.
    torch.testing.assert_close(run(True, ratio=1.0), unmerged, atol=1e-6, rtol=0)


def test_non_fused_attention_path_agrees_with_fused():
    model = build("vit")
    x = images(2)
    pitome.patch(model, algo="pitome", ratio=0.8, prop_attn=True)
    fused = outputs(model, x)
    for block in model.blocks:
        block.attn.fused_attn = False
    torch.testing.assert_close(outputs(model, x), fused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algo", ALGOS)
def test_torch_compile_fullgraph(algo):
    model = build("deit_distilled")
    pitome.patch(model, algo=algo, ratio=0.8, prop_attn=True)
    x = images(2)
    eager = outputs(model, x)
    torch._dynamo.reset()  # each test compiles afresh instead of hitting the recompile limit
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("algo", ALGOS)
def test_torch_compile_with_a_dynamic_batch_makes_one_graph(algo):
    from torch._dynamo.utils import counters

    model = build("vit")
    pitome.patch(model, algo=algo, ratio=0.8)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    with torch.no_grad():
        for batch in (2, 3, 5):
            x = images(batch)
            torch.testing.assert_close(compiled(x), outputs(model, x), atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1  # no recompile per batch size


def test_r_schedule_and_merge_blocks():
    model = build("vit")
    pitome.patch(model, algo="tome", r=5, merge_blocks=[1, 3])
    outputs(model, images(1))
    assert pitome.merge_info(model).merges == [0, 5, 0, 5]
    pitome.patch(model, algo="pitome", r=[4, 3, 2, 1])
    outputs(model, images(1))
    assert pitome.merge_info(model).token_counts == [65, 61, 58, 56, 55]


def test_metric_hidden_merges_differently():
    model = build("vit")
    x = images(2)
    pitome.patch(model, algo="tome", ratio=0.7, metric="hidden")
    hidden = outputs(model, x)
    pitome.patch(model, algo="tome", ratio=0.7, metric="keys")
    assert not torch.allclose(outputs(model, x), hidden)


def test_attention_mask_is_refused_on_a_patched_model():
    model = build("vit")
    pitome.patch(model, ratio=0.9)
    with pytest.raises(ValueError, match="attn_mask"):
        model.forward_features(images(1), attn_mask=torch.zeros(1, 1, 65, 65))


@pytest.mark.parametrize("algo", BASELINES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 4])
def test_baseline_invariants_below_ratio_one(variant, algo, dtype, batch):
    model = build(variant).to(dtype)
    prefix = model.num_prefix_tokens
    tokens = NUM_PATCHES + prefix
    traced = algo != "dct"
    pitome.patch(model, algo=algo, ratio=0.8, trace_source=traced)
    logits = outputs(model, images(batch).to(dtype))
    assert logits.shape == (batch, TINY["num_classes"]) and torch.isfinite(logits.float()).all()
    info = pitome.merge_info(model)
    assert info.merges == MERGES_AT_0_8
    final = info.token_counts[-1]
    assert info.sizes.shape == (batch, final, 1)
    total = info.sizes.sum(dim=1).flatten()
    if algo in PRUNING:
        assert (total < tokens).all()
    else:
        torch.testing.assert_close(total, torch.full((batch,), float(tokens)))
    if traced:
        covered = info.source.sum(dim=1)
        assert covered.max() == 1  # no input token is in two output tokens
        if algo not in PRUNING:
            assert torch.equal(covered, torch.ones(batch, tokens))
        assert torch.equal(info.source.sum(dim=2, keepdim=True), info.sizes)
        assert torch.equal(info.source[:, :prefix, :prefix], torch.eye(prefix).expand(batch, -1, -1))


@pytest.mark.parametrize("algo", BASELINES)
def test_baselines_train_and_compile(algo):
    model = build("vit").double().train()
    pitome.patch(model, algo=algo, ratio=0.8)
    x = images(2).double().requires_grad_()
    params = [p for p in model.parameters() if p.requires_grad]

    def loss() -> torch.Tensor:
        torch.manual_seed(0)  # the same plans every call, random matching's too
        return model(x).square().mean()

    loss().backward()
    # Every parameter, and every patch of the input, takes part in the loss: each block
    # attends over every token it is given before any of them is merged or dropped.
    untrained = [name for name, p in model.named_parameters() if p.requires_grad
                 and (p.grad is None or not torch.isfinite(p.grad).all() or not p.grad.abs().sum() > 0)]
    assert untrained == []
    patch = TINY["patch_size"]
    per_patch = x.grad.abs().unfold(2, patch, patch).unfold(3, patch, patch).sum(dim=(1, 4, 5))
    assert (per_patch > 0).all()
    # The gradient is the loss's: along a random direction of the parameters it matches a
    # central difference (the plans, made without gradient, stay the same for so small a
    # step). MCTF pools with the attention it planned from, which the backward pass
    # treats as a constant, as it treats the plan.
    if algo != "mctf":
        generator = torch.Generator().manual_seed(1)
        direction = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in params]
        analytic = sum((p.grad * d).sum() for p, d in zip(params, direction)).item()
        step = 1e-7
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(step * d)
            plus = loss().item()
            for p, d in zip(params, direction):
                p.sub_(2 * step * d)
            minus = loss().item()
            for p, d in zip(params, direction):
                p.add_(step * d)
        assert analytic == pytest.approx((plus - minus) / (2 * step), rel=1e-5, abs=1e-8)
    model.float()
    model.eval()
    x = images(2)
    if algo == "random":
        return  # random plans differ between the two calls by design
    eager = outputs(model, x)
    torch._dynamo.reset()  # each test compiles afresh instead of hitting the recompile limit
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager, atol=1e-5, rtol=1e-5)


def test_dct_refuses_source_tracing():
    with pytest.raises(ValueError, match="no sources"):
        pitome.patch(build("vit"), algo="dct", trace_source=True)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("train", [False, True])
def test_the_kept_attention_is_timms_own_on_every_variant(variant, fused, train):
    """The adapter keeps one copy of timm's Attention forward (for the proportional-attention
    kernel and the keys); with nothing merged yet it must be timm's forward, bit for bit."""
    from pitome.adapters.timm_vit import attention_with_keys
    from pitome.runtime.state import MergeState

    model = build(variant)
    x = torch.randn(2, 17, model.embed_dim, generator=torch.Generator().manual_seed(5))
    pitome.patch(model, algo="pitome", ratio=0.9)
    state = MergeState(pitome.merge_config(model), x, model.num_prefix_tokens, len(model.blocks))
    for block in model.blocks:
        block.attn.fused_attn = fused
        block.attn.train(train)
        with torch.no_grad():
            ours, keys, _ = attention_with_keys(block.attn, x, state, 0)
            assert torch.equal(ours, block.attn(x))
        assert keys is not None and keys.shape[:2] == (2, 17)


def test_dense_feature_paths_refuse_rather_than_return_unmerged_features():
    model = pitome.patch(build("vit"), ratio=0.8)
    for call in (lambda: model.forward_intermediates(images(1)),
                 lambda: model.get_intermediate_layers(images(1), n=2)):
        with pytest.raises(NotImplementedError, match="no per-patch intermediate features"):
            call()
    pitome.unpatch(model)
    assert len(model.get_intermediate_layers(images(1), n=2)) == 2


def test_attention_pooling_is_said_to_ignore_sizes():
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(**TINY, global_pool="map", class_token=False).eval()
    with pytest.warns(UserWarning, match="weighs each merged token once"):
        pitome.patch(model, ratio=0.8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pitome.patch(model, ratio=1.0)  # nothing merges: nothing to say
