"""Figures 4 and 7: CoarseScore / RefineScore heatmaps of every head, a top Phase-1 head's peaks,
and the top Phase-2 heads' dynamics over CoT stages."""

from __future__ import annotations

import os

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ..plotting import save_figure

VARIANT_LABELS = {"all": "all causal keys", "document": "document keys", "kurtosis": "excess kurtosis",
                  "normalized": "normalized kurtosis", "product": "QK x OV", "both_positive": "QK x OV, both > 0",
                  "mean_product": "mean of QK_t x OV_t"}


def variant_label(heads: pd.DataFrame) -> str:
    """The ranking a head table's `score` holds, in words (from its `score_variant` column), e.g.
    "document keys, normalized kurtosis" for coarse_document_normalized; "" when the column is absent."""
    if "score_variant" not in heads or heads.empty:
        return ""
    kind, _, rest = str(heads["score_variant"].iloc[0]).partition("_")
    parts = [rest] if kind == "refine" else rest.split("_", 1)
    return ", ".join(VARIANT_LABELS.get(p, p) for p in parts)


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

    coarse: layer, head, score (the title names its `score_variant`). example: token, weight (attention of that head from an early-CoT
    query over prompt tokens) with columns layer, head, doc_id constant.
    """
    fig = Figure(figsize=(13, 4.5), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    _head_heatmap(left, coarse, "score", f"CoarseScore (Eq. 1): {variant_label(coarse)}", top_k)
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

    refine: layer, head, score (the title names its `score_variant`), and list columns qk_shortlist_by_stage, qk_nearmiss_by_stage,
    ov_by_stage (one value per CoT stage bin, NaN where a bin had no refinement position).
    """
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    axes = fig.subplots(1, 4, gridspec_kw={"width_ratios": [1.4, 1, 1, 1]})
    _head_heatmap(axes[0], refine, "score", f"RefineScore (Eq. 3): {variant_label(refine)}", top_k)
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
