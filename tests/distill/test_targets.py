"""Teacher targets on disk (mechdistill.distill.targets): tensors, table and the interaction scales."""

from __future__ import annotations

import math

import pandas as pd
import pytest
import torch

from mechdistill.distill.pools import HeadPool
from mechdistill.distill.targets import (
    interaction_scales,
    load_interaction_scales,
    load_targets,
    save_targets,
)


def test_interaction_scales_by_hand_and_stored_with_the_tensors(tmp_path):
    t = torch.tensor
    docs = {  # Phase 1 kappa*Align over valid queries: 2*0.5 = 1, 4*0.5 = 2 (doc a), 3*-1 = -3 (doc b; 100 masked)
        "a": {"p1.sharpness": t([2.0, 4.0, 9.0]), "p1.align": t([0.5, 0.5, 9.0]), "p1.mask": t([True, True, False])},
        "b": {"p1.sharpness": t([3.0, 10.0]), "p1.align": t([-1.0, 10.0]), "p1.mask": t([True, False])},
    }
    scales = interaction_scales(docs.values())
    assert scales["phase1"] == pytest.approx(math.sqrt((1 + 4 + 9) / 3))
    assert scales["phase2"] == 1.0                                  # no refinement position: the raw term
    tensors = {f"{d}/{k}": v for d, sig in docs.items() for k, v in sig.items()}
    pools = {"phase1": HeadPool(heads=[(0, 1)], weights=t([1.0]))}
    table = pd.DataFrame({"doc_id": ["a", "b"]})
    save_targets(tensors, table, pools, "teacher", 4, tmp_path / "t.parquet", tmp_path / "t.safetensors")
    assert load_interaction_scales(tmp_path / "t.safetensors") == pytest.approx(scales)
    assert torch.equal(load_targets(tmp_path / "t.safetensors")["b"]["p1.align"], docs["b"]["p1.align"])
    assert interaction_scales([{"p1.sharpness": t([0.0]), "p1.align": t([1.0]), "p1.mask": t([True])}])["phase1"] == 1.0


def test_the_same_targets_are_the_same_bytes(tmp_path):
    """safetensors writes its metadata map in a random order (4 keys here: 24 orders); `save_targets`
    puts the header in a fixed one, so reruns give byte-identical files that still load."""
    import subprocess
    import sys

    from safetensors import safe_open

    t = torch.tensor
    tensors = {"a/p1.mask": t([True, False]), "a/topk_values": t([[2.0, 1.0]]), "b/topk_ids": t([[3, 1]])}
    pools = {"phase1": HeadPool(heads=[(0, 1)], weights=t([1.0]))}
    table = pd.DataFrame({"doc_id": ["a", "b"]})
    files = []
    for i in range(6):
        files.append(tmp_path / f"{i}.safetensors")
        save_targets(tensors, table, pools, "teacher", 4, tmp_path / f"{i}.parquet", files[-1], {"phase1": 1.0})
    assert len({f.read_bytes() for f in files}) == 1
    header = files[0].read_bytes()[8:400].decode(errors="ignore")
    assert header.index('"interaction_scales"') < header.index('"pools"') < header.index('"teacher"') \
        < header.index('"top_k"')
    with safe_open(str(files[0]), "pt") as f:
        assert f.metadata()["teacher"] == "teacher" and torch.equal(f.get_tensor("b/topk_ids"), t([[3, 1]]))
    # the library's own order really varies (so the test above can fail): raw saves in fresh processes
    script = ("import sys, torch; from safetensors.torch import save_file; "
              "save_file({'x': torch.zeros(1)}, sys.argv[1], metadata={k: k for k in 'abcdefgh'})")
    raw = set()
    for i in range(4):  # 8 metadata keys: 4 processes agree by chance with probability (1/8!)^3
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"raw{i}.st")], check=True)
        raw.add((tmp_path / f"raw{i}.st").read_bytes())
    assert len(raw) > 1


def test_targets_file_reads_a_document_at_a_time_what_load_targets_reads(tmp_path):
    """`TargetsFile` (safe_open, memory-mapped) and `TeacherTargets.from_files` give each document's tensors as
    `load_targets` does, reading only the document asked for."""
    import json

    from safetensors.torch import save_file

    from mechdistill.distill.targets import TargetsFile, TeacherTargets

    g = torch.Generator().manual_seed(0)
    docs = {d: {"topk_values": torch.randn(n, 4, generator=g), "input_ids": torch.arange(n + 3),
                "p1.mask": torch.rand(n, generator=g) > 0.5} for d, n in (("a", 3), ("b", 5), ("c", 2))}
    path = tmp_path / "t.safetensors"
    save_file({f"{d}/{k}": v for d, sig in docs.items() for k, v in sig.items()}, str(path),
              metadata={"interaction_scales": json.dumps({"phase1": 2.0, "phase2": 1.0})})
    whole, lazy = load_targets(path), TargetsFile(path)
    assert sorted(lazy) == sorted(whole) == ["a", "b", "c"] and len(lazy) == 3 and "b" in lazy
    for d in docs:
        assert lazy[d].keys() == whole[d].keys() == docs[d].keys()
        assert all(torch.equal(lazy[d][k], docs[d][k]) for k in docs[d])
    targets = TeacherTargets.from_files({"train": path, "val": path})
    assert targets.has("val", "c") and not targets.has("val", "d") and targets.scales == {"phase1": 2.0, "phase2": 1.0}
    assert torch.equal(targets.get("train", "b")["topk_values"], docs["b"]["topk_values"])
