"""Head sets: cumulative bins of top-ranked heads and count-matched near-zero, most-negative and random
controls."""

from __future__ import annotations

import pytest

from mechdistill.patching.head_sets import (
    CONTROLS,
    SIGNED_SCORE,
    control_head_sets,
    cumulative_bins,
    most_negative_heads,
    near_zero_heads,
    random_head_sets,
)

ALL_HEADS = [(layer, head) for layer in range(5) for head in range(6)]  # 30 heads
SCORES = [30.0 - i for i in range(30)]  # descending, 30 .. 1
# a hand-made ranking with positive and negative scores (descending, as the stage sorts them)
SIGNED = {(0, 0): 3.0, (0, 1): 1.5, (1, 0): 0.2, (1, 1): -0.05, (2, 0): -0.4, (2, 1): -2.0, (3, 0): -5.0}


def test_cumulative_bins_capped_and_deduplicated():
    bins = cumulative_bins(ALL_HEADS)
    assert list(bins) == [3, 8, 16, 30]
    assert bins[3] == ALL_HEADS[:3] and bins[30] == ALL_HEADS
    assert list(cumulative_bins(ALL_HEADS[:5], bins=(3, 8, 16))) == [3, 5]


def test_most_negative_heads_are_the_lowest_scores():
    assert most_negative_heads(list(SIGNED), 2) == [(3, 0), (2, 1)]  # -5.0, -2.0
    assert most_negative_heads(ALL_HEADS, 3) == [(4, 5), (4, 4), (4, 3)]
    assert len(most_negative_heads(ALL_HEADS, 100)) == 30
    with pytest.raises(ValueError):
        most_negative_heads(ALL_HEADS, -1)


def test_near_zero_heads_have_the_smallest_absolute_scores():
    ranked, scores = list(SIGNED), list(SIGNED.values())
    assert near_zero_heads(ranked, scores, 2) == [(1, 1), (1, 0)]            # |-0.05|, |0.2|
    assert near_zero_heads(ranked, scores, 3) == [(1, 1), (1, 0), (2, 0)]    # then |-0.4|
    assert set(near_zero_heads(ranked, scores, 2)).isdisjoint(most_negative_heads(ranked, 2))
    # ties: ranking order (0.1 is ranked before -0.1)
    assert near_zero_heads([(0, 0), (0, 1), (0, 2)], [0.1, -0.1, -3.0], 2) == [(0, 0), (0, 1)]
    assert len(near_zero_heads(ranked, scores, 100)) == len(SIGNED)
    with pytest.raises(ValueError):
        near_zero_heads(ranked, scores[:-1], 2)


def test_random_head_sets_count_matched_deterministic_distinct():
    sets = random_head_sets(ALL_HEADS, 8, n_seeds=5, seed=3, exclude=ALL_HEADS[:8])
    assert all(len(s) == 8 and len(set(s)) == 8 for s in sets)
    assert len({frozenset(s) for s in sets}) == 5
    assert all(not set(s) & set(ALL_HEADS[:8]) for s in sets)
    assert sets == random_head_sets(ALL_HEADS, 8, n_seeds=5, seed=3, exclude=ALL_HEADS[:8])
    assert sets != random_head_sets(ALL_HEADS, 8, n_seeds=5, seed=4, exclude=ALL_HEADS[:8])
    with pytest.raises(ValueError):
        random_head_sets(ALL_HEADS, 31, n_seeds=1, seed=0)
    with pytest.raises(ValueError):
        random_head_sets(ALL_HEADS[:3], 3, n_seeds=2, seed=0)  # only one distinct set exists


def test_control_head_sets():
    controls = control_head_sets(ALL_HEADS, SCORES, n_random=2)
    assert list(controls) == [3, 8, 16, 30]
    assert set(controls[8]) == {"top", *CONTROLS}
    assert controls[8]["most_negative"] == ALL_HEADS[::-1][:8]
    assert controls[8]["near_zero"] == ALL_HEADS[::-1][:8]  # all scores positive: the smallest are nearest 0
    assert all(len(s) == 8 for s in controls[8]["random"]) and len(controls[8]["random"]) == 2
    assert len(controls[30]["random"]) == 1  # a single set of all 30 heads exists
    signed = control_head_sets(list(SIGNED), list(SIGNED.values()), bins=(2,), n_random=1)
    assert signed[2]["top"] == [(0, 0), (0, 1)]
    assert signed[2]["near_zero"] == [(1, 1), (1, 0)] and signed[2]["most_negative"] == [(3, 0), (2, 1)]
    with pytest.raises(ValueError, match="descending"):
        control_head_sets(ALL_HEADS, SCORES[::-1])


def test_controls_read_the_signed_product_under_both_positive():
    # both_positive scores: two positive heads, then four heads tied at 0 (ranking order among ties is
    # arbitrary). Their products tell them apart: (3, 0) has qk < 0 < ov (product -4), (3, 1) qk > 0 > ov
    # (-1): anti-aligned; (2, 0) and (2, 1) are inert (|qk*ov| ~ 0)
    ranked = [(0, 0), (1, 0), (3, 0), (3, 1), (2, 0), (2, 1)]
    both_positive = [5.0, 3.0, 0.0, 0.0, 0.0, 0.0]
    product = [5.0, 3.0, -4.0, -1.0, 0.01, -0.02]
    sets = control_head_sets(ranked, both_positive, bins=(2,), n_random=1, control_scores=product)[2]
    assert sets["near_zero"] == [(2, 0), (2, 1)]
    assert sets["most_negative"] == [(3, 0), (3, 1)]
    # on the tied scores alone the controls swap: "near zero" would be the anti-aligned heads
    plain = control_head_sets(ranked, both_positive, bins=(2,), n_random=1)[2]
    assert plain["near_zero"] == [(3, 0), (3, 1)] and plain["most_negative"] == [(2, 1), (2, 0)]
    assert SIGNED_SCORE["refine_both_positive"] == "refine_product"
