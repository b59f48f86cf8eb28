"""Regenerate a finished run's teacher traces with another engine and compare them row by row.

    python benchmarks/compare_traces.py [--config config/config.yaml] [--backend transformers]
                                        [--splits train,val,test,clean_neutral,clean_guided_exemplar]

Reads results/{dataset}/{teacher}/cot/{split}.parquet and the prompts it was generated from (run from the
workflow's directory, after `snakemake`), generates the same prompts with `--backend` and the run's
generation settings (budget forcing included), writing under a temporary folder (results/ is not
touched), and prints per split: rows with identical text (`raw`), identical token counts, identical
predicted labels, and the engines on both sides. Exit status 1 when any row differs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mechdistill import paths  # noqa: E402
from mechdistill.config import load_config  # noqa: E402
from mechdistill.io import read_parquet  # noqa: E402
from mechdistill.labels import LabelSpace  # noqa: E402
from mechdistill.model_sources import ModelCatalog  # noqa: E402
from mechdistill.teacher.generate import generate_cot  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="config/config.yaml")
    ap.add_argument("--backend", default="transformers", choices=["transformers", "vllm"])
    ap.add_argument("--splits", default="train,val,test,clean_neutral,clean_guided_exemplar")
    args = ap.parse_args()
    config = load_config(args.config)
    config["generation"]["backend"] = args.backend
    teacher, differing = config["teacher"], 0
    for dataset in config["datasets"]:
        space = LabelSpace(read_parquet(paths.labels(dataset), "labels"))
        for split in args.splits.split(","):
            if not Path(paths.cot(dataset, teacher, split)).exists():  # e.g. a prompt style the run left out
                print(f"{dataset}/{split}: no trace file in this run ({paths.cot(dataset, teacher, split)}), skipped")
                continue
            run = read_parquet(paths.cot(dataset, teacher, split), "cot")
            prompts = read_parquet(paths.prompts(dataset, split), "prompts")
            with tempfile.TemporaryDirectory() as tmp:
                again = generate_cot(ModelCatalog.from_config(config), teacher, prompts, space, Path(tmp) / "cot.parquet", dataset, split, gen=config["generation"])
            same_text = int((run["raw"].to_numpy() == again["raw"].to_numpy()).sum())
            same_tokens = int((run["n_tokens"].to_numpy() == again["n_tokens"].to_numpy()).sum())
            same_labels = sum(list(a) == list(b) for a, b in zip(run["pred_labels"], again["pred_labels"]))
            differing += len(run) - same_text
            print(f"{dataset}/{split}: {same_text} of {len(run)} identical texts, {same_tokens} identical token "
                  f"counts, {same_labels} identical label lists; run: {', '.join(sorted(set(run['engine'])))}; "
                  f"again: {', '.join(sorted(set(again['engine'])))}", flush=True)
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
