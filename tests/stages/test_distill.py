"""rules/distill.smk stages: teacher_targets, distill (mech and vanilla), student_predict."""

import json

import pandas as pd
from safetensors import safe_open

from mechdistill import paths
from mechdistill.characterize.teacher_forcing import forced_sequence
from mechdistill.models import load_tokenizer
from mechdistill.stages.distill import run_distill
from tests.stages.conftest import DATASET, STUDENT, TEACHER


def test_teacher_targets_hold_the_cot_logits_and_phase1_signals(tiny):
    tiny.ensure("teacher_targets")
    tokenizer = load_tokenizer(tiny.config, TEACHER)
    for split, n_docs in [("train", 3), ("val", 2)]:
        table = pd.read_parquet(tiny.path(paths.targets(DATASET, TEACHER, split)))
        prompts = pd.read_parquet(tiny.path(paths.prompts(DATASET, split))).set_index("doc_id")
        cot = pd.read_parquet(tiny.path(paths.cot(DATASET, TEACHER, split))).set_index("doc_id")
        anchors = pd.read_parquet(tiny.path(paths.anchors(DATASET, TEACHER, split))).set_index("doc_id")
        assert len(table) == n_docs and table["has_phase1"].all() and not table["has_phase2"].any()
        with safe_open(tiny.path(paths.targets_tensors(DATASET, TEACHER, split)), "pt") as tensors:
            assert json.loads(tensors.metadata()["pools"]) == json.loads(table["pools"].iloc[0])
            for row in table.itertuples():
                seq = forced_sequence(tokenizer, prompts.loc[row.doc_id, "messages"], cot.loc[row.doc_id, "cot"],
                                      anchors.loc[row.doc_id].to_dict())
                # one top-k row per position that predicts a CoT token
                assert row.n_tokens == len(seq.input_ids) and row.n_cot == len(seq.input_ids) - seq.cot_token_start
                values = tensors.get_tensor(f"{row.doc_id}/topk_values")
                assert tuple(values.shape) == (row.n_cot, 8)  # distill.top_k: 8
                assert (values[:, :-1] >= values[:, 1:]).all()  # sorted, largest first
                assert row.n_early == len(tensors.get_tensor(f"{row.doc_id}/p1.mask")) == len(seq.early_queries)


def test_distill_mech_trains_and_saves_the_student(tiny):
    tiny.ensure("distill")
    log = pd.read_parquet(tiny.path(paths.train_log(DATASET, STUDENT, "mech")))
    train = log[log["split"] == "train"]
    assert list(train["step"]) == [1, 2]
    # The 1-layer student IS the teacher's layer 0 and both Phase-1 pools sit in layer 0: identical pooled
    # rows at step 1, apart once the first update has changed the student.
    assert train["phase1.attn"].iloc[0] < 1e-6 < train["phase1.attn"].iloc[1]
    assert tiny.path(paths.student_model(DATASET, STUDENT, "mech")).exists()
    assert not tiny.path(paths.checkpoint_dir(DATASET, STUDENT, "mech")).exists()
    mechanism = pd.read_parquet(tiny.path(paths.mechanism(DATASET, STUDENT, "mech")))
    assert set(mechanism["when"]) == {"before", "after"}
    assert set(mechanism["metric"]) == {"sharpness", "anchor_align"}  # no refinement positions: no Phase 2


def test_distill_vanilla_never_computes_head_signals(tiny):
    tiny.upto("distill")
    with tiny.inside():
        run_distill(tiny.config, DATASET, STUDENT, "vanilla")
    log = pd.read_parquet(tiny.path(paths.train_log(DATASET, STUDENT, "vanilla")))
    assert (log["phase1.attn"] == 0).all() and (log["phase2.qk"] == 0).all()
    assert (log.loc[log["split"] == "train", "cot.ce"] > 0).all()


def test_student_predict_runs_the_distilled_student(tiny):
    tiny.ensure("student_predict")
    pred = pd.read_parquet(tiny.path(paths.student_pred(DATASET, STUDENT, "mech", "test")))
    prompts = pd.read_parquet(tiny.path(paths.prompts(DATASET, "test")))
    assert list(pred["doc_id"]) == list(prompts["doc_id"])
    teacher = pd.read_parquet(tiny.path(paths.cot(DATASET, TEACHER, "test")))
    assert pred["raw"].tolist() != teacher["raw"].tolist()  # its own generations, not the teacher's
    assert pred["n_tokens"].between(1, 16).all()
