"""The spectral-distance diagnostic (SPEC §8)."""

from __future__ import annotations

import torch

from pitome.analysis.spectrum import (lifted_graph, normalized_laplacian, spectral_distance,
                                      spectrum, token_graph)
from pitome.core.registry import MergeContext, get_method


def random_membership(nodes: int, groups: int, generator: torch.Generator) -> torch.Tensor:
    assignment = torch.cat([torch.arange(groups), torch.randint(0, groups, (nodes - groups,),
                                                                generator=generator)])
    assignment = assignment[torch.randperm(nodes, generator=generator)]
    return torch.nn.functional.one_hot(assignment, groups).T.double()


def test_lifted_spectrum_is_the_coarse_spectrum_plus_ones():
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        weights = torch.rand(20, 20, generator=generator, dtype=torch.float64)
        weights = (weights + weights.T).fill_diagonal_(0.0)
        membership = random_membership(20, 7, generator)
        coarse = membership @ weights @ membership.T  # keeps within-group weight on its diagonal
        expected = torch.cat([torch.linalg.eigvalsh(normalized_laplacian(coarse)),
                              torch.ones(13, dtype=torch.float64)]).sort().values
        torch.testing.assert_close(spectrum(lifted_graph(weights, membership)), expected)


def test_no_merge_means_zero_distance():
    generator = torch.Generator().manual_seed(1)
    metric = torch.randn(15, 8, generator=generator)
    weights = token_graph(metric)
    assert spectral_distance(weights, torch.eye(15, dtype=torch.float64)) < 1e-9


def test_membership_must_be_a_partition():
    weights = token_graph(torch.randn(4, 3))
    dropped = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    try:
        lifted_graph(weights, dropped)
    except ValueError as error:
        assert "exactly one" in str(error)
    else:
        raise AssertionError("a membership that loses a node was accepted")


def clustered_tokens(seed: int) -> torch.Tensor:
    """A CLS token, then clusters of sizes 24, 16, 8 and 8 isolated tokens, in 32 dims."""
    generator = torch.Generator().manual_seed(seed)
    parts = [torch.randn(1, 32, generator=generator)]
    for size in (24, 16, 8):
        centre = torch.randn(32, generator=generator)
        parts.append(centre + 0.3 * torch.randn(size, 32, generator=generator))
    parts.append(torch.randn(8, 32, generator=generator))
    tokens = torch.cat(parts)
    return tokens[torch.cat([torch.tensor([0]), 1 + torch.randperm(56, generator=generator)])]


def distance_of(algo: str, metric: torch.Tensor, r: int) -> float:
    ctx = MergeContext(r=r, num_prefix=1, block=0, num_blocks=1, margin=0.3)
    plan = get_method(algo).build()(metric.unsqueeze(0), ctx)
    members = plan.membership()[0, 1:, 1:].double()
    return spectral_distance(token_graph(metric[1:]), members)


def test_pitome_preserves_the_spectrum_better_than_tome_on_clustered_tokens():
    pitome_sd = torch.tensor([distance_of("pitome_paper", clustered_tokens(s), 16) for s in range(20)])
    tome_sd = torch.tensor([distance_of("tome", clustered_tokens(s), 16) for s in range(20)])
    assert pitome_sd.mean() < tome_sd.mean()
    assert (pitome_sd < tome_sd).float().mean() >= 0.75
