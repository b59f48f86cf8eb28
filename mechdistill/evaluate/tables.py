"""Result tables (Tables 1-4) and Figure 9's data, computed from per-instance metric files.

Input: the long-format `results/{dataset}/{model}/{method}/metrics.parquet` files, columns
dataset, student, method, doc_id, metric, value (one row per document and metric; a corpus-level
metric such as macro-F1 is stored once with doc_id "", and its values on the bootstrap resamples
of the test set with doc_id "resample:<s>"). The teacher's file has method "teacher".

A cell is the metric's corpus-level value when one is stored (doc_id ""), else the mean of its
per-document values. So a metric whose corpus value is not the mean of per-document values
(macro-F1; LAS, averaged over leakage groups) is reported as its evaluator computed it.

Rows, as in the paper's tables: per dataset, per student, one row per method; each method of kind
"ours" carries per column its gain over a REFERENCE row, shown "0.620 (+0.090*)"; then per dataset
an "Avg. gain" row (the mean gain of the ours rows) and the teacher's row. The reference
(`build_table`'s `reference`, `table_spec` per table) is as in the paper:
  - Table 1 (clinical coding, MIMIC-IV): every method; the gain is over the best BASELINE of the
    column (methods of kind "baseline"; ablations never count; highest mean, lowest for
    lower-is-better columns): Table 1's Focus 0.62 - 0.53 = +0.09;
  - Tables 2, 3, 4: only the Vanilla and ours rows (and the teacher); the gain is over Vanilla
    (Table 2's Focus 0.66 - 0.41 = +0.25);
  - table2_baselines (not in the paper): LF-WikiSeeAlso with every method and the gain over the
    best baseline, Table 1's layout for the second dataset.
Significance (App. E), "*" only when the difference favours ours and:
  - a metric with per-document values: paired Wilcoxon p < alpha AND the paired bootstrap CI of
    the mean difference excludes 0 (documents paired by doc_id);
  - an aggregate metric with resamples (macro-F1): the percentile CI of the paired resample
    differences excludes 0 (Wilcoxon is not applicable to bootstrap resamples; p is NaN);
  - a metric with only a corpus value: no mark.
The gain is the difference of the two cells (what the table shows).
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io import atomic_path, read_parquet, write_text
from ..stats import bootstrap_ci
from .settings import RunSettings
from .significance import resampled_gain, significant_gain
from .xmc import RESAMPLE

# (column label, metric name, higher is better), in the order of Tables 1 and 2.
TABLE_COLUMNS: list[tuple[str, str, bool]] = [
    ("Foc", "focus", True),
    ("Conf", "confusion", False),
    ("LAS", "las", True),
    ("Sim", "sim_correct_xr", True),   # the LAS simulator's accuracy on input + rationale (LAS_NOTE)
    ("F1", "macro_f1", True),
    ("Sharp", "sharpness", True),
    ("Align", "anchor_align", True),
    ("Loop", "loopback", True),
    ("Help", "helpfulness", True),
]
LABELS = [label for label, _, _ in TABLE_COLUMNS]
# Columns of each table (Table 3: the behaviour and task metrics of the further students;
# Table 4: their mechanism scores; table2_baselines: Table 2 with every baseline).
TABLE_LABELS = {"table1": LABELS, "table2": LABELS, "table2_baselines": LABELS, "table3": LABELS[:5],
                "table4": LABELS[5:]}
VANILLA = "vanilla"  # the reference row of Tables 2-4 (the paper's "Vanilla")
BEST_BASELINE = "best baseline"  # the reference name of a gain over the best baseline per column
# The gain's reference per table: None = the best baseline of each column, else a method's name.
TABLE_REFERENCE: dict[str, str | None] = {"table1": None, "table2": VANILLA, "table2_baselines": None,
                                          "table3": VANILLA, "table4": VANILLA}
LAS_NOTE = ("LAS = Hase et al.'s (2020) leakage-adjusted simulatability: the simulator's accuracy on input + "
            "rationale minus its accuracy on the input alone, averaged over the leaking and non-leaking "
            "documents, a difference of accuracies in [-1, 1] (0: the rationale does not help the simulator); "
            "Sim = the same simulator's plain accuracy on input + rationale, in [0, 1] (the scale the paper's "
            "LAS values of 0.69-0.85 read as)")
SEMCOT_GAP = ("semcot writes no text rationale (its student reasons in implicit thought embeddings, "
              "distill/baselines/semcot.py), so its Foc, Conf and LAS are empty here, where the paper's "
              "Table 1 reports 0.47 / 0.30 / 0.72 without saying which text it scored")
METRIC_COLUMNS = ["dataset", "student", "method", "doc_id", "metric", "value"]
KEYS = ["dataset", "student", "method"]
ROW_KINDS = ("baseline", "ours", "ablation", "avg_gain", "teacher")
STATS = ["delta", "ci_low", "ci_high", "p", "sig"]  # per-column extras, filled on the ours rows
TEACHER_METHOD = "teacher"
AVG_GAIN = "Avg. gain"
NO_ROWS = "no rows for this config"
TABLE1_ADAPTERS = ("mimic4_icd10", "icd10cm_controlled")
TABLE2_ADAPTERS = ("wikiseealso",)
LATEX_ESCAPES = {"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "$": "\\$", "#": "\\#", "_": "\\_",
                 "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}", "<": "$<$", ">": "$>$"}
SIG_NOTE = ("* = significant (per-document metrics: paired Wilcoxon p < 0.05 and 95% bootstrap CI of the "
            "difference excludes 0; macro-F1: 95% CI over paired bootstrap resamples of the test set excludes 0)")


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


def stat_columns(labels: Sequence[str] = LABELS) -> list[str]:
    """Extra columns of `build_table`: `{label}_{stat}` for stat in delta, ci_low, ci_high, p, sig."""
    return [f"{label}_{stat}" for label in labels for stat in STATS]


class _Summary:
    """One method's values: corpus value per metric, per-document values [doc_id x metric] and
    per-resample values [resample x metric]."""

    def __init__(self, block: pd.DataFrame) -> None:
        block = block.reset_index(drop=True)
        doc_id = block["doc_id"].fillna("").astype(str)
        self.corpus = block[doc_id == ""].groupby("metric")["value"].mean().dropna()
        is_resample = doc_id.str.startswith(RESAMPLE)
        pivot = lambda rows: rows.pivot_table(index="doc_id", columns="metric", values="value",  # noqa: E731
                                              aggfunc="mean")
        self.per_doc = pivot(block[(doc_id != "") & ~is_resample].assign(doc_id=doc_id))
        self.resamples = pivot(block[is_resample].assign(doc_id=doc_id))

    def cell(self, metric: str) -> float:
        """The corpus-level value if stored, else the mean over documents (NaN if neither)."""
        if metric in self.corpus.index:
            return float(self.corpus[metric])
        if metric in self.per_doc.columns:
            return float(self.per_doc[metric].mean())
        return math.nan

    def values(self, table: str, metric: str) -> pd.Series | None:
        """Per-document ("per_doc") or per-resample ("resamples") values of `metric`, if any."""
        frame = getattr(self, table)
        if metric in frame.columns and frame[metric].notna().any():
            return frame[metric]
        return None


def metric_values(block: pd.DataFrame) -> dict[str, float]:
    """One model's metrics rows -> metric: its table cell (the corpus value if stored, else the mean over
    documents), in name order."""
    summary = _Summary(block)
    return {metric: summary.cell(metric) for metric in sorted(set(block["metric"]))}


def _compare(ours: _Summary, base: _Summary, metric: str, higher_is_better: bool, alpha: float,
             n_resamples: int, seed: int) -> dict:
    """CI, p-value and mark of ours over the baseline on one metric; NaN / "" when untestable."""
    out = {"ci_low": math.nan, "ci_high": math.nan, "p": math.nan, "sig": ""}
    mine, theirs = ours.values("resamples", metric), base.values("resamples", metric)
    if mine is not None and theirs is not None:
        both = pd.concat([theirs.rename("a"), mine.rename("b")], axis=1, join="inner").dropna()
        if len(both) < 2:
            return out
        r = resampled_gain(both["a"], both["b"], base.cell(metric), ours.cell(metric))
    else:
        mine, theirs = ours.values("per_doc", metric), base.values("per_doc", metric)
        if mine is None or theirs is None:
            return out
        both = pd.concat([theirs.rename("a"), mine.rename("b")], axis=1, join="inner").dropna()
        if len(both) < 2:
            return out
        r = significant_gain(both["a"], both["b"], alpha=alpha, n_resamples=n_resamples, seed=seed)
    favours = r["diff"] > 0 if higher_is_better else r["diff"] < 0
    return {"ci_low": r["ci_low"], "ci_high": r["ci_high"], "p": r["p_value"],
            "sig": "*" if r["significant"] and favours else ""}


def _row(dataset: str, student: str, method: str, kind: str, summary: _Summary | None) -> dict:
    row = {"dataset": dataset, "student": student, "method": method, "kind": kind}
    row |= {label: (summary.cell(metric) if summary else math.nan) for label, metric, _ in TABLE_COLUMNS}
    return row | {c: ("" if c.endswith("_sig") else math.nan) for c in stat_columns()}


def _block_rows(block: pd.DataFrame, dataset: str, student: str, methods: Sequence[str], kinds: Mapping[str, str],
                reference: str | None, alpha: float, n_resamples: int, seed: int) -> list[dict]:
    """Rows of one (dataset, student): a cell per column and method; each ours row's gain over the
    reference of that column (reference None: the best baseline; else the row of method `reference`),
    with its test."""
    summaries = {m: _Summary(block[block["method"] == m]) for m in methods}
    rows = [_row(dataset, student, m, kinds.get(m, "ablation"), summaries[m]) for m in methods]
    is_reference = ((lambda r: r["kind"] == "baseline") if reference is None
                    else (lambda r: r["method"] == reference))
    for mine in (r for r in rows if r["kind"] == "ours"):
        for label, metric, higher in TABLE_COLUMNS:
            base = {r["method"]: r[label] for r in rows if is_reference(r) and not math.isnan(r[label])}
            if not base or math.isnan(mine[label]):
                continue
            best = (max if higher else min)(base, key=base.get)
            mine[f"{label}_delta"] = mine[label] - base[best]
            test = _compare(summaries[mine["method"]], summaries[best], metric, higher, alpha, n_resamples, seed)
            mine |= {f"{label}_{k}": v for k, v in test.items()}
    return rows


def _avg_gain_row(rows: list[dict], dataset: str) -> dict | None:
    """Mean gain of the dataset's ours rows per column (None when no ours row has a gain)."""
    ours = [r for r in rows if r["kind"] == "ours"]
    gains = {label: [r[f"{label}_delta"] for r in ours if not math.isnan(r[f"{label}_delta"])] for label in LABELS}
    if not any(gains.values()):
        return None
    row = _row(dataset, "", AVG_GAIN, "avg_gain", None)
    return row | {f"{label}_delta": float(np.mean(g)) for label, g in gains.items() if g}


def build_table(metrics: pd.DataFrame, dataset: str | Sequence[str], students: Sequence[str],
                methods: Sequence[str], kinds: Mapping[str, str] | None = None, teacher: str | None = None,
                alpha: float = 0.05, n_resamples: int = 1000, seed: int = 0,
                reference: str | None = None, pairs: Collection[tuple[str, str]] | None = None) -> pd.DataFrame:
    """The rows of a table, in the given orders; see the module docstring.

    kinds: method -> baseline | ours | ablation (default: mech is ours, vanilla a baseline, the rest
    ablations). teacher: the teacher's model name; its row (method "teacher") closes each dataset
    when its metrics are present. reference: what the ours rows' gain is over: None, the best
    baseline of each column (Table 1); a method's name, that method's row (Tables 2-4: "vanilla"; not
    one of `methods`: no gains).
    Columns: dataset, student, method, kind (ROW_KINDS), the TABLE_COLUMNS labels (cell values), and
    `stat_columns()`: per label the ours rows' gain over the reference, CI and p-value of the
    paired difference, and its mark ("*" or ""); the avg-gain row holds gains in its `_delta`
    columns. Missing data are NaN / "", never errors. pairs: the (student, method) pairs the run
    distils (`paths.distilled_pairs`); a method a student is not distilled with has no row (default: all).
    """
    kinds = dict(kinds) if kinds is not None else {"mech": "ours", "vanilla": "baseline"}
    datasets = [dataset] if isinstance(dataset, str) else list(dataset)
    rows = []
    for ds in datasets:
        in_dataset = metrics[metrics["dataset"] == ds]
        block_rows = []
        for student in students:
            block = in_dataset[in_dataset["student"] == student]
            trained = [m for m in methods if pairs is None or (student, m) in pairs]
            block_rows += _block_rows(block, ds, student, trained, kinds, reference, alpha, n_resamples, seed)
        avg = _avg_gain_row(block_rows, ds)
        rows += block_rows + ([avg] if avg else [])
        mine = in_dataset[(in_dataset["method"] == TEACHER_METHOD) & (in_dataset["student"] == teacher)]
        if teacher and len(mine):
            rows.append(_row(ds, teacher, TEACHER_METHOD, "teacher", _Summary(mine)))
    return pd.DataFrame(rows, columns=KEYS + ["kind"] + LABELS + stat_columns())


# -----------------------------------------------------------------------------
# Which table shows what


def table_spec(run: RunSettings, table: str, kinds: Mapping[str, str] | None = None) -> dict:
    """Datasets, students, methods, kinds, reference, teacher, columns and caption of `table` for a run's settings.

    table1: datasets with adapter mimic4_icd10 (MIMIC-IV) or icd10cm_controlled (the demo);
    table2 and table2_baselines: datasets with adapter wikiseealso (LF-WikiSeeAlso); all three with
    the first two students and every column. table3 / table4: the further students (students[2:])
    on every dataset, Table 3 with Focus, Confusion, LAS and macro-F1, Table 4 with the four
    mechanism scores. With no further student, Tables 3 and 4 hold the teacher's rows only.
    Methods, in config order (the keys of config["methods"]; kinds: method -> kind,
    `distill.methods.method_kinds`): table1 and table2_baselines every method, the gain of ours
    over the best baseline per column; table2, table3, table4 only vanilla and the methods of kind
    ours, the gain over vanilla (TABLE_REFERENCE), as the paper lays them out.
    """
    names = list(run.datasets)
    adapter = {n: run.datasets[n].get("adapter") for n in names}
    students, methods = list(run.students), list(run.methods)
    demo = "; here the SYNTHETIC ICD-10-CM demo vignettes" if "icd10cm_controlled" in adapter.values() else ""
    wiki = [n for n in names if adapter[n] in TABLE2_ADAPTERS]
    specs = {
        "table1": ([n for n in names if adapter[n] in TABLE1_ADAPTERS], students[:2],
                   f"clinical coding (MIMIC-IV in the paper{demo})"),
        "table2": (wiki, students[:2], "LF-WikiSeeAlso"),
        "table2_baselines": (wiki, students[:2], "LF-WikiSeeAlso with every baseline (not in the paper: Table 2 "
                                                 "shows Vanilla and ours only)"),
        "table3": (names, students[2:], "further student backbones: behaviour, LAS and macro-F1"),
        "table4": (names, students[2:], "further student backbones: mechanism scores"),
    }
    if table not in specs:
        raise ValueError(f"unknown table {table!r}; expected one of {sorted(specs)}")
    datasets, chosen, what = specs[table]
    kinds = dict(kinds) if kinds is not None else {}
    ours = [m for m in methods if kinds.get(m) == "ours"]
    baselines = [m for m in methods if kinds.get(m) == "baseline"]
    reference = TABLE_REFERENCE[table]
    if reference is None:
        shown = methods
        versus = f"the best baseline ({', '.join(baselines) or 'none'}) per column"
    else:
        shown = [m for m in methods if m == reference or m in ours]
        versus = f"the {reference} row" if reference in methods else f"{reference} (not in this config: no gains)"
    notes = [SIG_NOTE]
    if "LAS" in TABLE_LABELS[table]:
        notes.append(LAS_NOTE)
    if "semcot" in shown and any(label in TABLE_LABELS[table] for label in ("Foc", "Conf", "LAS")):
        notes.append(SEMCOT_GAP)
    number = "Table 2 (every baseline)" if table == "table2_baselines" else f"Table {table[5:]}"
    caption = (f"{number}: {what}; datasets: {', '.join(datasets) or 'none'}; "
               f"students: {', '.join(chosen) or 'none in this config'}; teacher: {run.teacher or ''}. "
               f"(+gain) = {', '.join(ours) or 'ours'} minus {versus}; " + "; ".join(notes) + ".")
    return {"datasets": datasets, "students": chosen, "methods": shown, "kinds": kinds, "reference": reference,
            "pairs": set(run.pairs),
            "reference_name": reference or BEST_BASELINE,
            "teacher": run.teacher, "labels": TABLE_LABELS[table], "caption": caption}


# -----------------------------------------------------------------------------
# Writers


def _fmt(x: float) -> str:
    return "" if pd.isna(x) else f"{x:.3f}"


def _fmt_delta(delta: float, sig: str = "") -> str:
    return "" if pd.isna(delta) else f"{round(delta, 3) + 0.0:+.3f}{sig}"  # + 0.0: no "-0.000"


def _cell_text(row: pd.Series, label: str, latex: bool = False, bold: bool = False) -> str:
    """A cell as the paper prints it: value, and "(+gain)" on ours rows; the avg-gain row: gain."""
    if row["kind"] == "avg_gain":
        return _fmt_delta(row[f"{label}_delta"])
    text = _fmt(row[label])
    if bold and text:
        text = f"\\textbf{{{text}}}"
    if row["kind"] == "ours" and pd.notna(row[f"{label}_delta"]):
        sig = ("$^{*}$" if latex else "*") if row[f"{label}_sig"] else ""
        text += f" ({_fmt_delta(row[f'{label}_delta'])}{sig})"
    return text


def _row_name(row: pd.Series, reference: str = BEST_BASELINE) -> list[str]:
    if row["kind"] == "avg_gain":
        return [row["dataset"], "", f"{AVG_GAIN} (ours vs {reference})"]
    return [row["dataset"], row["student"], row["method"]]


def _best(table: pd.DataFrame, labels: Sequence[str]) -> set[tuple[int, str]]:
    """(row index, label) of the best student value per column within each (dataset, student) block."""
    best = set()
    higher = {label: h for label, _, h in TABLE_COLUMNS}
    students = table[table["kind"].isin(["baseline", "ours", "ablation"])]
    for _, block in students.groupby(["dataset", "student"], sort=False):
        for label in labels:
            values = block[label].dropna()
            if len(values):
                top = values.max() if higher[label] else values.min()
                best |= {(i, label) for i in values.index[np.isclose(values, top)]}
    return best


def _arrow(higher: bool, latex: bool = False) -> str:
    if latex:
        return "$\\uparrow$" if higher else "$\\downarrow$"
    return "↑" if higher else "↓"


def _header(labels: Sequence[str], latex: bool = False) -> list[str]:
    higher = {label: h for label, _, h in TABLE_COLUMNS}
    return ["Dataset", "Student", "Method"] + [f"{label} {_arrow(higher[label], latex)}" for label in labels]


def to_markdown(table: pd.DataFrame, caption: str = "", labels: Sequence[str] = LABELS,
                reference: str = BEST_BASELINE) -> str:
    """Markdown table: values to 3 decimals, "(+gain)" on ours rows, avg-gain ("ours vs `reference`")
    and teacher rows."""
    header = _header(labels)
    lines = [caption, ""] if caption else []
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 3 + "---:|" * len(labels)]
    if table.empty:
        lines.append("| " + " | ".join([NO_ROWS] + [""] * (len(header) - 1)) + " |")
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(_row_name(row, reference) + [_cell_text(row, label) for label in labels]) + " |")
    return "\n".join(lines) + "\n"


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters (underscores in method and model names, <, etc.)."""
    return text.translate(str.maketrans(LATEX_ESCAPES))


def to_latex(table: pd.DataFrame, caption: str = "", labels: Sequence[str] = LABELS,
             reference: str = BEST_BASELINE) -> str:
    """booktabs tabular in a table float; best student value per column per (dataset, student) in
    bold; ours rows shaded as in the paper (needs \\usepackage[table]{xcolor})."""
    header = _header(labels, latex=True)
    lines = ["\\begin{table}[t]", "\\centering"]
    if caption:
        lines.append(f"\\caption{{{latex_escape(caption)}}}")
    lines += ["\\begin{tabular}{lll" + "r" * len(labels) + "}", "\\toprule", " & ".join(header) + " \\\\",
              "\\midrule"]
    if table.empty:
        lines.append(f"\\multicolumn{{{len(header)}}}{{c}}{{{NO_ROWS}}} \\\\")
    best, previous = _best(table, labels), None
    for i, row in table.iterrows():
        block = (row["dataset"], row["student"])
        if previous is not None and previous != block:
            lines.append("\\midrule")
        previous = block
        cells = [latex_escape(str(c)) for c in _row_name(row, reference)]
        for label in labels:
            cells.append(_cell_text(row, label, latex=True, bold=(i, label) in best))
        shade = "\\rowcolor{green!15} " if row["kind"] in ("ours", "avg_gain") else ""
        lines.append(shade + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, files: dict[str, str | os.PathLike], caption: str = "",
                labels: Sequence[str] = LABELS, reference: str = BEST_BASELINE) -> None:
    """Write the table to files["csv"] (full precision, every column and stat), files["md"] and
    files["tex"] (the table's `labels` columns), each atomically."""
    csv = table if len(table) else pd.DataFrame({"note": [NO_ROWS]})
    with atomic_path(files["csv"]) as tmp:
        csv.to_csv(tmp, index=False)
    write_text(files["md"], to_markdown(table, caption, labels, reference))
    write_text(files["tex"], to_latex(table, caption, labels, reference))


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
