"""rules/claims.smk stage: the paper's claims checked on the tiny run's own artifacts."""

import pandas as pd
import pytest

from mechdistill import paths
from mechdistill.evaluate.claims import CLAIMS, NOT_MEASURABLE
from mechdistill.stages.claims import run_claims
from tests.stages.conftest import DATASET, TEACHER


def test_claims_of_the_tiny_run(tiny):
    tiny.ensure("evaluate")  # head scores, patching and the mech student's metrics (no baseline trained)
    with tiny.inside():
        run_claims(tiny.config)
    table = pd.read_parquet(tiny.path(paths.claims("parquet")))
    assert sorted(set(table["claim"])) == list(CLAIMS) and set(table["dataset"]) == {DATASET}

    # claim 1 by hand: top-k CoarseScore heads' mean relative depth minus all heads'
    coarse = pd.read_parquet(tiny.path(paths.head_scores(DATASET, TEACHER, "coarse"))).sort_values(["layer", "head"])
    k, last = tiny.config["distill"]["pools"]["phase1"]["k"], coarse["layer"].max()
    top = coarse.sort_values("score", ascending=False, kind="stable").head(k)
    one = table[table["claim"] == 1].iloc[0]
    assert one["estimate"] == pytest.approx(top["layer"].mean() / last - coarse["layer"].mean() / last)
    assert one["n"] == len(coarse) == 8 and one["ci_low"] <= one["ci_high"]

    rest = table[table["claim"] > 1].set_index("claim")
    assert (rest["verdict"] == NOT_MEASURABLE).all()
    assert "have a finite RefineScore" in rest.loc[2, "reason"]      # random CoT: no refinement positions
    assert rest.loc[[3], "n"].max() <= tiny.config["patching"]["max_docs"] < 5   # too few documents
    assert "no patched runs" in rest.loc[4, "reason"].iloc[0]         # nothing ranked in Phase 2
    # no baseline was trained here: claim 5 names every one of tiny.yaml's
    assert rest.loc[5, "reason"] == "Foc is NaN (no value) for vanilla, unicott, morsd, semcot, cwt"

    text = tiny.path(paths.claims("md")).read_text()
    assert all(f"## Claim {n}: {c.text}" in text for n, c in CLAIMS.items())
