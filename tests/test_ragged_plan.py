"""The one-launch ragged plan kernel against its PyTorch twin (``ragged_bipartite``)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from pitome.algorithms.matching import ragged_bipartite, ragged_energy_bipartite  # noqa: E402
from pitome.core.ragged import RaggedContext  # noqa: E402
from pitome.kernels import kernel_backend  # noqa: E402
from pitome.kernels.energy import EnergyOptions  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def padded_batch(lengths, num_prefix, dim, ratio=0.7, heads=0, seed=0, dtype=torch.float32):
    """A right-padded metric (non-prefix tokens; per-head when ``heads``) and its context,
    each row removing ``ratio``'s share of its mergeable tokens (at most half)."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    shape = (len(lengths), width - num_prefix) + ((heads,) if heads else ()) + (dim,)
    # Few directions, so tokens cluster and the energy has something to order.
    centres = torch.randn(4, dim, generator=generator)
    pick = torch.randint(0, 4, shape[:-1], generator=generator)
    metric = centres[pick] + 0.3 * torch.randn(shape, generator=generator)
    lengths_t = torch.tensor(lengths)
    real = torch.arange(width) < lengths_t.unsqueeze(1)
    mergeable = lengths_t - num_prefix
    r = torch.minimum((mergeable * (1 - ratio)).long(), mergeable // 2)
    sizes = torch.rand(len(lengths), width, 1, generator=generator) * 3 + 1
    ctx = RaggedContext(lengths=lengths_t.to(DEVICE), r=r.to(DEVICE), num_prefix=num_prefix,
                        block=0, num_blocks=4, margin=0.5, real=real.to(DEVICE),
                        sizes=(sizes * real.unsqueeze(-1)).to(DEVICE))
    return metric.to(DEVICE, dtype), ctx


def assert_same_plan(fast, reference):
    assert torch.equal(fast.slot.cpu(), reference.slot.cpu())
    assert torch.equal(fast.target.cpu(), reference.target.cpu())
    assert (fast.drop_src, fast.max_norm) == (reference.drop_src, reference.max_norm)


# No row holds exactly two mergeable tokens: their energies tie exactly (each is the other's
# only neighbour), and which comes first is then rounding, on either side.
CASES = [([9, 5, 12, 4], 1), ([40, 17, 33], 0), ([70, 66, 2, 69], 1), ([130, 7], 1)]


@pytest.mark.parametrize("lengths,num_prefix", CASES)
@pytest.mark.parametrize("start", [0, 1])
@pytest.mark.parametrize("split", ["alternate", "contiguous"])
def test_tome_rows_in_one_launch_match_pytorch(lengths, num_prefix, start, split):
    metric, ctx = padded_batch(lengths, num_prefix, 16)
    plans = []
    for backend in ("triton", "torch"):
        with kernel_backend(backend):
            plans.append(ragged_bipartite(metric, ctx, split=split, start=start))
    assert_same_plan(*plans)


@pytest.mark.parametrize("lengths,num_prefix", CASES)
@pytest.mark.parametrize("kind", ["elu", "gaussian"])
@pytest.mark.parametrize("pool", [1.0, 0.75, math.inf])
@pytest.mark.parametrize("weighted", [False, True])
def test_pitome_rows_in_one_launch_match_pytorch(lengths, num_prefix, kind, pool, weighted):
    metric, ctx = padded_batch(lengths, num_prefix, 16, seed=1)
    weights = ctx.sizes[:, num_prefix:, 0] if weighted else None
    options = EnergyOptions(ctx.margin, kind, 1.0, weights)
    plans = []
    for backend in ("triton", "torch"):
        with kernel_backend(backend):
            plans.append(ragged_energy_bipartite(metric, ctx, options,
                                                 None if math.isinf(pool) else pool))
    assert_same_plan(*plans)


@pytest.mark.parametrize("split", ["alternate", "contiguous"])
def test_pitome_rows_from_per_head_keys_match_pytorch(split):
    metric, ctx = padded_batch([20, 11, 17], 1, 8, heads=3, seed=2)
    options = EnergyOptions(ctx.margin, "elu", 1.0, None)
    plans = []
    for backend in ("triton", "torch"):
        with kernel_backend(backend):
            plans.append(ragged_energy_bipartite(metric, ctx, options, 1.0, split))
    assert_same_plan(*plans)


def test_a_row_that_removes_nothing_keeps_its_tokens_and_padding_has_no_place():
    metric, ctx = padded_batch([12, 3, 12], 1, 8, seed=3)
    ctx = RaggedContext(**{**ctx.__dict__, "r": torch.tensor([4, 0, 0], device=DEVICE)})
    with kernel_backend("triton"):
        plan = ragged_bipartite(metric, ctx)
    slot, target = plan.slot.cpu(), plan.target.cpu()
    assert torch.equal(slot[1, :3], torch.arange(3)) and (slot[1, 3:] == -1).all()
    assert sorted(slot[2].tolist()) == list(range(12))  # nothing merged, every place once
    assert (target[1:] == -1).all()
    kept = slot[0][slot[0] >= 0]
    assert sorted(kept.tolist()) == list(range(8)) and int((target[0] >= 0).sum()) == 4


def test_the_kernel_plans_where_triton_runs_and_pytorch_elsewhere():
    from pitome.kernels.ragged import ragged_plan

    metric, ctx = padded_batch([9, 5], 1, 8)
    with kernel_backend("triton"):
        assert ragged_plan(metric, ctx) is not None
    with kernel_backend("torch"):
        assert ragged_plan(metric, ctx) is None
    with kernel_backend("triton"), torch.enable_grad():
        assert ragged_plan(metric.requires_grad_(), ctx) is None  # no backward pass


# ----------------------------------------------------------------------------- applying a plan
def row_plan_case(lengths, num_prefix, channels=24, dtype=torch.float32, seed=0):
    """A plan from the one-launch planner, the tokens it merges, their sizes and masks."""
    metric, ctx = padded_batch(lengths, num_prefix, 8, seed=seed)
    with kernel_backend("torch"):
        plan = ragged_bipartite(metric, ctx)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(len(lengths), max(lengths), channels, generator=generator).to(DEVICE, dtype)
    lengths_out = ctx.lengths - ctx.r
    width_out = int(lengths_out.max())
    real_out = torch.arange(width_out, device=DEVICE) < lengths_out.unsqueeze(1)
    sizes = torch.where(ctx.real.unsqueeze(-1), ctx.sizes, 1.0)
    return plan, x, sizes, ctx.real, real_out


@pytest.mark.parametrize("lengths,num_prefix", CASES)
@pytest.mark.parametrize("weighted", [True, False])
@pytest.mark.parametrize("with_residual", [True, False])
def test_the_padded_merge_kernel_matches_its_pytorch_twin(lengths, num_prefix, weighted,
                                                          with_residual):
    from pitome.runtime.padded import apply_row_plan

    plan, x, sizes, real, real_out = row_plan_case(lengths, num_prefix)
    sizes = sizes if weighted else None
    residual = torch.randn_like(x) if with_residual else None
    results = {}
    for backend in ("triton", "torch"):
        with kernel_backend(backend):
            results[backend] = apply_row_plan(plan, x, sizes, real, real_out, None, residual)
    (fast, fast_sizes, _), (reference, reference_sizes, _) = results["triton"], results["torch"]
    torch.testing.assert_close(fast, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_sizes, reference_sizes, rtol=1e-6, atol=1e-6)
    assert (fast[~real_out] == 0).all() and (fast_sizes[~real_out] == 1).all()
    weight = real.unsqueeze(-1).float() * (1 if sizes is None else sizes)
    total_in = weight.sum(dim=1)
    torch.testing.assert_close(fast_sizes.masked_fill(~real_out.unsqueeze(-1), 0).sum(dim=1),
                               total_in)  # every real token's size lands in one output


def test_the_padded_merge_kernel_rounds_bfloat16_once():
    from pitome.runtime.padded import apply_row_plan

    plan, x, sizes, real, real_out = row_plan_case([40, 17, 33], 0, dtype=torch.bfloat16)
    with kernel_backend("triton"):
        fast = apply_row_plan(plan, x, sizes, real, real_out)[0]
    with kernel_backend("torch"):
        reference = apply_row_plan(plan, x, sizes, real, real_out)[0]
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), reference.float(), rtol=1e-2, atol=1e-2)


def test_the_padded_merge_kernel_leaves_norm_rules_and_gradients_to_pytorch():
    from pitome.core.ragged import RowPlan
    from pitome.kernels.merge import merge_padded_rows

    plan, x, sizes, real, real_out = row_plan_case([9, 5], 1)
    width_out = real_out.shape[1]
    with kernel_backend("triton"):
        assert merge_padded_rows(plan, x, sizes, width_out) is not None
        tofu = RowPlan(plan.slot, plan.target, max_norm=True)
        assert merge_padded_rows(tofu, x, sizes, width_out) is None
        with torch.enable_grad():
            assert merge_padded_rows(plan, x.requires_grad_(), sizes, width_out) is None
    with kernel_backend("torch"):
        assert merge_padded_rows(plan, x.detach(), sizes, width_out) is None


def test_the_padded_merge_kernel_drops_pruned_tokens():
    from pitome.core.ragged import RowPlan
    from pitome.runtime.padded import apply_row_plan

    plan, x, sizes, real, real_out = row_plan_case([40, 17, 33], 0)
    pruned = RowPlan(plan.slot, plan.target, drop_src=True)
    with kernel_backend("triton"):
        fast, fast_sizes, _ = apply_row_plan(pruned, x, sizes, real, real_out)
    with kernel_backend("torch"):
        reference, reference_sizes, _ = apply_row_plan(pruned, x, sizes, real, real_out)
    torch.testing.assert_close(fast, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_sizes, reference_sizes)
