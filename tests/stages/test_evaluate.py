"""rules/evaluate.smk stages: evaluate one distilled tiny student, then Tables 1-4 and Figure 9."""

import json

import pandas as pd
import pytest

from mechdistill import paths
from mechdistill.evaluate.xmc import macro_f1
from mechdistill.stages.evaluate import run_evaluate
from mechdistill.stages.model_free import run_figure9, run_tables
from tests.stages.conftest import DATASET, STUDENT, TEACHER


def test_evaluate_scores_the_student_against_gold_and_its_own_trajectories(tiny):
    tiny.ensure("evaluate")
    metrics = pd.read_parquet(tiny.path(paths.metrics(DATASET, STUDENT, "mech")))
    assert (metrics[["dataset", "student", "method"]] == [DATASET, STUDENT, "mech"]).all().all()
    assert {"P@1", "f1", "macro_f1", "focus", "confusion", "bleu4", "perplexity", "sharpness",
            "anchor_align"} <= set(metrics["metric"])
    documents = (metrics["doc_id"] != "") & ~metrics["doc_id"].str.startswith("resample:")
    per_doc = metrics[documents].pivot(index="doc_id", columns="metric", values="value")
    pred = pd.read_parquet(tiny.path(paths.student_pred(DATASET, STUDENT, "mech", "test"))).set_index("doc_id")
    docs = pd.read_parquet(tiny.path(paths.data(DATASET, "test"))).set_index("doc_id")
    prompts = pd.read_parquet(tiny.path(paths.prompts(DATASET, "test"))).set_index("doc_id")
    for doc_id in docs.index:  # P@1 by hand: the answer's labels rank first, then the other candidates
        answer = list(pred.loc[doc_id, "pred_labels"])
        ranked = answer + [c for c in prompts.loc[doc_id, "candidates"] if c not in answer]
        assert per_doc.loc[doc_id, "P@1"] == float(ranked[0] in set(docs.loc[doc_id, "labels"]))
    summary = pd.read_parquet(tiny.path(paths.trajectory_summary(DATASET, f"{STUDENT}/mech"))).set_index("doc_id")
    assert per_doc["focus"].tolist() == pytest.approx(summary.loc[per_doc.index, "focus"].tolist(), nan_ok=True)
    assert (per_doc["perplexity"] > 1).all()


def test_teacher_is_evaluated_on_its_own_cot(tiny):
    tiny.ensure("evaluate")
    with tiny.inside():
        run_evaluate(tiny.config, DATASET, TEACHER, paths.TEACHER_METHOD)
    metrics = pd.read_parquet(tiny.path(paths.metrics(DATASET, TEACHER, "teacher")))
    assert (metrics[["student", "method"]] == [TEACHER, "teacher"]).all().all()
    assert {"macro_f1", "focus", "confusion", "perplexity", "sharpness"} <= set(metrics["metric"])
    assert "bleu4" not in set(metrics["metric"])  # against itself it would be 100
    cot = pd.read_parquet(tiny.path(paths.cot(DATASET, TEACHER, "test"))).set_index("doc_id")
    docs = pd.read_parquet(tiny.path(paths.data(DATASET, "test")))
    expected = macro_f1(list(docs["labels"]), [list(cot.loc[d, "pred_labels"]) for d in docs["doc_id"]])
    corpus = metrics[(metrics["doc_id"] == "") & (metrics["metric"] == "macro_f1")]["value"]
    assert corpus.tolist() == pytest.approx([expected])
    resamples = metrics[metrics["doc_id"].str.startswith("resample:")]
    assert len(resamples) == tiny.config["evaluate"]["n_bootstrap"] and set(resamples["metric"]) == {"macro_f1"}


def test_documents_in_flight_give_the_teachers_row_of_one_at_a_time(tiny, tmp_path):
    """evaluate.in_flight 2: the teacher's perplexity and mechanism metrics, forwards of two documents at once
    in threads, equal those of one document at a time (in_flight 1, the default), value for value."""
    import copy

    tiny.upto("evaluate")
    config = copy.deepcopy(tiny.config)
    outputs = {}
    for workers in (1, 2):
        config["evaluate"]["in_flight"] = workers
        outputs[workers] = tmp_path / f"in_flight_{workers}.parquet"
        with tiny.inside():
            run_evaluate(config, DATASET, TEACHER, paths.TEACHER_METHOD, out_path=outputs[workers])
    one, two = (pd.read_parquet(outputs[w]) for w in (1, 2))
    forward = {"perplexity", "sharpness", "anchor_align", "loopback", "helpfulness"}
    assert {"perplexity", "sharpness", "anchor_align"} <= set(one["metric"])
    assert (one["metric"].isin(forward)).sum() >= 2 * len(set(one.loc[one["metric"] == "perplexity", "doc_id"]))
    pd.testing.assert_frame_equal(two, one)


def test_tables_and_figure9(tiny):
    tiny.ensure("evaluate")  # the mech student's metrics
    metrics = [paths.metrics(DATASET, STUDENT, "mech")]
    with tiny.inside():
        if not tiny.path(paths.metrics(DATASET, TEACHER, "teacher")).exists():
            run_evaluate(tiny.config, DATASET, TEACHER, paths.TEACHER_METHOD)
        run_tables(tiny.config, metrics + [paths.metrics(DATASET, TEACHER, "teacher")],
                   [paths.selection(DATASET, STUDENT, "mech")])
        run_figure9(tiny.config, metrics)
    table1 = tiny.path(paths.table("table1")).read_text()
    assert f"| {DATASET} | {STUDENT} | mech |" in table1 and f"| {DATASET} | {TEACHER} | teacher |" in table1
    step = json.loads(tiny.path(paths.selection(DATASET, STUDENT, "mech")).read_text())["step"]
    assert f"Selected on validation (val_cot_loss): {STUDENT}/mech: default at step {step}." in table1
    for table in ("table3", "table4"):  # no further student in the tiny config: the teacher's row only
        assert f"| {DATASET} | {TEACHER} | teacher |" in tiny.path(paths.table(table)).read_text()
    for fmt in paths.TABLE_FORMATS:
        assert tiny.path(paths.table("table2", fmt)).exists()
    assert tiny.path(paths.figure9()).read_bytes()[:4] == b"\x89PNG"
