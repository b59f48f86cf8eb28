"""teacher_targets resumes at its shard after a kill, and documents in flight give the same targets."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

from mechdistill import paths
from mechdistill.distill import targets as targets_lib
from mechdistill.stages.distill import KILL_AFTER_SHARDS, run_teacher_targets
from tests.helpers import REPO
from tests.stages.conftest import DATASET, TEACHER

SCRIPT = """
import json, sys
from mechdistill.stages.distill import run_teacher_targets
config, out = json.loads(sys.argv[1]), sys.argv[2]
run_teacher_targets(config, "{dataset}", "train", out_path=out + "/train.parquet", tensors_path=out + "/train.safetensors")
"""


def _config(tiny, **distill) -> dict:
    config = copy.deepcopy(tiny.config)
    config["distill"].update(distill)
    return config


def _reference(tiny) -> tuple[bytes, bytes]:
    """The uninterrupted run's files (the tiny pipeline's teacher_targets: one shard of 32 documents)."""
    tiny.ensure("teacher_targets")
    return (tiny.path(paths.targets_tensors(DATASET, TEACHER, "train")).read_bytes(),
            tiny.path(paths.targets(DATASET, TEACHER, "train")).read_bytes())


def test_a_killed_teacher_targets_resumes_at_its_shard_with_identical_output(tiny, tmp_path, monkeypatch):
    reference = _reference(tiny)
    config = _config(tiny, teacher_shard_size=1)  # the 3 train documents: 3 shards
    killed = subprocess.run([sys.executable, "-c", SCRIPT.format(dataset=DATASET), json.dumps(config), str(tmp_path)],
                            cwd=tiny.root, capture_output=True, text=True, timeout=600,
                            env={**os.environ, KILL_AFTER_SHARDS: "2",
                                 "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILLed after its 2nd shard
    (folder,) = tmp_path.glob(".train.shards-*")
    assert sorted(p.name for p in folder.iterdir()) == ["shard-00000.safetensors", "shard-00001.safetensors"]
    assert not (tmp_path / "train.safetensors").exists() and not (tmp_path / "train.parquet").exists()

    computed = []
    document_targets = targets_lib.document_targets
    monkeypatch.setattr(targets_lib, "document_targets",
                        lambda model, ex, **kw: computed.append(ex.doc_id) or document_targets(model, ex, **kw))
    with tiny.inside():
        run_teacher_targets(config, DATASET, "train", out_path=tmp_path / "train.parquet",
                            tensors_path=tmp_path / "train.safetensors")
    assert len(computed) == 1  # only the third document's shard
    assert ((tmp_path / "train.safetensors").read_bytes(), (tmp_path / "train.parquet").read_bytes()) == reference
    assert not list(tmp_path.glob(".train.shards-*"))  # cleared once written


def test_two_documents_in_flight_give_the_same_targets(tiny, tmp_path):
    reference = _reference(tiny)
    with tiny.inside():
        run_teacher_targets(_config(tiny, teacher_in_flight=2, teacher_shard_size=2), DATASET, "train",
                            out_path=tmp_path / "train.parquet", tensors_path=tmp_path / "train.safetensors")
    assert ((tmp_path / "train.safetensors").read_bytes(), (tmp_path / "train.parquet").read_bytes()) == reference
