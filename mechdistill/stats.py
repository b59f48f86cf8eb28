"""The percentile bootstrap, used wherever the pipeline reports a confidence interval: the CI of a
mean (patching effects over documents, paired differences of Tables 1-4, Figure 9's LAS bars), and
the resample indices of a corpus metric (macro-F1) recomputed per resample (App. E)."""

from __future__ import annotations

import math

import numpy as np

MAX_DRAW = 10_000_000  # indices drawn at once; larger problems are resampled in chunks


def resample_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """[n_resamples, n] document indices drawn with replacement, the same for every system that is
    evaluated with one (n, n_resamples, seed): two systems scored on these rows are paired resamples."""
    if n < 1:
        raise ValueError(f"cannot resample {n} documents")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """The ((1 - level) / 2, (1 + level) / 2) quantiles of `values` (NaNs dropped; NaN if none)."""
    data = np.asarray(values, dtype=float).ravel()
    data = data[~np.isnan(data)]
    if data.size == 0:
        return math.nan, math.nan
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(data, [tail, 1.0 - tail])
    return float(low), float(high)


def bootstrap_ci(values, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean of `values` and the percentile bootstrap CI of it, NaNs dropped.

    Resample the n values with replacement `n_resamples` times, drawn as
    `np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))` (in chunks of at most
    MAX_DRAW indices), take each resample's mean, and return the ((1 - level) / 2,
    (1 + level) / 2) quantiles of those means. Empty or all-NaN input gives (nan, nan, nan).
    """
    data = np.asarray(values, dtype=float).ravel()
    data = data[~np.isnan(data)]
    if data.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    chunk = max(1, MAX_DRAW // data.size)
    means = np.concatenate([data[rng.integers(0, data.size, size=(min(chunk, n_resamples - start), data.size))]
                            .mean(axis=1) for start in range(0, n_resamples, chunk)])
    return (float(data.mean()), *percentile_interval(means, level))
