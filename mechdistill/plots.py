"""Figures, computed only from artifacts (DataFrames read from results/).

Figures are built on matplotlib's object API (`Figure`, rendered by Agg), so no global pyplot
state is touched, and saved atomically without timestamps (same data -> same bytes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .io import atomic_path
from .trajectories import mean_with_ci

PHASES = {"focus": "Reasoning Focus F(t)", "confusion": "Near-Miss Confusion C(t)"}


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> None:
    """Write `fig` atomically; the format comes from the file suffix; no timestamp metadata."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    metadata = {"Software": None} if fmt == "png" else {"CreationDate": None} if fmt == "pdf" else None
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight", metadata=metadata)


def figure1(traj: pd.DataFrame, out_png: str | os.PathLike, title: str) -> None:
    """Fig. 1: mean Focus (left, early t) and Confusion (right, late t) per model, 95% t-CI band.

    traj: columns model, doc_id, phase, t, value (one row per document and grid point).
    """
    summary = mean_with_ci(traj[["model", "phase", "t", "value"]])
    n_docs = traj.dropna(subset=["value"]).groupby(["model", "phase"])["doc_id"].nunique()
    models = sorted(traj["model"].unique())
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, (phase, label) in zip(axes, PHASES.items()):
        for model in models:
            s = summary[(summary["model"] == model) & (summary["phase"] == phase)].sort_values("t")
            if s.empty:
                continue
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


def _head_heatmap(ax, heads: pd.DataFrame, value: str, title: str, top_k: int) -> None:
    """Layer x head heatmap of `value`; the top-k heads are outlined and labelled LxHy."""
    grid = heads.pivot(index="layer", columns="head", values=value).sort_index()
    image = ax.imshow(grid.to_numpy(), aspect="auto", origin="lower", cmap="viridis")
    ax.figure.colorbar(image, ax=ax, shrink=0.85, label=value)
    ax.set(xlabel="head", ylabel="layer", title=title)
    rows, cols = list(grid.index), list(grid.columns)
    ax.set_xticks(range(len(cols)), cols, fontsize=7)
    ax.set_yticks(range(0, len(rows), max(1, len(rows) // 15)), rows[:: max(1, len(rows) // 15)], fontsize=7)
    top = heads.dropna(subset=[value]).nlargest(top_k, value)
    for layer, head in zip(top["layer"], top["head"]):
        y, x = rows.index(layer), cols.index(head)
        ax.add_patch(Rectangle((x - 0.5, y - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
        ax.annotate(f"L{layer}H{head}", (x, y), color="white", fontsize=7, ha="center", va="center")


def figure4(coarse: pd.DataFrame, example: pd.DataFrame, out_png: str | os.PathLike, title: str,
            top_k: int = 5) -> None:
    """Fig. 4: CoarseScore heatmap (left) and one top Phase-1 head's attention over the prompt (right).

    coarse: layer, head, score. example: token, weight (attention of that head from an early-CoT
    query over prompt tokens) with columns layer, head, doc_id constant.
    """
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    _head_heatmap(left, coarse, "score", "CoarseScore (Eq. 1)", top_k)
    if len(example):
        peaks = example.nlargest(min(20, len(example)), "weight").sort_index()
        right.bar(range(len(peaks)), peaks["weight"], color="C3")
        right.set_xticks(range(len(peaks)), [t.strip() or repr(t) for t in peaks["token"]], rotation=70, fontsize=7)
        layer, head, doc = example[["layer", "head", "doc_id"]].iloc[0]
        right.set(ylabel="attention weight",
                  title=f"L{layer}H{head} from an early-CoT query, doc {doc}: top prompt tokens (in order)")
    fig.suptitle(title)
    save_figure(fig, out_png)


def figure7(refine: pd.DataFrame, out_png: str | os.PathLike, title: str, top_k: int = 5) -> None:
    """Fig. 7: RefineScore heatmap (left) and the top heads' dynamics over CoT stages (right):
    QK similarity to the shortlist and to near-misses, and OV helpfulness, per early->late bin.

    refine: layer, head, score, and list columns qk_shortlist_by_stage, qk_nearmiss_by_stage,
    ov_by_stage (one value per CoT stage bin, NaN where a bin had no refinement position).
    """
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1.4, 1, 1, 1]})
    _head_heatmap(axes[0], refine, "score", "RefineScore (Eq. 3)", top_k)
    top = refine.dropna(subset=["score"]).nlargest(top_k, "score")
    panels = [("qk_shortlist_by_stage", "QK to shortlist"), ("qk_nearmiss_by_stage", "QK to near-misses"),
              ("ov_by_stage", "OV helpfulness")]
    for ax, (column, label) in zip(axes[1:], panels):
        for i, row in enumerate(top.itertuples(index=False)):
            values = list(getattr(row, column))
            ax.plot(range(1, len(values) + 1), values, marker="o", color=f"C{i}", label=f"L{row.layer}H{row.head}")
        n_stages = len(top[column].iloc[0]) if len(top) else 0
        ax.set_xticks(range(1, n_stages + 1))
        ax.set(xlabel="CoT stage (early -> late)", title=label)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.suptitle(title)
    save_figure(fig, out_png)


PATCHING_SETS = {"top": ("top-ranked heads", "C0"), "random": ("random heads (count-matched)", "C7"),
                 "lowest": ("lowest-ranked heads", "C3")}


def patching_figure(summary: pd.DataFrame, out_png: str | os.PathLike, title: str, relative: bool = False) -> None:
    """Figs 5 and 8: patching effect vs cumulative bin (top-k heads) for top / random / lowest heads,
    denoising (left) and noising (right) panels, bootstrap 95% CI bars.

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
            x = [x_of[k] + (j - 1) * 0.08 for k in s["k"]]
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


def _ablation_color(method: str) -> str:
    """Bar colour of an ablation method: ours green, vanilla grey, Phase-1 blue, Phase-2 orange."""
    if method == "mech":
        return "C2"
    if method == "vanilla":
        return "C7"
    return "C0" if "phase1" in method else "C1" if "phase2" in method else "C4"


def figure9(data: pd.DataFrame, out_png: str | os.PathLike, title: str) -> None:
    """Fig. 9: LAS per ablation method (vanilla, mech, phase/term ablations) with 95% bootstrap CI.

    data: method, mean, ci_low, ci_high, n (from `evaluate.tables.figure9_data`), in plot order;
    a method without a CI (NaN) is drawn without an error bar.
    """
    fig = Figure(figsize=(max(4.0, 0.9 * len(data) + 1.5), 4), layout="constrained")
    ax = fig.subplots()
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
    ax.set(ylabel="LAS (teacher faithfulness)", title=title)
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, out_png)
