"""Print the characterization numbers of a finished run: where the top heads sit under each scoring
variant and prompt style, the head tables' ranges, the patching summaries (every head set with its
95 % CI), the distillation logs' loss terms and the mechanism scores before / after training.

    python benchmarks/characterization_report.py [--root .] [--dataset icd10_demo] [--teacher smollm2]
                                                [--student smollm2_l24]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from mechdistill import paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="the folder Snakemake ran in (holds results/)")
    ap.add_argument("--dataset", default="icd10_demo")
    ap.add_argument("--teacher", default="smollm2")
    ap.add_argument("--student", default="smollm2_l24")
    args = ap.parse_args()
    root, d, t, s = Path(args.root), args.dataset, args.teacher, args.student
    pd.set_option("display.width", 250)
    print((root / paths.head_comparison(d, t, "md")).read_text())
    for kind in paths.HEAD_SCORE_KINDS:
        for f in [root / paths.head_scores(d, t, kind), *sorted((root / paths.head_scores(d, t, kind)).parent.glob(f"clean_*/{kind}.parquet"))]:
            table = pd.read_parquet(f)
            cols = [c for c in table.columns if c.startswith(("coarse_", "sharpness_", "refine_")) or c in ("qk", "ov", "score")]
            print(f"{f}: {table['score'].notna().sum()} of {len(table)} heads scored, ranked by {table['score_variant'].iloc[0]}")
            print(table[cols].describe().loc[["mean", "min", "max"]].round(4).to_string())
    for phase in paths.PHASES:
        summary = pd.read_parquet(root / paths.patching(d, t, phase))
        print(f"\npatching {phase}")
        for metric, sub in summary.groupby("metric"):
            cells = sub.assign(cell=[f"{r.effect:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}] n={r.n_docs}" for r in sub.itertuples()])
            print(f"-- {metric}\n" + cells.pivot_table(index=["direction", "k"], columns="head_set", values="cell",
                                                       aggfunc="first").to_string())
        runs = pd.read_parquet(root / paths.patching_runs(d, t, phase))
        if len(runs):
            print("reference runs:", runs[runs["direction"] == "reference"].groupby("kind")["value"].mean().round(4).to_dict())
    for method in sorted(p.name for p in (root / paths.student_dir(d, s, "x")).parent.iterdir() if p.is_dir()):
        log_path = root / paths.train_log(d, s, method)
        if not log_path.exists():
            continue
        train = pd.read_parquet(log_path).query("split == 'train'")
        cols = ["step", "loss"] + [c for c in train.columns if c.startswith(("cot.", "phase1.", "phase2."))]
        print(f"\n{method}: train loss terms, first and last step\n{train[cols].iloc[[0, -1]].round(4).to_string()}")
        mechanism = pd.read_parquet(root / paths.mechanism(d, s, method))
        print("mechanism (mean over documents):", mechanism.groupby(["metric", "when"])["value"].mean().round(3).to_dict())


if __name__ == "__main__":
    main()
