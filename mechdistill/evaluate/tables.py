"""Result tables (Tables 1-4) and Figure 9's data, computed from per-instance metric files.

Input: the long-format `results/{dataset}/{student}/{method}/metrics.parquet` files, columns
dataset, student, method, doc_id, metric, value (one row per document and metric; a corpus-level
metric such as macro-F1 is stored once with doc_id "").

A cell is the metric's corpus-level value when one is stored (doc_id ""), else the mean of its
per-document values. So a metric whose corpus value is not the mean of per-document values
(macro-F1; LAS, averaged over leakage groups) is reported as its evaluator computed it.

The `ours` row also gets, per column, its delta to the best baseline (the best mean among the
other methods present for that dataset and student; lowest for lower-is-better columns) and a
significance mark (App. E): "*" only when the paired Wilcoxon test has p < alpha, the paired
bootstrap CI of the difference excludes 0, and the difference favours ours. The test pairs
per-document values by doc_id: the column's own metric, or the per-instance stand-in named in
`PAIRED_METRIC` (instance F1 for macro-F1); a column with only a corpus value gets no mark.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import atomic_path, read_parquet, write_text
from ..stats import bootstrap_ci
from .significance import significant_gain

# (column label, metric name, higher is better), in the order of Tables 1 and 2.
TABLE_COLUMNS: list[tuple[str, str, bool]] = [
    ("Foc", "focus", True),
    ("Conf", "confusion", False),
    ("LAS", "las", True),
    ("F1", "macro_f1", True),
    ("Sharp", "sharpness", True),
    ("Align", "anchor_align", True),
    ("Loop", "loopback", True),
    ("Help", "helpfulness", True),
]
# Per-instance metric used for the paired test of a corpus-level metric.
PAIRED_METRIC: dict[str, str] = {"macro_f1": "f1"}
METRIC_COLUMNS = ["dataset", "student", "method", "doc_id", "metric", "value"]
KEYS = ["dataset", "student", "method"]
STATS = ["delta", "ci_low", "ci_high", "p", "sig"]  # per-column extras, filled on the ours row
NO_ROWS = "no rows for this config"
TABLE1_ADAPTERS = ("mimic4_icd10", "icd10cm_controlled")
TABLE2_ADAPTERS = ("wikiseealso",)
LATEX_ESCAPES = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                 "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}", "<": "$<$", ">": "$>$"}
SIG_NOTE = "* = significant (paired Wilcoxon p < 0.05 and 95% bootstrap CI of the difference excludes 0)"


# -----------------------------------------------------------------------------
# Loading


def load_metrics(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate metrics files; a file lacking a required column is an InputError naming it."""
    frames = []
    for path in paths:
        df = read_parquet(path)
        missing = [c for c in METRIC_COLUMNS if c not in df.columns]
        if missing:
            raise InputError(f"metrics file lacks column(s) {missing} (has {list(df.columns)}).", file=str(path),
                             fix="regenerate it with the `evaluate` rule of this version of mechdistill.")
        frames.append(df[METRIC_COLUMNS])
    if not frames:
        return pd.DataFrame({c: pd.Series(dtype=float if c == "value" else str) for c in METRIC_COLUMNS})
    out = pd.concat(frames, ignore_index=True)
    out["doc_id"] = out["doc_id"].fillna("").astype(str)
    out["value"] = out["value"].astype(float)
    return out


# -----------------------------------------------------------------------------
# Building a table


def stat_columns() -> list[str]:
    """Extra columns of `build_table`: `{label}_{stat}` for stat in delta, ci_low, ci_high, p, sig."""
    return [f"{label}_{stat}" for label, _, _ in TABLE_COLUMNS for stat in STATS]


def _summaries(block: pd.DataFrame) -> tuple[pd.Series, pd.DataFrame]:
    """(corpus value per metric, per-document values [doc_id x metric]) of one method's rows."""
    doc_id = block["doc_id"].fillna("").astype(str)
    corpus = block[doc_id == ""].groupby("metric")["value"].mean().dropna()
    docs = block[doc_id != ""].assign(doc_id=doc_id[doc_id != ""])
    per_doc = docs.pivot_table(index="doc_id", columns="metric", values="value", aggfunc="mean")
    return corpus, per_doc


def _cell(corpus: pd.Series, per_doc: pd.DataFrame, metric: str) -> float:
    """The corpus-level value if stored, else the mean over documents (NaN if neither)."""
    if metric in corpus.index:
        return float(corpus[metric])
    if metric in per_doc.columns:
        return float(per_doc[metric].mean())
    return math.nan


def _instances(per_doc: pd.DataFrame, metric: str) -> pd.Series | None:
    """Per-document values used to test `metric` (its own, or its PAIRED_METRIC stand-in)."""
    for name in (metric, PAIRED_METRIC.get(metric)):
        if name in per_doc.columns and per_doc[name].notna().any():
            return per_doc[name]
    return None


def _compare(ours: pd.Series | None, base: pd.Series | None, higher_is_better: bool, alpha: float,
             n_resamples: int, seed: int) -> dict:
    """CI, p-value and mark of ours over the baseline, paired by doc_id; NaN / "" when untestable."""
    empty = {"ci_low": math.nan, "ci_high": math.nan, "p": math.nan, "sig": ""}
    if ours is None or base is None:
        return empty
    both = pd.concat([base.rename("a"), ours.rename("b")], axis=1, join="inner").dropna()
    if len(both) < 2:
        return empty
    r = significant_gain(both["a"], both["b"], alpha=alpha, n_resamples=n_resamples, seed=seed)
    favours = r["diff"] > 0 if higher_is_better else r["diff"] < 0
    sig = r["p_value"] < alpha and (r["ci_low"] > 0 or r["ci_high"] < 0) and favours
    return {"ci_low": r["ci_low"], "ci_high": r["ci_high"], "p": r["p_value"], "sig": "*" if sig else ""}


def _block_rows(block: pd.DataFrame, dataset: str, student: str, methods: Sequence[str], ours: str,
                alpha: float, n_resamples: int, seed: int) -> list[dict]:
    """Rows of one (dataset, student): a cell per column and method, the ours row's comparison."""
    summaries = {m: _summaries(block[block["method"] == m]) for m in methods}
    rows = []
    for method in methods:
        row = {"dataset": dataset, "student": student, "method": method}
        row |= {label: _cell(*summaries[method], metric) for label, metric, _ in TABLE_COLUMNS}
        row |= {c: ("" if c.endswith("_sig") else math.nan) for c in stat_columns()}
        rows.append(row)
    if ours not in methods:
        return rows
    mine = rows[list(methods).index(ours)]
    for label, metric, higher in TABLE_COLUMNS:
        base = {r["method"]: r[label] for r in rows if r["method"] != ours and not math.isnan(r[label])}
        if not base or math.isnan(mine[label]):
            continue
        best = (max if higher else min)(base, key=base.get)
        mine[f"{label}_delta"] = mine[label] - base[best]
        test = _compare(_instances(summaries[ours][1], metric), _instances(summaries[best][1], metric),
                        higher, alpha, n_resamples, seed)
        mine |= {f"{label}_{k}": v for k, v in test.items()}
    return rows


def build_table(metrics: pd.DataFrame, dataset: str | Sequence[str], students: Sequence[str],
                methods: Sequence[str], ours: str = "mech", alpha: float = 0.05, n_resamples: int = 1000,
                seed: int = 0) -> pd.DataFrame:
    """One row per (dataset, student, method), in the given orders; see the module docstring.

    Columns: dataset, student, method, the TABLE_COLUMNS labels (cell values), and
    `stat_columns()`: per label the ours row's delta to the best baseline, CI and p-value of
    the paired difference, and its mark ("*" or ""). Missing data are NaN / "", never errors.
    """
    datasets = [dataset] if isinstance(dataset, str) else list(dataset)
    rows = []
    for ds in datasets:
        for student in students:
            block = metrics[(metrics["dataset"] == ds) & (metrics["student"] == student)]
            rows += _block_rows(block, ds, student, list(methods), ours, alpha, n_resamples, seed)
    columns = KEYS + [label for label, _, _ in TABLE_COLUMNS] + stat_columns()
    return pd.DataFrame(rows, columns=columns)


# -----------------------------------------------------------------------------
# Which table shows what


def table_spec(config: dict, table: str) -> dict:
    """Datasets, students, methods and caption of `table` ("table1".."table4") for a config.

    table1: datasets with adapter mimic4_icd10 (MIMIC-IV) or icd10cm_controlled (the demo);
    table2: datasets with adapter wikiseealso (LF-WikiSeeAlso); both with all students.
    table3 / table4 (other student backbones): the first dataset, with the students after the
    first (students[1:]) split in two halves, the first (larger, if odd) half in table3. With
    fewer than two students these are empty, and `write_table` writes a note row instead.
    Methods are the keys of config["methods"], in config order.
    """
    names = list(config.get("datasets", {}))
    adapter = {n: config["datasets"][n].get("adapter") for n in names}
    students, methods = list(config.get("students", [])), list(config.get("methods", {}))
    extra = students[1:]
    half = (len(extra) + 1) // 2
    specs = {
        "table1": ([n for n in names if adapter[n] in TABLE1_ADAPTERS], students,
                   "clinical coding (MIMIC-IV in the paper" + ("; here the SYNTHETIC ICD-10-CM demo vignettes)"
                                                               if "icd10cm_controlled" in adapter.values() else ")")),
        "table2": ([n for n in names if adapter[n] in TABLE2_ADAPTERS], students, "LF-WikiSeeAlso"),
        "table3": (names[:1], extra[:half], "other student backbones (first half)"),
        "table4": (names[:1], extra[half:], "other student backbones (second half)"),
    }
    if table not in specs:
        raise ValueError(f"unknown table {table!r}; expected one of {sorted(specs)}")
    datasets, chosen, what = specs[table]
    caption = (f"{table[:5].capitalize()} {table[5:]}: {what}; datasets: {', '.join(datasets) or 'none'}; "
               f"students: {', '.join(chosen) or 'none'}. Delta = ours minus the best baseline; {SIG_NOTE}.")
    return {"datasets": datasets, "students": chosen, "methods": methods, "caption": caption}


# -----------------------------------------------------------------------------
# Writers


def _fmt(x: float) -> str:
    return "" if pd.isna(x) else f"{x:.3f}"


def _fmt_delta(delta: float, sig: str) -> str:
    return "" if pd.isna(delta) else f"{round(delta, 3) + 0.0:+.3f}{sig}"  # + 0.0: no "-0.000"


def _has_delta(row: pd.Series) -> bool:
    return any(pd.notna(row[f"{label}_delta"]) for label, _, _ in TABLE_COLUMNS)


def _best(table: pd.DataFrame) -> set[tuple[int, str]]:
    """(row index, label) of the best value per column within each (dataset, student) block."""
    best = set()
    for _, block in table.groupby(["dataset", "student"], sort=False):
        for label, _, higher in TABLE_COLUMNS:
            values = block[label].dropna()
            if len(values):
                top = values.max() if higher else values.min()
                best |= {(i, label) for i in values.index[np.isclose(values, top)]}
    return best


def _arrow(higher: bool, latex: bool = False) -> str:
    if latex:
        return "$\\uparrow$" if higher else "$\\downarrow$"
    return "↑" if higher else "↓"


def to_markdown(table: pd.DataFrame, caption: str = "") -> str:
    """Markdown table: values to 3 decimals, a "Δ vs best baseline" row under the ours row."""
    header = ["Dataset", "Student", "Method"] + [f"{lab} {_arrow(h)}" for lab, _, h in TABLE_COLUMNS]
    lines = [caption, ""] if caption else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(TABLE_COLUMNS)]
    if table.empty:
        lines.append("| " + " | ".join([NO_ROWS] + [""] * (len(header) - 1)) + " |")
    for _, row in table.iterrows():
        cells = [row["dataset"], row["student"], row["method"]] + [_fmt(row[lab]) for lab, _, _ in TABLE_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
        if _has_delta(row):
            deltas = [_fmt_delta(row[f"{lab}_delta"], row[f"{lab}_sig"]) for lab, _, _ in TABLE_COLUMNS]
            lines.append("| " + " | ".join(["", "", "Δ vs best baseline"] + deltas) + " |")
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (underscores in method and model names, <, etc.)."""
    return text.translate(str.maketrans(LATEX_ESCAPES))


def to_latex(table: pd.DataFrame, caption: str = "") -> str:
    """booktabs tabular in a table float; best value per column per (dataset, student) in bold."""
    header = ["Dataset", "Student", "Method"] + [f"{lab} {_arrow(h, True)}" for lab, _, h in TABLE_COLUMNS]
    lines = ["\\begin{table}[t]", "\\centering"]
    if caption:
        lines.append(f"\\caption{{{latex_escape(caption)}}}")
    lines += ["\\begin{tabular}{lll" + "r" * len(TABLE_COLUMNS) + "}", "\\toprule", " & ".join(header) + " \\\\",
              "\\midrule"]
    if table.empty:
        lines.append(f"\\multicolumn{{{len(header)}}}{{c}}{{{NO_ROWS}}} \\\\")
    best, previous = _best(table), None
    for i, row in table.iterrows():
        if previous is not None and previous != (row["dataset"], row["student"]):
            lines.append("\\midrule")
        previous = (row["dataset"], row["student"])
        cells = [latex_escape(str(row[k])) for k in KEYS]
        for label, _, _ in TABLE_COLUMNS:
            text = _fmt(row[label])
            cells.append(f"\\textbf{{{text}}}" if (i, label) in best else text)
        lines.append(" & ".join(cells) + " \\\\")
        if _has_delta(row):
            deltas = [_fmt_delta(row[f"{lab}_delta"], "") + ("$^{*}$" if row[f"{lab}_sig"] else "")
                      for lab, _, _ in TABLE_COLUMNS]
            lines.append(" & ".join(["", "", "$\\Delta$ vs.\\ best baseline"] + deltas) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, files: dict[str, str | os.PathLike], caption: str = "") -> None:
    """Write the table to files["csv"] (full precision, with the stat columns), files["md"] and
    files["tex"], each atomically."""
    csv = table if len(table) else pd.DataFrame({"note": [NO_ROWS]})
    with atomic_path(files["csv"]) as tmp:
        csv.to_csv(tmp, index=False)
    write_text(files["md"], to_markdown(table, caption))
    write_text(files["tex"], to_latex(table, caption))


# -----------------------------------------------------------------------------
# Figure 9


def figure9_data(metrics: pd.DataFrame, dataset: str, student: str, methods: Sequence[str],
                 metric: str = "las", n_resamples: int = 1000, level: float = 0.95,
                 seed: int = 0) -> pd.DataFrame:
    """LAS per ablation method: mean over documents with a percentile bootstrap CI.

    Returns method, mean, ci_low, ci_high, n for the methods (in the given order) that have the
    metric; a method with only a corpus-level value gets it as mean, NaN CI and n = 0.
    """
    rows = []
    sel = metrics[(metrics["dataset"] == dataset) & (metrics["student"] == student) & (metrics["metric"] == metric)]
    for method in methods:
        part = sel[sel["method"] == method].dropna(subset=["value"])
        per_doc = part[part["doc_id"].fillna("") != ""].groupby("doc_id")["value"].mean().to_numpy()
        if len(per_doc):
            _, low, high = bootstrap_ci(per_doc, n_resamples, level, seed)
            rows.append({"method": method, "mean": float(per_doc.mean()), "ci_low": low, "ci_high": high,
                         "n": len(per_doc)})
        elif len(part):
            rows.append({"method": method, "mean": float(part["value"].mean()), "ci_low": math.nan,
                         "ci_high": math.nan, "n": 0})
    return pd.DataFrame(rows, columns=["method", "mean", "ci_low", "ci_high", "n"])
