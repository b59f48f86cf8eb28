"""The one bootstrap CI of the pipeline, against a direct computation of its resamples."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mechdistill.stats import MAX_DRAW, bootstrap_ci


def test_bootstrap_ci_matches_direct_percentiles():
    values = np.array([0.1, 0.5, 0.35, 0.9, 0.2, np.nan, 0.65, 0.4])
    mean, low, high = bootstrap_ci(values, n_resamples=500, level=0.9, seed=7)
    data = values[~np.isnan(values)]
    idx = np.random.default_rng(7).integers(0, data.size, size=(500, data.size))
    expected_low, expected_high = np.percentile(data[idx].mean(axis=1), [5, 95])
    assert mean == pytest.approx(data.mean())
    assert (low, high) == pytest.approx((expected_low, expected_high))
    assert low <= mean <= high
    assert all(math.isnan(v) for v in bootstrap_ci([np.nan, np.nan]))


def test_bootstrap_ci_resamples_in_chunks_beyond_max_draw(monkeypatch):
    """A problem larger than MAX_DRAW indices is resampled in chunks of whole resamples: the same
    mean, and a CI around it from the same number of resamples."""
    values = np.random.default_rng(0).normal(size=50)
    whole = bootstrap_ci(values, n_resamples=300, seed=3)
    monkeypatch.setattr("mechdistill.stats.MAX_DRAW", 50 * 7)  # 7 resamples per draw
    chunked = bootstrap_ci(values, n_resamples=300, seed=3)
    assert chunked[0] == whole[0] and chunked[1] <= chunked[0] <= chunked[2]
    assert MAX_DRAW == 10_000_000


def test_bootstrap_ci_quantiles_equal_percentiles():
    """np.quantile at (1 -/+ level) / 2 equals np.percentile at 100 (1 -/+ level) / 2: the one function
    reproduces the percentile form the patching effects used before, bit for bit."""
    rng = np.random.default_rng(1)
    for trial in range(200):
        values = rng.normal(size=int(rng.integers(1, 30)))
        _, low, high = bootstrap_ci(values, n_resamples=200, seed=trial)
        data_idx = np.random.default_rng(trial).integers(0, values.size, size=(200, values.size))
        means = values[data_idx].mean(axis=1)
        tail = 100 * (1 - 0.95) / 2
        assert (low, high) == tuple(np.percentile(means, [tail, 100 - tail]))
