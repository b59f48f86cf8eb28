"""Head sets: cumulative bins of top-ranked heads and count-matched random / lowest controls."""

from __future__ import annotations

import pytest

from mechdistill.patching.head_sets import control_head_sets, cumulative_bins, lowest_heads, random_head_sets

ALL_HEADS = [(layer, head) for layer in range(5) for head in range(6)]  # 30 heads


def test_cumulative_bins_capped_and_deduplicated():
    bins = cumulative_bins(ALL_HEADS)
    assert list(bins) == [3, 8, 16, 30]
    assert bins[3] == ALL_HEADS[:3] and bins[30] == ALL_HEADS
    assert list(cumulative_bins(ALL_HEADS[:5], bins=(3, 8, 16))) == [3, 5]


def test_lowest_heads():
    assert lowest_heads(ALL_HEADS, 3) == [(4, 5), (4, 4), (4, 3)]
    assert len(lowest_heads(ALL_HEADS, 100)) == 30
    with pytest.raises(ValueError):
        lowest_heads(ALL_HEADS, -1)


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
    controls = control_head_sets(ALL_HEADS, n_random=2)
    assert list(controls) == [3, 8, 16, 30]
    assert controls[8]["lowest"] == lowest_heads(ALL_HEADS, 8)
    assert all(len(s) == 8 for s in controls[8]["random"]) and len(controls[8]["random"]) == 2
    assert len(controls[30]["random"]) == 1  # a single set of all 30 heads exists
