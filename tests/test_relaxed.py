"""Relaxed merges (a fraction of one merge more per block): exact at fraction 0, their
derivatives those of the loss, each input's fraction its own; and the calibration rates
made from them."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY, images
from timm.models.vision_transformer import VisionTransformer

import pitome
from pitome.calibration import Objective
from pitome.runtime.state import relaxed_merges

R = [0, 4, 6, 3]  # a block that merges none, and blocks that merge some
ALGOS = ["pitome", "tome", "mctf", "tofu"]


def vit(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(**TINY).eval().to(dtype)


def zeros(batch: int, blocks=range(4), dtype=torch.float32, grad=False) -> dict:
    return {block: torch.zeros(batch, dtype=dtype, requires_grad=grad) for block in blocks}


def slope(at, step: float = 2e-3) -> float:
    """The derivative at 0 of ``at`` from positive steps only (a negative fraction is no
    merge), Richardson-extrapolated; steps this large because sizes are float32."""
    base = at(0.0)
    coarse, fine = (at(step) - base) / step, (at(step / 2) - base) / (step / 2)
    return 2 * fine - coarse


@pytest.mark.parametrize("algo", ALGOS)
def test_fraction_zero_is_the_hard_merge(algo):
    model = pitome.patch(vit(), algo, r=R)
    x = images(3)
    with torch.no_grad():
        hard = model(x)
        hard_sizes = pitome.merge_info(model).sizes
        with relaxed_merges(zeros(3)):
            relaxed = model(x)
        info = pitome.merge_info(model)
    torch.testing.assert_close(relaxed, hard, rtol=1e-5, atol=1e-5)
    assert info.merges == R
    torch.testing.assert_close(info.sizes, hard_sizes)


@pytest.mark.parametrize("algo", ["pitome", "tome"])
def test_a_fraction_moves_size_and_keeps_the_total(algo):
    model = pitome.patch(vit(), algo, r=R)
    with torch.no_grad(), relaxed_merges({0: torch.full((2,), 0.25), 2: torch.full((2,), 0.5)}):
        model(images(2))
    sizes = pitome.merge_info(model).sizes
    tokens = (TINY["img_size"] // TINY["patch_size"]) ** 2 + 1
    torch.testing.assert_close(sizes.sum(dim=(1, 2)), torch.full((2,), float(tokens)))
    assert (sizes != sizes.round()).any()  # some token holds part of another
    assert sizes.min() > 0  # a token gives away a fraction of itself, not all


@pytest.mark.parametrize("algo", ["pitome", "tome"])
def test_derivatives_match_finite_differences(algo):
    model = pitome.patch(vit(torch.float64), algo, r=R)
    x = images(2).double()

    def loss(fractions) -> torch.Tensor:
        with relaxed_merges(fractions):
            return model(x).square().sum()

    fractions = zeros(2, dtype=torch.float64, grad=True)
    grads = torch.autograd.grad(loss(fractions), list(fractions.values()))
    for block in (0, 1, 2):  # r = 0, and blocks that merge
        for item in range(2):
            def at(fraction: float) -> float:
                moved = zeros(2, dtype=torch.float64)
                moved[block][item] = fraction
                with torch.no_grad():
                    return loss(moved).item()
            assert grads[block][item].item() == pytest.approx(slope(at), rel=3e-3, abs=1e-7)
    assert any(abs(g).sum() > 0 for g in grads)


def test_each_inputs_fraction_moves_only_its_own_output():
    model = pitome.patch(vit(), "pitome", r=R)
    fractions = zeros(3, grad=True)
    with relaxed_merges(fractions):
        out = model(images(3))
    grads = torch.autograd.grad(out[1].sum(), list(fractions.values()))
    for grad in grads:
        assert grad[0] == 0 and grad[2] == 0
    assert any(grad[1] != 0 for grad in grads)


def test_relaxed_merges_refuse_what_they_cannot_do():
    model = pitome.patch(vit(), "pitome", r=R)
    with pytest.raises(ValueError, match="shape"), relaxed_merges(zeros(3)):
        model(images(2))
    with pytest.raises(ValueError, match="not one of the 4 blocks"), \
            relaxed_merges({7: torch.zeros(1)}):
        model(images(1))
    with pytest.raises(ValueError, match="1-D tensors"):
        with relaxed_merges({0: torch.zeros(1, 1)}):
            pass
    pitome.unpatch(model)
    pitome.patch(model, "pitome", r=[32, 0, 0, 0])  # half of the 64 patches: no room left
    with pytest.raises(ValueError, match="no room for one more"), \
            relaxed_merges({0: torch.zeros(1)}):
        model(images(1))
    pitome.unpatch(model)
    pitome.patch(model, "dct", r=R)
    with pytest.raises(TypeError, match="merge plans"), relaxed_merges({1: torch.zeros(1)}):
        model(images(1))
    with torch.no_grad():
        model(images(1))  # outside the block, the model is as patched


def test_merge_derivatives_predict_the_loss_of_one_merge_more():
    """The first-order term is the objective's derivative in the fraction (checked against
    the mean loss at a small fraction); the curvature term is a mean of squares."""
    model = vit(torch.float64)
    x = images(16).double()
    with torch.no_grad():  # logits of a trained model's spread, so the KL is not ~0
        model.head.weight.mul_(3 / model(x).std())
    objective = Objective(model, list(x.split(8)), "kl")
    pitome.patch(model, "tome", r=R)
    derivatives = objective.merge_derivatives([0, 1, 2], seed=0)
    for block in (0, 1, 2):
        def at(fraction: float) -> float:
            with relaxed_merges({block: torch.full((8,), fraction, dtype=torch.float64)}):
                return objective.losses().mean().item()
        assert derivatives[block][0] == pytest.approx(slope(at, 1e-2), rel=3e-2, abs=1e-5)
        assert derivatives[block][1] >= 0
