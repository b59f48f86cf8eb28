"""Stages through the config: real-data adapters via the registry, retrieval candidates."""

import numpy as np
import pandas as pd
import pytest
from conftest import REPO

from mechdistill import stages
from mechdistill.config import validate_config
from mechdistill.labels import LabelSpace
from mechdistill.prompts import retrieval_candidates

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


def test_wikiseealso_through_config_with_real_embedder(tmp_path, caplog):
    cfg = wiki_config(tmp_path)
    out = tmp_path / "data"
    stages.run_prepare_dataset(cfg, "wiki", out)
    labels = pd.read_parquet(out / "labels.parquet")
    assert {"label_id", "title", "parent", "ancestors", "assignable"} <= set(labels.columns)
    assert (out / "excluded_pairs.parquet").exists()
    with caplog.at_level("INFO"):
        stages.run_build_prompts(cfg, "wiki", "test", data_dir=out, out_path=tmp_path / "p.parquet")
    prompts = pd.read_parquet(tmp_path / "p.parquet")
    docs = pd.read_parquet(out / "test.parquet")
    assert prompts["candidates"].map(len).eq(3).all()
    expected = [len(set(g) & set(c)) / len(g) for g, c in zip(docs["labels"], prompts["candidates"])]
    assert prompts["gold_in_candidates"].tolist() == pytest.approx(expected)
    assert "candidate recall" in caplog.text
