import numpy as np
import pytest
from scipy import stats

from mechdistill.evaluate.significance import paired, paired_bootstrap_ci, paired_wilcoxon, significant_gain


def scores(n=200, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.random(n)
    return a, a + shift + 0.1 * rng.standard_normal(n)


def test_wilcoxon_matches_scipy_two_sided():
    a, b = scores(shift=0.01, seed=1)
    expected = stats.wilcoxon(b - a, alternative="two-sided").pvalue
    assert paired_wilcoxon(a, b) == pytest.approx(expected)
    assert paired_wilcoxon(b, a) == pytest.approx(expected)  # symmetric


def test_wilcoxon_all_zero_differences_is_one():
    a = np.array([0.2, 0.5, 1.0])
    assert paired_wilcoxon(a, a.copy()) == 1.0


def test_nan_pairs_dropped_everywhere():
    a, b = scores(n=50, shift=0.05, seed=2)
    a_nan, b_nan = a.copy(), b.copy()
    a_nan[3], b_nan[10] = np.nan, np.nan
    keep = np.ones(50, bool)
    keep[[3, 10]] = False
    assert paired_wilcoxon(a_nan, b_nan) == pytest.approx(paired_wilcoxon(a[keep], b[keep]))
    assert paired_bootstrap_ci(a_nan, b_nan) == paired_bootstrap_ci(a[keep], b[keep])
    assert significant_gain(a_nan, b_nan)["n"] == 48
    with pytest.raises(ValueError, match="no pair"):
        paired([np.nan], [1.0])


def test_bootstrap_ci_close_to_normal_interval():
    a, b = scores(n=2000, shift=0.02, seed=3)
    diff, low, high = paired_bootstrap_ci(a, b, n_resamples=2000, seed=0)
    d = b - a
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    assert diff == pytest.approx(d.mean())
    assert low == pytest.approx(d.mean() - half, abs=0.15 * half)
    assert high == pytest.approx(d.mean() + half, abs=0.15 * half)
    assert paired_bootstrap_ci(a, b, seed=5) == paired_bootstrap_ci(a, b, seed=5)  # seeded
    # constant difference: every resample gives the same mean
    assert paired_bootstrap_ci([0.0, 1.0, 0.5], [1.0, 2.0, 1.5]) == pytest.approx((1.0, 1.0, 1.0))


def test_significance_needs_both_test_and_interval():
    a, b = scores(shift=0.05, seed=4)
    gain = significant_gain(a, b)
    assert gain["significant"] and gain["diff"] > 0 and gain["ci_low"] > 0 and gain["p_value"] < 0.05
    drop = significant_gain(b, a)
    assert drop["significant"] and drop["diff"] < 0 and drop["ci_high"] < 0
    a, b = scores(shift=0.0, seed=4)
    null = significant_gain(a, b)
    assert not null["significant"] and null["ci_low"] < 0 < null["ci_high"]
    # CI excludes 0 but the test does not reject at this alpha: not significant
    a, b = scores(shift=0.05, seed=4)
    assert significant_gain(a, b, alpha=1e-300)["significant"] is False
