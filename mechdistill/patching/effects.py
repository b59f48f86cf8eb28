"""Patching effects (Figs 5 and 8): per-document restoration, disruption and relative change of a
metric (Reasoning Focus or Near-Miss Confusion), and their means over documents with bootstrap CIs.

    restoration     = (M_patched - M_corrupt) / (M_clean - M_corrupt)   denoising: 1 = fully restored
    disruption      = (M_clean - M_patched) / (M_clean - M_corrupt)     noising:   1 = fully disrupted
    relative change = (M_patched - M_ref) / |M_ref|
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..stats import bootstrap_ci

DEFAULT_EPS = 1e-8


def _safe_ratio(numerator, denominator, eps: float):
    """numerator / denominator elementwise, NaN where |denominator| < eps; a float for scalars."""
    num = np.asarray(numerator, dtype=float)
    den = np.asarray(denominator, dtype=float)
    small = np.abs(den) < eps
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(small, np.nan, num / np.where(small, 1.0, den))
    return float(ratio) if ratio.ndim == 0 else ratio


def restoration(m_patched, m_clean, m_corrupt, eps: float = DEFAULT_EPS):
    """Denoising effect (M_patched - M_corrupt) / (M_clean - M_corrupt): 1 = fully restored.

    NaN for documents where corruption did not move the metric (|M_clean - M_corrupt| < eps).
    """
    clean, corrupt = np.asarray(m_clean, dtype=float), np.asarray(m_corrupt, dtype=float)
    return _safe_ratio(np.asarray(m_patched, dtype=float) - corrupt, clean - corrupt, eps)


def disruption(m_patched, m_clean, m_corrupt, eps: float = DEFAULT_EPS):
    """Noising effect (M_clean - M_patched) / (M_clean - M_corrupt): 1 = fully disrupted.

    NaN for documents where corruption did not move the metric (|M_clean - M_corrupt| < eps).
    """
    clean, corrupt = np.asarray(m_clean, dtype=float), np.asarray(m_corrupt, dtype=float)
    return _safe_ratio(clean - np.asarray(m_patched, dtype=float), clean - corrupt, eps)


def relative_change(m_patched, m_ref, eps: float = DEFAULT_EPS):
    """(M_patched - M_ref) / |M_ref| (e.g. change of Near-Miss Confusion); NaN where |M_ref| < eps."""
    ref = np.asarray(m_ref, dtype=float)
    return _safe_ratio(np.asarray(m_patched, dtype=float) - ref, np.abs(ref), eps)


EFFECT_BY_DIRECTION = {"denoise": "restoration", "noise": "disruption"}


def document_effects(runs: pd.DataFrame, min_gap: float = 0.01) -> pd.DataFrame:
    """Per-document effects from patched-run values (pandas DataFrame in, DataFrame out).

    runs: one row per patched run with doc_id, direction (denoise | noise), kind (top or a control:
    near_zero | most_negative | random), k, seed, value, clean_value, corrupt_value. Random sets are averaged over seeds per
    document first. Effects per (doc_id, direction, kind, k):
        denoise: restoration = (M_p - M_corrupt) / (M_clean - M_corrupt), relative_change vs M_corrupt
        noise:   disruption  = (M_clean - M_p) / (M_clean - M_corrupt), relative_change vs M_clean
        value:   M_p itself
    Documents whose corruption moved the metric by less than `min_gap` get NaN restoration /
    disruption (a ratio of two near-zero numbers is noise), but keep value and relative_change.
    Returns long format: doc_id, direction, kind, k, metric, effect.
    """
    keys = ["doc_id", "direction", "kind", "k"]
    per_doc = runs.groupby(keys, as_index=False).agg(value=("value", "mean"), clean=("clean_value", "first"),
                                                     corrupt=("corrupt_value", "first"))
    gap_ok = (per_doc["clean"] - per_doc["corrupt"]).abs() >= min_gap
    denoise = per_doc["direction"] == "denoise"
    fraction = np.where(denoise, restoration(per_doc["value"], per_doc["clean"], per_doc["corrupt"]),
                        disruption(per_doc["value"], per_doc["clean"], per_doc["corrupt"]))
    reference = np.where(denoise, per_doc["corrupt"], per_doc["clean"])
    frames = [per_doc[keys].assign(metric=per_doc["direction"].map(EFFECT_BY_DIRECTION),
                                   effect=np.where(gap_ok, fraction, np.nan)),
              per_doc[keys].assign(metric="relative_change", effect=relative_change(per_doc["value"], reference)),
              per_doc[keys].assign(metric="value", effect=per_doc["value"])]
    return pd.concat(frames, ignore_index=True)


def summarize_effects(effects: pd.DataFrame, n_resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Mean effect over documents with a percentile bootstrap 95% CI, per (direction, kind, k, metric)
    -> DataFrame: direction, head_set, k, metric, effect, ci_low, ci_high, ci_width (= ci_high -
    ci_low: how much the documents say about that point), n_docs."""
    rows = []
    for (direction, kind, k, metric), group in effects.groupby(["direction", "kind", "k", "metric"], sort=True):
        mean, low, high = bootstrap_ci(group["effect"], n_resamples=n_resamples, seed=seed)
        rows.append(dict(direction=direction, head_set=kind, k=int(k), metric=metric, effect=mean,
                         ci_low=low, ci_high=high, ci_width=high - low, n_docs=int(group["effect"].notna().sum())))
    return pd.DataFrame(rows, columns=["direction", "head_set", "k", "metric", "effect", "ci_low", "ci_high",
                                       "ci_width", "n_docs"])


def summarize_patching(runs: pd.DataFrame, phase: str, min_gap: float = 0.01, n_resamples: int = 1000,
                       seed: int = 0) -> pd.DataFrame:
    """The patching/{phase}.parquet table from every run of the phase (reference runs are skipped):
    phase, direction, head_set, k, metric, effect, ci_low, ci_high, ci_width, n_docs (empty without patched
    runs)."""
    patched = runs[runs["direction"] != "reference"] if len(runs) else runs
    effects = (document_effects(patched, min_gap) if len(patched)
               else pd.DataFrame(columns=["direction", "kind", "k", "metric", "effect"]))
    summary = summarize_effects(effects, n_resamples, seed)
    summary.insert(0, "phase", phase)
    return summary
