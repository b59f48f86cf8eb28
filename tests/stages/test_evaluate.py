"""rules/evaluate.smk stages: evaluate one distilled tiny student, then Tables 1-4 and Figure 9."""

import pandas as pd
import pytest

from mechdistill import paths
from mechdistill.stages.evaluate import run_figure9, run_tables
from tests.stages.conftest import DATASET, STUDENT


def test_evaluate_scores_the_student_against_gold_and_its_own_trajectories(tiny):
    tiny.ensure("evaluate")
    metrics = pd.read_parquet(tiny.path(paths.metrics(DATASET, STUDENT, "mech")))
    assert (metrics[["dataset", "student", "method"]] == [DATASET, STUDENT, "mech"]).all().all()
    assert {"P@1", "f1", "macro_f1", "focus", "confusion", "bleu4", "perplexity", "sharpness",
            "anchor_align"} <= set(metrics["metric"])
    per_doc = metrics[metrics["doc_id"] != ""].pivot(index="doc_id", columns="metric", values="value")
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


def test_tables_and_figure9(tiny):
    tiny.ensure("evaluate")  # the mech student's metrics
    metrics = [paths.metrics(DATASET, STUDENT, "mech")]
    with tiny.inside():
        run_tables(tiny.config, metrics)
        run_figure9(tiny.config, metrics)
    table1 = tiny.path(paths.table("table1")).read_text()
    assert f"| {DATASET} | {STUDENT} | mech |" in table1
    for fmt in paths.TABLE_FORMATS:
        assert tiny.path(paths.table("table2", fmt)).exists()
    assert tiny.path(paths.figure9()).read_bytes()[:4] == b"\x89PNG"
