"""Verdicts on the paper's claims: synthetic head scores, patching runs and metrics with a known answer."""

import math

import numpy as np
import pandas as pd
import pytest

from mechdistill.evaluate import claims
from mechdistill.evaluate.claims import NOT_MEASURABLE, NOT_SUPPORTED, SUPPORTED
from mechdistill.evaluate.xmc import RESAMPLE

N_LAYERS, N_HEADS = 4, 4


# ----------------------------------------------------------------------------- verdict rules


@pytest.mark.parametrize("estimate, low, high, expected, n, verdict", [
    (0.5, 0.1, 0.9, 1, 10, SUPPORTED),
    (-0.5, -0.9, -0.1, -1, 10, SUPPORTED),
    (0.5, -0.1, 0.9, 1, 10, NOT_SUPPORTED),      # CI includes 0
    (-0.5, -0.9, -0.1, 1, 10, NOT_SUPPORTED),    # wrong direction
    (0.0, 0.0, 0.0, 1, 10, NOT_SUPPORTED),       # no difference at all
    (0.5, 0.1, 0.9, 1, 4, NOT_MEASURABLE),       # too few
    (0.5, math.nan, math.nan, 1, 10, NOT_MEASURABLE),
])
def test_judge(estimate, low, high, expected, n, verdict):
    assert claims.judge(estimate, low, high, expected, n, "documents", 5)[0] == verdict


def test_judge_says_why():
    assert "no difference at all" in claims.judge(0.0, 0.0, 0.0, 1, 10, "documents", 5)[1]
    assert "wrong direction" in claims.judge(-0.5, -0.9, -0.1, 1, 10, "documents", 5)[1]


def test_claim_verdict_needs_every_test():
    assert claims.claim_verdict([SUPPORTED, SUPPORTED]) == SUPPORTED
    assert claims.claim_verdict([SUPPORTED, NOT_MEASURABLE]) == NOT_MEASURABLE
    assert claims.claim_verdict([SUPPORTED, NOT_MEASURABLE, NOT_SUPPORTED]) == NOT_SUPPORTED
    assert claims.claim_verdict([]) == NOT_MEASURABLE


# ----------------------------------------------------------------------------- claims 1 and 2


def head_table(top: list[tuple[int, int]], rest: int = 1) -> pd.DataFrame:
    """Every head of a 4 x 4 model; the heads in `top` get scores 100, 99, ..., the rest scores in
    [-0.15, 0.15] that grow with depth (rest = 1) or shrink (rest = -1)."""
    rows = [(layer, head, rest * 0.01 * (layer * N_HEADS + head)) for layer in range(N_LAYERS)
            for head in range(N_HEADS)]
    table = pd.DataFrame(rows, columns=["layer", "head", "score"])
    for rank, (layer, head) in enumerate(top):
        table.loc[(table["layer"] == layer) & (table["head"] == head), "score"] = 100.0 - rank
    return table


def test_early_top_heads_support_claim_1_and_contradict_claim_2():
    heads = head_table([(0, 0), (0, 1), (0, 2), (0, 3)], rest=-1)  # the earlier, the higher the score
    (one,) = claims.head_depth_claim(1, "d", heads, k=4, n_resamples=500)
    (two,) = claims.head_depth_claim(2, "d", heads, k=4, n_resamples=500)
    # depths 0, 1/3, 2/3, 1 with 4 heads each: mean 0.5; the top 4 all at depth 0
    assert one["estimate"] == pytest.approx(-0.5) and two["estimate"] == pytest.approx(-0.5)
    assert one["ci_high"] < 0 and one["n"] == 16
    assert one["verdict"] == SUPPORTED and two["verdict"] == NOT_SUPPORTED
    assert "wrong direction" in two["reason"] and "L0H0" in one["detail"]
    assert one["p"] < 0.05  # 1 of C(16, 4) = 1820 subsets is as extreme


def test_top_heads_spread_over_layers_do_not_support_claim_1():
    heads = head_table([(0, 0), (1, 0), (2, 0), (2, 1)])  # then the last layer's heads
    (row,) = claims.head_depth_claim(1, "d", heads, k=4, n_resamples=500)
    assert row["estimate"] == pytest.approx((0 + 1 / 3 + 2 / 3 + 2 / 3) / 4 - 0.5)  # -1/12
    assert row["ci_low"] < 0 < row["ci_high"]
    assert row["verdict"] == NOT_SUPPORTED and "includes 0" in row["reason"]


def test_depth_shift_ci_resamples_heads():
    scores, depths = np.array([3.0, 2.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0, 1.0])
    shift, low, high, p = claims.depth_shift_ci(scores, depths, k=2, n_resamples=200, seed=1)
    assert shift == pytest.approx(-0.5)
    assert -0.5 <= low <= high <= 0.5 and 0 < p <= 1


@pytest.mark.parametrize("heads, why", [
    (None, "missing input"),
    (head_table([]).assign(score=math.nan), "only 0 of 16 heads"),   # e.g. no refinement positions
    (head_table([]).head(4).assign(layer=0), "depth is undefined"),   # one layer
    (head_table([]).head(9).assign(score=[1.0] * 4 + [math.nan] * 5), "only 4 of 9 heads"),
])
def test_head_depth_not_measurable(heads, why):
    (row,) = claims.head_depth_claim(2, "d", heads, k=4, source="heads/refine.parquet")
    assert row["verdict"] == NOT_MEASURABLE and why in row["reason"]


# ----------------------------------------------------------------------------- claims 3 and 4


CONTROL_FRACTION = {"near_zero": 0.05, "most_negative": -0.3}  # random: 0.2 (seeds 0.1 and 0.3)


def patching_runs(n_docs: int, top: dict[str, np.ndarray], gap: float = 1.0,
                  controls: tuple[str, ...] = ("near_zero", "most_negative")) -> pd.DataFrame:
    """Runs of n_docs documents, bins k = 2 and 4, clean 1 and corrupt 1 - gap. The patched value of a
    set is chosen so that its restoration / disruption is: top[direction][doc]; random 0.2 (seeds
    0.1 and 0.3); each of `controls` its CONTROL_FRACTION (anti-aligned heads push the other way)."""
    clean, corrupt = 1.0, 1.0 - gap

    def value(direction: str, fraction: float) -> float:
        """The patched value whose restoration (denoise) / disruption (noise) is `fraction`."""
        return corrupt + fraction * gap if direction == "denoise" else clean - fraction * gap

    rows = []
    for i in range(n_docs):
        doc = f"d{i}"
        rows += [(doc, "reference", "clean", 0, 0, clean), (doc, "reference", "corrupt", 0, 0, corrupt)]
        for direction in ("denoise", "noise"):
            for k in (2, 4):
                rows += [(doc, direction, "top", k, 0, value(direction, top[direction][i])),
                         (doc, direction, "random", k, 0, value(direction, 0.1)),
                         (doc, direction, "random", k, 1, value(direction, 0.3))]
                rows += [(doc, direction, kind, k, 0, value(direction, CONTROL_FRACTION[kind])) for kind in controls]
    runs = pd.DataFrame(rows, columns=["doc_id", "direction", "kind", "k", "seed", "value"])
    return runs.assign(clean_value=clean, corrupt_value=corrupt, text="")


def test_top_minus_control_by_hand():
    top = {"denoise": np.array([0.5, 0.9]), "noise": np.array([0.2, 0.4])}
    diffs = claims.top_minus_control(patching_runs(2, top), min_gap=0.01).set_index(["doc_id", "direction", "control"])
    assert diffs.loc[("d0", "denoise", "random"), "diff"] == pytest.approx(0.5 - 0.2)
    assert diffs.loc[("d1", "denoise", "near_zero"), "diff"] == pytest.approx(0.9 - 0.05)
    assert diffs.loc[("d1", "denoise", "most_negative"), "diff"] == pytest.approx(0.9 + 0.3)
    assert diffs.loc[("d1", "noise", "random"), "diff"] == pytest.approx(0.4 - 0.2)
    assert set(diffs.index.get_level_values("control")) == {"random", "near_zero", "most_negative"}


def test_patching_claim_verdicts():
    n = 8
    restore = 0.8 + 0.01 * np.arange(n)                          # clearly above both controls
    disrupt = 0.2 + np.array([0.3, -0.2] * (n // 2))             # vs random (0.2): +0.05 on average, noisy
    rows = claims.patching_claim(3, "d", patching_runs(n, {"denoise": restore, "noise": disrupt}), n_resamples=500)
    by_test = {(r["test"].split(" ")[0], r["compared_with"]): r for r in rows}
    assert sorted(by_test) == sorted((d, c) for d in ("denoise", "noise") for c in ("near_zero", "most_negative", "random"))
    assert by_test["denoise", "random"]["estimate"] == pytest.approx(restore.mean() - 0.2)
    assert by_test["denoise", "near_zero"]["estimate"] == pytest.approx(restore.mean() - 0.05)
    assert by_test["denoise", "most_negative"]["estimate"] == pytest.approx(restore.mean() + 0.3)
    assert by_test["denoise", "random"]["verdict"] == SUPPORTED and by_test["denoise", "random"]["n"] == n
    assert by_test["noise", "random"]["estimate"] == pytest.approx(0.05)
    assert by_test["noise", "random"]["verdict"] == NOT_SUPPORTED  # the CI includes 0
    assert by_test["noise", "near_zero"]["estimate"] == pytest.approx(disrupt.mean() - 0.05)
    assert by_test["noise", "most_negative"]["verdict"] == SUPPORTED
    assert "near-zero-score" in rows[0]["claim_text"] and "most negative-score" in rows[0]["claim_text"]
    table = claims.assemble(rows)
    assert set(table["claim_verdict"]) == {NOT_SUPPORTED}


def test_patching_claim_not_measurable():
    top = {"denoise": np.full(8, 0.9), "noise": np.full(8, 0.9)}
    few = claims.patching_claim(3, "d", patching_runs(3, top))                     # 3 documents
    flat = claims.patching_claim(4, "d", patching_runs(8, top, gap=0.001))         # corruption moved nothing
    missing = claims.patching_claim(4, "d", None, source="phase2_runs.parquet")
    empty = claims.patching_claim(4, "d", pd.DataFrame(columns=["doc_id", "direction"]),
                                  pd.DataFrame({"doc_id": ["a"], "aligned": [False], "reason": ["no swap"]}))
    assert all(r["verdict"] == NOT_MEASURABLE for r in few + flat + missing + empty)
    assert few[0]["n"] == 3 and "n = 3 documents" in few[0]["reason"]
    assert flat[0]["n"] == 0 and "0 of 8 patched documents moved" in flat[0]["reason"]
    assert "missing input phase2_runs.parquet" in missing[0]["reason"]
    assert "no patched runs" in empty[0]["reason"] and "no swap" in empty[0]["reason"]


def test_patching_claim_says_when_the_runs_lack_a_control():
    top = {"denoise": np.full(8, 0.9), "noise": np.full(8, 0.9)}
    rows = claims.patching_claim(3, "d", patching_runs(8, top, controls=("most_negative",)), n_resamples=200)
    near_zero = [r for r in rows if r["compared_with"] == "near_zero"]
    assert len(near_zero) == 2 and all(r["verdict"] == NOT_MEASURABLE for r in near_zero)
    assert "no near_zero head set" in near_zero[0]["reason"]
    assert {r["verdict"] for r in rows if r["compared_with"] == "most_negative"} == {SUPPORTED}
    assert claims.assemble(rows)["claim_verdict"].iloc[0] == NOT_MEASURABLE


def test_patching_claim_detail_reads_the_summarys_means_and_ci_widths():
    summary = pd.DataFrame(
        [("denoise", kind, k, "restoration", effect, width) for kind, k, effect, width in [
            ("top", 2, 0.7, 1.91), ("top", 4, 0.84, 0.5), ("near_zero", 2, -0.09, 0.22), ("near_zero", 4, 0.27, 0.38),
            ("most_negative", 2, -0.15, 0.44), ("most_negative", 4, 0.4, 0.8)]],
        columns=["direction", "head_set", "k", "metric", "effect", "ci_width"])
    top = {"denoise": np.full(8, 0.9), "noise": np.full(8, 0.9)}
    rows = claims.patching_claim(3, "d", patching_runs(8, top), summary=summary, n_resamples=200)
    detail = {(r["test"].split(" ")[0], r["compared_with"]): r["detail"] for r in rows}
    assert detail["denoise", "near_zero"].endswith("k=2: 0.70 (1.91) vs -0.09 (0.22); k=4: 0.84 (0.50) vs 0.27 (0.38)")
    assert "k=2: 0.70 (1.91) vs -0.15 (0.44)" in detail["denoise", "most_negative"]
    assert detail["denoise", "random"] == detail["noise", "near_zero"] == ""  # not in this summary


# ----------------------------------------------------------------------------- claims 5-9

KINDS = {"vanilla": "baseline", "phase1_only": "ablation", "mech": "ours"}
N_DOCS = 20


def synthetic_metrics() -> pd.DataFrame:
    """vanilla (baseline), phase1_only (an ablation, better than mech on focus) and mech (ours), 20 docs:
    mech gains focus, sharpness and anchor_align, is worse on confusion, has no LAS, and macro-F1 resamples
    above vanilla's; loopback has only 3 documents."""
    rng = np.random.default_rng(0)
    docs = [f"d{i}" for i in range(N_DOCS)]
    base = {m: rng.uniform(0.2, 0.6, N_DOCS) for m in ("focus", "confusion", "anchor_align", "sharpness", "f1")}
    offsets = {"mech": {"focus": 0.1, "confusion": 0.05, "anchor_align": 0.05, "sharpness": 0.05},
               "phase1_only": {"focus": 0.3, "confusion": -0.2}}
    rows = []
    for method in KINDS:
        for metric, values in base.items():
            shifted = values + offsets.get(method, {}).get(metric, 0.0) + rng.uniform(0, 0.01, N_DOCS)
            rows += [("ds", "st", method, d, metric, v) for d, v in zip(docs, shifted)]
        rows += [("ds", "st", method, d, "loopback", v) for d, v in zip(docs[:3], rng.uniform(0, 1, 3))]
        rows += [("ds", "st", method, d, "las", math.nan) for d in docs]
        macro = {"vanilla": 0.3, "phase1_only": 0.2, "mech": 0.4}[method]
        rows.append(("ds", "st", method, "", "macro_f1", macro))
        rows += [("ds", "st", method, f"{RESAMPLE}{s}", "macro_f1", macro + 0.01 * np.sin(s)) for s in range(50)]
    return pd.DataFrame(rows, columns=["dataset", "student", "method", "doc_id", "metric", "value"])


def test_distillation_claims_against_the_best_baseline():
    metrics = synthetic_metrics()
    rows = {r["test"]: r for r in claims.distillation_claims(metrics, ["ds"], ["st"], KINDS, n_resamples=500)}
    assert set(rows) == {"Foc", "Conf", "LAS", "F1", "Sharp", "Align", "Loop", "Help"}
    per_doc = metrics[metrics["doc_id"] != ""].pivot_table(index="doc_id", columns=["method", "metric"],
                                                          values="value")
    focus = rows["Foc"]
    assert focus["compared_with"] == "vanilla"  # phase1_only is an ablation, never the baseline
    assert focus["estimate"] == pytest.approx(per_doc["mech", "focus"].mean() - per_doc["vanilla", "focus"].mean())
    assert focus["verdict"] == SUPPORTED and focus["n"] == N_DOCS and focus["claim"] == 5
    assert rows["Conf"]["estimate"] > 0 and rows["Conf"]["verdict"] == NOT_SUPPORTED  # confusion went up
    assert rows["LAS"]["verdict"] == NOT_MEASURABLE and "NaN" in rows["LAS"]["reason"]
    assert rows["F1"]["estimate"] == pytest.approx(0.4 - 0.3) and rows["F1"]["verdict"] == SUPPORTED
    assert rows["Loop"]["n"] == 3 and rows["Loop"]["verdict"] == NOT_MEASURABLE
    assert rows["Help"]["verdict"] == NOT_MEASURABLE                         # no helpfulness at all
    assert rows["Sharp"]["verdict"] == rows["Align"]["verdict"] == SUPPORTED
    table = claims.assemble(rows.values())
    verdict = table.drop_duplicates("claim").set_index("claim")["claim_verdict"]
    assert verdict.to_dict() == {5: SUPPORTED, 6: NOT_SUPPORTED, 7: NOT_MEASURABLE, 8: SUPPORTED, 9: NOT_MEASURABLE}


@pytest.mark.parametrize("students, kinds, why", [
    (["st"], {"mech": "ours"}, "no method of kind 'baseline'"),
    (["st"], {"vanilla": "baseline"}, "no method of kind 'ours'"),
    ([], KINDS, "no students"),
])
def test_distillation_claims_not_measurable_without_a_comparison(students, kinds, why):
    rows = claims.distillation_claims(synthetic_metrics(), ["ds"], students, kinds)
    assert sorted({r["claim"] for r in rows}) == [5, 6, 7, 8, 9]
    assert all(r["verdict"] == NOT_MEASURABLE and why in r["reason"] for r in rows)


# ----------------------------------------------------------------------------- the report


def test_markdown_names_every_claim_with_its_source():
    rows = claims.head_depth_claim(1, "d", head_table([(0, 0)]), k=1, n_resamples=100)
    rows += claims.patching_claim(3, "d", None, source="x")
    rows += claims.distillation_claims(synthetic_metrics(), ["d"], ["st"], {"mech": "ours"})
    text = claims.to_markdown(claims.assemble(rows), "header line")
    for number, claim in claims.CLAIMS.items():
        assert f"## Claim {number}: {claim.text}" in text and claim.paper in text
    assert "header line" in text and "| 2 |" not in text  # claim 2 has no rows: its section says so
    assert "not computed in this run" in text


def test_distillation_claims_compare_with_vanilla_where_the_table_does():
    """Tables 2-4 compare ours with Vanilla, not the best baseline: with a second baseline better than
    vanilla on Focus, the claim's estimate is mech minus vanilla (computed here from the documents)."""
    metrics = synthetic_metrics()
    better = metrics[metrics["method"] == "vanilla"].assign(method="cwt")
    better.loc[better["metric"] == "focus", "value"] += 0.5
    metrics = pd.concat([metrics, better], ignore_index=True)
    kinds = {**KINDS, "cwt": "baseline"}
    per_doc = metrics[metrics["doc_id"] != ""].pivot_table(index="doc_id", columns=["method", "metric"], values="value")
    best = {r["test"]: r for r in claims.distillation_claims(metrics, ["ds"], ["st"], kinds, n_resamples=200)}
    assert best["Foc"]["compared_with"] == "cwt" and best["Foc"]["verdict"] == NOT_SUPPORTED
    vs_vanilla = {r["test"]: r for r in claims.distillation_claims(metrics, ["ds"], ["st"], kinds, n_resamples=200,
                                                                  references={("ds", "st"): "vanilla"})}
    focus = vs_vanilla["Foc"]
    assert focus["compared_with"] == "vanilla" and focus["verdict"] == SUPPORTED
    assert focus["estimate"] == pytest.approx(per_doc["mech", "focus"].mean() - per_doc["vanilla", "focus"].mean())
