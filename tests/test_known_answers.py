"""Known answers: each method's defining behaviour on a few tokens built so that the right
result can be worked out by hand (see each test's comments), never by running the library.

Tokens are mostly unit vectors in a plane, given by their angle in degrees, so every cosine
similarity is ``cos(Δangle)``. Indices in comments are of the non-prefix tokens (``j0, j1,
…``) unless they say "absolute".
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY, build, images

import pitome
from pitome.algorithms import DCT, MCTF, AttentionPruning, CrossGET, DiffRate, PiToMe, \
    RandomMatching, ToFu, ToMe
from pitome.algorithms.pitome import Hybrid
from pitome.analysis.flops import similarity_macs
from pitome.core.attention import log_size_bias, received_attention
from pitome.core.energy import cosine_similarity, energy_score, unit_rows
from pitome.core.plan import MergePlan
from pitome.core.registry import Algorithm, MergeContext, get_method
from pitome.core.schedule import TokenSchedule
from pitome.kernels import kernel_backend, merge_tokens, proportional_attention, token_energy

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not pitome.kernels.triton_available(), reason="needs Triton"))]


def planar(*degrees: float, prefix: int = 1, norms=None) -> torch.Tensor:
    """``1×(prefix+n)×2``: ``prefix`` prefix tokens, then unit vectors at ``degrees`` (each
    scaled by ``norms[i]`` when given). Prefix tokens are a fixed vector no test relies on."""
    radians = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    rows = torch.stack([radians.cos(), radians.sin()], dim=-1)
    if norms is not None:
        rows = rows * torch.tensor(norms, dtype=torch.float64).unsqueeze(-1)
    head = torch.tensor([[0.6, -0.8]], dtype=torch.float64).expand(prefix, 2)
    return torch.cat([head, rows]).float().unsqueeze(0)


def ctx(r: int, *, num_prefix: int = 1, block: int = 0, num_blocks: int = 4, margin: float = 0.5,
        sizes=None, attention=None) -> MergeContext:
    return MergeContext(r=r, num_prefix=num_prefix, block=block, num_blocks=num_blocks,
                        margin=margin, sizes=sizes, attention=attention)


def groups(plan: MergePlan) -> dict[int, set[int]]:
    """Output tokens of item 0 (named by the absolute input token they keep) and the
    absolute input tokens each holds."""
    membership = plan.membership()[0]
    return {int(plan.keep[0, k]): set(membership[k].nonzero().flatten().tolist())
            for k in range(plan.num_out)}


def merged_groups(plan: MergePlan) -> dict[int, set[int]]:
    """:func:`groups` without the tokens that hold only themselves."""
    return {token: held for token, held in groups(plan).items() if held != {token}}


# ---------------------------------------------------------------------------------------
# Token schedule


def test_per_block_cap_near_ratio_one_half_with_count_prefix():
    # 198 tokens, 1 prefix: r = ⌊198 − 99⌋ = 99 counted over all tokens, but only 197 are
    # mergeable and at most ⌊197/2⌋ = 98 can merge; then 100 tokens: ⌊100/2⌋ = 50 capped at
    # ⌊99/2⌋ = 49; then 51 tokens: ⌊51 − 25.5⌋ = 25 ≤ ⌊50/2⌋.
    assert TokenSchedule(ratio=0.5, count_prefix=True).plan(198, 1, 3) == [98, 49, 25]
    # Two prefix tokens (DeiT distilled): 66 → r 33 capped at 32; 34 → 17 capped at 16; …
    assert TokenSchedule(ratio=0.5, count_prefix=True).plan(66, 2, 3) == [32, 16, 8]
    # Just above one half the count, not the cap, decides: ⌊198 − 198·0.52⌋ = 95.
    assert TokenSchedule(ratio=0.52, count_prefix=True).plan(198, 1, 1) == [95]
    # Without count_prefix r comes from the 197 mergeable tokens: ⌊98.5⌋ = 98, ⌊49.5⌋ = 49.
    assert TokenSchedule(ratio=0.5).plan(198, 1, 2) == [98, 49]


# ---------------------------------------------------------------------------------------
# ToMe


def test_tome_similarity_pairs_are_set_a_times_set_b_for_odd_counts():
    # n tokens alternate A, B, A, …: |A| = ⌈n/2⌉, |B| = ⌊n/2⌋.
    for algorithm in (ToMe(), ToMe(prefix_parity=True)):
        assert [algorithm.similarity_pairs(n, 0, 12) for n in (1, 2, 7, 8, 196, 197)] == \
            [0, 1, 12, 16, 98 * 98, 98 * 99]
    # FLOPs of the planning: blocks entering with 10 and 8 tokens (1 prefix) merge, one
    # entering with 7 does not: (4·5 + 3·4) pairs × 4 channels.
    assert similarity_macs(ToMe(), [10, 8, 7, 7], num_prefix=1, metric_width=4) == 128
    # PiToMe and CrossGET compare all T′² pairs.
    assert PiToMe().similarity_pairs(7, 0, 12) == CrossGET().similarity_pairs(7, 0, 12) == 49


# j2 and j3 are near twins (1° apart); every other pair is at least 40° apart, so whichever
# of the two is in set A proposes the strongest edge and is the one merged with r = 1.
TWIN_DEGREES = (60, 150, 0, 1, 200, 250, 300, 100)


@pytest.mark.parametrize("num_prefix", [1, 2, 5])  # CLS; CLS + distillation; CLS + 4 registers
def test_authors_tome_alternates_as_if_the_prefix_tokens_were_in_the_sequence(num_prefix):
    metric = planar(*TWIN_DEGREES, prefix=num_prefix)
    p = num_prefix
    # The original ToMe alternates over the whole sequence from absolute token 0: absolute
    # even tokens are set A. j2 is absolute p + 2, j3 is p + 3.
    src, dst = (p + 2, p + 3) if p % 2 == 0 else (p + 3, p + 2)
    authors = get_method("tome_authors").build()(metric, ctx(1, num_prefix=p))
    assert merged_groups(authors) == {dst: {src, dst}}
    # The library's ToMe alternates over the non-prefix tokens: j2 is always in set A.
    plain = get_method("tome").build()(metric, ctx(1, num_prefix=p))
    assert merged_groups(plain) == {p + 3: {p + 2, p + 3}}


# ---------------------------------------------------------------------------------------
# ToFu


@pytest.mark.parametrize("num_blocks,pruning", [(4, [0]), (8, [0, 1]), (12, [0, 1, 2]),
                                                (6, [0, 1])])
def test_tofu_prunes_in_the_first_quarter_of_the_blocks_and_merges_after(num_blocks, pruning):
    metric = planar(*TWIN_DEGREES)
    plans = [ToFu()(metric, ctx(1, block=b, num_blocks=num_blocks)) for b in range(num_blocks)]
    assert [b for b, plan in enumerate(plans) if plan.drop_src] == pruning
    assert all(plan.max_norm for plan in plans[len(pruning):])
    # ToMe's matching: j2 (absolute 3, set A) proposes its twin j3 (absolute 4).
    assert all(merged_groups(plan) == {4: {3, 4}} for plan in plans[len(pruning):])
    assert all(groups(plan)[4] == {4} and 3 not in groups(plan) for plan in plans[:len(pruning)])


def test_tofu_on_a_model_loses_exactly_the_tokens_of_its_pruning_block():
    # 4 blocks at ρ = 0.8 over 64 patches + CLS: r = 12, 10, 8, 6. Block 0 (the first
    # quarter) prunes its 12; the others merge, which keeps the token count: 65 − 12 = 53.
    model = build("vit")
    pitome.patch(model, algo="tofu", ratio=0.8, trace_source=True)
    with torch.no_grad():
        model(images(2))
    info = pitome.merge_info(model)
    assert info.token_counts == [65, 53, 43, 35, 29]
    assert info.sizes.sum(dim=(1, 2)).tolist() == [53.0, 53.0]
    assert info.source.sum(dim=(1, 2)).tolist() == [53.0, 53.0]


# ---------------------------------------------------------------------------------------
# MCTF


def test_mctf_bidirectional_fusion_sends_a_moved_destination_along_with_what_it_holds():
    # Set A = j0 (0°), j2 (90°), j4 (30°), j6 (200°); set B = j1 (2°), j3 (93°), j5 (300°),
    # j7 (205°). Uniform attention and sizes: edges rank by cosine alone. r = 4.
    # Step 1 (⌈4/2⌉ = 2 A → B): best edges j0→j1 cos 2°, j2→j3 cos 3°, j6→j7 cos 5°,
    # j4→j1 cos 28°; j0 and j2 move; j6 and j4 stay.
    # Step 2 (⌊4/2⌋ = 2 B → stayed A): j7→j6 cos 5°, j1→j4 cos 28°, j3→j4 cos 63°,
    # j5→j4 cos 90°; j7 and j1 move. j1 takes j0 (absorbed in step 1) along into j4.
    metric = planar(0, 2, 90, 93, 30, 300, 200, 205)
    plan = MCTF()(metric, ctx(4, attention=torch.full((1, 9), 0.1)))
    # Absolute indices: jk is k + 1.
    assert merged_groups(plan) == {7: {7, 8}, 5: {1, 2, 5}, 4: {3, 4}}
    assert groups(plan)[6] == {6} and plan.num_out == 5
    # Token values 0…8, equal attention: each output is the mean of what it holds.
    merged, sizes = merge_tokens(plan, torch.arange(9.0).view(1, 9, 1), None)
    tokens = plan.keep[0].tolist()
    assert dict(zip(tokens, sizes.flatten().tolist())) == {0: 1, 4: 2, 5: 3, 6: 1, 7: 2}
    assert dict(zip(tokens, merged.flatten().tolist())) == \
        pytest.approx({0: 0, 4: 3.5, 5: 8 / 3, 6: 6, 7: 7.5})


def test_mctf_pools_by_attention_times_size():
    # Set A = j0 (0°), j2 (180°); set B = j1 (1°). r = 1: one step, j0 → j1.
    # x′ = Σ a·s·x / Σ a·s over {j0, j1} = (0.1·3·2 + 0.4·1·10) / (0.1·3 + 0.4·1) = 4.6 / 0.7.
    metric = planar(0, 1, 180)
    attention = torch.tensor([[0.3, 0.1, 0.4, 0.2]])
    sizes = torch.tensor([1.0, 3.0, 1.0, 1.0]).view(1, 4, 1)
    plan = MCTF()(metric, ctx(1, attention=attention, sizes=sizes))
    assert merged_groups(plan) == {2: {1, 2}}
    x = torch.tensor([0.0, 2.0, 10.0, -5.0]).view(1, 4, 1)
    merged, new_sizes = merge_tokens(plan, x, sizes)
    order = plan.keep[0].tolist()  # [CLS, j2, j1]: kept, then destinations
    assert order == [0, 3, 2]
    torch.testing.assert_close(merged.flatten(), torch.tensor([0.0, -5.0, 4.6 / 0.7]))
    assert new_sizes.flatten().tolist() == [1.0, 1.0, 4.0]


def test_a_plan_with_pooling_weights_averages_by_weight_times_size():
    x = torch.tensor([[[1.0], [2.0], [10.0]]])
    sizes = torch.tensor([[[1.0], [3.0], [1.0]]])
    weights = torch.tensor([[[1.0], [0.5], [0.25]]])
    plan = MergePlan(keep=torch.tensor([[0, 1]]), src=torch.tensor([[2]]),
                     dst=torch.tensor([[1]]), weights=weights)
    merged, new_sizes = plan.weighted_mean(x, sizes)
    # (0.5·3·2 + 0.25·1·10) / (0.5·3 + 0.25·1) = 5.5 / 1.75; sizes add up as plain sizes.
    torch.testing.assert_close(merged.flatten(), torch.tensor([1.0, 5.5 / 1.75]))
    assert new_sizes.flatten().tolist() == [1.0, 4.0]


# ---------------------------------------------------------------------------------------
# CrossGET


def test_crossget_sources_merge_into_their_own_best_non_source_token():
    # Twin pairs {0°, 5°} and {100°, 104°} hold the four strongest best matches (cos 5°
    # and cos 4°), so with r = 4 they are the sources. Among the other tokens (20°, 130°,
    # 200°, 250°) the 0°/5° pair's best is 20° and the 100°/104° pair's is 130°: two groups
    # of three, not every source in one token.
    metric = planar(0, 20, 100, 5, 130, 104, 200, 250)
    plan = CrossGET()(metric, ctx(4))
    assert merged_groups(plan) == {2: {1, 2, 4}, 5: {3, 5, 6}}
    assert groups(plan)[7] == {7} and groups(plan)[8] == {8}


# ---------------------------------------------------------------------------------------
# DiffRate


def test_diffrate_merges_the_least_attended_by_cosine_not_dot_product():
    # j4 (0°, least attended) is 10° from j0 but j1 (40°) is five times longer: its dot
    # product with j4 is larger (5·cos 40° = 3.8 > cos 10°), its cosine smaller.
    # With r = 2, j3 (200°, next least attended) joins j2 (120°, 80° away; j0 and j1 are
    # 160° and more away).
    metric = planar(10, 40, 120, 200, 0, norms=[1, 5, 1, 1, 1])
    attention = torch.tensor([[0.5, 0.3, 0.25, 0.2, 0.15, 0.01]])
    plan = DiffRate()(metric, ctx(1, attention=attention))
    assert merged_groups(plan) == {1: {1, 5}}
    plan = DiffRate()(metric, ctx(2, attention=attention))
    assert merged_groups(plan) == {1: {1, 5}, 3: {3, 4}}
    pruned = DiffRate(mode="prune")(metric, ctx(2, attention=attention))
    assert pruned.drop_src and set(groups(pruned)) == {0, 1, 2, 3}
    assert merged_groups(pruned) == {}


def test_received_attention_is_the_class_tokens_attention_row():
    # One head, scale 1: CLS query (1, 0) against keys (0,0), (2,0), (0,0) gives logits
    # 0, 2, 0; the other queries point elsewhere and must not count (their mean is 0).
    q = torch.tensor([[1.0, 0.0], [-0.5, 5.0], [-0.5, -5.0]]).view(1, 1, 3, 2)
    k = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]).view(1, 1, 3, 2)
    e2 = math.exp(2.0)
    got = received_attention(q, k, 1.0, None, num_prefix=1)
    torch.testing.assert_close(got, torch.tensor([[1.0, e2, 1.0]]) / (2 + e2))
    # Proportional attention's log s on the keys: sizes 1, 1, 2.
    bias = torch.tensor([0.0, 0.0, math.log(2.0)]).view(1, 1, 1, 3)
    got = received_attention(q, k, 1.0, bias, num_prefix=1)
    torch.testing.assert_close(got, torch.tensor([[1.0, e2, 2.0]]) / (3 + e2))
    # Without a prefix token: the mean query (0, 0) attends uniformly.
    got = received_attention(q, k, 1.0, None, num_prefix=0)
    torch.testing.assert_close(got, torch.full((1, 3), 1 / 3))


# ---------------------------------------------------------------------------------------
# DCT


def test_dct_of_two_tokens_into_one_is_their_mean():
    # DCT-II of (a, b): ((a + b)/√2, (a − b)/√2); keeping the first and inverting at length
    # 1 gives (a + b)/√2, times √(1/2): the mean.
    plan = DCT()(torch.zeros(1, 3, 4), ctx(1))
    torch.testing.assert_close(plan.matrix, torch.tensor([[0.5, 0.5]]))


def test_dct_is_truncated_dct_ii_and_its_inverse_at_the_shorter_length():
    scipy_fft = pytest.importorskip("scipy.fft")
    tokens, kept = 12, 7
    x = torch.randn(tokens, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coefficients = scipy_fft.dct(x.numpy(), type=2, norm="ortho", axis=0)[:kept]
    expected = scipy_fft.idct(coefficients, type=2, norm="ortho", axis=0) * math.sqrt(kept / tokens)
    plan = DCT()(torch.zeros(1, tokens + 1, 4), ctx(tokens - kept))
    torch.testing.assert_close(plan.matrix.double() @ x, torch.from_numpy(expected),
                               atol=1e-5, rtol=1e-5)


def test_dct_on_a_model_keeps_the_prefix_and_shares_the_count_equally():
    # 64 patches → 52 → 42 → 34 → 28 resampled tokens; each stands for 64/28 patches.
    model = build("vit")
    pitome.patch(model, algo="dct", ratio=0.8)
    with torch.no_grad():
        model(images(2))
    info = pitome.merge_info(model)
    assert info.token_counts == [65, 53, 43, 35, 29]
    expected = torch.cat([torch.ones(2, 1, 1), torch.full((2, 28, 1), 64 / 28)], dim=1)
    torch.testing.assert_close(info.sizes, expected)


# ---------------------------------------------------------------------------------------
# The floors


def test_prune_on_a_model_keeps_whole_tokens_of_size_one():
    # Pruning never merges: 65 − (12 + 10 + 8 + 6) = 29 tokens of one patch each.
    model = build("vit")
    pitome.patch(model, algo="prune", ratio=0.8, trace_source=True)
    with torch.no_grad():
        model(images(2))
    info = pitome.merge_info(model)
    assert info.token_counts[-1] == 29
    assert torch.equal(info.sizes, torch.ones(2, 29, 1))
    assert info.source[:, 0, 0].tolist() == [1.0, 1.0]  # CLS survives


def test_prune_drops_exactly_the_least_attended_tokens():
    attention = torch.tensor([[0.9, 0.05, 0.3, 0.01, 0.2, 0.02, 0.1]])
    plan = AttentionPruning()(planar(0, 10, 20, 30, 40, 50), ctx(3, attention=attention))
    # j0 (0.05), j2 (0.01) and j4 (0.02) are the least attended: absolute 1, 3, 5.
    assert plan.drop_src and set(plan.src[0].tolist()) == {1, 3, 5}
    assert plan.keep[0, 0] == 0 and sorted(plan.keep[0].tolist()) == [0, 2, 4, 6]


def test_random_matching_spreads_sources_and_destinations_uniformly():
    # 10 tokens, r = 3, 300 draws: each token is a source with probability 3/10 (90
    # expected), and each of the ⌊10/2⌋ = 5 destination slots receives a source with
    # probability 1/5 (180 of the 900 merges expected). Bounds are about ±4.5 σ.
    torch.manual_seed(0)
    metric = planar(*range(0, 100, 10))
    source_counts = torch.zeros(11)
    slot_counts = torch.zeros(5)
    for _ in range(300):
        plan = RandomMatching()(metric, ctx(3))
        assert plan.num_out == 8 and (plan.src[0] >= 1).all()
        source_counts.index_add_(0, plan.src[0], torch.ones(3))
        slot_counts.index_add_(0, plan.dst[0] - plan.dst.new_tensor(plan.num_out - 5),
                               torch.ones(3))
    assert source_counts[0] == 0
    assert ((source_counts[1:] - 90).abs() < 36).all(), source_counts
    assert ((slot_counts - 180).abs() < 55).all(), slot_counts


# ---------------------------------------------------------------------------------------
# PiToMe: energy, margin, protection


def test_energy_has_the_margin_subtracted_inside_the_elu():
    # Three unit vectors at 0°, 60°, 180°: S = [[1, .5, −1], [.5, 1, −.5], [−1, −.5, 1]].
    # m = 0.25, E_i = ⅓ Σ_j ELU(S_ij − m):
    #   E_0 = ⅓(0.75 + 0.25 + e^−1.25 − 1) = ⅓e^−1.25
    #   E_1 = ⅓(0.25 + 0.75 + e^−0.75 − 1) = ⅓e^−0.75
    #   E_2 = ⅓(e^−1.25 − 1 + e^−0.75 − 1 + 0.75)
    similarity = cosine_similarity(unit_rows(planar(0, 60, 180, prefix=0)))
    e = math.exp
    expected = torch.tensor([[e(-1.25) / 3, e(-0.75) / 3, (e(-1.25) + e(-0.75) - 1.25) / 3]])
    torch.testing.assert_close(energy_score(similarity, 0.25), expected)
    # A larger margin lowers every energy: with m = 0.5 token 1's terms are
    # ELU(0) + ELU(0.5) + ELU(−1) = 0.5 + e^−1 − 1.
    assert energy_score(similarity, 0.5)[0, 1].item() == pytest.approx((e(-1.0) - 0.5) / 3)


def test_gaussian_energy_is_a_kernel_of_width_one_minus_margin():
    # σ = 1 − 0.25 = 0.75; token 0's distances 1 − S are 0, 0.5, 2.
    similarity = cosine_similarity(unit_rows(planar(0, 60, 180, prefix=0)))
    terms = [math.exp(-0.5 * (d / 0.75) ** 2) for d in (0.0, 0.5, 2.0)]
    assert energy_score(similarity, 0.25, "gaussian")[0, 0].item() == pytest.approx(sum(terms) / 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_token_energy_known_values_on_each_backend(backend):
    metric = planar(0, 60, 180, prefix=0)
    e = math.exp
    expected = torch.tensor([[e(-1.25) / 3, e(-0.75) / 3, (e(-1.25) + e(-0.75) - 1.25) / 3]])
    with kernel_backend(backend):
        got = token_energy(metric, 0.25)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def clusters() -> torch.Tensor:
    """CLS, then seven tokens: a cluster u of three near copies (j6 = e0 and j1, j4 = e0 ±
    0.1·e4, cosines 0.995 and 0.980 among them), two exact copies of w = e1 (j0, j5), and
    y = e2 (j2), z = e3 (j3), each orthogonal to the rest.

    With m = 0.5 an orthogonal neighbour adds ELU(−0.5) = e^−0.5 − 1 ≈ −0.39, so
    E(j6) = (0.5 + 2·0.495 − 4·0.39)/7 ≈ −0.012 > E(j1) = E(j4) ≈ (0.5 + 0.495 + 0.480 −
    4·0.39)/7 ≈ −0.014 > E(w) = (2·0.5 − 5·0.39)/7 ≈ −0.14 > E(y) = E(z) = (0.5 − 6·0.39)/7.
    """
    basis = torch.eye(5)
    u, w = basis[0], basis[1]
    rows = [w, u + 0.1 * basis[4], basis[2], basis[3], u - 0.1 * basis[4], w, u]
    return torch.stack([torch.full((5,), 0.5)] + rows).unsqueeze(0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_pitome_merges_the_largest_cluster_and_protects_everything_else(backend):
    # Absolute indices: u at 2, 5, 7; w at 1, 6; y at 3; z at 4.
    # r = 2: the 2r = 4 highest energies are u's three and one w. A (energy ranks 0, 2)
    # holds j6 and one of j1, j4; B (ranks 1, 3) the other and a w: both A tokens join u's
    # B token (cosine ≥ 0.98 against 0). The other w, y and z are protected, although the
    # two w copies are the most similar pair (cosine 1): a pool of more than 2r tokens would
    # merge them first.
    with kernel_backend(backend):
        plan = PiToMe()(clusters(), ctx(2, margin=0.5))
    assert list(merged_groups(plan).values()) == [{2, 5, 7}] and plan.num_out == 6
    # BSM-PiToMe (all tokens alternate by energy, ToMe's top-r edges) with r = 3: A = ranks
    # 0, 2, 4, 6 (j6, a u, a w, y or z), B = ranks 1, 3, 5 (a u, a w, y or z); the three
    # edges of cosine ≥ 0.98 merge both clusters.
    with kernel_backend(backend):
        plan = get_method("bsm_pitome").build()(clusters(), ctx(3, margin=0.5))
    assert sorted(map(frozenset, merged_groups(plan).values())) == \
        sorted([frozenset({2, 5, 7}), frozenset({1, 6})])


class Recorder(Algorithm):
    """ToMe that records what each block's context and metric were."""

    def __init__(self, needs_attention: bool = False) -> None:
        self.needs_attention = needs_attention
        self.contexts: dict[int, MergeContext] = {}
        self.metrics: dict[int, torch.Tensor] = {}

    def __call__(self, metric: torch.Tensor, context: MergeContext) -> MergePlan:
        self.contexts[context.block] = context
        self.metrics[context.block] = metric
        return ToMe()(metric, context)


def test_each_block_gets_its_familys_margin():
    # timm ViT/DeiT: m_i = 0.75 − 0.75·i/L with L = 4.
    recorder = Recorder()
    model = pitome.patch(build("vit"), algo=recorder, ratio=0.9)
    with torch.no_grad():
        model(images(1))
    assert [recorder.contexts[b].margin for b in range(4)] == [0.75, 0.5625, 0.375, 0.1875]
    transformers = pytest.importorskip("transformers")
    # Hugging Face CLIP: 0.9 − 0.9·i/L.
    recorder = Recorder()
    torch.manual_seed(0)
    clip = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8)).eval()
    pitome.patch(clip, algo=recorder, ratio=0.9)
    with torch.no_grad():
        clip(pixel_values=torch.randn(1, 3, 32, 32))
    assert [recorder.contexts[b].margin for b in range(4)] == \
        pytest.approx([0.9, 0.675, 0.45, 0.225])
    # BERT: 0.9 − 0.25·i/L, in the first three blocks only.
    recorder = Recorder()
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32)).eval()
    pitome.patch(bert, algo=recorder, ratio=0.9)
    with torch.no_grad():
        bert(input_ids=torch.arange(3, 23).unsqueeze(0))
    assert sorted(recorder.contexts) == [0, 1, 2]
    assert [recorder.contexts[b].margin for b in range(3)] == pytest.approx([0.9, 0.8375, 0.775])


# ---------------------------------------------------------------------------------------
# Proportional attention: log s on the keys


def test_log_size_bias_is_log_s_along_the_keys():
    sizes = torch.tensor([[[1.0], [2.0], [4.0]]])
    bias = log_size_bias(sizes, torch.float32)
    assert bias.shape == (1, 1, 1, 3)
    torch.testing.assert_close(bias.flatten(), torch.tensor([0.0, math.log(2), math.log(4)]))


def bf16_attention_tolerance(v: torch.Tensor) -> dict[str, float]:
    """How far bf16 attention may be from exact: each weight rounded to bf16 (at most 2⁻⁸
    relative, so 2⁻⁸·max|v| on the output), then the output itself (within one bf16 ulp,
    2⁻⁷ relative, whichever way it rounds)."""
    return dict(atol=2 ** -8 * v.float().abs().max().item(), rtol=2 ** -7)


def attention_case(dtype):
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(1, 2, 3, 16, generator=generator).to(dtype)
    sizes = torch.tensor([[[1.0], [3.0], [4.0]]])
    return v, sizes


@pytest.mark.parametrize("backend", BACKENDS)
def test_proportional_attention_with_constant_logits_is_the_size_weighted_mean(backend):
    # Zero queries: every logit is log s_j, so the weights are s_j / Σ s = (1, 3, 4) / 8.
    dtype = torch.float32 if backend == "torch" else torch.bfloat16
    v, sizes = attention_case(dtype)
    q = k = torch.zeros_like(v)
    with kernel_backend(backend):
        out = proportional_attention(q, k, v, sizes, 0.25)
    expected = (v.float() * torch.tensor([1.0, 3.0, 4.0]).view(1, 1, 3, 1) / 8).sum(2, keepdim=True)
    expected = expected.expand(-1, -1, 3, -1).transpose(1, 2).reshape(1, 3, 32)
    tolerance = dict(atol=1e-6, rtol=0) if dtype == torch.float32 else bf16_attention_tolerance(v)
    torch.testing.assert_close(out.float(), expected, **tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_proportional_attention_over_merged_copies_is_attention_over_the_copies(backend):
    # Keys and values j1 = j2 = j3 merged into one token of size 3: with log 3 on its logits
    # every query attends exactly as it did to the three copies.
    dtype = torch.float32 if backend == "torch" else torch.bfloat16
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 3, 16, generator=generator).to(dtype) for _ in range(3))
    copies = [0, 1, 1, 1, 2]
    full = torch.nn.functional.scaled_dot_product_attention(
        q.float()[:, :, copies], k.float()[:, :, copies], v.float()[:, :, copies], scale=0.3)
    full = full.transpose(1, 2).reshape(1, 5, 32)[:, [0, 1, 4]]
    with kernel_backend(backend):
        merged = proportional_attention(q, k, v, torch.tensor([[[1.0], [3.0], [1.0]]]), 0.3)
    tolerance = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else bf16_attention_tolerance(v)
    torch.testing.assert_close(merged.float(), full, **tolerance)


def test_the_merge_state_biases_keys_by_log_size_only_with_proportional_attention():
    # The bias every adapter hands attention: log s on the key axis, none before a merge.
    from pitome.runtime.state import MergeState

    model = pitome.patch(build("vit"), algo="tome", ratio=0.8, prop_attn=True)
    state = MergeState(pitome.merge_config(model), torch.zeros(1, 5, 8), 1, 4)
    assert state.attention_bias(torch.float32) is None
    state.sizes = torch.tensor([[[1.0], [2.0], [1.0], [5.0], [1.0]]])
    bias = state.attention_bias(torch.float32)
    assert bias.shape == (1, 1, 1, 5)
    torch.testing.assert_close(bias.flatten(), torch.tensor([1.0, 2.0, 1.0, 5.0, 1.0]).log())
    pitome.patch(model, algo="tome", ratio=0.8, prop_attn=False)
    state = MergeState(pitome.merge_config(model), torch.zeros(1, 5, 8), 1, 4)
    state.sizes = torch.tensor([[[1.0], [2.0], [1.0], [5.0], [1.0]]])
    assert state.attention_bias(torch.float32) is None


# ---------------------------------------------------------------------------------------
# Adapters: timm pooling, BLIP's fused qkv


@pytest.mark.parametrize("include_prefix", [False, True])
def test_timm_average_pooling_weighs_by_size_over_the_tokens_timm_pools(include_prefix):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(**TINY, global_pool="avg", reg_tokens=2,
                              pool_include_prefix=include_prefix).eval()
    prefix = 0 if include_prefix else model.num_prefix_tokens
    assert model.num_prefix_tokens == 3
    pitome.patch(model, algo="tome", ratio=0.8)
    x = images(2)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        sizes = pitome.merge_info(model).sizes
        tokens, weights = features[:, prefix:], sizes[:, prefix:]
        expected = model.head(model.fc_norm((tokens * weights).sum(1) / weights.sum(1)))
    assert weights.sum().item() == 2 * (65 + 2 - prefix)
    torch.testing.assert_close(logits, expected)


def blip_vision():
    transformers = pytest.importorskip("transformers")
    model = transformers.BlipVisionModel(transformers.BlipVisionConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8)).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # BLIP's own initialisation leaves a tiny model nearly degenerate
        for name, parameter in model.named_parameters():
            if not ("norm" in name.lower() and name.endswith("weight")):
                scale = 0.1 if parameter.dim() > 1 else 0.02
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    return model


def test_blip_merges_on_the_keys_of_its_fused_qkv_and_ranks_by_the_class_query():
    # BLIP's qkv projection is [queries | keys | values] along channels, 2 heads of 16.
    model = blip_vision()
    recorder = Recorder(needs_attention=True)
    pitome.patch(model, algo=recorder, ratio=0.8)
    captured = []
    hook = model.encoder.layers[0].self_attn.qkv.register_forward_hook(
        lambda module, args, out: captured.append(out.detach()))
    try:
        with torch.no_grad():
            model(pixel_values=torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    finally:
        hook.remove()
    q, k, _ = captured[0].view(2, 17, 3, 2, 16).unbind(2)  # B×T×H×d each
    torch.testing.assert_close(recorder.metrics[0], k.mean(dim=2))
    logits = torch.einsum("bhd,bthd->bht", q[:, 0], k) * 16 ** -0.5
    torch.testing.assert_close(recorder.contexts[0].attention, logits.softmax(-1).mean(1))


def test_blip_proportional_attention_of_unit_sizes_is_blips_own_attention():
    from types import SimpleNamespace

    from pitome.adapters.hf import biased_attention

    model = blip_vision()
    attention = model.encoder.layers[0].self_attn
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    state = SimpleNamespace(sizes=torch.ones(2, 9, 1), config=SimpleNamespace(prop_attn=True))
    with torch.no_grad():
        torch.testing.assert_close(biased_attention(attention, x, state),
                                   attention(hidden_states=x)[0], atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Registered defaults


# name: (proportional attention, count_prefix) as each method's summary and SPEC §5-6 give
# them: ToMe's off-the-shelf default is on; the paper's PiToMe and the authors' timm
# settings run without it.
DEFAULTS = {
    "pitome": (True, False), "pitome_paper": (False, False), "pitome_deit": (False, False),
    "pitome_mae": (False, False), "bsm_pitome": (False, False), "pitome_text": (False, False),
    "tome": (True, False), "tome_authors": (True, True), "tofu": (True, False),
    "dct": (False, False), "diffrate": (True, False), "mctf": (True, False),
    "crossget": (True, False), "random": (True, False), "prune": (False, False),
    "visionzip": (False, False),
}


def test_every_registered_method_has_its_documented_defaults():
    assert set(pitome.available_algorithms()) == set(DEFAULTS)
    model = build("vit")
    for name, (prop_attn, count_prefix) in DEFAULTS.items():
        pitome.patch(model, algo=name, ratio=0.9)
        config = pitome.merge_config(model)
        assert (config.prop_attn, config.schedule.count_prefix) == (prop_attn, count_prefix), name


def test_proportional_attention_default_is_what_the_model_runs():
    # ToMe's default output is its prop_attn=True output, not its prop_attn=False one.
    model = build("vit")
    x = images(1)
    runs = {}
    for setting in (None, True, False):
        pitome.patch(model, algo="tome", ratio=0.8, prop_attn=setting)
        with torch.no_grad():
            runs[setting] = model(x)
    assert torch.equal(runs[None], runs[True]) and not torch.allclose(runs[None], runs[False])


def test_every_registered_method_builds_its_documented_algorithm():
    def built(name):
        return get_method(name).build()

    paper = built("pitome_paper")
    assert type(paper) is PiToMe and (paper.pool, paper.split, paper.energy, paper.alpha) == \
        (1.0, "alternate", "elu", 1.0)
    assert not paper.size_weighted
    bsm = built("bsm_pitome")
    assert type(bsm) is PiToMe and math.isinf(bsm.pool) and bsm.split == "alternate"
    text = built("pitome_text")
    assert (text.energy, text.split, text.pool) == ("gaussian", "contiguous", 1.0)
    default = built("pitome")
    assert type(default) is Hybrid and default.switch == 0.5
    assert type(default.early) is ToMe and not default.early.prefix_parity
    assert type(default.late) is PiToMe and default.late.pool == 1.0
    deit, mae = built("pitome_deit"), built("pitome_mae")
    assert math.isinf(deit.early.pool) and deit.late.pool == 1.0 and deit.switch == 0.5
    assert mae.early.pool == 1.0 and math.isinf(mae.late.pool) and mae.switch == 0.5
    assert not built("tome").prefix_parity and built("tome_authors").prefix_parity
    assert built("tofu").prune_until == 0.25
    mctf = built("mctf")
    assert (mctf.tau_sim, mctf.tau_info, mctf.tau_size) == (1.0, 20.0, 40.0)
    assert built("diffrate").mode == "merge"
    assert [type(built(n)) for n in ("dct", "crossget", "random", "prune")] == \
        [DCT, CrossGET, RandomMatching, AttentionPruning]
    assert [built(n).needs_attention for n in ("diffrate", "mctf", "prune", "tome")] == \
        [True, True, True, False]


def test_hybrids_switch_at_half_the_depth():
    default = get_method("pitome").build()
    for num_blocks, early in ((4, 2), (12, 6), (5, 3)):
        chosen = [default._choose(b, num_blocks) for b in range(num_blocks)]
        assert chosen == [default.early] * early + [default.late] * (num_blocks - early)


def test_diffrate_similarity_pairs_are_tail_times_kept_when_merging():
    # Merging compares each of the r least-attended tokens with each kept one; pruning
    # compares none. (DiffRate counted 0 in both modes before.)
    from pitome.algorithms.diffrate import DiffRate

    assert DiffRate("merge").similarity_pairs(196, 0, 12, r=19) == 19 * 177
    assert DiffRate("prune").similarity_pairs(196, 0, 12, r=19) == 0
