"""Whether two runs wrote the same artifacts: every Parquet file equal (pandas `equals`, wall-clock columns
dropped), every safetensors file holding the same tensors, every other file byte-identical.

    python benchmarks/compare_results.py RUN_A/results RUN_B/results

Used to show that a refactor changes no artifact (run the same config from a clone of each commit).
Prints one line per differing or missing file and a summary; exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

WALL_CLOCK = ("elapsed_s", "seconds", "wall_s", "time_s")  # columns that measure time, not results
SKIPPED_PARTS = ("logs", ".snakemake", "ckpt")
SKIPPED_SUFFIXES = (".log", ".html", ".png")  # logs; figures embed creation dates


def _frame(path: Path) -> pd.DataFrame:
    frame = pd.read_parquet(path)
    return frame.drop(columns=[c for c in frame.columns if c in WALL_CLOCK])


def _tensors(path: Path) -> dict:
    from safetensors.torch import load_file  # torch: only for runs that wrote weights

    return load_file(str(path))


def same_file(a: Path, b: Path) -> bool:
    if a.suffix == ".parquet":
        return _frame(a).equals(_frame(b))
    if a.suffix == ".safetensors":
        ta, tb = _tensors(a), _tensors(b)
        return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)
    return a.read_bytes() == b.read_bytes()


def compared_files(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*") if p.is_file()
            and not any(part in SKIPPED_PARTS for part in p.relative_to(root).parts)
            and p.suffix not in SKIPPED_SUFFIXES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="results folder of the first run")
    parser.add_argument("b", type=Path, help="results folder of the second run")
    args = parser.parse_args(argv)
    files_a, files_b = compared_files(args.a), compared_files(args.b)
    differing = []
    for rel in sorted(files_a ^ files_b):
        print(f"only in {'A' if rel in files_a else 'B'}: {rel}")
    for rel in sorted(files_a & files_b):
        if not same_file(args.a / rel, args.b / rel):
            differing.append(rel)
            print(f"differs: {rel}")
    n_parquet = sum(1 for rel in files_a & files_b if rel.suffix == ".parquet")
    n_weights = sum(1 for rel in files_a & files_b if rel.suffix == ".safetensors")
    print(f"{len(files_a & files_b)} files in both ({n_parquet} Parquet, {n_weights} safetensors): "
          f"{len(differing)} differ; {len(files_a ^ files_b)} in one run only")
    return 1 if differing or files_a ^ files_b else 0


if __name__ == "__main__":
    sys.exit(main())
