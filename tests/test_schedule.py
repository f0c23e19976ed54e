import pytest

from pitome.core.schedule import LinearMargin, TokenSchedule, check_ratio, linear_r, \
    resolve_margin, token_counts, tokens_to_merge


def test_vit_b_schedule_at_0_9_matches_the_paper():
    merges = TokenSchedule(ratio=0.9).plan(197, num_prefix=1, num_blocks=12)
    assert token_counts(197, merges) == [197, 178, 161, 145, 131, 118, 107, 97, 88, 80, 73, 66, 60]


def test_r_is_exact_where_binary_rounding_would_lose_one():
    assert tokens_to_merge(130, 0.9) == 13
    assert tokens_to_merge(100, 0.9) == 10
    assert tokens_to_merge(196, 1.0) == 0


@pytest.mark.parametrize("ratio", [0.49, 1.01, -1, 2])
def test_ratio_out_of_range_is_a_clear_error(ratio):
    with pytest.raises(ValueError, match="out of range"):
        check_ratio(ratio)


def test_ratio_one_half_merges_half_and_never_more():
    merges = TokenSchedule(ratio=0.5).plan(197, num_prefix=1, num_blocks=12)
    assert merges[0] == 98
    assert all(2 * r <= t - 1 for r, t in zip(merges, token_counts(197, merges)))


def test_fixed_r_forms():
    assert TokenSchedule(r=8).plan(197, 1, 4) == [8, 8, 8, 8]
    assert TokenSchedule(r=[4, 2]).plan(197, 1, 4) == [4, 2, 0, 0]
    assert TokenSchedule(r=(10, 0.5)).plan(197, 1, 3) == linear_r(10, 3, 0.5) == [5, 10, 15]


def test_impossible_r_names_the_block():
    # 196 mergeable tokens: 156, 116, 76 after blocks 0-2; block 3 would need 80 ≤ 76.
    with pytest.raises(ValueError, match="block 3 cannot merge r=40"):
        TokenSchedule(r=40).plan(197, 1, 12)
    with pytest.raises(ValueError, match="non-negative"):
        TokenSchedule(r=-1).plan(197, 1, 12)


def test_exactly_one_of_ratio_and_r():
    with pytest.raises(ValueError, match="exactly one"):
        TokenSchedule(ratio=0.9, r=4)


def test_count_prefix_convention_and_merge_blocks():
    assert TokenSchedule(ratio=0.9, count_prefix=True).plan(197, 1, 1) == [19]
    assert TokenSchedule(ratio=0.9, merge_blocks=(0, 2)).plan(197, 1, 4) == [19, 0, 17, 0]


def test_margin_schedules():
    assert resolve_margin(LinearMargin(0.75, 0.75), 0, 12) == 0.75
    assert resolve_margin(LinearMargin(0.75, 0.75), 6, 12) == pytest.approx(0.375)
    assert resolve_margin(0.5, 3, 12) == 0.5
    assert resolve_margin([0.1, 0.2], 1, 2) == 0.2
    with pytest.raises(ValueError, match="2 values"):
        resolve_margin([0.1, 0.2], 1, 12)


def test_a_token_count_is_reached_exactly_by_a_geometric_schedule():
    from pitome.core.schedule import merges_for_tokens

    for target in (64, 128, 192, 300):
        merges = merges_for_tokens(576, target, list(range(23)), 24)
        counts = token_counts(576, merges)
        assert counts[-1] == target and merges[23] == 0
        assert all(2 * r <= before for r, before in zip(merges, counts))
        assert all(r > 0 for r in merges[:23])
    assert merges_for_tokens(576, 600, list(range(23)), 24) == [0] * 24
    # Through the schedule: prefix tokens are not counted, merge_blocks are respected.
    merges = TokenSchedule(tokens=20, merge_blocks=(1, 3)).plan(65, 1, 4)
    assert merges[0] == merges[2] == 0 and token_counts(65, merges)[-1] == 21


def test_an_unreachable_token_count_is_refused_or_clamped():
    from pitome.core.schedule import merges_for_tokens

    with pytest.raises(ValueError, match=r"tokens=3 is out of reach.*tokens >= 4"):
        TokenSchedule(tokens=3).plan(65, 1, 4)  # 64 -> 32 -> 16 -> 8 -> 4 at the fewest
    assert token_counts(64, merges_for_tokens(64, 3, [0, 1, 2, 3], 4, clamp=True))[-1] == 4
    with pytest.raises(ValueError, match="at least one token"):
        TokenSchedule(tokens=0)
    with pytest.raises(TypeError, match="whole number"):
        TokenSchedule(tokens=2.5)
    with pytest.raises(ValueError, match="exactly one of ratio"):
        TokenSchedule(ratio=0.9, tokens=8)


def test_a_one_shot_schedule_removes_everything_in_the_last_merging_block():
    blocks = tuple(range(23))
    by_ratio = TokenSchedule(ratio=0.9).plan(577, 1, 24)
    at_once = TokenSchedule(ratio=0.9, one_shot=True, merge_blocks=blocks).plan(577, 1, 24)
    assert at_once[:22] == [0] * 22 and at_once[23] == 0
    assert at_once[22] == sum(TokenSchedule(ratio=0.9, merge_blocks=blocks).plan(577, 1, 24))
    assert sum(by_ratio) > at_once[22]  # the ratio schedule also merges in block 23
    assert TokenSchedule(tokens=3, one_shot=True).plan(65, 1, 4) == [0, 0, 0, 61]


@pytest.mark.parametrize("schedule", [
    TokenSchedule(ratio=0.9), TokenSchedule(ratio=(1.0, 0.8, 0.7), merge_blocks=(1, 2)),
    TokenSchedule(r=(8, -0.5), count_prefix=True), TokenSchedule(tokens=20, one_shot=True)])
def test_a_schedule_rebuilds_from_its_key(schedule):
    """torch.compile hands the plan the schedule's key, a string, not the schedule."""
    import copy
    import pickle

    assert TokenSchedule.from_key(schedule.key) == schedule
    assert pickle.loads(pickle.dumps(schedule)).key == copy.deepcopy(schedule).key == schedule.key
