"""Effect formulas: restoration, disruption and relative change by hand."""

from __future__ import annotations

import math

import numpy as np

from mechdistill.patching.effects import disruption, relative_change, restoration


def test_restoration_and_disruption_by_hand():
    clean, corrupt = np.array([1.0, 0.8, 0.5]), np.array([0.2, 0.4, 0.5])
    patched = np.array([0.6, 0.8, 0.7])
    np.testing.assert_allclose(restoration(patched, clean, corrupt), [0.5, 1.0, np.nan])
    np.testing.assert_allclose(disruption(patched, clean, corrupt), [0.5, 0.0, np.nan])
    assert restoration(0.2, 1.0, 0.2) == 0.0 and disruption(0.2, 1.0, 0.2) == 1.0
    assert math.isnan(restoration(0.3, 0.5, 0.5))  # zero denominator -> NaN, no warning


def test_relative_change_by_hand():
    np.testing.assert_allclose(relative_change([0.3, 0.1, -0.3, 1.0], [0.1, 0.2, -0.2, 0.0]),
                               [2.0, -0.5, -0.5, np.nan])
