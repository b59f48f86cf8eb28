"""A verdict on each claim of the paper, from this run's own artifacts (results/claims.{md,parquet}).

Every claim gets, per dataset (and per student and "ours" method for claims 5-9), the statistic this
run measured, its 95% confidence interval, and one of three verdicts:

    supported            the estimate has the direction the paper claims AND its CI excludes 0
    not supported        measured, but the direction is wrong or the CI includes 0
    not measurable here  an input is missing or empty, too few heads / documents (the row says how
                         many), no baseline or no "ours" method, or a NaN value

A claim with several tests (e.g. 3: two directions x two controls) is supported only when every
test is (an intersection-union test, so no multiplicity correction is needed); it is not supported
when any measured test is not; otherwise it is not measurable here.

Claims and statistics (`CLAIMS`):

 1, 2  Phase 1 (CoarseScore) heads sit early, Phase 2 (RefineScore) heads mid-to-late (Sec. 2,
       Figs 4 and 7). Relative depth of a head d = layer / (n_layers - 1). Statistic: mean d of the
       top-k heads by score minus mean d of every head with a finite score (k = the distillation
       pool's size, `distill.pools.{phase}.k`); claim 1 expects < 0, claim 2 > 0. CI: percentile
       bootstrap over heads (resample the scored heads with replacement, re-rank, recompute); p: a
       two-sided permutation test (random k-subsets of the scored heads).
 3, 4  Patching the top-ranked heads restores (denoising) and disrupts (noising) the phase's metric
       more than every count-matched control (`patching.head_sets.CONTROLS`: the heads whose score
       is closest to 0, the most negative-score heads, random heads; Sec. 2, Figs 5 and 8). Per
       document: the restoration / disruption fraction of the top set minus that of the control,
       averaged over the bins k (`patching.effects.document_effects`); statistic: its mean over
       documents, CI: percentile bootstrap over documents; expected > 0. Documents whose corruption
       moved the metric by less than `patching.min_gap` have no fraction and do not count. The
       detail of each test lists the summary's per-bin means and bootstrap CI widths of top and control.
 5-8   Mechanistic distillation raises Focus, lowers Confusion, raises LAS and macro-F1 over the
       row its table compares it with (Sec. 4): the best baseline in Table 1 (clinical coding, the
       first two students), Vanilla in Tables 2-4 (`tables.TABLE_REFERENCE`). The ours row of
       `tables.build_table` with that reference (its delta, paired-bootstrap CI and p).
 9     It recovers the four mechanism scores (Sharpness, AnchorAlign, LoopBack, Helpfulness) over
       the same reference (Sec. 4 RQ2): four tests as in 5-8, each expected > 0.

A bootstrap CI of fewer than `MIN_DOCS` documents is not trusted (with n = 2 it has at most three
distinct means): such a test is "not measurable here". No number of the paper is typed in here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..patching.effects import document_effects
from ..patching.head_sets import CONTROLS
from ..stats import bootstrap_ci, percentile_interval
from .tables import TABLE_COLUMNS, build_table
from .xmc import RESAMPLE

SUPPORTED, NOT_SUPPORTED, NOT_MEASURABLE = "supported", "not supported", "not measurable here"
MIN_DOCS = 5
LEVEL = 0.95
EFFECT = {"denoise": "restoration", "noise": "disruption"}
PHASE_OF_CLAIM = {1: "phase1", 2: "phase2", 3: "phase1", 4: "phase2"}
SCORE_OF_PHASE = {"phase1": "CoarseScore", "phase2": "RefineScore"}
METRIC_OF_PHASE = {"phase1": "Reasoning Focus", "phase2": "Near-Miss Confusion"}
DISTILL_LABELS = {5: ["Foc"], 6: ["Conf"], 7: ["LAS"], 8: ["F1"], 9: ["Sharp", "Align", "Loop", "Help"]}
DOC_METRIC = {"macro_f1": "f1"}  # documents behind a corpus metric: those with an instance F1
COLUMNS = ["claim", "claim_text", "paper", "dataset", "student", "method", "test", "compared_with", "estimate",
           "ci_low", "ci_high", "p", "n", "unit", "verdict", "reason", "detail", "claim_verdict"]


@dataclass(frozen=True)
class Claim:
    number: int
    text: str
    paper: str       # where the paper makes it
    statistic: str   # what this run measures for it


CLAIMS: dict[int, Claim] = {c.number: c for c in [
    Claim(1, "Phase 1 (CoarseScore) heads concentrate in early layers", "Sec. 2 (Phase 1), Eq. 1, Fig. 4 left",
          "mean relative depth of the top-k CoarseScore heads minus that of all scored heads (expected < 0)"),
    Claim(2, "Phase 2 (RefineScore) heads sit in mid-to-late layers", "Sec. 2 (Phase 2), Eq. 3, Fig. 7 left",
          "mean relative depth of the top-k RefineScore heads minus that of all scored heads (expected > 0)"),
    Claim(3, "Patching the top CoarseScore heads restores (denoising) and disrupts (noising) Reasoning Focus "
             "more than count-matched near-zero-score, most negative-score and random heads",
          "Sec. 2 (Phase 1), Fig. 5",
          "per document, top-set minus control restoration / disruption averaged over bins; mean over documents "
          "(expected > 0)"),
    Claim(4, "Patching the top RefineScore heads restores (denoising) and disrupts (noising) Near-Miss "
             "Confusion more than count-matched near-zero-score, most negative-score and random heads",
          "Sec. 2 (Phase 2), Fig. 8",
          "per document, top-set minus control restoration / disruption averaged over bins; mean over documents "
          "(expected > 0)"),
    Claim(5, "Mechanistic distillation raises Reasoning Focus over the table's reference row",
          "Sec. 4 RQ1, Tables 1-3 (Foc)", "ours minus the reference (Table 1: the best baseline; Tables 2-4: Vanilla), Focus (expected > 0)"),
    Claim(6, "Mechanistic distillation lowers Near-Miss Confusion below the table's reference row",
          "Sec. 4 RQ1, Tables 1-3 (Conf)", "ours minus the reference (Table 1: the best baseline; Tables 2-4: Vanilla), Confusion (expected < 0)"),
    Claim(7, "Mechanistic distillation raises LAS (teacher faithfulness) over the table's reference row",
          "Sec. 4 (Evaluation Metrics), Tables 1-3 (LAS)", "ours minus the reference (Table 1: the best baseline; Tables 2-4: Vanilla), LAS (expected > 0)"),
    Claim(8, "Mechanistic distillation raises macro-F1 over the table's reference row", "Sec. 4, Tables 1-3 (F1)",
          "ours minus the reference (Table 1: the best baseline; Tables 2-4: Vanilla), macro-F1 (expected > 0)"),
    Claim(9, "Mechanistic distillation recovers the teacher's mechanism scores (Sharpness, AnchorAlign, "
             "LoopBack, Helpfulness) over the table's reference row",
          "Sec. 4 RQ2, Tables 1, 2, 4 (Sharp, Align, Loop, Help)",
          "ours minus the reference (Table 1: the best baseline; Tables 2-4: Vanilla), each mechanism score (expected > 0)"),
]}


# -----------------------------------------------------------------------------
# Verdicts


def judge(estimate: float, ci_low: float, ci_high: float, expected: int, n: int, unit: str,
          min_n: int) -> tuple[str, str]:
    """(verdict, reason) of one test. expected: +1 if the claim says the estimate is > 0, -1 if < 0."""
    if n < min_n:
        return NOT_MEASURABLE, f"n = {n} {unit} < {min_n}: too few for a bootstrap CI"
    if math.isnan(estimate):
        return NOT_MEASURABLE, "the estimate is NaN"
    if math.isnan(ci_low) or math.isnan(ci_high):
        return NOT_MEASURABLE, "no CI (nothing to pair or resample)"
    side = "above" if expected > 0 else "below"
    if estimate == 0:
        return NOT_SUPPORTED, f"no difference at all (the claim expects {side} 0)"
    if estimate * expected < 0:
        return NOT_SUPPORTED, f"the wrong direction (the claim expects {side} 0)"
    if (ci_low if expected > 0 else -ci_high) <= 0:
        return NOT_SUPPORTED, "the right direction, but the CI includes 0"
    return SUPPORTED, f"{side} 0, CI excludes 0"


def _row(claim: int, dataset: str, test: str, compared_with: str, *, student: str = "", method: str = "",
         estimate: float = math.nan, ci: tuple[float, float] = (math.nan, math.nan), p: float = math.nan,
         n: int = 0, unit: str = "", verdict: str = NOT_MEASURABLE, reason: str = "", detail: str = "") -> dict:
    return {"claim": claim, "claim_text": CLAIMS[claim].text, "paper": CLAIMS[claim].paper, "dataset": dataset,
            "student": student, "method": method, "test": test, "compared_with": compared_with,
            "estimate": float(estimate), "ci_low": float(ci[0]), "ci_high": float(ci[1]), "p": float(p),
            "n": int(n), "unit": unit, "verdict": verdict, "reason": reason, "detail": detail}


def claim_verdict(verdicts: Sequence[str]) -> str:
    """A claim's verdict from its tests': supported if all are, not supported if any measured one is not."""
    if NOT_SUPPORTED in verdicts:
        return NOT_SUPPORTED
    if verdicts and all(v == SUPPORTED for v in verdicts):
        return SUPPORTED
    return NOT_MEASURABLE


def assemble(rows: Sequence[dict]) -> pd.DataFrame:
    """Rows of every test -> the claims table (COLUMNS), ordered by claim, with each claim's verdict
    per (dataset, student, method)."""
    out = pd.DataFrame(list(rows), columns=COLUMNS[:-1])
    keys = ["claim", "dataset", "student", "method"]
    out["claim_verdict"] = out.groupby(keys, sort=False)["verdict"].transform(lambda v: claim_verdict(list(v)))
    out = out.sort_values("claim", kind="stable", ignore_index=True)
    return out.astype({"claim": "int64", "n": "int64"})


# -----------------------------------------------------------------------------
# Claims 1 and 2: where the top heads sit


def relative_depth(layers: np.ndarray, n_layers: int) -> np.ndarray:
    """layer / (n_layers - 1): 0 = first layer, 1 = last."""
    return np.asarray(layers, dtype=float) / (n_layers - 1)


def depth_shift(scores: np.ndarray, depths: np.ndarray, k: int) -> float:
    """Mean depth of the k highest-scoring heads minus the mean depth of all (ties: first in order)."""
    top = np.argsort(-np.asarray(scores, dtype=float), kind="stable")[:k]
    return float(depths[top].mean() - depths.mean())


def depth_shift_ci(scores: np.ndarray, depths: np.ndarray, k: int, n_resamples: int = 1000, level: float = LEVEL,
                   seed: int = 0) -> tuple[float, float, float, float]:
    """(shift, CI low, CI high, permutation p): `depth_shift` with a percentile bootstrap CI over heads
    and a two-sided permutation p-value (the top-k replaced by random k-subsets)."""
    scores, depths = np.asarray(scores, dtype=float), np.asarray(depths, dtype=float)
    n = len(scores)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_resamples, n))                                # [S, n]
    s, d = scores[idx], depths[idx]                                                # [S, n]
    top = np.take_along_axis(d, np.argsort(-s, axis=1, kind="stable")[:, :k], 1)   # [S, k]
    low, high = percentile_interval(top.mean(1) - d.mean(1), level)
    observed = depth_shift(scores, depths, k)
    null = rng.permuted(np.tile(depths, (n_resamples, 1)), axis=1)[:, :k].mean(1) - depths.mean()  # [S]
    p = (1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (1 + n_resamples)
    return observed, low, high, float(p)


def head_depth_claim(claim: int, dataset: str, heads: pd.DataFrame | None, k: int, source: str = "",
                     n_resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Claim 1 (CoarseScore table) or 2 (RefineScore table) on one dataset's teacher heads.

    heads: one row per head of the model (layer, head, score; NaN = unscored), None if the file is
    missing. k: how many top heads the claim is about.
    """
    phase = PHASE_OF_CLAIM[claim]
    test, expected = f"top-{k} {SCORE_OF_PHASE[phase]} heads", (-1 if phase == "phase1" else 1)

    def row(**kw) -> list[dict]:
        return [_row(claim, dataset, test, "all scored heads", unit="heads", **kw)]

    if heads is None:
        return row(reason=f"missing input {source}")
    scored = heads.dropna(subset=["score"]).sort_values(["layer", "head"], kind="stable")  # ties: (layer, head)
    n_layers = int(heads["layer"].max()) + 1 if len(heads) else 0
    if n_layers < 2:
        return row(n=len(scored), reason=f"{n_layers} layer(s): depth is undefined")
    if len(scored) <= k:
        return row(n=len(scored), reason=f"only {len(scored)} of {len(heads)} heads have a finite "
                                         f"{SCORE_OF_PHASE[phase]}, not more than k = {k}")
    scores, depths = scored["score"].to_numpy(), relative_depth(scored["layer"].to_numpy(), n_layers)
    shift, low, high, p = depth_shift_ci(scores, depths, k, n_resamples, LEVEL, seed)
    verdict, reason = judge(shift, low, high, expected, len(scored), "scored heads", k + 1)
    top = scored.iloc[np.argsort(-scores, kind="stable")[:k]]
    detail = (f"top-{k} mean depth {depths.mean() + shift:.3f} vs {depths.mean():.3f} over {len(scored)} heads of "
              f"{n_layers} layers; top heads " + ", ".join(f"L{r.layer}H{r.head}" for r in top.itertuples()))
    return row(estimate=shift, ci=(low, high), p=p, n=len(scored), verdict=verdict, reason=reason, detail=detail)


# -----------------------------------------------------------------------------
# Claims 3 and 4: patching the top heads vs controls


def top_minus_control(runs: pd.DataFrame, min_gap: float) -> pd.DataFrame:
    """Per document, direction and control: the top set's restoration / disruption minus the
    control's at the same k, averaged over the bins k where both are finite.

    runs: the patching runs file (references are skipped). Returns doc_id, direction, control, diff.
    """
    patched = runs[runs["direction"].isin(list(EFFECT))]
    effects = document_effects(patched, min_gap) if len(patched) else pd.DataFrame(
        columns=["doc_id", "direction", "kind", "k", "metric", "effect"])
    fractions = effects[effects["metric"] == effects["direction"].map(EFFECT)]
    wide = fractions.groupby(["doc_id", "direction", "k", "kind"])["effect"].mean().unstack("kind")
    frames = []
    for control in CONTROLS:
        if "top" not in wide.columns or control not in wide.columns:
            continue
        diff = (wide["top"] - wide[control]).dropna().groupby(level=["doc_id", "direction"]).mean()
        frames.append(diff.rename("diff").reset_index().assign(control=control))
    if not frames:
        return pd.DataFrame(columns=["doc_id", "direction", "control", "diff"])
    return pd.concat(frames, ignore_index=True)[["doc_id", "direction", "control", "diff"]]


def _gap_note(runs: pd.DataFrame, pairs: pd.DataFrame | None, min_gap: float) -> str:
    """How many documents were patched, aligned and moved by the corruption (for a reason)."""
    refs = runs[runs["direction"] == "reference"].groupby("doc_id").first() if len(runs) else pd.DataFrame()
    moved = int(((refs["clean_value"] - refs["corrupt_value"]).abs() >= min_gap).sum()) if len(refs) else 0
    aligned = f"{int(pairs['aligned'].sum())} of {len(pairs)} pairs aligned, " if pairs is not None and len(pairs) else ""
    return f"{aligned}{moved} of {len(refs)} patched documents moved by the corruption >= min_gap {min_gap}"


def _by_bin(summary: pd.DataFrame | None, direction: str, control: str) -> str:
    """The summary's mean effect and bootstrap CI width of top vs control per bin, e.g.
    "k=3: 0.70 (CI width 1.91) vs -0.09 (0.22)"."""
    if summary is None or summary.empty:
        return ""
    part = summary[(summary["direction"] == direction) & (summary["metric"] == EFFECT[direction])]
    wide = part.pivot_table(index="k", columns="head_set", values=["effect", "ci_width"], aggfunc="mean",
                            dropna=False)
    if not {"top", control} <= set(part["head_set"]):
        return ""
    mean, width = wide["effect"], wide["ci_width"]
    return f"{EFFECT[direction]} top vs {control}, mean (95% CI width) per bin: " + "; ".join(
        f"k={k}: {mean.loc[k, 'top']:.2f} ({width.loc[k, 'top']:.2f}) vs {mean.loc[k, control]:.2f} "
        f"({width.loc[k, control]:.2f})" for k in mean.index)


def patching_claim(claim: int, dataset: str, runs: pd.DataFrame | None, pairs: pd.DataFrame | None = None,
                   summary: pd.DataFrame | None = None, min_gap: float = 0.01, source: str = "",
                   n_resamples: int = 1000, seed: int = 0, min_docs: int = MIN_DOCS) -> list[dict]:
    """Claim 3 (phase 1) or 4 (phase 2) on one dataset: one test per direction and control.

    runs / pairs / summary: the phase's patching files (None = missing); summary only adds the
    per-bin means of Figs 5 and 8 to `detail`.
    """
    phase = PHASE_OF_CLAIM[claim]
    rows = []
    diffs = top_minus_control(runs, min_gap) if runs is not None and len(runs) else None
    for direction in EFFECT:
        for control in CONTROLS:
            test = f"{direction} ({EFFECT[direction]} of {METRIC_OF_PHASE[phase]}): top vs {control}"
            base = dict(unit="documents", detail=_by_bin(summary, direction, control))
            if runs is None:
                rows.append(_row(claim, dataset, test, control, reason=f"missing input {source}", **base))
                continue
            if diffs is None:
                why = "; ".join(sorted(set(pairs["reason"].astype(str)))) if pairs is not None and len(pairs) else ""
                rows.append(_row(claim, dataset, test, control, **base,
                                 reason=f"no patched runs (no ranked head or no aligned pair{': ' + why if why else ''})"))
                continue
            if control not in set(runs["kind"]):
                rows.append(_row(claim, dataset, test, control, **base,
                                 reason=f"the runs have no {control} head set (made before it existed? rerun patching)"))
                continue
            values = diffs.loc[(diffs["direction"] == direction) & (diffs["control"] == control), "diff"].to_numpy()
            mean, low, high = bootstrap_ci(values, n_resamples, LEVEL, seed)
            verdict, reason = judge(mean, low, high, 1, len(values), "documents with a ratio", min_docs)
            if verdict == NOT_MEASURABLE:
                reason += f" ({_gap_note(runs, pairs, min_gap)})"
            rows.append(_row(claim, dataset, test, control, estimate=mean, ci=(low, high), n=len(values),
                             verdict=verdict, reason=reason, **base))
    return rows


# -----------------------------------------------------------------------------
# Claims 5-9: mechanistic distillation vs its table's reference row


def _paired_documents(metrics: pd.DataFrame, dataset: str, student: str, methods: Sequence[str],
                      metric: str) -> int:
    """Documents with a finite per-document value of `metric` (or its DOC_METRIC) for every method."""
    name = DOC_METRIC.get(metric, metric)
    doc_id = metrics["doc_id"].fillna("").astype(str)
    rows = metrics[(metrics["dataset"] == dataset) & (metrics["student"] == student) & (metrics["metric"] == name)
                   & (doc_id != "") & ~doc_id.str.startswith(RESAMPLE) & metrics["value"].notna()]
    sets = [set(rows.loc[rows["method"] == m, "doc_id"]) for m in methods]
    return len(set.intersection(*sets)) if sets else 0


def distillation_claims(metrics: pd.DataFrame, datasets: Sequence[str], students: Sequence[str],
                        kinds: Mapping[str, str], n_resamples: int = 1000, seed: int = 0,
                        min_docs: int = MIN_DOCS,
                        references: Mapping[tuple[str, str], str | None] | None = None) -> list[dict]:
    """Claims 5-9 per dataset, student and method of kind "ours", from the metrics of every
    (student, method) (`tables.load_metrics`). kinds: method -> baseline | ours | ablation.

    references: (dataset, student) -> the row ours is compared with, as its table lays it out
    (`tables.table_spec`'s reference): None = the best baseline of each column (Table 1), a
    method's name = that row (Tables 2-4: "vanilla"). A pair not in it: the best baseline."""
    references = dict(references or {})
    ours = [m for m, kind in kinds.items() if kind == "ours"]
    baselines = [m for m, kind in kinds.items() if kind == "baseline"]
    higher = {label: h for label, _, h in TABLE_COLUMNS}
    metric_of = {label: m for label, m, _ in TABLE_COLUMNS}
    rows = []

    def versus(dataset: str, student: str) -> str:
        return references.get((dataset, student)) or "best baseline"

    def untestable(dataset, reason, student="", method=""):
        for claim, labels in DISTILL_LABELS.items():
            rows.extend(_row(claim, dataset, label, versus(dataset, student), student=student, method=method,
                             unit="documents", reason=reason) for label in labels)

    for dataset in datasets:
        if not students:
            untestable(dataset, "no students in the config")
        elif not ours:
            untestable(dataset, f"no method of kind 'ours' in the config (methods: {', '.join(kinds) or 'none'})")
        elif not baselines:
            untestable(dataset, f"no method of kind 'baseline' to compare with (methods: {', '.join(kinds)})")
    if not (students and ours and baselines):
        return rows
    tables = {ref: build_table(metrics, list(datasets), list(students), ours + baselines, kinds,
                               n_resamples=n_resamples, seed=seed, reference=ref)
              for ref in {references.get((d, s)) for d in datasets for s in students}}
    for dataset in datasets:
        for student in students:
            reference = references.get((dataset, student))
            table = tables[reference]
            block = table[(table["dataset"] == dataset) & (table["student"] == student)]
            if block.empty:
                continue
            base_rows = block[(block["kind"] == "baseline") if reference is None else (block["method"] == reference)]
            for mine in block[block["kind"] == "ours"].to_dict("records"):
                for claim, labels in DISTILL_LABELS.items():
                    for label in labels:
                        cells = base_rows.set_index("method")[label].dropna()
                        common = dict(student=student, method=mine["method"], unit="documents")
                        if math.isnan(mine[label]) or cells.empty:
                            nan_in = [m for m in [mine["method"]] + list(base_rows["method"])
                                      if math.isnan(block.set_index("method").loc[m, label])]
                            why = (f"{label} is NaN (no value) for {', '.join(nan_in)}" if nan_in or reference is None
                                   else f"no {reference} row to compare with")
                            rows.append(_row(claim, dataset, label, versus(dataset, student), **common, reason=why))
                            continue
                        best = cells.idxmax() if higher[label] else cells.idxmin()
                        n = _paired_documents(metrics, dataset, student, [mine["method"], best], metric_of[label])
                        delta, low, high = mine[f"{label}_delta"], mine[f"{label}_ci_low"], mine[f"{label}_ci_high"]
                        verdict, reason = judge(delta, low, high, 1 if higher[label] else -1, n, "paired documents",
                                                min_docs)
                        detail = f"{mine['method']} {mine[label]:.4g} vs {best} {cells[best]:.4g}"
                        rows.append(_row(claim, dataset, label, best, **common, estimate=delta, ci=(low, high),
                                         p=mine[f"{label}_p"], n=n, verdict=verdict, reason=reason, detail=detail))
    return rows


# -----------------------------------------------------------------------------
# Markdown


def _num(x: float, signed: bool = False) -> str:
    return "" if pd.isna(x) else (f"{x:+.3g}" if signed else f"{x:.3g}")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def to_markdown(claims: pd.DataFrame, header: str = "") -> str:
    """results/claims.md: a summary of every claim's verdict, then each claim with its tests."""
    keys = ["claim", "dataset", "student", "method"]
    lines = ["# The paper's claims, checked on this run", ""] + ([header, ""] if header else [])
    lines += ["Verdicts: **supported** = the direction the paper claims and a 95% CI that excludes 0; "
              "**not supported** = measured, but the wrong direction or a CI that includes 0; "
              "**not measurable here** = an input is missing, too few heads or documents, no baseline, or NaN.",
              "", "## Summary", "", "| # | claim | paper | dataset | student / method | verdict |",
              "|---|---|---|---|---|---|"]
    for (claim, dataset, student, method), group in claims.groupby(keys, sort=False):
        who = f"{student} / {method}" if student else ""
        lines.append(f"| {claim} | {_cell(CLAIMS[claim].text)} | {CLAIMS[claim].paper} | {dataset} | {who} | "
                     f"**{group['claim_verdict'].iloc[0]}** |")
    for number, claim in CLAIMS.items():
        part = claims[claims["claim"] == number]
        lines += ["", f"## Claim {number}: {claim.text}", "", f"Paper: {claim.paper}. Measured: {claim.statistic}.",
                  "", "| dataset | student / method | test | vs | estimate | 95% CI | p | n | verdict | reason |",
                  "|---|---|---|---|---:|---|---:|---:|---|---|"]
        if part.empty:
            lines.append(f"| | | | | | | | | {NOT_MEASURABLE} | not computed in this run |")
        for r in part.itertuples(index=False):
            ci = "" if pd.isna(r.ci_low) else f"[{_num(r.ci_low)}, {_num(r.ci_high)}]"
            who = f"{r.student} / {r.method}" if r.student else ""
            reason = r.reason + (f" ({r.detail})" if r.detail else "")
            lines.append(f"| {r.dataset} | {who} | {_cell(r.test)} | {r.compared_with} | {_num(r.estimate, True)} | "
                         f"{ci} | {_num(r.p)} | {r.n} | {r.verdict} | {_cell(reason)} |")
    return "\n".join(lines) + "\n"
