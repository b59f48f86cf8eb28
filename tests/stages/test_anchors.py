"""rules/anchors.smk stages: anchors, trajectories, figure1 on the tiny teacher's CoT."""

import json

import pandas as pd
import pytest

from mechdistill import paths
from mechdistill.stages.anchors import run_anchors
from mechdistill.stages.model_free import run_figure1
from tests.stages.conftest import DATASET, TEACHER


def test_anchors_are_gold_titles_and_spans_lie_in_the_cot(tiny):
    tiny.ensure("anchors")
    titles = pd.read_parquet(tiny.path(paths.labels(DATASET))).set_index("label_id")["title"]
    for split in paths.SPLITS:
        docs = pd.read_parquet(tiny.path(paths.data(DATASET, split)))
        cot = pd.read_parquet(tiny.path(paths.cot(DATASET, TEACHER, split))).set_index("doc_id")["cot"]
        anchors = pd.read_parquet(tiny.path(paths.anchors(DATASET, TEACHER, split)))
        assert list(anchors["doc_id"]) == list(docs["doc_id"])
        for row, gold in zip(anchors.itertuples(), docs["labels"]):
            assert list(row.anchors) == [titles[g] for g in gold]  # ancestor_levels 0: the gold titles
            assert row.anchor_text == "Key concepts: " + "; ".join(t.rstrip(".") for t in row.anchors) + "."
            assert not set(row.near_misses) & set(gold) and not set(row.near_misses) & set(row.shortlist)
            n = len(cot[row.doc_id])
            spans = [list(row.early_span)] + [list(s) for s in (*row.refine_spans, *row.shortlist_spans,
                                                                *row.nearmiss_spans)]
            assert all(0 <= a <= b <= n for a, b in spans)
        # a random model's CoT mentions no label: no refinement positions, and the reason says so
        assert (anchors["reason"] != "").all()


def test_anchors_from_an_llm_when_asked(tiny, tmp_path):
    """App. B's no-label mode: concepts come from an auxiliary LLM (the tiny model's junk, parsed)."""
    tiny.ensure("anchors")
    config = json.loads(json.dumps(tiny.config))
    config["anchors"].update(mode="llm", llm={"max_concepts": 3, "max_new_tokens": 8})
    with tiny.inside():
        run_anchors(config, DATASET, TEACHER, "val", out_path=tmp_path / "anchors.parquet")
    out = pd.read_parquet(tmp_path / "anchors.parquet")
    assert len(out) == 2
    assert all(len(a) <= 3 and all(isinstance(c, str) and c.strip() for c in a) for a in out["anchors"])


def test_trajectories_of_the_teacher_and_figure1(tiny):
    tiny.ensure("trajectories")
    summary = pd.read_parquet(tiny.path(paths.trajectory_summary(DATASET, TEACHER)))
    curves = pd.read_parquet(tiny.path(paths.trajectories(DATASET, TEACHER)))
    test_ids = list(pd.read_parquet(tiny.path(paths.data(DATASET, "test")))["doc_id"])
    assert list(summary["doc_id"]) == test_ids and (summary["model"] == TEACHER).all()
    assert summary["focus"].between(-1, 1).all()
    assert summary["n_early"].eq(4).all()  # anchors.early_tokens: 4
    assert set(curves["phase"]) == {"focus", "confusion"} and curves["t"].between(0, 1).all()
    # the summary's Focus is the curve's last early point, F(T_early)
    last = curves[curves["phase"] == "focus"].sort_values("t").groupby("doc_id")["value"].last()
    assert summary.set_index("doc_id")["focus"].loc[last.index].tolist() == pytest.approx(last.tolist())
    with tiny.inside():
        run_figure1(tiny.config, DATASET, [paths.trajectories(DATASET, TEACHER)])
    assert tiny.path(paths.figure1(DATASET)).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_anchors_log_counts_phase_positions_per_style_and_warns(tiny, tmp_path, caplog):
    """The clean split's anchors log counts its style's CoTs with early queries and with refinement
    positions; a random teacher refines nowhere, so the refinement count warns."""
    tiny.ensure("anchors")
    split = paths.clean_split(tiny.config["clean_prompts"]["style"])
    with tiny.inside(), caplog.at_level("INFO"):
        run_anchors(tiny.config, DATASET, TEACHER, split, out_path=tmp_path / "anchors.parquet")
    out = pd.read_parquet(tmp_path / "anchors.parquet")
    style = split.removeprefix("clean_")
    n_early = sum(b > a for a, b in out["early_span"])
    n_refine = int(out["refine_spans"].map(len).gt(0).sum())
    assert n_refine == 0 and n_early == len(out) > 0
    assert (f"style {style}: {len(out)} CoTs, {n_early} with early queries, 0 with refinement positions"
            in caplog.text)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"prompt style {style}: only 0 of {len(out)} CoTs have refinement positions" in w for w in warnings)
    assert not any("have early queries" in w for w in warnings)
