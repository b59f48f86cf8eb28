"""Token-aligned Phase-1 and Phase-2 corruptions of a clean document."""

from __future__ import annotations

import pytest

from mechdistill.patching.corruptions import (
    NEUTRAL_TERMS,
    align_token_length,
    count_tokens,
    distinguishing_swaps,
    find_occurrences,
    icd_sibling_swaps,
    phase1_corruption,
    phase2_corruption,
)

NOTE = ("72M with worsening dyspnea and orthopnea. Chronic systolic (congestive) heart failure, "
        "EF 35%. Heart failure clinic follow-up; chronic kidney disease stable.")
LOADED_TERMS = ["heart failure", "dyspnea", "Chronic systolic (congestive) heart failure", "kidney disease"]


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
