"""Where the top heads sit under each scoring variant and prompt style.

The paper's reading of the two phases is about depth: Phase-1 heads concentrate in early layers,
Phase-2 heads in mid-to-late ones. Whether a head table shows that depends on choices the paper
leaves open (which keys the kurtosis runs over, raw or length-normalised sharpness, product of
means or both-positive RefineScore) and on the prompt (neutral or phase-teaching). This module
ranks the heads by every variant column of the tables and summarises the depth of the top k.

Variant columns: every numeric column of a coarse table whose name starts with "coarse" and of a
refine table whose name starts with "refine" (e.g. coarse_document_normalized, refine_product);
`score` is the configured ranking and is listed as "score".
"""

from __future__ import annotations

import pandas as pd

PHASE_OF_KIND = {"coarse": "phase1", "refine": "phase2"}
THIRDS = ("early", "middle", "late")


def variant_columns(table: pd.DataFrame, kind: str) -> list[str]:
    """`score` first, then the table's numeric `<kind>*` columns, in table order."""
    numeric = [c for c in table.columns if pd.api.types.is_numeric_dtype(table[c])]
    return ["score"] + [c for c in numeric if c.startswith(kind) and c != "score"]


def top_heads(table: pd.DataFrame, kind: str, k: int, n_layers: int) -> pd.DataFrame:
    """The k highest heads of every variant column: prompt_split, phase, variant, rank, layer, head,
    value and depth = layer / (n_layers - 1) (0 = first layer, 1 = last)."""
    rows = []
    split = table["prompt_split"].iloc[0] if "prompt_split" in table and len(table) else ""
    for variant in variant_columns(table, kind):
        top = table.dropna(subset=[variant]).nlargest(k, variant)
        for rank, r in enumerate(top.itertuples(), 1):
            rows.append((split, PHASE_OF_KIND[kind], variant, rank, int(r.layer), int(r.head),
                         float(getattr(r, variant)), int(r.layer) / max(1, n_layers - 1)))
    return pd.DataFrame(rows, columns=["prompt_split", "phase", "variant", "rank", "layer", "head", "value", "depth"])


def depth_summary(top: pd.DataFrame) -> pd.DataFrame:
    """Per prompt_split, phase and variant: mean and median depth of its top heads and the fraction in
    the early / middle / late third of the layers, and the heads themselves ("L19H0, ...")."""
    def one(group: pd.DataFrame) -> pd.Series:
        third = (group["depth"] * 3).clip(upper=2.999).astype(int)
        out = {"n": len(group), "mean_depth": group["depth"].mean(), "median_depth": group["depth"].median()}
        out |= {f"frac_{name}": float((third == i).mean()) for i, name in enumerate(THIRDS)}
        out["heads"] = ", ".join(f"L{r.layer}H{r.head}" for r in group.sort_values("rank").itertuples())
        return pd.Series(out)

    keys = ["prompt_split", "phase", "variant"]
    if top.empty:
        return pd.DataFrame(columns=keys + ["n", "mean_depth", "median_depth"] + [f"frac_{t}" for t in THIRDS] + ["heads"])
    return top.groupby(keys, sort=False).apply(one, include_groups=False).reset_index()


def table_kind(table: pd.DataFrame) -> str:
    """"coarse" or "refine": the kind of a head table, from its `score_variant` (e.g. coarse_document_normalized)."""
    return str(table["score_variant"].iloc[0]).partition("_")[0]


def compare_heads(tables: list[pd.DataFrame], k: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Head tables, e.g. the teacher's coarse and refine tables of every prompt style -> (every
    variant's top-k heads, `depth_summary`). The depth scale comes from each table's layers."""
    tops = [top_heads(t, table_kind(t), k, int(t["layer"].max()) + 1) for t in tables if len(t)]
    top = pd.concat(tops, ignore_index=True) if tops else top_heads(pd.DataFrame(), "coarse", k, 1)
    return top, depth_summary(top)


def comparison_markdown(summary: pd.DataFrame, k: int, title: str) -> str:
    """The depth summary as a Markdown table."""
    lines = [f"# {title}", "", f"Top-{k} heads per phase by each scoring variant and prompt style; depth = layer / "
             "(layers - 1). Phase 1 is expected early, Phase 2 mid-to-late.", "",
             "| prompts | phase | variant | mean depth | early | middle | late | heads |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summary.itertuples():
        lines.append(f"| {r.prompt_split} | {r.phase} | {r.variant} | {r.mean_depth:.2f} | {r.frac_early:.1f} | "
                     f"{r.frac_middle:.1f} | {r.frac_late:.1f} | {r.heads} |")
    missing = [f"{split} {phase}" for split in dict.fromkeys(summary["prompt_split"]) for phase in PHASE_OF_KIND.values()
               if not ((summary["prompt_split"] == split) & (summary["phase"] == phase)).any()]
    if missing:
        lines += ["", "No finite score (no document with the positions the score needs, e.g. no refinement "
                  "position for Phase 2): " + ", ".join(missing) + "."]
    return "\n".join(lines) + "\n"
