"""Algorithms on hand-made tokens whose right answer is known."""

from __future__ import annotations

import pytest
import torch

import pitome
from pitome.core.energy import cosine_similarity, energy_score, unit_rows
from pitome.core.plan import MergePlan
from pitome.core.registry import MergeContext, get_method

MERGING = ["pitome", "pitome_paper", "pitome_deit", "pitome_mae", "bsm_pitome", "pitome_text",
           "tome", "tome_authors"]
PITOME_FAMILY = [name for name in MERGING if name.startswith(("pitome", "bsm"))]


def clustered_tokens(seed: int = 0, dim: int = 32) -> tuple[torch.Tensor, int, tuple[int, int]]:
    """A CLS token, then 15 tokens: a tight cluster of 12, an exact duplicate pair, an outlier.

    Returns the ``1×16×dim`` metric, the outlier's index among non-prefix tokens, and the
    duplicate pair's indices (one even, one odd, so positional splits separate them too).
    """
    generator = torch.Generator().manual_seed(seed)
    centre = torch.randn(dim, generator=generator)
    cluster = centre + 0.35 * torch.randn(12, dim, generator=generator)
    duplicate = centre + 0.1 * torch.randn(dim, generator=generator)
    outlier = -centre + 0.1 * torch.randn(dim, generator=generator)
    cls = torch.randn(1, dim, generator=generator)
    rows = list(cluster[:6]) + [duplicate] + list(cluster[6:]) + [duplicate, outlier]
    metric = torch.stack([cls[0]] + rows).unsqueeze(0)
    return metric, 14, (6, 13)


def plan_for(algo: str, metric: torch.Tensor, r: int, block: int = 0) -> MergePlan:
    method = get_method(algo)
    ctx = MergeContext(r=r, num_prefix=1, block=block, num_blocks=2, margin=0.5)
    return method.build()(metric, ctx)


@pytest.mark.parametrize("algo", MERGING)
def test_exact_duplicates_merge_first(algo):
    metric, _, (first, second) = clustered_tokens()
    plan = plan_for(algo, metric, r=1)
    merged_pair = {plan.src[0, 0].item(), plan.keep[0, plan.dst[0, 0]].item()}
    assert merged_pair == {first + 1, second + 1}


@pytest.mark.parametrize("algo", PITOME_FAMILY)
@pytest.mark.parametrize("block", [0, 1])
def test_pitome_protects_the_isolated_token(algo, block):
    metric, outlier, _ = clustered_tokens()
    plan = plan_for(algo, metric, r=4, block=block)
    outlier += 1
    assert outlier not in plan.src[0].tolist()
    assert outlier not in plan.keep[0, plan.dst[0]].tolist()
    assert outlier in plan.keep[0].tolist()


def test_the_papers_rule_protects_even_when_all_but_one_token_merges():
    metric, outlier, _ = clustered_tokens()
    plan = plan_for("pitome_paper", metric, r=7)
    touched = set(plan.src[0].tolist()) | set(plan.keep[0, plan.dst[0]].tolist())
    assert outlier + 1 not in touched
    assert plan.num_out == 16 - 7


def test_energy_ranks_cluster_members_above_the_outlier():
    metric, outlier, _ = clustered_tokens()
    energy = energy_score(cosine_similarity(unit_rows(metric[:, 1:])), margin=0.5)
    assert energy[0].argmin().item() == outlier
    gaussian = energy_score(cosine_similarity(unit_rows(metric[:, 1:])), 0.5, "gaussian")
    assert gaussian[0].argmin().item() == outlier


def test_plan_reductions_on_a_known_plan():
    x = torch.tensor([[[1.0], [2.0], [3.0], [4.0], [10.0]]])
    # Keep 0, 1, 3; token 2 merges into output 1 (token 1), token 4 into output 2 (token 3).
    plan = MergePlan(keep=torch.tensor([[0, 1, 3]]), src=torch.tensor([[2, 4]]),
                     dst=torch.tensor([[1, 2]]))
    assert plan.apply(x, "sum").flatten().tolist() == [1.0, 5.0, 14.0]
    assert plan.apply(x, "amax").flatten().tolist() == [1.0, 3.0, 10.0]
    assert plan.apply(x, "mean").flatten().tolist() == [1.0, 2.5, 7.0]
    assert plan.apply(x, "drop").flatten().tolist() == [1.0, 2.0, 4.0]
    sizes = torch.tensor([[[1.0], [3.0], [1.0], [1.0], [1.0]]])
    merged, new_sizes = plan.weighted_mean(x, sizes)
    assert new_sizes.flatten().tolist() == [1.0, 4.0, 2.0]
    assert merged.flatten().tolist() == [1.0, (6.0 + 3.0) / 4, 7.0]


def test_padding_never_merges_with_real_tokens():
    metric, _, _ = clustered_tokens()
    padding = torch.ones(1, 16, dtype=torch.bool)
    padding[0, 12:] = False  # the last four tokens are padding, duplicates of real ones
    metric[0, 12:] = metric[0, 2:6]
    for algo in MERGING:
        ctx = MergeContext(r=4, num_prefix=1, block=0, num_blocks=2, margin=0.5, padding=padding)
        plan = get_method(algo).build()(metric, ctx)
        destinations = plan.keep[0, plan.dst[0]]
        assert torch.equal(padding[0, plan.src[0]], padding[0, destinations]), algo


def test_every_registered_algorithm_is_documented():
    algorithms = pitome.available_algorithms()
    assert set(MERGING) <= set(algorithms)
    assert all(len(summary) > 20 for summary in algorithms.values())
