"""distill.train.report_to: the train log streamed to TensorBoard / W&B from rank 0 equals train_log.parquet."""

from __future__ import annotations

import copy
import math
import sys
import types

import pandas as pd
import pytest

from mechdistill.config import load_config
from mechdistill.distill.reporting import open_reporters, row_scalars
from mechdistill.distill.settings import DistillSettings
from mechdistill.distill.train_config import TrainConfig, report_targets
from mechdistill.distill.trainer import train
from mechdistill.errors import ConfigError
from tests.distill.test_trainer import (
    ce_terms,
    config,
    noisy_ce_terms,
    one_thread,  # noqa: F401  (the autouse fixture: one torch thread)
    scripted,
    shuffled_batches,
    tiny_llama,
    token_data,
)
from tests.helpers import REPO

VALUES = {2: 3.0, 4: 1.5, 6: 2.0}  # the scripted criterion at each evaluation


def read_events(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the TensorBoard event files in `folder`: tag -> [(step, value)], as TensorBoard's own
    reader loads them (what an earlier process wrote past a later one's restart purged)."""
    pytest.importorskip("tensorboard")
    # the reader TensorBoard's own server uses
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    events = EventAccumulator(str(folder), size_guidance={"tensors": 0})
    events.Reload()
    return {tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in events.Tensors(tag)]
            for tag in events.Tags()["tensors"] if not tag.startswith("config")}


def parquet_scalars(log: pd.DataFrame) -> dict[str, list[tuple[int, float]]]:
    """The same tags computed from the Parquet log: every numeric, non-missing value of a row but its step."""
    expected: dict[str, list[tuple[int, float]]] = {}
    for row in log.to_dict("records"):
        for name, value in row.items():
            if name not in ("split", "step") and not (isinstance(value, float) and math.isnan(value)):
                expected.setdefault(f"{row['split']}/{name}", []).append((int(row["step"]), float(value)))
    return expected


def test_tensorboard_scalars_equal_the_parquet_log_step_by_step(tmp_path):
    cfg = config(max_steps=6, eval_every=2, report_to="tensorboard")
    train(tiny_llama(), ce_terms, shuffled_batches(token_data(4), 2), cfg, tmp_path / "model",
          val_batches=[{"input_ids": token_data(2, seed=2)}], criterion=scripted(VALUES),
          report_config={"run": {"method": "vanilla"}})

    log = pd.read_parquet(tmp_path / "train_log.parquet")
    streamed, expected = read_events(tmp_path / "tensorboard"), parquet_scalars(log)
    assert {"train/loss", "train/ce", "train/z_loss", "train/lr", "train/grad_norm", "val/loss",
            "val/scripted"} <= set(streamed)
    assert streamed == expected  # every tag, every step, bit for bit (written in double precision)
    assert [v for _, v in streamed["val/scripted"]] == [VALUES[2], VALUES[4], VALUES[6]]
    assert [s for s, _ in streamed["train/loss"]] == list(range(1, 7))


def test_a_resumed_run_shows_each_step_once_and_equals_the_parquet_log(tmp_path):
    cfg = config(max_steps=6, eval_every=2, checkpoint_every=2, report_to=["tensorboard"])
    val, batches = [{"input_ids": token_data(2, seed=2)}], shuffled_batches(token_data(6, seed=1), 2)

    def kill_at_step_5(row):
        if row["step"] == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):  # streamed steps 1-5; the checkpoint is at step 4
        train(tiny_llama(), noisy_ce_terms, batches, cfg, tmp_path / "model", val_batches=val,
              criterion=scripted(VALUES), on_step=kill_at_step_5)
    train(tiny_llama(seed=7), noisy_ce_terms, batches, cfg, tmp_path / "model", val_batches=val,
          criterion=scripted(VALUES))

    streamed = read_events(tmp_path / "tensorboard")
    assert [s for s, _ in streamed["train/loss"]] == list(range(1, 7))
    assert streamed == parquet_scalars(pd.read_parquet(tmp_path / "train_log.parquet"))


def test_a_fresh_run_replaces_the_curves_of_an_earlier_one(tmp_path):
    cfg = config(max_steps=2, report_to="tensorboard")
    for steps in (3, 2):
        train(tiny_llama(), ce_terms, shuffled_batches(token_data(4), 2), config(max_steps=steps, report_to="tensorboard"),
              tmp_path / "model", keep_checkpoint=False)
    assert cfg.report_to == ("tensorboard",)
    assert [s for s, _ in read_events(tmp_path / "tensorboard")["train/loss"]] == [1, 2]


def test_only_rank_0_reports():
    reporters = open_reporters(["tensorboard", "wandb"], NOWHERE, {}, is_main=False)
    reporters.log_row({"split": "train", "step": 1, "loss": 1.0})
    reporters.close()
    assert reporters.reporters == [] and not NOWHERE.exists()


NOWHERE = __import__("pathlib").Path("/nonexistent/mechdistill-report")


def test_report_to_takes_one_target_a_list_or_none():
    assert report_targets(None) == report_targets("none") == report_targets([]) == ()
    assert report_targets("wandb") == ("wandb",)
    assert report_targets(["tensorboard", "wandb", "tensorboard"]) == ("tensorboard", "wandb")
    assert TrainConfig().report_to == ()
    with pytest.raises(ConfigError, match=r"distill\.train\.report_to: unknown \['tensorbord'\]"):
        TrainConfig(report_to="tensorbord")
    with pytest.raises(ConfigError, match="lists 'none' with a target"):
        report_targets(["none", "wandb"])


@pytest.mark.parametrize("target, module, fix", [("tensorboard", "tensorboard", "pip install tensorboard"),
                                                 ("wandb", "wandb", "pip install wandb")])
def test_a_target_that_is_not_installed_names_the_key_and_the_install_command(tmp_path, monkeypatch, target,
                                                                                module, fix):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ConfigError, match=rf"distill\.train\.report_to asks for {target}.*{fix}"):
        open_reporters([target], tmp_path, {})


def test_wandb_gets_the_same_rows_offline_with_the_config(tmp_path, monkeypatch):
    """The W&B path against a stand-in module that records its calls (the real package is optional)."""
    calls: dict[str, list] = {"init": [], "log": [], "finish": []}

    class FakeRun:
        def log(self, data, step):
            calls["log"].append((step, data))

        def finish(self):
            calls["finish"].append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls["init"].append(kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    result = train(tiny_llama(), ce_terms, shuffled_batches(token_data(4), 2), config(max_steps=3, report_to="wandb"),
                   tmp_path / "model", report_config={"run": {"method": "vanilla"}}, report_name="vanilla/default")

    [init] = calls["init"]
    assert init["mode"] == "offline" and init["config"] == {"run": {"method": "vanilla"}}
    assert init["name"] == "vanilla/default" and init["dir"] == str(tmp_path / "wandb")
    assert calls["log"] == [(int(row["step"]), row_scalars(row)) for row in result.log.to_dict("records")]
    assert calls["finish"] == [True]


def test_turning_the_curves_on_or_off_retrains_nothing():
    """distill.train.report_to is left out of the distill rule's params (rerun trigger); lr is not."""
    config = load_config(REPO / "config/tiny.yaml")
    edited = {"report_to": ["tensorboard", "wandb"], "lr": 0.5}
    params = {}
    for key, value in {None: None, **edited}.items():
        changed = copy.deepcopy(config)
        if key is not None:
            changed["distill"]["train"][key] = value
        params[key] = DistillSettings.params(changed)
    assert params["report_to"] == params[None] != params["lr"]
