"""Figures 5 and 8: patching effect against cumulative bins of top-ranked heads, with the controls
(`head_sets.CONTROLS`)."""

from __future__ import annotations

import os

import pandas as pd
from matplotlib.figure import Figure

from ..plotting import save_figure

PATCHING_SETS = {"top": ("top-ranked heads", "C0"),
                 "near_zero": ("near-zero-score heads (|score| smallest)", "C2"),
                 "most_negative": ("most negative-score heads (the ranking's last k)", "C3"),
                 "random": ("random heads (count-matched)", "C7")}
"""head_set -> (legend label, colour): one line per set, top and every control."""


def patching_figure(summary: pd.DataFrame, out_png: str | os.PathLike, title: str, relative: bool = False) -> None:
    """Figs 5 and 8: patching effect vs cumulative bin (top-k heads), one line for the top heads and
    one per control (near-zero-score, most negative-score, random), denoising (left) and noising
    (right) panels, bootstrap 95% CI bars.

    summary: patching/{phase}.parquet (direction, head_set, k, metric, effect, ci_low, ci_high, n_docs).
    relative=False plots restoration / disruption fractions; True the relative change of the metric
    (Fig. 8 reports Confusion's change in %).
    """
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    panels = {"denoise": ("Denoising (clean patterns -> corrupted run)", "restoration"),
              "noise": ("Noising (corrupted patterns -> clean run)", "disruption")}
    for ax, (direction, (panel_title, fraction)) in zip(axes, panels.items()):
        metric = "relative_change" if relative else fraction
        data = summary[(summary["direction"] == direction) & (summary["metric"] == metric)]
        ks = sorted(data["k"].unique())
        x_of = {k: i for i, k in enumerate(ks)}
        for j, (kind, (label, color)) in enumerate(PATCHING_SETS.items()):
            s = data[data["head_set"] == kind].sort_values("k")
            if s.empty:
                continue
            x = [x_of[k] + (j - (len(PATCHING_SETS) - 1) / 2) * 0.08 for k in s["k"]]  # side by side
            scale = 100.0 if relative else 1.0
            err = [(s["effect"] - s["ci_low"]).clip(lower=0) * scale, (s["ci_high"] - s["effect"]).clip(lower=0) * scale]
            ax.errorbar(x, s["effect"] * scale, yerr=err, color=color, marker="o", capsize=3, label=label)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(ks)), [f"Top {k}" for k in ks])
        ax.set_xlabel("cumulative bin (k heads patched)")
        ax.set_ylabel("relative change of the metric (%)" if relative else f"{fraction} fraction")
        ax.set_title(panel_title, fontsize="medium")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no aligned clean/corrupted pairs", ha="center", va="center", transform=ax.transAxes)
    n_docs = int(summary["n_docs"].max()) if len(summary) else 0
    fig.suptitle(f"{title}\n(documents per point: up to {n_docs})", y=1.04)
    save_figure(fig, out_png)
