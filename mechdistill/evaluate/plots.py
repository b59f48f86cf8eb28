"""Figure 9: LAS of the distillation methods and ablations, with bootstrap CIs."""

from __future__ import annotations

import os
from collections.abc import Mapping

import pandas as pd
from matplotlib.figure import Figure

from ..plotting import save_figure


def _ablation_color(method: str) -> str:
    """Bar colour of an ablation method: ours green, vanilla grey, Phase-1 blue, Phase-2 orange."""
    if method == "mech":
        return "C2"
    if method == "vanilla":
        return "C7"
    return "C0" if "phase1" in method else "C1" if "phase2" in method else "C4"


def figure9(panels: Mapping[str, pd.DataFrame] | pd.DataFrame, out_png: str | os.PathLike, title: str) -> None:
    """Fig. 9: LAS per ablation method (vanilla, mech, phase/term ablations) with 95% bootstrap CI, one panel per
    dataset (as the paper: MIMIC-IV-full and LF-WikiSeeAlso-320K side by side).

    panels: dataset -> method, mean, ci_low, ci_high, n (from `evaluate.tables.figure9_data`), in plot order
    (one frame: a single unnamed panel); a method without a CI (NaN) is drawn without an error bar.
    """
    panels = {"": panels} if isinstance(panels, pd.DataFrame) else dict(panels)
    widest = max((len(data) for data in panels.values()), default=0)
    fig = Figure(figsize=(len(panels) * max(4.0, 0.9 * widest + 1.5), 4.4), layout="constrained")
    axes = fig.subplots(1, max(1, len(panels)), squeeze=False)[0]
    for ax, (dataset, data) in zip(axes, panels.items()):
        if data.empty:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        else:
            x = range(len(data))
            low = (data["mean"] - data["ci_low"]).fillna(0).clip(lower=0)
            high = (data["ci_high"] - data["mean"]).fillna(0).clip(lower=0)
            ax.bar(x, data["mean"], yerr=[low, high], capsize=4, color=[_ablation_color(m) for m in data["method"]])
            ax.set_xticks(x, [f"{m}\n(n={n})" for m, n in zip(data["method"], data["n"])], rotation=30, ha="right",
                          fontsize=8)
            ax.axhline(0, color="black", linewidth=0.8)
        ax.set(ylabel="LAS (teacher faithfulness)", title=dataset)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, out_png)
