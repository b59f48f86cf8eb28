"""The clean-prompt characterization set: snippets, multi-domain label lists, styles."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pandas as pd
import pytest

from mechdistill.labels import LabelSpace
from mechdistill.teacher.clean_prompts import (
    GUIDED_INSTRUCTION,
    GUIDED_SYSTEM,
    NEUTRAL_INSTRUCTION,
    build_clean_prompts,
    multi_domain_list,
    parse_style,
    snippet,
)
from tests.helpers import StubEmbedder

SETTINGS = {"n_labels": 30, "n_near_miss": 3, "snippet_sentences": 2, "snippet_chars": 600}
# Words that teach the paper's two phases, written out here (not imported from the code under test).
PHASE_WORDS = re.compile(r"\b(broad|area|rule out|ruled? out|close alternatives?|discriminat\w*|rather than|first|"
                         r"then|narrow\w*|phases?)\b", re.IGNORECASE)


def test_neutral_instruction_asks_for_reasoning_before_the_answer_without_phase_words():
    """An Instruct teacher asked only for labels may answer at once: no CoT, no early queries, no
    refinement positions. The neutral style asks for step-by-step reasoning first and names no phase."""
    assert not PHASE_WORDS.search(NEUTRAL_INSTRUCTION), PHASE_WORDS.findall(NEUTRAL_INSTRUCTION)
    reason = re.search(r"\breason(ing)?\b.*\bstep by step\b|\bstep by step\b", NEUTRAL_INSTRUCTION, re.IGNORECASE)
    assert reason is not None
    assert reason.start() < NEUTRAL_INSTRUCTION.index("<answer>ID; ID</answer>")
    assert PHASE_WORDS.search(GUIDED_INSTRUCTION)  # the guided style keeps teaching them


def test_snippet_keeps_the_sentences_nearest_the_gold_titles_in_document_order():
    text = "Admitted on Monday.\nChest pain at rest.\nLikes gardening.\nTroponin rose overnight."
    embedder = StubEmbedder({"Admitted on Monday.": (0, 1), "Chest pain at rest.": (1, 0), "Likes gardening.": (0, 1),
                             "Troponin rose overnight.": (0.8, 0.6), "Acute myocardial infarction": (1, 0)})
    assert snippet(text, ["Acute myocardial infarction"], embedder, 2, 600) == \
        "Chest pain at rest.\nTroponin rose overnight."
    # the cap drops the second sentence (whole sentences only), never the best one
    assert snippet(text, ["Acute myocardial infarction"], embedder, 2, 25) == "Chest pain at rest."


def test_label_list_spans_every_chapter_and_keeps_gold_and_near_misses(icd_space):
    gold = ["I21.4", "E11.65"]
    near = icd_space.hierarchy_near_misses(gold, 4)
    labels = multi_domain_list(gold, near, icd_space, 60, random.Random(0))
    assert len(labels) == 60 and len(set(labels)) == 60
    assert set(gold) <= set(labels) and set(near) <= set(labels)
    roots = {icd_space.root(lab) for lab in labels}
    all_roots = {icd_space.root(lab) for lab in icd_space.assignable}
    # 60 - 6 distractors, one per non-gold chapter per round: every chapter of ICD-10-CM is there
    assert roots == all_roots
    assert labels != gold + near + labels[len(gold) + len(near):]  # shuffled
    assert multi_domain_list(gold, near, icd_space, 60, random.Random(0)) == labels  # seeded


def test_without_a_hierarchy_distractors_are_uniform_over_the_space():
    space = LabelSpace(pd.DataFrame({"label_id": [f"L{i}" for i in range(50)], "title": [f"t{i}" for i in range(50)],
                                     "parent": None, "ancestors": [[] for _ in range(50)], "assignable": True}))
    labels = multi_domain_list(["L0"], ["L1"], space, 20, random.Random(1))
    assert len(labels) == 20 and {"L0", "L1"} <= set(labels)


@pytest.mark.parametrize("style", ["neutral", "guided", "neutral_exemplar", "guided_exemplar"])
def test_styles_differ_only_in_instruction_and_exemplar(icd_space, style):
    docs = pd.DataFrame({"doc_id": ["d1"], "text": ["Reason for admission: acute myocardial infarction."],
                         "labels": [["I21.4"]]})
    exemplar_doc = pd.Series({"doc_id": "t0", "text": "Known type 2 diabetes with hyperglycemia.", "labels": ["E11.65"]})
    embedder = StubEmbedder({})  # a one-sentence document needs no embedding; ICD has a hierarchy
    out_docs, prompts = build_clean_prompts(docs, icd_space, SETTINGS, style, 0, embedder, exemplar_doc)
    assert out_docs["doc_id"].tolist() == ["clean-d1"] and out_docs["source_doc_id"].tolist() == ["d1"]
    row = prompts.iloc[0]
    messages = json.loads(row["messages"])
    base, exemplar = parse_style(style)
    assert (row["prompt_style"], bool(row["exemplar"])) == (style, exemplar)
    assert len(messages) == (4 if exemplar else 2)
    user = messages[-1]["content"]
    if base == "neutral":
        assert user.startswith(NEUTRAL_INSTRUCTION) and not PHASE_WORDS.search(json.dumps(messages).split("Document:")[0])
    else:
        assert user.startswith(GUIDED_INSTRUCTION) and messages[0]["content"] == GUIDED_SYSTEM
    if style == "guided_exemplar":
        assert "rather than" in messages[2]["content"]  # the phase-teaching worked answer
    if style == "neutral_exemplar":  # reasons before the answer, no phase word
        assert messages[2]["content"] == ("The document supports Type 2 diabetes mellitus with hyperglycemia [E11.65]."
                                          "\n<answer>E11.65</answer>")
    assert len(row["candidates"]) == 30 and "I21.4" in row["candidates"]
    assert all(f"[{c}]" in user for c in row["candidates"])


def test_unknown_style_is_named():
    with pytest.raises(ValueError, match="allowed: neutral, guided"):
        parse_style("chatty")


def test_embedding_near_misses_without_hierarchy():
    from mechdistill.teacher.clean_prompts import near_misses

    space = LabelSpace(pd.DataFrame({"label_id": ["a", "b", "c"], "title": ["heart", "cardiac", "soil"],
                                     "parent": None, "ancestors": [[], [], []], "assignable": True}))
    embedder = StubEmbedder({"heart": (1, 0), "cardiac": (0.9, np.sqrt(1 - 0.81)), "soil": (0, 1)})
    assert near_misses(["a"], space, 1, embedder) == ["b"]
