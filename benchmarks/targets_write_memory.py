"""Peak host memory (RSS) of writing a split's teacher targets, each way in a fresh process: `in_memory`
(every tensor of the split in one dict, then `save_targets`: how teacher_targets wrote before its shards)
against `sharded` (shards of `--shard-size` documents, `write_target_shard`, then the streamed
`merge_target_shards`). Synthetic paper-shaped documents: 4,096 CoT positions, top_k 50 (2.4 MiB each).

    PYTHONPATH=$PWD python benchmarks/targets_write_memory.py --docs 256 512
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch

from mechdistill.distill import targets

N_COT, TOP_K, N_TOKENS, N_EARLY = 4096, 50, 5000, 64


def document(i: int) -> tuple[dict[str, torch.Tensor], dict]:
    """One synthetic document's flat tensors and table row (as `targets.document_targets` gives them)."""
    g = torch.Generator().manual_seed(i)
    doc_id = f"d{i:05d}"
    sig = {"topk_values": torch.randn(N_COT, TOP_K, generator=g),
           "topk_indices": torch.randint(0, 128_000, (N_COT, TOP_K), generator=g),
           "input_ids": torch.randint(0, 128_000, (N_TOKENS,), generator=g),
           "p1.sharpness": torch.randn(N_EARLY, generator=g), "p1.align": torch.randn(N_EARLY, generator=g),
           "p1.mask": torch.ones(N_EARLY, dtype=torch.bool)}
    row = dict(doc_id=doc_id, n_tokens=N_TOKENS, n_cot=N_COT, n_early=N_EARLY, n_refine=0, has_phase1=True,
               has_phase2=False)
    return {f"{doc_id}/{k}": v for k, v in sig.items()}, row


def write(mode: str, n_docs: int, shard_size: int, folder: Path) -> None:
    table, tensors_path = folder / "t.parquet", folder / "t.safetensors"
    if mode == "in_memory":
        docs = [document(i) for i in range(n_docs)]
        tensors = {k: v for doc_tensors, _ in docs for k, v in doc_tensors.items()}
        targets.save_targets(tensors, pd.DataFrame([row for _, row in docs]), {}, "teacher", TOP_K, table, tensors_path)
        return
    shards = []
    for start in range(0, n_docs, shard_size):
        shards.append(folder / f"shard-{start // shard_size:05d}.safetensors")
        targets.write_target_shard(shards[-1], [document(i) for i in range(start, min(start + shard_size, n_docs))])
    targets.merge_target_shards(shards, {}, "teacher", TOP_K, table, tensors_path)


def child(mode: str, n_docs: int, shard_size: int) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as folder:
        write(mode, n_docs, shard_size, Path(folder))
        size = (Path(folder) / "t.safetensors").stat().st_size
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{mode:9s} {n_docs:5d} docs  file {size / 2**20:7.0f} MiB  peak RSS {peak / 1024:6.0f} MiB "
          f"({(peak - before) / 1024:+.0f} MiB over the imports)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--shard-size", type=int, default=32)
    ap.add_argument("--child", nargs=2, metavar=("MODE", "N_DOCS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child[0], int(args.child[1]), args.shard_size)
    for n_docs in args.docs:
        for mode in ("in_memory", "sharded"):
            subprocess.run([sys.executable, __file__, "--child", mode, str(n_docs), "--shard-size",
                            str(args.shard_size)], check=True)


if __name__ == "__main__":
    main()
