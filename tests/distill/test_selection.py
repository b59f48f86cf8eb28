"""Choosing by validation: criteria, the best step of a train log, the best grid point, publishing."""

from __future__ import annotations

import math
import os

import pandas as pd
import pytest

from mechdistill.distill.selection import (
    LINK_MIN_BYTES,
    best_row,
    cot_loss_value,
    link_dir,
    make_criterion,
    select_point,
)
from mechdistill.models import ModelCatalog, load_model
from mechdistill.teacher.backends import TransformersBackend
from mechdistill.teacher.generate import generate_cot
from mechdistill.teacher.prompts import build_prompts


def train_log(values: dict[int, float], name: str = "val_cot_loss", max_steps: int = 4) -> pd.DataFrame:
    """A hand-made train log: a train row per step, a val row with criterion `name` at each step of `values`."""
    train = [{"split": "train", "step": s, "loss": 10.0 - s} for s in range(1, max_steps + 1)]
    val = [{"split": "val", "step": s, "loss": 99.0, name: v} for s, v in values.items()]
    return pd.DataFrame(train + val)


def test_val_cot_loss_is_the_unweighted_cot_terms_whatever_the_total():
    assert cot_loss_value(None, {"loss": 50.0, "cot.ce": 2.5, "cot.kl": 0.25, "phase1.attn": 7.0}) == 2.75
    with pytest.raises(ValueError, match="cot.kl"):
        cot_loss_value(None, {"loss": 1.0, "cot.ce": 1.0})
    assert make_criterion("val_loss").value(None, {"loss": 3.0}) == 3.0
    assert make_criterion("val_macro_f1", lambda model, row: 0.5).maximize
    with pytest.raises(ValueError, match="needs a value function"):
        make_criterion("val_macro_f1")


@pytest.mark.parametrize("values, name, step", [
    ({1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0}, "val_cot_loss", 2),
    ({1: 3.0, 2: 1.0, 3: 1.0, 4: 1.0}, "val_cot_loss", 2),        # ties: the earliest
    ({1: math.nan, 2: 5.0, 3: math.nan}, "val_cot_loss", 2),      # NaN never wins
    ({1: 0.1, 2: 0.3, 3: 0.3, 4: 0.2}, "val_macro_f1", 2),        # F1: the highest
])
def test_best_row_is_the_trainers_choice(values, name, step):
    assert best_row(train_log(values, name), name)["step"] == step


def test_best_row_needs_the_criterion_column_and_val_rows():
    with pytest.raises(ValueError, match="no 'val_macro_f1' column"):
        best_row(train_log({1: 1.0}), "val_macro_f1")
    assert best_row(train_log({}).assign(val_cot_loss=math.nan), "val_cot_loss") is None


def test_select_point_picks_the_best_point_and_records_every_candidate():
    logs = {"alpha=0.5": train_log({2: 3.0, 4: 2.5}), "alpha=1.0": train_log({2: 2.0, 4: 2.2}),
            "alpha=2.0": train_log({2: 2.4, 4: 2.0}), "alpha=4.0": train_log({2: math.nan, 4: math.nan})}
    values = {name: {"alpha": float(name.split("=")[1])} for name in logs}
    record = select_point(logs, values, "val_cot_loss")
    # alpha=1.0 and alpha=2.0 tie at 2.0: the first point in grid order wins
    assert record == {
        "criterion": "val_cot_loss", "maximize": False, "point": "alpha=1.0", "values": {"alpha": 1.0}, "step": 2,
        "value": 2.0, "candidates": [
            {"point": "alpha=0.5", "values": {"alpha": 0.5}, "step": 4, "value": 2.5},
            {"point": "alpha=1.0", "values": {"alpha": 1.0}, "step": 2, "value": 2.0},
            {"point": "alpha=2.0", "values": {"alpha": 2.0}, "step": 4, "value": 2.0},
            {"point": "alpha=4.0", "values": {"alpha": 4.0}, "step": 2, "value": None}]}
    f1 = {"a": train_log({2: 0.2, 4: 0.1}, "val_macro_f1"), "b": train_log({2: 0.3}, "val_macro_f1")}
    assert select_point(f1, {"a": {}, "b": {}}, "val_macro_f1")["point"] == "b"


def test_link_dir_hard_links_weights_copies_small_files_and_replaces_atomically(tmp_path):
    source, target = tmp_path / "grid" / "p" / "model", tmp_path / "model"
    source.mkdir(parents=True)
    (source / "config.json").write_text('{"a": 1}')
    (source / "model.safetensors").write_bytes(os.urandom(LINK_MIN_BYTES + 1))
    target.mkdir()
    (target / "stale.bin").write_text("old model")
    link_dir(source, target)
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    assert (target / "model.safetensors").stat().st_ino == (source / "model.safetensors").stat().st_ino
    assert (target / "config.json").read_text() == '{"a": 1}'
    assert (target / "config.json").stat().st_ino != (source / "config.json").stat().st_ino
    assert sorted(p.name for p in tmp_path.iterdir()) == ["grid", "model"]  # no temp or .old dir left


@pytest.fixture()
def prompts(icd_space):
    docs = pd.DataFrame({"doc_id": [f"d{i}" for i in range(3)],
                         "text": [f"Note {i}: chronic systolic heart failure." for i in range(3)],
                         "labels": [["I50.22"]] * 3})
    return build_prompts(docs, icd_space, {"strategy": "hierarchy", "size": 4, "n_near_miss": 2},
                         {"exemplar": False, "system": "S", "instruction": "Pick."}, seed=0)


def test_loaded_model_backend_generates_what_student_predict_would(tiny_config, icd_space, prompts, tmp_path):
    """val_macro_f1 generates with the model in memory; it must give the texts that loading the same
    weights from disk (student_predict's backend) gives, budget forcing included."""
    gen = tiny_config["generation"]
    from_disk = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "disk.parquet", gen=tiny_config["generation"])
    model, tok = load_model(ModelCatalog.from_config(tiny_config), "tiny_llama", device="cpu", dtype=gen.get("dtype"))
    in_memory = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "memory.parquet",
                             backend_factory=lambda: TransformersBackend.from_model(model, tok, gen), gen=tiny_config["generation"])
    assert from_disk["forced_answer"].any()  # the comparison covers budget forcing
    pd.testing.assert_frame_equal(from_disk, in_memory)
