"""The model card of a published student: select_distill writes it without metrics, model_card adds them from
metrics.parquet; the folder still loads with from_pretrained."""

from __future__ import annotations

import subprocess

import pandas as pd
import pytest
import transformers
from huggingface_hub import ModelCard

from mechdistill import paths
from mechdistill.evaluate.card import NOT_EVALUATED
from mechdistill.stages.model_free import run_model_card
from tests.helpers import REPO
from tests.stages.conftest import DATASET, STUDENT, TEACHER


def table_values(metrics: pd.DataFrame) -> dict[str, float]:
    """Each metric as the result tables show it, computed here from the rows: the corpus value (doc_id "") if
    stored, else the mean of the per-document values (bootstrap resamples left out)."""
    doc_id = metrics["doc_id"].fillna("")
    values = {}
    for metric, rows in metrics.groupby("metric"):
        corpus = rows[doc_id[rows.index] == ""]
        per_doc = rows[(doc_id[rows.index] != "") & ~doc_id[rows.index].str.startswith("resample:")]
        values[metric] = float(corpus["value"].mean() if len(corpus) else per_doc["value"].mean())
    return values


def head_commit() -> str:
    done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def test_a_published_student_carries_its_card_with_its_metrics_and_still_loads(tiny):
    tiny.ensure("evaluate")
    model_dir = tiny.path(paths.student_model_dir(DATASET, STUDENT, "mech"))
    card_path = tiny.path(paths.model_card(DATASET, STUDENT, "mech"))
    before = ModelCard.load(card_path)  # select_distill's card: no metrics yet
    assert NOT_EVALUATED in before.text and not before.data.to_dict().get("model-index")

    with tiny.inside():
        run_model_card(tiny.config, DATASET, STUDENT, "mech")
    card = ModelCard.load(card_path)
    metrics = pd.read_parquet(tiny.path(paths.metrics(DATASET, STUDENT, "mech")))
    expected = table_values(metrics)
    in_index = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert in_index == {name: value for name, value in expected.items() if value == value}  # exactly, NaN left out
    assert {"macro_f1", "focus", "sharpness"} <= set(in_index)
    for name, value in expected.items():
        assert f"| {name} | {value:.6g} |" in card.text
    test_docs = pd.read_parquet(tiny.path(paths.data(DATASET, "test")))["doc_id"].nunique()
    assert f"({test_docs} documents)" in card.text

    items = pd.read_parquet(tiny.path(paths.training_items(DATASET, STUDENT, "mech")))
    log = pd.read_parquet(tiny.path(paths.train_log(DATASET, STUDENT, "mech")))
    selection = pd.read_json(tiny.path(paths.selection(DATASET, STUDENT, "mech")), typ="series")
    for fact in (f"`{TEACHER}` (source: random", f"`{STUDENT}` (source: ", "`mech` (ours)", f"`{DATASET}`: ",
                 f"{items.loc[items['split'] == 'train', 'doc_id'].nunique()} train documents",
                 f"{items.loc[items['split'] == 'val', 'doc_id'].nunique()} val documents",
                 f"{int(log.loc[log['split'] == 'train', 'step'].max())} optimizer steps",
                 f"step {selection['step']}, by {selection['criterion']}",
                 "".join(f"{k} = {v}; " for k, v in (tiny.config["distill"]["weights"] or {}).items())
                 + "a weight left out is 1",
                 f"at commit `{head_commit()}"):
        assert fact in card.text, fact
    assert "python" in card.text.split("Trained by")[1]  # the distill job's command line
    assert card.data.tags == ["mechdistill", "distillation", "mech"]

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)  # README.md does not disturb loading
    assert model.config.num_hidden_layers == tiny.config["models"][STUDENT]["n_layers"]
    transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("value", [0.123456789012345, 1e-9])
def test_card_metrics_round_trip_exactly(tmp_path, value):
    from mechdistill.evaluate.card import StudentFacts, model_card

    facts = StudentFacts("d", "s", {"source": "hf", "id": "org/student"}, "t", {"source": "hf", "id": "org/teacher"},
                         "mech", "ours", "CoT + Phase 1 + Phase 2 losses", "default", {}, {"alpha": 1.0}, {"train": 3},
                         5, {"point": "default", "step": 4, "criterion": "val_cot_loss", "value": 1.5}, "cmd", "abc")
    card = model_card(facts, {"macro_f1": value, "las": float("nan")}, test_docs=2)
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert [(r.metric_type, r.metric_value) for r in loaded.data.eval_results] == [("macro_f1", value)]
    assert loaded.data.base_model == "org/student" and "| las | nan |" in loaded.text
    assert "| Loss weights | alpha = 1.0; a weight left out is 1 |" in loaded.text
    assert "| Selected | grid point `default` (of 1), step 4, by val_cot_loss = 1.5 |" in loaded.text
