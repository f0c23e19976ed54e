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
