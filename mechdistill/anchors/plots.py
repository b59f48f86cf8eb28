"""Figure 1: Reasoning Focus F(t) and Near-Miss Confusion C(t) of every model, from trajectories."""

from __future__ import annotations

import os

import pandas as pd
from matplotlib.figure import Figure

from ..plotting import save_figure
from .trajectories import mean_with_ci

PHASES = {"focus": "Reasoning Focus F(t)", "confusion": "Near-Miss Confusion C(t)"}


def figure1(traj: pd.DataFrame, out_png: str | os.PathLike, title: str) -> None:
    """Fig. 1: mean Focus (left, early t) and Confusion (right, late t) per model, 95% t-CI band.

    traj: columns model, doc_id, phase, t, value (one row per document and grid point). A model with
    no value in a panel (e.g. SemCoT, whose reasoning is implicit: no CoT) is left out of it.
    """
    traj = traj.assign(value=pd.to_numeric(traj["value"], errors="coerce"))
    summary = mean_with_ci(traj[["model", "phase", "t", "value"]])
    n_docs = traj.dropna(subset=["value"]).groupby(["model", "phase"])["doc_id"].nunique()
    models = sorted(traj["model"].unique())
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, (phase, label) in zip(axes, PHASES.items()):
        for model in models:
            s = summary[(summary["model"] == model) & (summary["phase"] == phase)].sort_values("t")
            if s.empty or (model, phase) not in n_docs:
                continue
            s = s.astype({"mean": float, "ci_low": float, "ci_high": float})
            ax.plot(s["t"], s["mean"], color=colors[model], label=f"{model} (n={n_docs[(model, phase)]})")
            ax.fill_between(s["t"], s["ci_low"], s["ci_high"], color=colors[model], alpha=0.2, linewidth=0)
        ax.set_xlabel("normalised CoT position t" + (" (early segment)" if phase == "focus" else " (late segment)"))
        ax.set_ylabel(label)
        ax.set_title(label)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    save_figure(fig, out_png)
