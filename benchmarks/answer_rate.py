"""Whether models write a parseable answer: per prediction file (a student's pred/test.parquet or the
teacher's cot/test.parquet), the documents with a closed `</answer>` block, with a mapped label, the finish
reasons, the budget-forced rows, the mean generated tokens and the macro-F1 against the split's gold labels.

    PYTHONPATH=$PWD python benchmarks/answer_rate.py results/icd10_demo/smollm2_l24/*/pred/test.parquet \\
        [--gold results/icd10_demo/data/test.parquet]
"""

from __future__ import annotations

import argparse

import pandas as pd

from mechdistill.evaluate.xmc import macro_f1
from mechdistill.teacher.answers import ANSWER_CLOSE


def answer_rate(pred: pd.DataFrame, gold: pd.Series) -> dict:
    """The counts of one prediction file (columns of teacher.generate.COT_COLUMNS); gold: labels by doc_id."""
    golds, preds = [list(gold[d]) for d in pred["doc_id"]], [list(p) for p in pred["pred_labels"]]
    return {"docs": len(pred), "closed_answer_block": int(sum(ANSWER_CLOSE in r for r in pred["raw"])),
            "with_mapped_labels": int(sum(bool(p) for p in preds)),
            "finish": pred["finish_reason"].value_counts().to_dict(), "forced": int(pred["forced_answer"].sum()),
            "mean_tokens": round(float(pred["n_tokens"].mean()), 1), "macro_f1": round(macro_f1(golds, preds), 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+")
    ap.add_argument("--gold", default="results/icd10_demo/data/test.parquet")
    args = ap.parse_args()
    gold = pd.read_parquet(args.gold).set_index("doc_id")["labels"]
    for path in args.paths:
        pred = pd.read_parquet(path)
        print(path, answer_rate(pred, gold))
        print("  first output ends:", repr(pred["raw"].iloc[0][-120:]))


if __name__ == "__main__":
    main()
