"""How often MoRSD's sampled rationales qualify, from a finished run's teacher data.

    python benchmarks/morsd_qualifying.py --results results/icd10_demo [--teacher smollm2] [--min-f1 0.5]

Reads {results}/{teacher}/baseline_data/morsd/{train,val}.parquet (the greedy trace, sample -1, and the
sampled ones) and the gold labels of {results}/data/{split}.parquet, and prints per split, with the F1 of
`morsd.answer_f1`:
  - docs: documents; samples: sampled rationales; greedy F1: the mean F1 of the teacher's greedy answers;
  - answer closed: share of sampled rationales whose answer block ends with </answer> (an open block ran out
    of force_answer_tokens or max_new_tokens);
  - per qualifying rule, the share of documents with at least one sampled rationale that qualifies, and the
    share that fall back to the greedy trace (no candidate qualifies, greedy included):
      F1 >= m        the fixed threshold (`min_f1`, each of --min-f1);
      F1 >= greedy, > 0   a candidate at least as good as the teacher's own greedy answer and not wholly
                          wrong (`min_f1: greedy`, the default): the greedy trace qualifies when its F1 > 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mechdistill.distill.baselines.morsd import GREEDY, answer_f1  # noqa: E402
from mechdistill.teacher.answers import ANSWER_CLOSE  # noqa: E402


def qualifying(data: pd.DataFrame, gold: pd.Series, thresholds: list[float]) -> dict[str, float]:
    """The shares above for one split. data: the morsd teacher data; gold: doc_id -> gold labels."""
    data = data.assign(f1=[answer_f1(list(p), list(gold[d])) for d, p in zip(data["doc_id"], data["pred_labels"])])
    greedy = data[data["sample"] == GREEDY].set_index("doc_id")["f1"]
    sampled = data[data["sample"] != GREEDY]
    best_sample = sampled.groupby("doc_id")["f1"].max().reindex(greedy.index).fillna(-1.0)
    out = {"docs": len(greedy), "samples": len(sampled), "greedy F1": float(greedy.mean()),
           "sampled F1": float(sampled["f1"].mean()),
           "answer closed": float(sampled["raw"].str.contains(ANSWER_CLOSE, regex=False).mean())}
    for m in thresholds:
        out[f"sample F1 >= {m}"] = float((best_sample >= m).mean())
        out[f"fallback F1 >= {m}"] = float(((best_sample < m) & (greedy < m)).mean())
    at_greedy = (best_sample >= greedy) & (best_sample > 0)
    out["sample F1 >= greedy, > 0"] = float(at_greedy.mean())
    out["fallback F1 >= greedy, > 0"] = float(((best_sample <= 0) & (greedy <= 0)).mean())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True, help="results/{dataset} of a finished run")
    parser.add_argument("--teacher", default="smollm2")
    parser.add_argument("--min-f1", type=float, nargs="+", default=[0.5, 0.25])
    args = parser.parse_args()
    root = Path(args.results)
    rows = {}
    for split in ("train", "val"):
        data = pd.read_parquet(root / args.teacher / "baseline_data" / "morsd" / f"{split}.parquet")
        gold = pd.read_parquet(root / "data" / f"{split}.parquet").set_index("doc_id")["labels"]
        rows[split] = qualifying(data, gold, args.min_f1)
    print(pd.DataFrame(rows).to_markdown(floatfmt=".3f"))


if __name__ == "__main__":
    main()
