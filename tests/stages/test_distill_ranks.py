"""Distillation on 2 real DeepSpeed ZeRO-3 ranks (CPU accelerator, gloo), launched as the `distill`
rule launches it (torchrun ... python -m mechdistill distill), against one process on the same
global batches.

2 ranks x 1 document per micro-batch see the global batch that 1 process with grad_accum_steps 2
sees, so the per-step losses and the saved weights must agree; the ranks must read disjoint
documents; a run killed after a checkpoint must resume from it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from mechdistill import paths
from mechdistill.distill.launch import local_launcher
from mechdistill.distill.methods import needs_teacher_data
from mechdistill.stages.distill import KILL_AFTER_STEP, run_baseline_teacher_data, run_distill
from tests.helpers import REPO
from tests.stages.conftest import DATASET, STUDENT

pytest.importorskip("deepspeed")

STEPS = 3


def _config(tiny, method: str, **train) -> dict:
    config = copy.deepcopy(tiny.config)
    config["methods"] = {**config["methods"], method: {"base": "mech"}}
    config["distill"]["max_docs"] = 2  # 2 train documents: one per rank
    config["distill"]["train"].update(max_steps=STEPS, checkpoint_every=1, eval_every=2, **train)
    return config


def _launch(tiny, config: dict, method: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """The distill rule's command, 2 ranks: {mpi} {tasks} python -m mechdistill distill ..."""
    snapshot = tiny.path(f"{method}.config.json")
    snapshot.write_text(json.dumps(config))
    log = tiny.path(f"{method}.log")
    command = (f"{local_launcher('cpu')} 2 {sys.executable} -m mechdistill distill {DATASET} {STUDENT} {method} "
               f"--config {snapshot} --log-file {log}")
    return subprocess.run(command, shell=True, cwd=tiny.root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
                               "OMP_NUM_THREADS": "1", **(env or {})})


def _shards(text: str) -> list[list[str]]:
    return [json.loads(m.replace("'", '"')) for m in re.findall(r"reads (\[.*?\]) of the training", text)]


@pytest.mark.slow
def test_two_zero3_ranks_train_like_one_process_and_resume_after_a_kill(tiny):
    tiny.ensure("teacher_targets")
    # one process, 2 micro-batches per step, no DeepSpeed: the reference
    reference = _config(tiny, "mech_1rank", grad_accum_steps=2)
    with tiny.inside():
        run_distill(reference, DATASET, STUDENT, "mech_1rank", "default")
    # 2 ZeRO-3 ranks, 1 micro-batch each; killed after step 2 (its checkpoint written), then run again
    ranks = _config(tiny, "mech_2ranks")
    ranks["distill"].update(deepspeed=True, zero_optimization={"stage3_param_persistence_threshold": 0})
    killed = _launch(tiny, ranks, "mech_2ranks", {KILL_AFTER_STEP: "2"})
    point = paths.grid_method("mech_2ranks", "default")
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert tiny.path(paths.checkpoint_dir(DATASET, STUDENT, point)).exists()
    assert not tiny.path(paths.student_model(DATASET, STUDENT, point)).exists()
    resumed = _launch(tiny, ranks, "mech_2ranks")
    log_text = tiny.path("mech_2ranks.log").read_text()
    assert resumed.returncode == 0, resumed.stderr[-3000:] + log_text[-3000:]
    assert "resumed from" in log_text and "at step 2" in log_text

    # the ranks read disjoint documents (rank 0 logs to the file, rank 1 to stderr)
    first, second = _shards(log_text)[-1], _shards(resumed.stderr)[-1]
    assert len(first) == len(second) == 1 and not set(first) & set(second)

    logs = {name: pd.read_parquet(tiny.path(paths.train_log(DATASET, STUDENT, paths.grid_method(name, "default"))))
            for name in ("mech_1rank", "mech_2ranks")}
    train = {name: log[log["split"] == "train"].set_index("step") for name, log in logs.items()}
    assert list(train["mech_2ranks"].index) == list(range(1, STEPS + 1))
    terms = ["loss", "cot.ce", "cot.kl", "phase1.attn", "phase1.write"]
    pd.testing.assert_frame_equal(train["mech_2ranks"][terms], train["mech_1rank"][terms], rtol=1e-4, atol=1e-6)
    val = {name: log[log["split"] == "val"].set_index("step")["loss"] for name, log in logs.items()}
    pd.testing.assert_series_equal(val["mech_2ranks"], val["mech_1rank"], rtol=1e-4, atol=1e-6)

    # the saved model loads with from_pretrained and holds the reference's weights
    models = {name: AutoModelForCausalLM.from_pretrained(tiny.path(paths.student_model_dir(
        DATASET, STUDENT, paths.grid_method(name, "default")))).state_dict() for name in train}
    assert models["mech_2ranks"].keys() == models["mech_1rank"].keys()
    for name, weight in models["mech_1rank"].items():
        torch.testing.assert_close(models["mech_2ranks"][name], weight, rtol=1e-4, atol=1e-5, msg=name)


F1_LINE = re.compile(r"val_macro_f1 on rank (\d) of (\d): ([0-9.]+) over (\d+) val documents, (\d+) labels answered")


@pytest.mark.slow
@pytest.mark.parametrize("base", ["vanilla", "semcot"])
def test_two_zero3_ranks_select_by_val_macro_f1_like_one_process(tiny, base):
    """val_macro_f1 under 2 ZeRO-3 ranks (refused before, "cannot share"; SemCoT refused even on one): the ranks
    answer one val document each, stepping every forward together (generate's synced_gpus; SemCoT's predict
    runs its whole answer budget), gather the answers and both compute the value that one process computes for
    the same weights (the same global batches: 2 micro-batches per step)."""
    tiny.ensure("teacher_targets")
    one, two = f"{base}_f1_1rank", f"{base}_f1_2ranks"
    configs = {one: _config(tiny, one, grad_accum_steps=2), two: _config(tiny, two)}
    for name, config in configs.items():
        config["methods"][name] = {**(tiny.config["methods"].get(base) or {}), "base": base}
        config["distill"]["train"].update(max_steps=2, checkpoint_every=0)
        config["distill"]["select"] = {"criterion": "val_macro_f1", "val_docs": None}
        config["generation"]["fuzzy_threshold"] = 0  # any forced answer maps to a candidate: labels to compare
    configs[two]["distill"].update(deepspeed=True, zero_optimization={"stage3_param_persistence_threshold": 0})
    with tiny.inside():
        for name, config in configs.items():
            if needs_teacher_data(name, config["methods"][name]):
                run_baseline_teacher_data(config, DATASET, name)
        run_distill(configs[one], DATASET, STUDENT, one, "default")
    done = _launch(tiny, configs[two], two)
    log_text = tiny.path(f"{two}.log").read_text()
    assert done.returncode == 0, done.stderr[-3000:] + log_text[-3000:]

    # rank 0 logs to the file, rank 1 to stderr: each evaluation, both ranks score both documents alike
    lines = {rank: [m for m in F1_LINE.findall(text) if m[0] == rank] for rank, text in (("0", log_text),
                                                                                           ("1", done.stderr))}
    assert len(lines["0"]) == len(lines["1"]) == 1  # one evaluation: step 2 (eval_every), the end
    assert [m[2:] for m in lines["0"]] == [m[2:] for m in lines["1"]]
    assert all(m[1] == "2" and m[3] == "2" and int(m[4]) > 0 for m in lines["0"])  # both documents, gathered

    logs = {name: pd.read_parquet(tiny.path(paths.train_log(DATASET, STUDENT, paths.grid_method(name, "default")))
                                  ).query("split == 'val'").set_index("step")["val_macro_f1"] for name in configs}
    pd.testing.assert_series_equal(logs[two], logs[one], check_names=False)
    assert float(lines["0"][-1][2]) == pytest.approx(logs[one].iloc[-1], abs=1e-6)
