"""rules/distill.smk stages: teacher_targets, distill (mech, vanilla, by val macro-F1), select_distill, student_predict."""

import copy
import json
import os
from types import SimpleNamespace

import pandas as pd
import pytest
from safetensors import safe_open

from mechdistill import paths
from mechdistill.characterize.teacher_forcing import forced_sequence
from mechdistill.distill.methods import method_grid
from mechdistill.evaluate.xmc import macro_f1
from mechdistill.io import read_split
from mechdistill.models import ModelCatalog, load_tokenizer, with_distilled_model
from mechdistill.stages import distill as distill_stage
from mechdistill.stages.distill import run_distill
from mechdistill.stages.model_free import run_select_distill
from mechdistill.teacher.answers import end_of_turn, supervised_output
from mechdistill.teacher.generate import generate_cot
from tests.stages.conftest import DATASET, STUDENT, TEACHER


def test_teacher_targets_hold_the_cot_logits_and_phase1_signals(tiny):
    tiny.ensure("teacher_targets")
    tokenizer = load_tokenizer(ModelCatalog.from_config(tiny.config), TEACHER)
    for split, n_docs in [("train", 3), ("val", 2)]:
        table = pd.read_parquet(tiny.path(paths.targets(DATASET, TEACHER, split)))
        prompts = pd.read_parquet(tiny.path(paths.prompts(DATASET, split))).set_index("doc_id")
        cot = pd.read_parquet(tiny.path(paths.cot(DATASET, TEACHER, split))).set_index("doc_id")
        anchors = pd.read_parquet(tiny.path(paths.anchors(DATASET, TEACHER, split))).set_index("doc_id")
        assert len(table) == n_docs and table["has_phase1"].all() and not table["has_phase2"].any()
        with safe_open(tiny.path(paths.targets_tensors(DATASET, TEACHER, split)), "pt") as tensors:
            assert json.loads(tensors.metadata()["pools"]) == json.loads(table["pools"].iloc[0])
            for row in table.itertuples():
                output = supervised_output(cot.loc[row.doc_id, "cot"], cot.loc[row.doc_id, "raw"], end_of_turn(tokenizer))
                seq = forced_sequence(tokenizer, prompts.loc[row.doc_id, "messages"], output,
                                      anchors.loc[row.doc_id].to_dict())
                # one top-k row per position that predicts a token of the teacher's output (CoT, answer block, end of turn)
                assert row.n_tokens == len(seq.input_ids) and row.n_cot == len(seq.input_ids) - seq.cot_token_start
                values = tensors.get_tensor(f"{row.doc_id}/topk_values")
                assert tuple(values.shape) == (row.n_cot, 8)  # distill.top_k: 8
                assert (values[:, :-1] >= values[:, 1:]).all()  # sorted, largest first
                assert row.n_early == len(tensors.get_tensor(f"{row.doc_id}/p1.mask")) == len(seq.early_queries)


def test_distill_mech_trains_and_saves_the_student(tiny):
    tiny.ensure("distill")
    point = paths.grid_method("mech", "default")  # no grid in tiny.yaml: one point
    log = pd.read_parquet(tiny.path(paths.train_log(DATASET, STUDENT, point)))
    train = log[log["split"] == "train"]
    assert list(train["step"]) == [1, 2]
    # The 1-layer student IS the teacher's layer 0 and both Phase-1 pools sit in layer 0: identical pooled
    # rows at step 1, apart once the first update has changed the student.
    assert train["phase1.attn"].iloc[0] < 1e-6 < train["phase1.attn"].iloc[1]
    assert tiny.path(paths.student_model(DATASET, STUDENT, point)).exists()
    assert not tiny.path(paths.checkpoint_dir(DATASET, STUDENT, point)).exists()
    assert not tiny.path(paths.checkpoint_dir(DATASET, STUDENT, point) + ".best").exists()
    mechanism = pd.read_parquet(tiny.path(paths.mechanism(DATASET, STUDENT, point)))
    assert set(mechanism["when"]) == {"before", "after"}
    assert set(mechanism["metric"]) == {"sharpness", "anchor_align"}  # no refinement positions: no Phase 2

    # eval_every 1: both steps validated; the saved step has the lowest unweighted CE + KL (the earliest on ties)
    val = log[log["split"] == "val"].set_index("step")
    cot = val["cot.ce"] + val["cot.kl"]
    assert list(val.index) == [1, 2] and val["val_cot_loss"].tolist() == pytest.approx(cot.tolist())
    best = 1 if cot[1] <= cot[2] else 2
    record = json.loads(tiny.path(paths.best_step(DATASET, STUDENT, point)).read_text())
    assert record == {"criterion": "val_cot_loss", "maximize": False, "step": best, "value": pytest.approx(cot[best]),
                      "last_step": 2, "evaluated_steps": [1, 2]}

    # the selection published the one point as the method's model, log and mechanism, with its record
    selection = json.loads(tiny.path(paths.selection(DATASET, STUDENT, "mech")).read_text())
    assert (selection["point"], selection["step"], selection["criterion"]) == ("default", best, "val_cot_loss")
    assert [c["point"] for c in selection["candidates"]] == ["default"]
    for name in ("model.safetensors", "config.json"):
        published = tiny.path(paths.student_model_dir(DATASET, STUDENT, "mech")) / name
        assert published.read_bytes() == (tiny.path(paths.student_model_dir(DATASET, STUDENT, point)) / name).read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(tiny.path(paths.train_log(DATASET, STUDENT, "mech"))), log)


def test_distill_vanilla_never_computes_head_signals(tiny):
    tiny.upto("distill")
    config = copy.deepcopy(tiny.config)
    config["distill"]["mechanism_docs"] = 2  # the before/after mechanism metrics on the first 2 train documents
    with tiny.inside():
        run_distill(config, DATASET, STUDENT, "vanilla")
    log = pd.read_parquet(tiny.path(paths.train_log(DATASET, STUDENT, "vanilla")))
    assert (log["phase1.attn"] == 0).all() and (log["phase2.qk"] == 0).all()
    assert (log.loc[log["split"] == "train", "cot.ce"] > 0).all()
    mechanism = pd.read_parquet(tiny.path(paths.mechanism(DATASET, STUDENT, "vanilla")))
    train_ids = set(pd.read_parquet(tiny.path(paths.cot(DATASET, TEACHER, "train")))["doc_id"])
    assert mechanism["doc_id"].nunique() == 2 and set(mechanism["doc_id"]) <= train_ids  # of 3 train + 2 val


def test_vanilla_trains_a_1_layer_student_whose_phase2_band_holds_no_layer(tiny, tmp_path):
    """The issue's case: a 1-layer student with finite RefineScores (traces with refinement sentences) and
    the default Phase 2 band [0.33, 1.0), which holds none of its layers. Before, building its pools
    raised for every method; vanilla needs no pool and now trains (its Phase 2 metrics left out)."""
    tiny.upto("distill")
    config = copy.deepcopy(tiny.config)
    config["distill"]["pools"]["phase2"]["layers"] = [0.33, 1.0]
    config["distill"]["train"].update(max_steps=1, eval_every=0, checkpoint_every=0)
    config["distill"]["mechanism_docs"] = 1
    refine = tmp_path / "refine.parquet"
    table = pd.read_parquet(tiny.path(paths.head_scores(DATASET, STUDENT, "coarse")))[["layer", "head", "score"]]
    table.to_parquet(refine)  # finite scores in layer 0, as a traced refinement would give
    folder = tmp_path / "vanilla"
    with tiny.inside():
        run_distill(config, DATASET, STUDENT, "vanilla", "default", student_refine=refine, model_dir=folder / "model",
                    log_path=folder / "log.parquet", mechanism_path=folder / "mechanism.parquet",
                    ckpt_dir=folder / "ckpt", best_path=folder / "best.json", items_path=folder / "items.parquet")
    assert (folder / "model" / "model.safetensors").exists()
    assert set(pd.read_parquet(folder / "mechanism.parquet")["metric"]) == {"sharpness", "anchor_align"}


def test_a_distill_checkpoint_is_not_resumed_after_the_loss_weights_change(tiny, tmp_path, monkeypatch, caplog):
    """Stopped after step 1 under the default weights, rerun with cot.kl 0: the run must start fresh and
    save what a clean run with cot.kl 0 saves (before, it resumed the stale step silently)."""
    import mechdistill.distill.run as runner

    tiny.upto("distill")
    changed = copy.deepcopy(tiny.config)
    changed["distill"]["weights"] = {"cot.kl": 0.0}
    real_train = runner.train

    def run(config, name, **train_kwargs):
        monkeypatch.setattr(runner, "train", lambda *a, **k: real_train(*a, **{**k, **train_kwargs}))
        folder = tmp_path / name
        with tiny.inside():
            run_distill(config, DATASET, STUDENT, "mech", "default", model_dir=folder / "model",
                        log_path=folder / "log.parquet", mechanism_path=folder / "mechanism.parquet",
                        ckpt_dir=folder / "ckpt", best_path=folder / "best.json", items_path=folder / "items.parquet")
        return folder

    killed = run(tiny.config, "run", stop_after=1)
    assert (killed / "ckpt").is_dir()
    clean = run(changed, "clean")
    with caplog.at_level("WARNING", logger="mechdistill.distill.trainer"):
        rerun = run(changed, "run")
    assert "the run's other settings or inputs changed" in caplog.text and "training from scratch" in caplog.text
    assert (rerun / "model" / "model.safetensors").read_bytes() == (clean / "model" / "model.safetensors").read_bytes()
    stale = run(tiny.config, "stale")  # the test can fail: the default weights train another model
    assert (stale / "model" / "model.safetensors").read_bytes() != (clean / "model" / "model.safetensors").read_bytes()


def test_student_predict_runs_the_distilled_student(tiny):
    tiny.ensure("student_predict")
    pred = pd.read_parquet(tiny.path(paths.student_pred(DATASET, STUDENT, "mech", "test")))
    prompts = pd.read_parquet(tiny.path(paths.prompts(DATASET, "test")))
    assert list(pred["doc_id"]) == list(prompts["doc_id"])
    teacher = pd.read_parquet(tiny.path(paths.cot(DATASET, TEACHER, "test")))
    assert pred["raw"].tolist() != teacher["raw"].tolist()  # its own generations, not the teacher's
    assert pred["n_tokens"].between(1, 16).all()


def test_distill_selects_by_val_macro_f1_with_student_predicts_generation(tiny):
    """val_macro_f1: at each evaluation the student generates the val answers; the value logged at the
    saved step is the macro-F1 of what the saved model generates on val by student_predict's code path."""
    tiny.upto("distill")
    config = copy.deepcopy(tiny.config)
    config["distill"]["select"]["criterion"] = "val_macro_f1"
    with tiny.inside():
        run_distill(config, DATASET, STUDENT, "phase1_only")  # not in tiny.yaml's methods: its own folder
        record = json.loads(open(paths.selection(DATASET, STUDENT, "phase1_only")).read())
        log = pd.read_parquet(paths.train_log(DATASET, STUDENT, "phase1_only"))
        val = read_split(paths.split_files(DATASET, TEACHER, "val"))
        catalog, name = with_distilled_model(ModelCatalog.from_config(config), STUDENT, "phase1_only",
                                             paths.student_model_dir(DATASET, STUDENT, "phase1_only"))
        pred = generate_cot(catalog, name, val.prompts.reset_index(), val.space, "val_pred.parquet",
                            gen=config["generation"])
    assert (record["criterion"], record["maximize"]) == ("val_macro_f1", True)
    scores = log.loc[log["split"] == "val", "val_macro_f1"]
    assert len(scores) == 2 and scores.between(0, 1).all()
    gold = [list(val.docs.loc[d, "labels"]) for d in pred["doc_id"]]
    assert record["value"] == pytest.approx(macro_f1(gold, list(pred["pred_labels"])))


def write_point(root, point: str, values: dict[int, float], weights: bytes) -> None:
    """A finished grid point of mech, by hand: a model folder, a train log with val_cot_loss, mechanism,
    training items."""
    where = paths.grid_method("mech", point)
    model_dir = root / paths.student_model_dir(DATASET, STUDENT, where)
    model_dir.mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps({"point": point}))
    (model_dir / "model.safetensors").write_bytes(weights)
    rows = [{"split": "train", "step": s, "loss": 5.0} for s in (1, 2, 3, 4)]
    rows += [{"split": "val", "step": s, "loss": 9.0, "val_cot_loss": v} for s, v in values.items()]
    pd.DataFrame(rows).to_parquet(root / paths.train_log(DATASET, STUDENT, where))
    pd.DataFrame({"doc_id": ["d"], "metric": ["sharpness"], "value": [len(point)], "when": ["after"]}).to_parquet(
        root / paths.mechanism(DATASET, STUDENT, where))
    pd.DataFrame({"split": ["train"], "doc_id": [point], "n_tokens": [9], "n_supervised": [4]}).to_parquet(
        root / paths.training_items(DATASET, STUDENT, where))


def test_select_distill_publishes_the_best_grid_point(tiny_config, tmp_path, monkeypatch):
    config = copy.deepcopy(tiny_config)
    config["methods"]["mech"] = {"grid": {"alpha": [0.5, 1.0, 2.0], "beta": [1.0]}}
    names = [p.name for p in method_grid("mech", config["methods"]["mech"])]  # alpha=0.5,beta=1.0--<hash>, ...
    points = dict(zip(names, [{2: 3.0, 4: 2.5}, {2: 2.4, 4: 1.5},
                              {2: 1.5, 4: 2.0}]))  # ties with the second point: the first in grid order wins
    for point, values in points.items():
        write_point(tmp_path, point, values, os.urandom(2 << 20))
    monkeypatch.chdir(tmp_path)
    record = run_select_distill(config, DATASET, STUDENT, "mech")

    chosen = paths.grid_method("mech", names[1])
    assert json.loads(open(paths.selection(DATASET, STUDENT, "mech")).read()) == record == {
        "dataset": DATASET, "student": STUDENT, "method": "mech", "criterion": "val_cot_loss", "maximize": False,
        "point": names[1], "values": {"alpha": 1.0, "beta": 1.0}, "step": 4, "value": 1.5,
        "candidates": [
            {"point": names[0], "values": {"alpha": 0.5, "beta": 1.0}, "step": 4, "value": 2.5},
            {"point": names[1], "values": {"alpha": 1.0, "beta": 1.0}, "step": 4, "value": 1.5},
            {"point": names[2], "values": {"alpha": 2.0, "beta": 1.0}, "step": 2, "value": 1.5}]}
    published, source = (tmp_path / paths.student_model_dir(DATASET, STUDENT, m) for m in ("mech", chosen))
    assert (published / "model.safetensors").stat().st_ino == (source / "model.safetensors").stat().st_ino
    assert json.loads((published / "config.json").read_text()) == {"point": names[1]}
    assert (published / "config.json").stat().st_mtime_ns >= (source / "config.json").stat().st_mtime_ns
    for path in (paths.train_log, paths.mechanism, paths.training_items):
        pd.testing.assert_frame_equal(pd.read_parquet(path(DATASET, STUDENT, "mech")),
                                      pd.read_parquet(path(DATASET, STUDENT, chosen)))


def _val_split(n: int) -> SimpleNamespace:
    """A val split's parts that val_macro_f1 reads: doc ids (anchors), prompts, gold labels, label space."""
    ids = [f"d{i}" for i in range(n)]
    return SimpleNamespace(anchors=pd.DataFrame({"doc_id": ids}),
                           prompts=pd.DataFrame({"messages": ["[]"] * n, "candidates": [["A", "B"]] * n},
                                                index=pd.Index(ids, name="doc_id")),
                           docs=pd.DataFrame({"labels": [["A"] if i % 2 else ["B"] for i in range(n)]}, index=ids),
                           space=None)


def _select(val_docs: int | None) -> SimpleNamespace:
    gen = {"backend": "transformers", "student_backend": "auto"}
    return SimpleNamespace(criterion="val_macro_f1", val_docs=val_docs, generation=SimpleNamespace(mapping=lambda: gen))


@pytest.mark.parametrize("val_docs, answered", [(3, ["d0", "d1", "d2"]), (None, [f"d{i}" for i in range(5)])])
def test_val_macro_f1_answers_only_the_first_val_docs(monkeypatch, val_docs, answered):
    """distill.select.val_docs bounds the generation of each evaluation: only the first val_docs documents are
    answered (null: all), and the value is the macro-F1 of those answers against those documents' gold."""
    seen = []

    def answers(model, tokenizer, prompts, space, gen):
        seen.append(list(prompts["doc_id"]))
        return [["A"]] * len(prompts)

    monkeypatch.setattr(distill_stage, "answers_in_memory", answers)
    val = _val_split(5)
    criterion = distill_stage._criterion(_select(val_docs), val, None, SimpleNamespace(predict=None), None, None, 0, 1)
    value = criterion.value(None, {})
    assert seen == [answered]
    gold = [list(val.docs.loc[d, "labels"]) for d in answered]
    assert value == pytest.approx(macro_f1(gold, [["A"]] * len(answered)))


def test_val_macro_f1_of_a_method_with_its_own_inference_answers_through_its_predict(monkeypatch):
    """SemCoT (own inference): val_macro_f1 scores what the recipe's predict answers, with the grid point's
    params, as student_predict does; the student's generate is not run."""
    monkeypatch.setattr(distill_stage, "answers_in_memory", lambda *args: pytest.fail("generated, not predicted"))
    calls = []

    def predict(model, tokenizer, prompts, space, gen, params):
        calls.append((list(prompts["doc_id"]), params))
        return pd.DataFrame({"doc_id": prompts["doc_id"], "pred_labels": [["A"]] * len(prompts)})

    method = SimpleNamespace(baseline=SimpleNamespace(params=lambda given: {"K": 2, **(given or {})}))
    val = _val_split(4)
    criterion = distill_stage._criterion(_select(2), val, None, SimpleNamespace(predict=predict), method,
                                         {"alpha": 0.5}, 0, 1)
    value = criterion.value("model", {})
    assert calls == [(["d0", "d1"], {"K": 2, "alpha": 0.5})]
    assert value == pytest.approx(macro_f1([["B"], ["A"]], [["A"], ["A"]]))
