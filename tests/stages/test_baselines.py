"""The four baselines through their stages on the tiny pipeline: teacher data, distill, select, predict."""

import pandas as pd
import pytest

from mechdistill import paths
from mechdistill.distill.methods import resolve_method
from mechdistill.stages.distill import run_baseline_teacher_data, run_distill, run_student_predict
from tests.stages.conftest import DATASET, STUDENT, TEACHER

BASELINES = ["unicott", "morsd", "semcot", "cwt"]


@pytest.fixture(scope="module")
def trained(tiny):
    """Every baseline trained (teacher data for train and val first) and predicting on test."""
    tiny.ensure("teacher_targets")
    with tiny.inside():
        for method in BASELINES:
            if resolve_method(method, tiny.config["methods"][method]).recipe.teacher_data is not None:
                for split in ("train", "val"):
                    run_baseline_teacher_data(tiny.config, DATASET, method, split)
            run_distill(tiny.config, DATASET, STUDENT, method)
            run_student_predict(tiny.config, DATASET, STUDENT, method)
    return tiny


@pytest.mark.parametrize("method", BASELINES)
def test_a_baseline_trains_on_its_items_and_predicts(trained, method):
    log = pd.read_parquet(trained.path(paths.train_log(DATASET, STUDENT, method)))
    train = log[log["split"] == "train"]
    assert list(train["step"]) == [1, 2] and train["loss"].notna().all()
    assert (log["cot.kl"] == 0).all()  # no logit distillation in any of the four
    assert "val_cot_loss" in log.columns and log.loc[log["split"] == "val", "val_cot_loss"].notna().all()
    items = pd.read_parquet(trained.path(paths.training_items(DATASET, STUDENT, method)))
    assert {"train", "val"} <= set(items["split"]) and (items["n_supervised"] > 0).all()
    assert (items["n_supervised"] < items["n_tokens"]).all()  # the prompt is never a target
    assert trained.path(paths.student_model(DATASET, STUDENT, method)).exists()
    pred = pd.read_parquet(trained.path(paths.student_pred(DATASET, STUDENT, method, "test")))
    assert len(pred) == 3 and pred["raw"].map(len).gt(0).all()


def test_morsd_samples_rationales_and_the_student_scores_them(trained):
    data = pd.read_parquet(trained.path(paths.baseline_data(DATASET, TEACHER, "morsd", "train")))
    # 2 sampled traces per document, plus the greedy trace as sample -1
    assert sorted(data.groupby("doc_id").size().unique()) == [3]
    assert set(data["sample"]) == {-1, 0, 1}
    items = pd.read_parquet(trained.path(paths.training_items(DATASET, STUDENT, "morsd")))
    train = items[items["split"] == "train"]
    assert train["doc_id"].is_unique and len(train) == 3  # n_select 1
    assert train["rd"].notna().all() and (train["rd"] > 0).all()


def test_unicott_and_semcot_read_their_teacher_data(trained):
    nodes = pd.read_parquet(trained.path(paths.baseline_data(DATASET, TEACHER, "unicott", "train")))
    assert set(nodes.columns) >= {"doc_id", "node", "parents", "text"}
    chains = nodes.sort_values(["doc_id", "node"]).groupby("doc_id")["parents"].apply(list)
    for parents in chains:  # a chain: each node's parent is the one before it
        assert [list(p) for p in parents] == [[]] + [[i] for i in range(len(parents) - 1)]
    condensed = pd.read_parquet(trained.path(paths.baseline_data(DATASET, TEACHER, "semcot", "val")))
    assert len(condensed) == 2 and condensed["condensed"].map(len).gt(0).all()
    pred = pd.read_parquet(trained.path(paths.student_pred(DATASET, STUDENT, "semcot", "test")))
    assert (pred["cot"] == "").all()  # the reasoning is implicit


def test_cwt_relabels_once_and_trains_on_one_chunk_per_document_per_epoch(trained):
    items = pd.read_parquet(trained.path(paths.training_items(DATASET, STUDENT, "cwt")))
    fixed = items[(items["split"] == "train") & items["epoch"].isna()]
    assert (fixed.groupby("doc_id")["chunk"].nunique() == fixed.groupby("doc_id")["n_chunks"].first()).all()
    epoch0 = items[items["epoch"] == 0]
    assert epoch0["doc_id"].is_unique and set(epoch0["doc_id"]) == set(fixed["doc_id"])
    ckpt = trained.path(paths.checkpoint_dir(DATASET, STUDENT, paths.grid_method("cwt", "default")))
    assert not ckpt.exists() and not ckpt.with_name(ckpt.name + ".relabel.parquet").exists()  # cleaned up
