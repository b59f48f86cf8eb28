"""Patching helpers: effect formulas, bootstrap CI, head sets and token-aligned corruptions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mechdistill.patching import (
    NEUTRAL_TERMS,
    align_token_length,
    bootstrap_ci,
    control_head_sets,
    count_tokens,
    cumulative_bins,
    disruption,
    distinguishing_swaps,
    find_occurrences,
    icd_sibling_swaps,
    lowest_heads,
    phase1_corruption,
    phase2_corruption,
    random_head_sets,
    relative_change,
    restoration,
)

NOTE = ("72M with worsening dyspnea and orthopnea. Chronic systolic (congestive) heart failure, "
        "EF 35%. Heart failure clinic follow-up; chronic kidney disease stable.")
LOADED_TERMS = ["heart failure", "dyspnea", "Chronic systolic (congestive) heart failure", "kidney disease"]


# ---------------------------------------------------------------- effect formulas

def test_restoration_and_disruption_by_hand():
    clean, corrupt = np.array([1.0, 0.8, 0.5]), np.array([0.2, 0.4, 0.5])
    patched = np.array([0.6, 0.8, 0.7])
    np.testing.assert_allclose(restoration(patched, clean, corrupt), [0.5, 1.0, np.nan])
    np.testing.assert_allclose(disruption(patched, clean, corrupt), [0.5, 0.0, np.nan])
    assert restoration(0.2, 1.0, 0.2) == 0.0 and disruption(0.2, 1.0, 0.2) == 1.0
    assert math.isnan(restoration(0.3, 0.5, 0.5))  # zero denominator -> NaN, no warning


def test_relative_change_by_hand():
    np.testing.assert_allclose(relative_change([0.3, 0.1, -0.3, 1.0], [0.1, 0.2, -0.2, 0.0]),
                               [2.0, -0.5, -0.5, np.nan])


def test_bootstrap_ci_matches_direct_percentiles():
    values = np.array([0.1, 0.5, 0.35, 0.9, 0.2, np.nan, 0.65, 0.4])
    mean, low, high = bootstrap_ci(values, n_resamples=500, level=0.9, seed=7)
    data = values[~np.isnan(values)]
    idx = np.random.default_rng(7).integers(0, data.size, size=(500, data.size))
    expected_low, expected_high = np.percentile(data[idx].mean(axis=1), [5, 95])
    assert mean == pytest.approx(data.mean())
    assert (low, high) == pytest.approx((expected_low, expected_high))
    assert low <= mean <= high
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan, np.nan]))


# ---------------------------------------------------------------- head sets

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


# ---------------------------------------------------------------- corruptions

def test_find_occurrences_longest_term_case_insensitive_word_bounded():
    spans = find_occurrences(NOTE, LOADED_TERMS + ["failure"])
    texts = [NOTE[a:b] for a, b in spans]
    assert texts == ["dyspnea", "Chronic systolic (congestive) heart failure", "Heart failure", "kidney disease"]
    assert find_occurrences("heartfailure HF", ["heart failure", "F"]) == []


@pytest.mark.parametrize("tok_name", ["byte_tok", "smol_tok"])
def test_phase1_corruption_is_token_aligned(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    corruption = phase1_corruption(NOTE, LOADED_TERMS, NEUTRAL_TERMS, tok)
    assert corruption.aligned, corruption.reason
    assert count_tokens(corruption.corrupted, tok) == count_tokens(NOTE, tok) == corruption.n_tokens_clean
    assert [r.old for r in corruption.replacements] == [NOTE[r.start:r.end] for r in corruption.replacements]
    assert len(corruption.replacements) == 4
    lowered = corruption.corrupted.lower()
    assert "heart failure" not in lowered and "dyspnea" not in lowered and "kidney" not in lowered
    assert "orthopnea" in lowered and "EF 35%" in corruption.corrupted
    if tok_name == "byte_tok":  # one token per byte: alignment means the same byte length
        assert len(corruption.corrupted.encode()) == len(NOTE.encode())
    assert corruption.to_dict()["replacements"][0]["old"] == "dyspnea"


@pytest.mark.parametrize("tok_name", ["byte_tok", "smol_tok"])
def test_phase1_corruption_rejected_when_no_neutral_term_fits(tok_name, request):
    tok = request.getfixturevalue(tok_name)
    # every neutral word changes the token count of "dyspnea" and padding is disabled
    corruption = phase1_corruption(NOTE, ["dyspnea"], ["issue", "matter"], tok, pad=False)
    assert not corruption.aligned and "padding disabled" in corruption.reason
    assert corruption.corrupted == NOTE and corruption.replacements == []
    no_terms = phase1_corruption(NOTE, ["asthma"], NEUTRAL_TERMS, tok)
    assert not no_terms.aligned and "no term" in no_terms.reason


def test_phase1_rejects_terms_shorter_than_any_neutral_word(byte_tok):
    corruption = phase1_corruption("Known HF.", ["HF"], NEUTRAL_TERMS, byte_tok)  # 2 bytes; padding only grows
    assert not corruption.aligned and "'HF'" in corruption.reason


def test_align_token_length(byte_tok, smol_tok):
    for tok in (byte_tok, smol_tok):
        padded, reason = align_token_length("heart failure", "issue", tok)
        assert padded.startswith("issue ") and count_tokens(padded, tok) == count_tokens("heart failure", tok)
        assert align_token_length("a b", "a b", tok) == ("a b", "aligned")
        assert align_token_length("issue", "heart failure and more", tok)[0] is None
        assert align_token_length("heart failure", "issue", tok, pad=False)[0] is None


def test_distinguishing_swaps():
    assert distinguishing_swaps("Chronic systolic (congestive) heart failure",
                                "Acute systolic (congestive) heart failure") == {"Chronic": "Acute"}
    assert distinguishing_swaps("Hypertensive heart disease with heart failure",
                                "Hypertensive heart disease without heart failure") == {"with": "without"}


def test_phase2_corruption_icd_sibling(smol_tok, byte_tok):
    assert icd_sibling_swaps("I50.22", "I50.21") == {"Chronic": "Acute"}
    corruption = phase2_corruption(NOTE, "I50.22", "I50.21", smol_tok, swaps={"EF 35%": "EF 55%"})
    assert corruption.aligned, corruption.reason
    assert [(r.old, r.new) for r in corruption.replacements] == [
        ("Chronic", "Acute"), ("EF 35%", "EF 55%"), ("chronic", "acute")]
    assert "Acute systolic (congestive) heart failure, EF 55%" in corruption.corrupted
    assert count_tokens(corruption.corrupted, smol_tok) == count_tokens(NOTE, smol_tok)
    # bytes: "Chronic" (7) -> "Acute" (5) can only be padded with words of >= 5 bytes: rejected
    rejected = phase2_corruption(NOTE, "I50.22", "I50.21", byte_tok)
    assert not rejected.aligned and "'Chronic'" in rejected.reason
