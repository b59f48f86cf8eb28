"""Figures 5 and 8: one line per head set, the controls named in the legend."""

from __future__ import annotations

import pandas as pd

from mechdistill.patching import plots
from mechdistill.patching.head_sets import CONTROLS


def test_patching_figure_draws_top_and_every_control(monkeypatch, tmp_path):
    assert list(plots.PATCHING_SETS) == ["top", *CONTROLS]
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figures.append(fig))
    summary = pd.DataFrame(
        [("phase1", direction, kind, k, metric, 0.1 * k, 0.0, 0.2 * k, 0.2 * k, 3)
         for direction, metric in (("denoise", "restoration"), ("noise", "disruption"))
         for kind in ("top", *CONTROLS) for k in (2, 4)],
        columns=["phase", "direction", "head_set", "k", "metric", "effect", "ci_low", "ci_high", "ci_width", "n_docs"])
    plots.patching_figure(summary, tmp_path / "f.png", "Figure 5")
    (fig,) = figures
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == [plots.PATCHING_SETS[kind][0] for kind in ("top", *CONTROLS)]
        assert any("near-zero" in label for label in labels) and any("most negative" in label for label in labels)
