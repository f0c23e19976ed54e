"""Each baseline's defining behaviour on hand-made tokens."""

from __future__ import annotations

import math

import pytest
import torch

from pitome.algorithms import DCT, MCTF, AttentionPruning, CrossGET, DiffRate, RandomMatching, ToFu
from pitome.core.registry import MergeContext


def context(r: int, tokens: int, *, block: int = 0, num_blocks: int = 4, attention=None,
            sizes=None, num_prefix: int = 1) -> MergeContext:
    return MergeContext(r=r, num_prefix=num_prefix, block=block, num_blocks=num_blocks,
                        margin=0.5, sizes=sizes, attention=attention)


def spread_tokens(tokens: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, tokens, dim, generator=generator)


def merged_pairs(plan) -> set[tuple[int, int]]:
    return {(s, plan.keep[0, d].item()) for s, d in zip(plan.src[0].tolist(), plan.dst[0].tolist())}


def test_tofu_prunes_early_and_keeps_the_largest_norm_late():
    metric = spread_tokens(9)
    metric[0, 3] = metric[0, 4] * 1.0001  # one obvious pair, positions of opposite parity
    early = ToFu()(metric, context(1, 9, block=0))
    assert early.drop_src and merged_pairs(early) & {(3, 4), (4, 3)}
    late = ToFu()(metric, context(1, 9, block=3))
    assert late.max_norm and not late.drop_src
    x = torch.stack([torch.tensor([3.0, 0.0]), torch.tensor([0.0, 1.0])]).unsqueeze(0)
    from pitome.core.plan import MergePlan
    plan = MergePlan(keep=torch.tensor([[1]]), src=torch.tensor([[0]]), dst=torch.tensor([[0]]),
                     max_norm=True)
    merged, sizes = plan.weighted_mean(x, torch.ones(1, 2, 1))
    assert math.isclose(merged.norm().item(), 3.0, rel_tol=1e-6)  # MLERP: the larger norm
    direction = merged[0, 0] / merged.norm()
    torch.testing.assert_close(direction, torch.tensor([3.0, 1.0]) / math.sqrt(10))
    assert sizes.item() == 2


def test_mlerp_of_a_group_of_three_and_its_gradient():
    from pitome.core.plan import MergePlan

    # Tokens 1 and 2 both merge into token 3: the mean of (3, 0), (0, 1), (0, 2) is (1, 1),
    # rescaled to the largest norm, 3.
    x = torch.tensor([[[5.0, 5.0], [3.0, 0.0], [0.0, 1.0], [0.0, 2.0]]], dtype=torch.float64)
    plan = MergePlan(keep=torch.tensor([[0, 3]]), src=torch.tensor([[1, 2]]),
                     dst=torch.tensor([[1, 1]]), max_norm=True)
    sizes = torch.ones(1, 4, 1, dtype=torch.float64)
    merged, new_sizes = plan.weighted_mean(x, sizes)
    torch.testing.assert_close(merged[0, 1], torch.full((2,), 3 / math.sqrt(2), dtype=torch.float64))
    assert merged[0, 0].tolist() == [5.0, 5.0] and new_sizes.flatten().tolist() == [1.0, 3.0]
    # Training through it: the backward pass is the derivative of this forward.
    assert torch.autograd.gradcheck(lambda t: plan.weighted_mean(t, sizes)[0],
                                    (x.clone().requires_grad_(),))


def test_dct_keeps_constant_and_low_frequency_sequences():
    tokens, r = 32, 8
    matrix = DCT()(torch.zeros(1, tokens + 1, 4), context(r, tokens + 1)).matrix
    assert matrix.shape == (tokens - r, tokens)
    constant = torch.full((tokens, 1), 2.5)
    torch.testing.assert_close(matrix @ constant, torch.full((tokens - r, 1), 2.5))
    # The slowest cosine over the sequence stays the slowest cosine at the new length.
    slow = torch.cos(math.pi * (torch.arange(tokens) + 0.5) / tokens).unsqueeze(1)
    shorter = torch.cos(math.pi * (torch.arange(tokens - r) + 0.5) / (tokens - r)).unsqueeze(1)
    torch.testing.assert_close(matrix @ slow, shorter, atol=1e-5, rtol=1e-5)
    # The highest frequencies are cut.
    fast = torch.cos(math.pi * (tokens - 1) * (torch.arange(tokens) + 0.5) / tokens).unsqueeze(1)
    assert (matrix @ fast).abs().max() < 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_dct_resamples_tokens_of_every_float_dtype(dtype):
    x = torch.randn(2, 9, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    plan = DCT()(x, context(2, 9))
    out, sizes = plan.weighted_mean(x, torch.ones(2, 9, 1))
    assert out.dtype == dtype and out.shape == (2, 7, 3)
    assert torch.equal(out[:, 0], x[:, 0])
    expected = plan.matrix.double() @ x[:, 1:].double()
    torch.testing.assert_close(out[:, 1:].double(), expected, **(
        dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-6, rtol=1e-6)))


def test_diffrate_merges_the_least_attended_into_their_nearest_kept_token():
    metric = spread_tokens(7)
    attention = torch.tensor([[0.5, 0.2, 0.01, 0.1, 0.02, 0.1, 0.07]])
    metric[0, 3] = metric[0, 5] + 0.01  # token 3 (kept) is token 5's twin
    metric[0, 2] = metric[0, 1] + 0.01  # token 2 (least attended) is token 1's twin
    plan = DiffRate()(metric, context(2, 7, attention=attention))
    assert set(plan.src[0].tolist()) == {2, 4}
    assert (2, 1) in merged_pairs(plan)
    pruned = DiffRate(mode="prune")(metric, context(2, 7, attention=attention))
    assert pruned.drop_src and set(pruned.src[0].tolist()) == {2, 4}


def test_prune_drops_the_least_attended():
    attention = torch.tensor([[0.4, 0.3, 0.05, 0.1, 0.01, 0.14]])
    plan = AttentionPruning()(spread_tokens(6), context(2, 6, attention=attention))
    assert plan.drop_src and set(plan.src[0].tolist()) == {2, 4}
    assert plan.keep[0, 0] == 0


def test_mctf_merges_uninformative_tokens_first_and_large_ones_last():
    tokens = 9
    metric = torch.ones(1, tokens, 4) + 1e-3 * spread_tokens(tokens, 4)  # all alike
    attention = torch.full((1, tokens), 0.1)
    attention[0, 3] = 1e-4  # token 3 (set A) is ignored by CLS: merge it first
    plan = MCTF()(metric, context(1, tokens, attention=attention))
    assert plan.src[0].tolist() == [3]
    sizes = torch.ones(1, tokens, 1)
    sizes[0, 3] = 1e6  # now token 3 is huge: it should no longer be the one to go
    plan = MCTF()(metric, context(1, tokens, attention=attention, sizes=sizes))
    assert plan.src[0].tolist() != [3]
    assert plan.weights is not None  # attention-weighted pooling


def test_mctf_is_bidirectional():
    metric = spread_tokens(11)
    plan = MCTF()(metric, context(4, 11, attention=torch.full((1, 11), 0.1)))
    sources = set(plan.src[0].tolist())
    assert len(sources) == 4
    assert any(s % 2 == 1 for s in sources - {0}) and any(s % 2 == 0 for s in sources - {0})
    assert sources.isdisjoint(plan.keep[0].tolist())


def test_crossget_matches_over_the_complete_graph_without_chains():
    metric = spread_tokens(9)
    metric[0, 2] = metric[0, 4] + 1e-3  # a twin pair of equal parity: bipartite splits miss it
    plan = CrossGET()(metric, context(1, 9))
    assert merged_pairs(plan) & {(2, 4), (4, 2)}
    plan = CrossGET()(metric, context(4, 9))
    sources = plan.src[0].tolist()
    # Sources are the 4 tokens whose best match (over every other token) is strongest, and
    # each joins its own most similar non-source token: no chains, no single sink.
    unit = torch.nn.functional.normalize(metric[0], dim=-1)
    cosine = (unit @ unit.T).fill_diagonal_(-2.0)
    best = {i: cosine[i, 1:].max().item() for i in range(1, 9)}
    assert set(sources) == set(sorted(best, key=best.get, reverse=True)[:4])
    others = [i for i in range(1, 9) if i not in sources]
    expected = {s: max(others, key=lambda o: cosine[s, o].item()) for s in sources}
    assert {s: plan.keep[0, d].item() for s, d in zip(sources, plan.dst[0].tolist())} == expected
    assert len(set(expected.values())) > 1  # these tokens do not all share one best partner


def test_random_matching_is_random_but_valid():
    metric = spread_tokens(21)
    torch.manual_seed(0)
    first = RandomMatching()(metric, context(5, 21))
    second = RandomMatching()(metric, context(5, 21))
    assert not torch.equal(first.src, second.src)
    for plan in (first, second):
        assert sorted(plan.keep[0].tolist() + plan.src[0].tolist()) == list(range(21))
        assert set(plan.keep[0, plan.dst[0]].tolist()).isdisjoint(plan.src[0].tolist())
