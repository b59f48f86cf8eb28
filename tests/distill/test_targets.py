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


def _shard_documents(docs: dict[str, dict[str, torch.Tensor]]) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """(flat tensors, table row) of each document, as `document_targets` gives them."""
    return [({f"{d}/{k}": v for k, v in sig.items()},
             dict(doc_id=d, n_tokens=len(sig["input_ids"]), n_cot=len(sig["topk_values"]),
                  n_early=len(sig.get("p1.mask", [])), n_refine=len(sig.get("p2.mask", [])),
                  has_phase1="p1.mask" in sig, has_phase2="p2.mask" in sig)) for d, sig in docs.items()]


def _random_documents(n: int, seed: int = 0, n_cot: int = 5) -> dict[str, dict[str, torch.Tensor]]:
    """n documents' targets in every dtype the targets hold (int64, float32, bfloat16, bool, uint8), with an
    empty tensor, a document without Phase 2 and doc ids whose order is not the documents'."""
    g = torch.Generator().manual_seed(seed)
    docs = {}
    for i in range(n):
        n_early = 3 + i % 4
        sig = {"input_ids": torch.randint(0, 100, (7 + i,), generator=g), "text": torch.randint(0, 255, (9,), generator=g).to(torch.uint8),
               "topk_values": torch.randn(n_cot, 4, generator=g), "topk_indices": torch.randint(0, 100, (n_cot, 4), generator=g),
               "p1.sharpness": torch.randn(n_early, generator=g), "p1.align": torch.randn(n_early, generator=g),
               "p1.mask": torch.rand(n_early, generator=g) > 0.3, "p1.attn": torch.randn(n_early, 2, generator=g).to(torch.bfloat16),
               "p1.queries": torch.zeros(0, dtype=torch.long)}
        if i % 3:
            sig.update({"p2.loopback": torch.randn(4, generator=g), "p2.helpfulness": torch.randn(4, generator=g),
                        "p2.mask": torch.tensor([True, False, True, True])})
        docs[f"doc{(7 * i) % n:03d}-é"] = sig
    return docs


def test_merged_shards_are_the_bytes_save_targets_writes(tmp_path):
    """The streamed merge of a split's shards gives the file `save_targets` writes from all the tensors in
    memory, byte for byte (header, metadata, layout, data), the same table, and the same interaction scales."""
    from mechdistill.distill.targets import merge_target_shards, write_target_shard

    docs = _random_documents(10)
    documents = _shard_documents(docs)
    pools = {"phase1": HeadPool(heads=[(0, 1)], weights=torch.tensor([1.0]))}
    shard_paths = []
    for i, start in enumerate(range(0, len(documents), 3)):  # shards of 3, 3, 3, 1 documents
        shard_paths.append(tmp_path / f"shard-{i}.safetensors")
        write_target_shard(shard_paths[-1], documents[start:start + 3])
    scales = merge_target_shards(shard_paths, pools, "teacher", 4, tmp_path / "merged.parquet", tmp_path / "merged.safetensors")
    tensors = {name: value for doc_tensors, _ in documents for name, value in doc_tensors.items()}
    table = pd.DataFrame([row for _, row in documents])
    save_targets(tensors, table, pools, "teacher", 4, tmp_path / "saved.parquet", tmp_path / "saved.safetensors")
    assert (tmp_path / "merged.safetensors").read_bytes() == (tmp_path / "saved.safetensors").read_bytes()
    assert scales == interaction_scales(docs.values()) and scales["phase2"] != 1.0
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "merged.parquet"), pd.read_parquet(tmp_path / "saved.parquet"))
    loaded = load_targets(tmp_path / "merged.safetensors")
    assert all(torch.equal(loaded[d][k], v) for d, sig in docs.items() for k, v in sig.items())


def test_merging_an_empty_split_writes_what_save_targets_writes(tmp_path):
    from mechdistill.distill.targets import merge_target_shards

    merge_target_shards([], {}, "teacher", 4, tmp_path / "merged.parquet", tmp_path / "merged.safetensors")
    save_targets({}, pd.DataFrame(columns=["doc_id"]), {}, "teacher", 4, tmp_path / "saved.parquet", tmp_path / "saved.safetensors")
    assert (tmp_path / "merged.safetensors").read_bytes() == (tmp_path / "saved.safetensors").read_bytes()


def test_the_merge_holds_one_chunk_of_tensor_data_not_a_shard(tmp_path):
    """Peak memory of the merge is bounded by one shard, not the split: 6 shards of 48 MiB each (top-k values
    16 MiB, indices 32 MiB) merge with a traced peak (every Python allocation: the bytes read and written) of
    about one 4 MiB copy buffer, under one shard, while the split is 288 MiB."""
    import tracemalloc

    from mechdistill.distill.targets import COPY_CHUNK, merge_target_shards, write_target_shard

    shard_paths = []
    for i in range(6):
        docs = _random_documents(1, seed=i, n_cot=1 << 20)  # topk_values: 2^20 x 4 float32 = 16 MiB
        shard_paths.append(tmp_path / f"shard-{i}.safetensors")
        write_target_shard(shard_paths[-1], _shard_documents({f"d{i}": docs.popitem()[1]}))
    shard_bytes = max(p.stat().st_size for p in shard_paths)
    tracemalloc.start()
    try:
        merge_target_shards(shard_paths, {}, "teacher", 4, tmp_path / "merged.parquet", tmp_path / "merged.safetensors")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    split_bytes = (tmp_path / "merged.safetensors").stat().st_size
    assert split_bytes > 6 * (48 << 20) and shard_bytes > 48 << 20
    assert COPY_CHUNK <= peak < min(shard_bytes, COPY_CHUNK + (1 << 20))  # one chunk buffer, no shard held whole


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
