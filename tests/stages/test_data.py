"""rules/data.smk stages: prepare_dataset and build_prompts, on the tiny config and on LF-WikiSeeAlso
fixtures through the adapter registry (retrieval candidates with the real embedder)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mechdistill import paths
from mechdistill.config import validate_config
from mechdistill.labels import LabelSpace
from mechdistill.stages.data import run_build_prompts, run_prepare_dataset
from mechdistill.teacher.prompts import retrieval_candidates
from tests.helpers import REPO
from tests.stages.conftest import DATASET

WIKI = REPO / "tests" / "fixtures" / "wikiseealso"


def wiki_config(tmp_path, **candidates):
    return validate_config({
        "datasets": {"wiki": {"adapter": "wikiseealso", "params": {"root": str(WIKI), "val_fraction": 0.3},
                              "candidates": {"strategy": "retrieval", "size": 3, **candidates}}},
        "models": {"t": {"source": "random", "arch": "llama"}},
        "teacher": "t", "cache_dir": str(tmp_path / "cache"),
    })


class BagOfWords:
    """A stub embedder: unit-normalised counts over a fixed vocabulary, computed by hand."""

    vocab = ["cat", "dog", "mammal", "wolf", "car"]

    def encode(self, texts):
        m = np.array([[t.lower().count(w) for w in self.vocab] for t in texts], dtype=np.float32) + 1e-6
        return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_retrieval_candidates_rank_by_cosine():
    labels = pd.DataFrame({"label_id": ["a", "b", "c"], "title": ["Cat", "Dog and wolf", "Car"],
                           "parent": [None] * 3, "ancestors": [[]] * 3, "assignable": [True] * 3})
    space = LabelSpace(labels)
    out = retrieval_candidates(["a dog met a wolf", "car, car and a cat"], space, size=2, embedder=BagOfWords())
    assert out == [["b", "a"], ["c", "a"]]


def test_wikiseealso_through_config_with_real_embedder(tmp_path, caplog, monkeypatch):
    cfg = wiki_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    run_prepare_dataset(cfg, "wiki")
    labels = pd.read_parquet(paths.labels("wiki"))
    assert {"label_id", "title", "parent", "ancestors", "assignable"} <= set(labels.columns)
    assert Path(paths.excluded_pairs("wiki")).exists()
    with caplog.at_level("INFO"):
        run_build_prompts(cfg, "wiki", "test", out_path=tmp_path / "p.parquet")
    prompts = pd.read_parquet(tmp_path / "p.parquet")
    docs = pd.read_parquet(paths.data("wiki", "test"))
    assert prompts["candidates"].map(len).eq(3).all()
    expected = [len(set(g) & set(c)) / len(g) for g, c in zip(docs["labels"], prompts["candidates"])]
    assert prompts["gold_in_candidates"].tolist() == pytest.approx(expected)
    # the prompts log (its summary) gives the gold recall of the candidate lists, computed here
    all_gold, no_gold = sum(r == 1.0 for r in expected) / len(expected), sum(r == 0.0 for r in expected) / len(expected)
    assert (f"gold recall of the candidate lists (every method's ceiling): mean {sum(expected) / len(expected):.3f}, "
            f"every gold label offered in {all_gold:.3f} of the documents, none in {no_gold:.3f}") in caplog.text


def test_stats_json_counts_the_files_and_the_sample(tmp_path, monkeypatch):
    """stats.json: n_{split}_source = documents in the dataset's files (LF-WikiSeeAlso fixture: 20 trn rows, one
    without labels, val_fraction 0.3 -> round(5.7) = 6 val; 7 tst rows, one without labels; 12 lbl rows),
    n_{split} = the max_docs sample."""
    cfg = wiki_config(tmp_path)
    cfg["datasets"]["wiki"]["max_docs"] = {"train": 2, "val": 1, "test": 2}
    monkeypatch.chdir(tmp_path)
    run_prepare_dataset(cfg, "wiki")
    stats = json.loads(Path(paths.data_stats("wiki")).read_text())
    assert (stats["n_train_source"], stats["n_val_source"], stats["n_test_source"], stats["n_labels"]) == (13, 6, 6, 12)
    assert (stats["n_train"], stats["n_val"], stats["n_test"]) == (2, 1, 2)


def test_prepare_dataset_writes_every_split_and_the_label_space(tiny):
    tiny.ensure("prepare_dataset")
    labels = pd.read_parquet(tiny.path(paths.labels(DATASET)))
    assignable = set(labels.loc[labels["assignable"], "label_id"])
    seen = set()
    for split, n in [("train", 3), ("val", 2), ("test", 3)]:
        docs = pd.read_parquet(tiny.path(paths.data(DATASET, split)))
        assert len(docs) == n and docs["text"].str.len().gt(0).all()
        assert docs["labels"].map(len).between(2, 3).all()  # codes_per_doc: [2, 3]
        assert all(set(g) <= assignable for g in docs["labels"])
        assert not seen & set(docs["doc_id"])  # no document in two splits
        seen |= set(docs["doc_id"])
    stats = json.loads(tiny.path(paths.data_stats(DATASET)).read_text())
    assert (stats["n_train"], stats["n_val"], stats["n_test"]) == (3, 2, 3)
    assert stats["n_labels"] == int(labels["assignable"].sum())


def test_build_prompts_lists_every_gold_code_among_the_candidates(tiny):
    tiny.ensure("build_prompts")
    for split in paths.SPLITS:
        docs = pd.read_parquet(tiny.path(paths.data(DATASET, split)))
        prompts = pd.read_parquet(tiny.path(paths.prompts(DATASET, split)))
        assert list(prompts["doc_id"]) == list(docs["doc_id"])
        for gold, cands, msgs, text in zip(docs["labels"], prompts["candidates"], prompts["messages"], docs["text"]):
            assert set(gold) <= set(cands) and len(cands) >= 6  # hierarchy strategy, size 6
            user = json.loads(msgs)[-1]["content"]
            assert text in user and all(f"[{c}]" in user for c in cands)
        assert (prompts["gold_in_candidates"] == 1.0).all()


def test_clean_prompts_are_snippets_of_the_source_split_with_a_long_neutral_list(tiny):
    tiny.ensure("clean_prompts")
    settings = tiny.config["clean_prompts"]
    assert paths.clean_splits(tiny.config) == ["clean_neutral", "clean_guided_exemplar"]
    source = pd.read_parquet(tiny.path(paths.data(DATASET, settings["source_split"]))).set_index("doc_id")
    for split, style in [("clean_neutral", "neutral"), ("clean_guided_exemplar", "guided_exemplar")]:
        docs = pd.read_parquet(tiny.path(paths.data(DATASET, split)))
        prompts = pd.read_parquet(tiny.path(paths.prompts(DATASET, split)))
        assert len(docs) == settings["n_docs"] == len(prompts)
        assert docs["doc_id"].tolist() == prompts["doc_id"].tolist() == [f"clean-{d}" for d in docs["source_doc_id"]]
        for doc in docs.itertuples():
            assert list(doc.labels) == list(source.loc[doc.source_doc_id, "labels"])
            # every snippet line is a line of the source document
            assert set(doc.text.split("\n")) <= {s.strip() for s in source.loc[doc.source_doc_id, "text"].split("\n")}
        assert (prompts["prompt_style"] == style).all()
        assert prompts["candidates"].map(len).eq(settings["n_labels"]).all()
        guided = "rule out close alternatives" in prompts["messages"].iloc[0]
        assert guided == (style == "guided_exemplar")
