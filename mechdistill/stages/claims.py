"""rules/claims.smk: claims.

`run_claims` reads the teacher's head scores and patching files of every dataset and the metrics of
every distilled student (`paths.claims_inputs`), and writes a verdict on each claim of the paper:
results/claims.parquet (one row per test, `evaluate.claims.COLUMNS`) and results/claims.md.
A missing file is not an error here: the claims that need it are "not measurable here".
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from .. import paths
from ..distill.methods import method_kinds
from ..evaluate import claims
from ..evaluate.settings import ClaimSettings
from ..evaluate.tables import load_metrics, table_spec
from ..io import read_parquet, write_parquet, write_text

log = logging.getLogger(__name__)
PathLike = str | os.PathLike


def _exists(path: PathLike) -> bool:
    """Whether the artifact exists (a missing one is logged: what needs it is not measurable)."""
    if Path(path).exists():
        return True
    log.warning("%s does not exist: the claims that need it are not measurable here", path)
    return False


def _read(path: PathLike) -> pd.DataFrame | None:
    return read_parquet(path) if _exists(path) else None


def run_claims(config: dict, *, md_path: PathLike | None = None, parquet_path: PathLike | None = None) -> None:
    """Every claim of the paper, per dataset (and student / ours method) -> results/claims.{md,parquet}."""
    settings = ClaimSettings.from_config(config)
    run, teacher, datasets = settings.run, settings.run.teacher, list(settings.run.datasets)
    n_boot, seed = run.n_bootstrap, run.seed
    rows = []
    for dataset in datasets:
        for claim, kind in ((1, "coarse"), (2, "refine")):
            path = paths.head_scores(dataset, teacher, kind)
            k = settings.pool_sizes[claims.PHASE_OF_CLAIM[claim]]
            rows += claims.head_depth_claim(claim, dataset, _read(path), k, path, n_boot, seed)
        for claim in (3, 4):
            phase = claims.PHASE_OF_CLAIM[claim]
            path = paths.patching_runs(dataset, teacher, phase)
            rows += claims.patching_claim(claim, dataset, _read(path), _read(paths.patching_pairs(dataset, teacher, phase)),
                                          _read(paths.patching(dataset, teacher, phase)), settings.min_gap, path,
                                          settings.patching_bootstrap, seed)
    metric_files = [f for f in paths.claims_inputs(config)["metrics"] if _exists(f)]
    kinds = method_kinds(run.methods)
    references = {(d, s): spec["reference"] for table in ("table1", "table2", "table3")
                  for spec in [table_spec(run, table, kinds)] for d in spec["datasets"] for s in spec["students"]}
    rows += claims.distillation_claims(load_metrics(metric_files), datasets, run.students, kinds, n_boot, seed,
                                       references=references)
    table = claims.assemble(rows)
    header = (f"Teacher `{teacher}`, students {', '.join(f'`{s}`' for s in run.students) or 'none'}, "
              f"datasets {', '.join(f'`{d}`' for d in datasets)}. Every number below was computed by the `claims` "
              f"rule from this run's artifacts (results/); none is copied from the paper.")
    write_parquet(table, parquet_path or paths.claims("parquet"))
    write_text(md_path or paths.claims("md"), claims.to_markdown(table, header))
    verdicts = table.drop_duplicates(["claim", "dataset", "student", "method"])["claim_verdict"].value_counts()
    log.info("claims: %s", ", ".join(f"{v}: {n}" for v, n in verdicts.items()))

