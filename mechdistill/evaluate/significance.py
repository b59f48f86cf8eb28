"""Paired significance tests for per-document scores (App. E).

`a` holds the baseline's per-document scores, `b` the candidate's, aligned document by
document; differences are d_i = b_i - a_i, so a positive difference means `b` is better.
Pairs where either score is NaN are dropped before every computation, the same way in all
functions, so test and interval always see the same documents.

- Wilcoxon signed-rank (two-sided): zero differences are discarded ("wilcox" zero method,
  as in the paper), ranks of |d_i| with ties averaged; scipy.stats.wilcoxon computes it.
- Paired bootstrap: resample documents with replacement S times, d_s = mean_s(b) - mean_s(a);
  the level-CI is the percentile interval of {d_s}, e.g. the 2.5th and 97.5th percentiles.
- A difference is significant only when p < alpha AND the CI excludes 0.

An aggregate metric (macro-F1) has no per-document score: each system's metric is recomputed on
the same bootstrap resamples of the test set (`stats.resample_indices`, `xmc.macro_f1_resamples`)
and `resampled_gain` takes the percentile CI of the paired differences. App. E uses Wilcoxon only
where independent replicates exist (resamples drawn with replacement are not), so there the mark
rests on the CI alone and p is NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..stats import bootstrap_ci, percentile_interval

ArrayLike = Sequence[float] | np.ndarray


def paired(a: ArrayLike, b: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The two score arrays as float, with pairs holding a NaN on either side dropped."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores must be 1-D arrays of one length; got shapes {a.shape} and {b.shape}")
    ok = ~(np.isnan(a) | np.isnan(b))
    if not ok.any():
        raise ValueError("no pair of scores left once NaN pairs are dropped")
    return a[ok], b[ok]


def paired_wilcoxon(a: ArrayLike, b: ArrayLike) -> float:
    """Two-sided p-value of the Wilcoxon signed-rank test on d = b - a.

    When every difference is zero there is nothing to rank: no evidence of a difference, and
    we return p = 1.0 (scipy would warn and return NaN).
    """
    a, b = paired(a, b)
    if not np.any(b - a):
        return 1.0
    # scipy.stats takes ~2.5 s to import: select_distill and the other jobs that import the tables skip it
    from scipy import stats

    return float(stats.wilcoxon(b, a, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_bootstrap_ci(a: ArrayLike, b: ArrayLike, n_resamples: int = 1000, level: float = 0.95,
                        seed: int = 0) -> tuple[float, float, float]:
    """(mean difference, CI low, CI high) of mean(b) - mean(a) by the paired percentile bootstrap.

    The point estimate is the observed mean of d = b - a (the mean of the bootstrap d_s is the
    same in expectation); the interval is the ((1-level)/2, (1+level)/2) percentiles of d_s.
    """
    a, b = paired(a, b)
    return bootstrap_ci(b - a, n_resamples=n_resamples, level=level, seed=seed)


def significant_gain(a: ArrayLike, b: ArrayLike, alpha: float = 0.05, n_resamples: int = 1000,
                     level: float = 0.95, seed: int = 0) -> dict:
    """Difference of b over a with its bootstrap CI and Wilcoxon p-value.

    Returns {diff, ci_low, ci_high, p_value, significant, n}: `significant` is True only when
    p_value < alpha and the CI excludes 0 (a gain if diff > 0, a drop if diff < 0); n is the
    number of pairs used.
    """
    a, b = paired(a, b)
    diff, low, high = paired_bootstrap_ci(a, b, n_resamples=n_resamples, level=level, seed=seed)
    p = paired_wilcoxon(a, b)
    return {"diff": diff, "ci_low": low, "ci_high": high, "p_value": p,
            "significant": bool(p < alpha and (low > 0 or high < 0)), "n": int(len(a))}


def resampled_gain(a_resamples: ArrayLike, b_resamples: ArrayLike, a_value: float, b_value: float,
                   level: float = 0.95) -> dict:
    """Gain of b over a on an aggregate metric from paired resamples (module docstring).

    a_resamples, b_resamples: the metric of each system on the same S resamples (resample s of one
    is resample s of the other). Returns {diff, ci_low, ci_high, p_value (NaN), significant, n}:
    diff = b_value - a_value (the full test set's values), the CI the percentile interval of
    b_s - a_s, significant when the CI excludes 0; n = resamples used.
    """
    a, b = paired(a_resamples, b_resamples)
    low, high = percentile_interval(b - a, level)
    return {"diff": float(b_value - a_value), "ci_low": low, "ci_high": high, "p_value": float("nan"),
            "significant": bool(low > 0 or high < 0), "n": int(len(a))}
