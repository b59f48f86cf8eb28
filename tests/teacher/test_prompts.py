import json
import random
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechdistill.config import load_config
from mechdistill.labels import LabelSpace
from mechdistill.teacher.answers import AnswerParser
from mechdistill.teacher.prompts import (
    build_prompts,
    candidate_recall,
    exemplar_answer,
    hierarchy_candidates,
    render_prompt,
    retrieval_candidates,
)
from mechdistill.teacher.settings import PromptSettings
from tests.helpers import LetterCountEmbedder

REPO = Path(__file__).resolve().parents[2]


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


# Words that teach the paper's two phases (Sec. 2: a broad area first, then ruling out close
# alternatives). Written out here, not imported, so the test checks the text, not the code's own list.
PHASE_WORDS = re.compile(r"\b(broad|area|semantic area|rule out|ruled? out|close alternatives?|discriminat\w*|"
                         r"rather than|first|then|narrow\w*|phases?)\b", re.IGNORECASE)


def test_neutral_exemplar_reasons_without_phase_words_and_parses_back(icd_space, parser):
    gold = ["I50.22", "I10"]
    cands = ["I50.21", "I50.22", "I10", "E11.9"]
    text = exemplar_answer(gold, cands, icd_space, "neutral")
    assert text == ("The document supports Chronic systolic (congestive) heart failure [I50.22].\n"
                    "The document supports Essential (primary) hypertension [I10].\n<answer>I50.22; I10</answer>")
    assert not PHASE_WORDS.search(text)
    assert parser.parse(text, cands).pred_labels == gold
    assert PHASE_WORDS.search(exemplar_answer(gold, cands, icd_space, "guided"))  # the guided one teaches them
    with pytest.raises(ValueError, match="allowed: guided, neutral"):
        exemplar_answer(gold, cands, icd_space, "terse")


def test_paper_config_task_prompt_teaches_no_phases(icd_space):
    """config/paper.yaml's task prompt as the teacher sees it (system, exemplar turn, instruction) asks
    for reasoning before the answer and names no phase; config/config.yaml's demo prompt does (a 135M
    teacher needs it)."""
    docs = pd.DataFrame({"doc_id": ["x0", "x1"], "labels": [["I50.22"], ["I10", "E11.9"]],
                         "text": ["Chronic systolic heart failure, on furosemide.", "Hypertension; type 2 diabetes."]})
    cand = {"strategy": "hierarchy", "size": 8, "n_near_miss": 3}

    def chat(config_name: str) -> list[dict]:
        prompt_cfg = PromptSettings.from_config(load_config(REPO / "config" / config_name)).mapping()
        rows = build_prompts(docs, icd_space, cand, prompt_cfg, seed=0, exemplar_doc=docs.iloc[0])
        return json.loads(rows["messages"].iloc[1])

    messages = chat("paper.yaml")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]  # the exemplar is on
    instruction = messages[-1]["content"].split("\nDocument:")[0]
    task_text = "\n".join([messages[0]["content"], messages[1]["content"].split("\nDocument:")[0],
                           messages[2]["content"], instruction])
    assert not PHASE_WORDS.search(task_text), PHASE_WORDS.findall(task_text)
    assert re.search(r"step by step", messages[0]["content"] + instruction, re.IGNORECASE)
    assert re.search(r"reason", instruction, re.IGNORECASE)
    assert instruction.index("<answer>") > re.search(r"reason", instruction, re.IGNORECASE).start()
    assert messages[2]["content"].endswith("<answer>I50.22</answer>") and "\n" in messages[2]["content"]  # reasons first

    demo = chat("config.yaml")
    assert PHASE_WORDS.search(demo[0]["content"]) and "rather than" in demo[2]["content"]


def _letter_space() -> LabelSpace:
    """Three labels whose titles are one letter each (LetterCountEmbedder: its unit axis)."""
    return LabelSpace(pd.DataFrame({"label_id": ["A", "B", "D"], "title": ["aaaa", "bbbb", "dddd"],
                                    "parent": [None] * 3, "ancestors": [[]] * 3, "assignable": [True] * 3}))


def test_retrieval_reads_the_whole_document_not_its_first_word_pieces(byte_tok):
    """The gold-relevant text ("d"s) lies after the first 16 tokens the embedder reads: cut there, as the
    old `embedder.encode(texts)` did, the document looks like "a"s and D is not retrieved; embedded in
    windows it is."""
    space = _letter_space()
    embedder = LetterCountEmbedder(byte_tok, max_seq_length=16)       # one token per character
    document = "aaa " * 4 + "ddd " * 12                              # 16 chars of a, then 48 of d
    assert retrieval_candidates([document], space, size=1, embedder=embedder) == [["D"]]
    # what the old code did: the document's embedding from its first 16 tokens only
    cut = embedder.encode([document]) @ embedder.encode(["aaaa", "bbbb", "dddd"]).T   # [1, labels]
    assert ["A", "B", "D"][int(cut.argmax())] == "A"

    docs = pd.DataFrame({"doc_id": ["x"], "text": [document], "labels": [["D"]]})
    rows = build_prompts(docs, space, {"strategy": "retrieval", "size": 1}, {"exemplar": False, "system": "S",
                                                                           "instruction": "I"}, seed=0,
                         embedder=embedder)
    assert rows["candidates"].tolist() == [["D"]] and rows["gold_in_candidates"].tolist() == [1.0]


def test_candidate_recall_of_hand_built_rows():
    rows = pd.DataFrame({"gold_in_candidates": [1.0, 0.5, 0.0, 1.0]})
    assert candidate_recall(rows) == {"n_docs": 4, "mean_recall": 0.625, "all_gold": 0.5, "no_gold": 0.25}
    empty = candidate_recall(rows.iloc[:0])
    assert empty["n_docs"] == 0 and np.isnan(empty["mean_recall"])
