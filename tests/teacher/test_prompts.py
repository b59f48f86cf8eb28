import json
import random

import pandas as pd
import pytest

from mechdistill.teacher.answers import AnswerParser
from mechdistill.teacher.prompts import build_prompts, exemplar_answer, hierarchy_candidates, render_prompt


@pytest.fixture(scope="module")
def parser(icd_space):
    return AnswerParser(icd_space, fuzzy_threshold=90)


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
