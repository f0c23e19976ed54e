"""The fast merge (row index ops, merged rows only) against a dense reference."""

from __future__ import annotations

import pytest
import torch

from pitome.core.plan import MergePlan, assemble


def random_plan(batch: int, tokens: int, r: int, num_prefix: int, seed: int) -> MergePlan:
    """A random valid plan: r sources, each merging into one of the B-set tokens."""
    generator = torch.Generator().manual_seed(seed)
    mergeable = tokens - num_prefix
    order = torch.stack([torch.randperm(mergeable, generator=generator) for _ in range(batch)])
    src, rest = order[:, :r], order[:, r:]
    destinations, kept = rest[:, : mergeable // 2], rest[:, mergeable // 2:]
    dst = torch.randint(0, destinations.shape[1], (batch, r), generator=generator)
    return assemble(num_prefix, kept=kept, destinations=destinations, src=src,
                    dst_in_destinations=dst)


def dense_reference(plan: MergePlan, x: torch.Tensor, sizes: torch.Tensor):
    """``P·(s x) / P·s`` with the 0/1 membership matrix ``P`` built explicitly, in float64."""
    batch, tokens, _ = x.shape
    membership = torch.zeros(batch, plan.num_out, tokens, dtype=torch.float64)
    membership.scatter_(2, plan.keep.unsqueeze(-1), 1.0)
    membership[torch.arange(batch)[:, None], plan.dst, plan.src] = 1.0
    weighted = membership @ (x.double() * sizes.double())
    new_sizes = membership @ sizes.double()
    assert torch.equal(membership.sum(1), torch.ones(batch, tokens, dtype=torch.float64))
    return weighted / new_sizes, new_sizes


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("batch", [1, 3])
def test_weighted_mean_matches_the_dense_reference(dtype, tolerance, batch):
    tokens, r = 33, 10
    plan = random_plan(batch, tokens, r, num_prefix=1, seed=batch)
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(batch, tokens, 16, generator=generator).to(dtype)
    sizes = torch.randint(1, 5, (batch, tokens, 1), generator=generator).float()
    merged, new_sizes = plan.weighted_mean(x, sizes)
    expected, expected_sizes = dense_reference(plan, x, sizes)
    assert merged.dtype == dtype
    assert torch.equal(new_sizes.double(), expected_sizes)
    torch.testing.assert_close(merged.double(), expected, atol=tolerance, rtol=tolerance)
