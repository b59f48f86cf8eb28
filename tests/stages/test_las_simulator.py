"""rules/evaluate.smk las_simulator: a dataset's LAS simulators are trained once and every evaluate
job (each method, and the teacher's row) scores with those same saved simulators."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from mechdistill.config import load_config
from mechdistill.evaluate import las
from mechdistill.evaluate.settings import EvaluateSettings
from mechdistill.io import write_parquet
from mechdistill.stages import evaluate as stage
from tests.evaluate.test_las import HashedBagOfWords
from tests.helpers import REPO

TRAIN_LABELS = [["A01"], ["B02", "A01"], ["C03"], ["B02"], ["A01", "C03"], ["C03"]] * 2
TEST_IDS = ["t0", "t1", "t2", "t3"]
TEST_TEACHER = [["A01"], ["B02"], ["C03"], ["C03"]]


def _cot(ids: list[str], cots: list[str], labels: list[list[str]]) -> pd.DataFrame:
    n = len(ids)
    return pd.DataFrame({"doc_id": ids, "cot": cots, "answer": [", ".join(x) for x in labels], "pred_labels": labels,
                         "unmapped": [[] for _ in ids], "n_tokens": [10] * n, "finish_reason": ["stop"] * n,
                         "raw": cots, "has_answer_block": [True] * n, "forced_answer": [False] * n})


@pytest.fixture
def setup(tmp_path, monkeypatch):
    """The demo's defaults (logreg over the embedder), a bag-of-words encoder in place of MiniLM, and
    a dataset's train docs + teacher train traces on disk."""
    monkeypatch.setattr(stage, "SentenceEmbedder", lambda name: HashedBagOfWords())
    config = load_config(REPO / "config" / "tiny.yaml")
    train_ids = [f"d{i}" for i in range(len(TRAIN_LABELS))]
    docs = pd.DataFrame({"doc_id": train_ids, "text": ["a note"] * len(train_ids), "labels": TRAIN_LABELS})
    cots = [f"it reads like {' '.join(x).lower()}" for x in TRAIN_LABELS]
    inputs = {"train_docs": tmp_path / "train.parquet", "teacher_train_cot": tmp_path / "cot_train.parquet"}
    write_parquet(docs, inputs["train_docs"], "documents")
    write_parquet(_cot(train_ids, cots, TRAIN_LABELS), inputs["teacher_train_cot"], "cot")
    return config, inputs, tmp_path / "las_simulator"


def _evaluate_las(config: dict, directory, rationales: list[str]) -> pd.DataFrame:
    """The LAS rows one evaluate job writes for test rationales `rationales`."""
    docs = pd.DataFrame({"text": ["a note"] * 4}, index=TEST_IDS)
    teacher = pd.DataFrame({"pred_labels": TEST_TEACHER}, index=TEST_IDS)
    gold = [["A01"]] * 4
    return stage._las_frame(EvaluateSettings.from_config(config), directory, teacher, docs, TEST_IDS, gold, gold,
                            rationales)


def test_every_method_is_scored_by_the_one_saved_simulator(setup, monkeypatch):
    config, inputs, directory = setup
    stage.run_las_simulator(config, "demo", inputs=inputs, out_dir=directory)
    manifest = json.loads((directory / las.MANIFEST).read_text())
    assert manifest["kind"] == "logreg" and manifest["train_source"] == "teacher" and manifest["trained"]
    assert sorted(p.name for p in directory.iterdir()) == ["r.safetensors", "simulator.json", "x.safetensors",
                                                           "xr.safetensors"]

    # evaluate never trains: any fit (or a new training run) raises
    def no_training(*args, **kwargs):
        raise AssertionError("evaluate trained a LAS simulator")
    monkeypatch.setattr(las.EmbeddingSimulator, "fit", no_training)
    monkeypatch.setattr(stage, "fit_view_simulators", no_training)
    loaded = []
    original = las.EmbeddingSimulator.load.__func__

    def recording_load(cls, path, encoder, truncator=None):
        simulator = original(cls, path, encoder, truncator)
        loaded.append((path.name, simulator.weights.copy(), list(simulator.classes)))
        return simulator
    monkeypatch.setattr(las.EmbeddingSimulator, "load", classmethod(recording_load))

    methods = {"vanilla": ["nothing here"] * 4, "mech": ["it reads like a01", "like b02", "like c03", "like a01"]}
    rows = {m: _evaluate_las(config, directory, r) for m, r in methods.items()}
    assert len(loaded) == 2 * len(las.VIEWS)
    for (name_a, w_a, c_a), (name_b, w_b, c_b) in zip(loaded[:3], loaded[3:]):
        assert name_a == name_b and c_a == c_b and np.array_equal(w_a, w_b)  # the same simulator for both methods

    # the saved simulators score as freshly trained ones would (same training data, deterministic fit)
    monkeypatch.undo()
    encoder = HashedBagOfWords()
    train_targets = [las.target_label(x, las.label_frequencies(TRAIN_LABELS)) for x in TRAIN_LABELS]
    test_targets = [las.target_label(x, las.label_frequencies(TRAIN_LABELS)) for x in TEST_TEACHER]
    for method, rationales in methods.items():
        correct = las.simulator_correctness(lambda: las.EmbeddingSimulator(encoder), ["a note"] * len(TRAIN_LABELS),
                                            [f"it reads like {' '.join(x).lower()}" for x in TRAIN_LABELS],
                                            train_targets, ["a note"] * 4, rationales, test_targets)
        corpus = rows[method].set_index("metric").loc[["las_corpus", "sim_acc_xr"], "value"]
        assert corpus["las_corpus"] == pytest.approx(las.las_from_correctness(correct["x"], correct["xr"],
                                                                              correct["r"])["las"])
        assert corpus["sim_acc_xr"] == pytest.approx(correct["xr"].mean())
    assert rows["mech"].set_index("metric").loc["sim_acc_xr", "value"] > \
        rows["vanilla"].set_index("metric").loc["sim_acc_xr", "value"]


def test_evaluate_refuses_simulators_of_another_setting(setup):
    config, inputs, directory = setup
    stage.run_las_simulator(config, "demo", inputs=inputs, out_dir=directory)
    other = {**config, "evaluate": {**config["evaluate"], "las": {**config["evaluate"]["las"], "target": "gold"}}}
    with pytest.raises(Exception, match="rerun the las_simulator rule"):
        _evaluate_las(other, directory, ["x"] * 4)
    # target student trains on the teacher's answers: the teacher-target simulators serve it
    student = {**config, "evaluate": {**config["evaluate"], "las": {**config["evaluate"]["las"], "target": "student"}}}
    assert np.isfinite(_evaluate_las(student, directory, ["like a01"] * 4).set_index("metric").loc["las_corpus", "value"])
