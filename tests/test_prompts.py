import json
import random

import pandas as pd
import pytest

from mechdistill.prompts import (
    AnswerParser,
    build_prompts,
    exemplar_answer,
    hierarchy_candidates,
    render_prompt,
)

CANDS = ["I50.22", "I50.21", "I50.32", "I10"]


@pytest.fixture(scope="module")
def parser(icd_space):
    return AnswerParser(icd_space, fuzzy_threshold=90)


@pytest.mark.parametrize("output, cot, pred, unmapped", [
    ("Heart. <answer>I50.22; I10</answer>", "Heart.", ["I50.22", "I10"], []),
    ("x <answer>i50.22, I5021\n- I10: Essential (primary) hypertension</answer>", "x", ["I50.22", "I50.21", "I10"], []),
    ("y <answer>Chronic systolic (congestive) heart failure</answer>", "y", ["I50.22"], []),  # exact title
    ("z <answer>chronic diastolic congestive heart failure</answer>", "z", ["I50.32"], []),  # normalised title
    ("t <answer>chronic diastolc (congestive) heart failre</answer>", "t", ["I50.32"], []),  # fuzzy, candidates
    ("u <answer>Chronic systolic (congestive) heart failure [I50.22]</answer>", "u", ["I50.22"], []),
    ("w <answer>I50.22; I50.22; banana split</answer>", "w", ["I50.22"], ["banana split"]),  # dedupe + junk
    ("v <answer>I50.22; I10", "v", ["I50.22", "I10"], []),                          # unclosed block
    ("first <answer>I10</answer> again <answer>I50.21</answer>", "first <answer>I10</answer> again", ["I50.21"], []),
    ("no answer block at all", "no answer block at all", [], []),
    ("<answer></answer>", "", [], []),
    ("ishable Eliath ### <answer>;;; ,, Q99.XYZ ##</answer>", "ishable Eliath ###", [], ["Q99.XYZ ##"]),
])
def test_answer_parsing(parser, output, cot, pred, unmapped):
    parsed = parser.parse(output, CANDS)
    assert (parsed.cot, parsed.pred_labels, parsed.unmapped) == (cot, pred, unmapped)


def test_fuzzy_matching_only_within_candidates(parser):
    # A near-spelling of a label that is not a candidate stays unmapped.
    assert parser.parse("<answer>chronic diastolc (congestive) heart failre</answer>", ["I10"]).pred_labels == []


def test_hierarchy_candidates(icd_space):
    gold = ["I50.22", "J45.20"]
    cands = hierarchy_candidates(gold, icd_space, size=12, n_near_miss=4, rng=random.Random(0))
    assert len(cands) == 12 and set(gold) <= set(cands)
    assert {"I50.20", "I50.21", "I50.23"} & set(cands)  # siblings of I50.22 are near-misses
    roots = {icd_space.root(c) for c in cands}
    assert len(roots) > 2  # distractors from other chapters
    assert cands == hierarchy_candidates(gold, icd_space, 12, 4, random.Random(0))  # deterministic


def test_exemplar_shows_two_phases_and_parses_back(icd_space, parser):
    gold = ["I50.22"]
    cands = ["I50.21", "I50.22", "I10"]
    text = exemplar_answer(gold, cands, icd_space)
    assert "The work-up focused on other forms of heart disease." in text  # phase 1: block I30-I5A
    assert ("Chronic systolic (congestive) heart failure [I50.22] fits the note rather than "
            "Acute systolic (congestive) heart failure [I50.21]") in text  # phase 2: a near-miss ruled out
    assert parser.parse(text, cands).pred_labels == gold


def test_build_prompts_rows(icd_space):
    docs = pd.DataFrame({"doc_id": ["a", "b"], "text": ["Note A", "Note B"], "labels": [["I50.22"], ["I10", "E11.9"]]})
    cfg = {"strategy": "hierarchy", "size": 6, "n_near_miss": 2}
    pcfg = {"exemplar": True, "system": "SYS", "instruction": "Pick labels."}
    out = build_prompts(docs, icd_space, cfg, pcfg, seed=0, exemplar_doc=docs.iloc[0])
    assert list(out["doc_id"]) == ["a", "b"]
    assert (out["gold_in_candidates"] == 1.0).all()
    msgs = json.loads(out["messages"][1])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert "Note B" in msgs[-1]["content"] and "- Essential (primary) hypertension [I10]" in msgs[-1]["content"]
    assert "<answer>I50.22</answer>" in msgs[2]["content"]


def test_render_prompt_without_chat_template():
    class NoTemplate:
        chat_template = None
    text = render_prompt(NoTemplate(), [{"role": "user", "content": "hi"}])
    assert text == "User: hi\n\nAssistant:"
