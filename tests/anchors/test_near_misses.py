"""Anchors, near-misses and the CoT shortlist on a real ICD-10-CM subtree; concept extraction."""

import numpy as np
import pytest

from mechdistill.anchors.concepts import (
    anchor_text,
    concept_prompt,
    extract_concepts,
    label_anchors,
    parse_concepts,
)
from mechdistill.anchors.near_misses import near_misses, shortlist
from tests.helpers import icd_subtree

COT = ("The work-up focused on heart failure.\n"
       "Chronic systolic (congestive) heart failure [I50.22] fits the note "
       "rather than Acute systolic (congestive) heart failure [I50.21].")


@pytest.fixture(scope="module")
def space():
    return icd_subtree("I50")


class FakeEmbedder:
    """Unit vectors by hand: the gold title points along x, near titles lean towards it."""

    def __init__(self, space):
        self.vec = {space.title[lab]: np.array(v, np.float32) for lab, v in {
            "I50.22": [1, 0, 0], "I50.32": [0.9, 0.1, 0], "I50.21": [0.6, 0.8, 0],
            "I50.9": [0, 1, 0], "I50.20": [-1, 0, 0]}.items()}

    def encode(self, texts):
        return np.stack([self.vec.get(t, np.array([0, 0, -1], np.float32)) for t in texts])


def test_label_anchors_with_ancestors(space):
    assert label_anchors(["I50.22"], space) == ["Chronic systolic (congestive) heart failure"]
    assert label_anchors(["I50.22", "I50.21"], space, ancestor_levels=2) == [
        "Chronic systolic (congestive) heart failure", "Acute systolic (congestive) heart failure",
        "Systolic (congestive) heart failure", "Heart failure"]
    assert anchor_text(["Heart failure", "EF 35%."]) == "Key concepts: Heart failure; EF 35%."
    assert anchor_text([]) == ""


def test_hierarchy_near_misses(space):
    assert near_misses(["I50.22"], "", None, space, ["hierarchy"], 3) == ["I50.20", "I50.21", "I50.23"]
    # with candidates, the hierarchy neighbours among them come first
    cands = ["I50.22", "I50.32", "I50.21"]
    assert near_misses(["I50.22"], "", cands, space, ["hierarchy"], 3) == ["I50.21", "I50.32", "I50.20"]


def test_embedding_near_misses(space):
    emb = FakeEmbedder(space)
    cands = ["I50.20", "I50.9", "I50.21", "I50.22", "I50.32"]
    assert near_misses(["I50.22"], "", cands, space, ["embedding"], 3, emb) == ["I50.32", "I50.21", "I50.9"]
    with pytest.raises(ValueError, match="embedder"):
        near_misses(["I50.22"], "", cands, space, ["embedding"], 3)


def test_cot_near_misses_and_union(space):
    assert near_misses(["I50.22"], COT, None, space, ["cot"], 5) == ["I50.21"]
    # a ruled-out gold label is never a near-miss
    assert near_misses(["I50.21"], COT, None, space, ["cot"], 5) == []
    assert near_misses(["I50.22"], COT, None, space, ["cot", "hierarchy"], 3) == ["I50.21", "I50.20", "I50.23"]
    assert near_misses(["I50.22"], COT, None, space, ["hierarchy", "cot"], 2) == ["I50.20", "I50.21"]
    listed = "I50.22 fits rather than [I50.21] or [I50.23], and I50.9 too."
    assert near_misses(["I50.22"], listed, None, space, ["cot"], 5) == ["I50.21", "I50.23", "I50.9"]
    with pytest.raises(ValueError, match="unknown"):
        near_misses(["I50.22"], COT, None, space, ["magic"], 2)


def test_default_near_misses_do_not_read_the_cot(space):
    """The default strategies (schema) are hierarchy, then embedding: a label the CoT rules out is not
    taken first for that (it would raise the CoT's Confusion by construction); `cot` stays available."""
    from mechdistill.config import load_config
    from tests.helpers import REPO

    strategies = load_config(REPO / "config" / "config.yaml")["anchors"]["near_miss"]["strategies"]
    assert strategies == ["hierarchy", "embedding"]
    rules_out_i50_9 = "I50.22 fits the note rather than Heart failure, unspecified [I50.9]."
    emb = FakeEmbedder(space)
    assert near_misses(["I50.22"], rules_out_i50_9, None, space, strategies, 2, emb) == ["I50.20", "I50.21"]
    assert near_misses(["I50.22"], rules_out_i50_9, None, space, ["cot", *strategies], 2, emb) == ["I50.9", "I50.20"]


def test_shortlist(space):
    assert shortlist(COT, ["I50.22", "I50.21"], space) == ["I50.22"]
    assert shortlist("Not I50.21; I50.9 fits. Then I50.21 after all.", None, space) == ["I50.9", "I50.21"]
    assert shortlist("", None, space) == []
    assert shortlist("café — naïve", ["I50.22"], space) == []


def test_parse_concepts_on_junk():
    out = "Sure!\n<concepts>\n1. Heart failure\n- EF 35%; **volume overload**\n* heart FAILURE\n</concepts>"
    assert parse_concepts(out) == ["Heart failure", "EF 35%", "volume overload"]
    assert parse_concepts("a; b; c; d; e; f", max_concepts=2) == ["a", "b"]
    assert parse_concepts("<concepts>ischemia") == ["ischemia"]
    assert parse_concepts("") == [] and parse_concepts("<concepts></concepts>") == []
    assert parse_concepts("--- \n ;; \n ...") == []
    msgs = concept_prompt("Patient with dyspnea.", 4)
    assert [m["role"] for m in msgs] == ["system", "user"] and "at most 4" in msgs[1]["content"]


def test_extract_concepts_with_tiny_model(tiny_config):
    from mechdistill.model_sources import ModelCatalog
    from mechdistill.teacher.backends import TransformersBackend

    backend = TransformersBackend(ModelCatalog.from_config(tiny_config), "tiny_llama", {**tiny_config["generation"], "device": "cpu"})
    docs = ["Chest pain and dyspnea.", "café — naïve"]
    concepts = extract_concepts(lambda chats: [g.text for g in backend(chats)], docs, max_concepts=3)
    assert len(concepts) == 2
    assert all(isinstance(c, str) and c for cs in concepts for c in cs)
    assert all(len(cs) <= 3 for cs in concepts)
    assert extract_concepts(lambda chats: [], [], 3) == []
