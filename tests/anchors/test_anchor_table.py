"""The anchors artifact: near-misses that do not read the CoT, N positions that follow the paper."""

import pandas as pd
import pytest

from mechdistill.anchors.anchor_table import anchor_table
from tests.helpers import icd_subtree

# Gold I50.22. The CoT keeps I50.22 and rules out I50.9, which is not among the hierarchy near-misses
# the table picks first (siblings of I50.22 under I50.2: I50.20, I50.21, I50.23)
COT = ("The work-up focused on heart failure.\n"
       "Chronic systolic (congestive) heart failure [I50.22] fits the note rather than "
       "Heart failure, unspecified [I50.9].")


def test_ruled_out_mentions_are_nearmiss_positions_but_not_near_misses(byte_tok):
    space = icd_subtree("I50")
    docs = pd.DataFrame({"doc_id": ["d"], "labels": [["I50.22"]]})
    cot = pd.DataFrame({"doc_id": ["d"], "cot": [COT]}).set_index("doc_id")
    prompts = pd.DataFrame({"doc_id": ["d"], "candidates": [["I50.22", "I50.21", "I50.9", "I50.20"]]}).set_index("doc_id")
    settings = {"near_miss": {"strategies": ["hierarchy"], "n": 2}, "ancestor_levels": 0, "early_tokens": 5}
    row = anchor_table(docs, cot, prompts, space, byte_tok, settings).iloc[0]
    assert row["shortlist"] == ["I50.22"]
    assert "I50.9" not in row["near_misses"] and set(row["near_misses"]) <= {"I50.20", "I50.21", "I50.23"}
    start = COT.index("Heart failure, unspecified")
    assert [list(s) for s in row["nearmiss_spans"]] == [[start, COT.index("[I50.9]") + 7]]
    assert row["reason"] == "" and len(row["refine_spans"]) == 1


def test_phase_yield_counts_cots_with_early_queries_and_refinement_positions_per_style():
    from mechdistill.anchors.anchor_table import phase_yield, phase_yield_warnings

    # hand-built rows: neutral has 3 CoTs (one empty: no early span; one with a refine span),
    # guided_exemplar has 2 (both with early queries and refine spans)
    table = pd.DataFrame({
        "early_span": [[0, 40], [0, 0], [0, 12], [0, 30], [0, 25]],
        "refine_spans": [[[41, 90]], [], [], [[10, 29]], [[3, 20], [21, 25]]],
    })
    styles = pd.Series(["neutral", "neutral", "neutral", "guided_exemplar", "guided_exemplar"])
    out = phase_yield(table, styles).set_index("style")
    assert list(out.index) == ["neutral", "guided_exemplar"]
    assert out.loc["neutral", ["n_docs", "n_early", "n_refine"]].tolist() == [3, 2, 1]
    assert out.loc["guided_exemplar", ["n_docs", "n_early", "n_refine"]].tolist() == [2, 2, 2]
    assert out.loc["neutral", "refine_fraction"] == pytest.approx(1 / 3)

    warnings = phase_yield_warnings(phase_yield(table, styles), min_fraction=0.5)
    # neutral: 2/3 early >= 0.5 (no warning), 1/3 refine < 0.5 (warning); guided_exemplar: none
    assert len(warnings) == 1
    assert "neutral" in warnings[0] and "1 of 3" in warnings[0] and "refinement positions" in warnings[0]
    assert len(phase_yield_warnings(phase_yield(table, styles), min_fraction=0.9)) == 2  # neutral early 2/3 too
    assert phase_yield_warnings(phase_yield(table, styles), min_fraction=0.0) == []
