"""The anchors artifact: near-misses that do not read the CoT, N positions that follow the paper."""

import pandas as pd

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
