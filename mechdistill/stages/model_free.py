"""The jobs that load no model: the grid-point choice (select_distill), the published students' model
cards (model_card) and the figures and tables of every phase (figure1, head_figures, head_comparison,
patching_figures, tables, figure9). They read and
write artifacts only, so this module imports neither torch nor transformers (an import-linter contract
checks it) and each job starts in about a second instead of the ~15 s a model job spends importing."""

from __future__ import annotations

import json
import logging
import os
import textwrap
from pathlib import Path

import pandas as pd

from .. import paths
from ..characterize.compare import compare_heads, comparison_markdown
from ..characterize.settings import HeadComparisonSettings, HeadFigureSettings
from ..distill.methods import grid_point, method_grid, method_kinds, resolve_method
from ..distill.selection import copy_file, link_dir, select_point
from ..distill.settings import CardSettings, SelectSettings
from ..evaluate.card import StudentFacts, write_model_card
from ..evaluate.settings import RunSettings
from ..evaluate.tables import (
    METRIC_COLUMNS,
    build_table,
    figure9_data,
    load_metrics,
    metric_values,
    table_spec,
    write_table,
)
from ..evaluate.xmc import RESAMPLE
from ..io import read_json, read_parquet, write_json, write_parquet, write_text

log = logging.getLogger(__name__)
PathLike = str | os.PathLike


def run_head_figures(config: dict, dataset: str, *, coarse_path: PathLike | None = None,
                     refine_path: PathLike | None = None, example_path: PathLike | None = None,
                     figure4_path: PathLike | None = None, figure7_path: PathLike | None = None) -> None:
    """The teacher's head tables -> Figures 4 (Phase-1 heads) and 7 (Phase-2 heads)."""
    # matplotlib and scipy: only the figure jobs import them, not select_distill, tables or claims
    from ..characterize.plots import figure4, figure7

    teacher, top_k = config["teacher"], HeadFigureSettings.from_config(config).value
    figure4(read_parquet(coarse_path or paths.head_scores(dataset, teacher, "coarse")),
            read_parquet(example_path or paths.head_example(dataset, teacher)),
            figure4_path or paths.head_figure(4, dataset), f"{dataset}, {teacher}: Phase 1 heads", top_k=top_k)
    figure7(read_parquet(refine_path or paths.head_scores(dataset, teacher, "refine")),
            figure7_path or paths.head_figure(7, dataset), f"{dataset}, {teacher}: Phase 2 heads", top_k=top_k)


def run_head_comparison(config: dict, dataset: str, *, coarse_path: PathLike | None = None,
                        refine_path: PathLike | None = None, style_paths: list[PathLike] | None = None,
                        md_path: PathLike | None = None, parquet_path: PathLike | None = None) -> None:
    """The teacher's head tables on the characterization split and on every compared prompt style ->
    heads/comparison.{md,parquet}: top-k heads per phase and scoring variant, with their depths."""
    teacher, k = config["teacher"], HeadComparisonSettings.from_config(config).value
    if style_paths is None:
        style_paths = [paths.style_head_scores(dataset, teacher, s, kind)
                       for s in paths.compared_splits(config) for kind in paths.HEAD_SCORE_KINDS]
    files = [coarse_path or paths.head_scores(dataset, teacher, "coarse"),
             refine_path or paths.head_scores(dataset, teacher, "refine"), *style_paths]
    top, summary = compare_heads([read_parquet(f) for f in files], k)
    for r in summary.itertuples():
        log.info("%s %s %s: mean depth %.2f of the top-%d heads (%s)", r.prompt_split, r.phase, r.variant,
                 r.mean_depth, k, r.heads)
    write_text(md_path or paths.head_comparison(dataset, teacher, "md"),
               comparison_markdown(summary, k, f"{dataset}, {teacher}: where the top heads sit"))
    write_parquet(top, parquet_path or paths.head_comparison(dataset, teacher, "parquet"))


def run_patching_figure(config: dict, dataset: str, phase: str, *, summary_path: PathLike | None = None,
                        out_png: PathLike | None = None) -> None:
    """patching/{phase}.parquet -> Figure 5 (phase1) or Figure 8 (phase2)."""
    # matplotlib and scipy: only the figure jobs import them, not select_distill, tables or claims
    from ..patching.plots import patching_figure

    what = {"phase1": "Reasoning Focus (CoarseScore heads)", "phase2": "Near-Miss Confusion (RefineScore heads)"}[phase]
    patching_figure(read_parquet(summary_path or paths.patching(dataset, config["teacher"], phase)),
                    out_png or paths.patching_figure(phase, dataset),
                    f"Figure {paths.FIGURE_OF_PHASE[phase]} - {dataset}, {config['teacher']}: patching {what}",
                    relative=phase == "phase2")


def run_figure1(config: dict, dataset: str, curve_paths: list[PathLike], out_png: PathLike | None = None) -> None:
    """The trajectories of every model on a dataset -> Figure 1."""
    # matplotlib and scipy: only the figure jobs import them, not select_distill, tables or claims
    from ..anchors.plots import figure1

    curves = pd.concat([read_parquet(p) for p in curve_paths], ignore_index=True)
    figure1(curves, out_png or paths.figure1(dataset), title=f"{dataset}: Reasoning Focus and Near-Miss Confusion")


def run_select_distill(config: dict, dataset: str, student: str, method_name: str, *,
                       model_dir: PathLike | None = None, log_path: PathLike | None = None,
                       mechanism_path: PathLike | None = None, selection_path: PathLike | None = None,
                       items_path: PathLike | None = None) -> dict:
    """Publish the grid point of `method_name` with the best validation value (distill.select.criterion,
    from each point's train log; ties: the first point) as the method's model/ (weights hard-linked),
    train_log.parquet, mechanism.parquet and training_items.parquet, and write the selection record (`paths.selection`; see
    `distill.selection.select_point`) and the model's card, not evaluated yet (`evaluate.card`).
    Reads each point's files at paths.*(..., grid_method(method, point)). Returns the record."""
    points = method_grid(method_name, config["methods"].get(method_name))
    where = {point.name: paths.grid_method(method_name, point.name) for point in points}
    logs = {name: read_parquet(paths.train_log(dataset, student, folder)) for name, folder in where.items()}
    criterion = SelectSettings.from_config(config).value
    record = select_point(logs, {point.name: point.values for point in points}, criterion)
    chosen = where[record["point"]]
    link_dir(paths.student_model_dir(dataset, student, chosen),
             model_dir or paths.student_model_dir(dataset, student, method_name))
    for path, target in ((paths.train_log, log_path), (paths.mechanism, mechanism_path),
                         (paths.training_items, items_path)):
        copy_file(path(dataset, student, chosen), target or path(dataset, student, method_name))
    record = {"dataset": dataset, "student": student, "method": method_name, **record}
    write_json(selection_path or paths.selection(dataset, student, method_name), record)
    published = model_dir or paths.student_model_dir(dataset, student, method_name)
    write_model_card(published, _student_facts(config, dataset, student, method_name, record))  # metrics: model_card
    log.info("select %s/%s: grid point %s, step %s, %s %s (of %d points: %s)", student, method_name, record["point"],
             record["step"], record["criterion"], record["value"], len(points),
             ", ".join(f"{c['point']}: {c['value']}" for c in record["candidates"]))
    return record


def _student_facts(config: dict, dataset: str, student: str, method_name: str, selection: dict) -> StudentFacts:
    """What the card of a published student says, from the config (`CardSettings`), its selection record and
    the chosen grid point's files: train log (steps), training items (documents) and provenance.json (the
    command and commit of its distill job; "unknown" where it is missing)."""
    card = CardSettings.from_config(config, method=method_name)
    entry = grid_point(method_name, card.method, selection["point"]).settings
    method = resolve_method(method_name, entry)
    where = paths.grid_method(method_name, selection["point"])
    train_log = read_parquet(paths.train_log(dataset, student, where))
    items = read_parquet(paths.training_items(dataset, student, where))
    docs = items.drop_duplicates(["split", "doc_id"]).groupby("split", sort=False).size()
    made = Path(paths.provenance(dataset, student, where))
    made_by = read_json(made) if made.exists() else {"command": "unknown", "commit": "unknown"}
    return StudentFacts(dataset, student, card.models[student], card.teacher, card.models[card.teacher], method_name,
                        method.kind, method.description, selection["point"], entry,
                        {**card.weights, **(entry.get("weights") or {})}, {s: int(n) for s, n in docs.items()},
                        int(train_log.loc[train_log["split"] == "train", "step"].max()), selection,
                        made_by["command"], made_by["commit"])


def run_model_card(config: dict, dataset: str, student: str, method_name: str, *,
                   selection_path: PathLike | None = None, metrics_path: PathLike | None = None,
                   model_dir: PathLike | None = None) -> None:
    """The published student's card with its test metrics (metrics.parquet: each metric as the tables show it)
    -> README.md in its model folder, which select_distill wrote without them."""
    selection = read_json(selection_path or paths.selection(dataset, student, method_name))
    metrics = read_parquet(metrics_path or paths.metrics(dataset, student, method_name))
    doc_ids = metrics["doc_id"].fillna("").astype(str)
    test_docs = doc_ids[(doc_ids != "") & ~doc_ids.str.startswith(RESAMPLE)].nunique()
    path = write_model_card(model_dir or paths.student_model_dir(dataset, student, method_name),
                            _student_facts(config, dataset, student, method_name, selection), metric_values(metrics),
                            test_docs)
    log.info("model card of %s/%s with %d metrics -> %s", student, method_name, metrics["metric"].nunique(), path)


def _metrics(metrics_paths: list[PathLike]) -> pd.DataFrame:
    return load_metrics(metrics_paths) if metrics_paths else pd.DataFrame(columns=METRIC_COLUMNS)


def selection_note(records: list[dict], datasets: list[str], students: list[str]) -> str:
    """The caption's sentence on how each shown model was chosen on validation (selection.json)."""
    shown = [r for r in records if r["dataset"] in datasets and r["student"] in students]
    if not shown:
        return ""
    criteria = ", ".join(sorted({r["criterion"] for r in shown}))
    picks = "; ".join(f"{r['student']}/{r['method']}: {r['point']} at step {r['step']}"
                      + (f" (of {len(r['candidates'])} grid points)" if len(r.get("candidates", [])) > 1 else "")
                      for r in shown)
    return f" Selected on validation ({criteria}): {picks}."


def run_tables(config: dict, metrics_paths: list[PathLike], selection_paths: list[PathLike] | None = None) -> None:
    """Every metrics file of the config -> results/tables/{table1..4, table2_baselines}.{csv,md,tex}; the captions say
    which grid point and step of each student was selected (selection.json files, when given)."""
    run = RunSettings.from_config(config)
    metrics, kinds = _metrics(metrics_paths), method_kinds(run.methods)
    records = [json.loads(Path(p).read_text()) for p in selection_paths or []]
    for table in paths.TABLES:
        spec = table_spec(run, table, kinds)
        built = build_table(metrics, spec["datasets"], spec["students"], spec["methods"], kinds, spec["teacher"],
                            n_resamples=run.n_bootstrap, seed=run.seed, reference=spec["reference"], pairs=spec["pairs"])
        caption = spec["caption"] + selection_note(records, spec["datasets"], spec["students"])
        write_table(built, {fmt: paths.table(table, fmt) for fmt in paths.TABLE_FORMATS}, caption=caption,
                    labels=spec["labels"], reference=spec["reference_name"])
        log.info("%s: %d rows (%s)", table, len(built), spec["caption"])


def run_figure9(config: dict, metrics_paths: list[PathLike], out_png: PathLike | None = None) -> None:
    """Figure 9: LAS of ours and its phase and term ablations, a panel per dataset, for the first student
    distilled with an ablation (the paper's primary student)."""
    # matplotlib and scipy: only the figure jobs import them, not select_distill, tables or claims
    from ..evaluate.plots import figure9

    run = RunSettings.from_config(config)
    kinds = method_kinds(run.methods)
    student = next((s for s, m in run.pairs if kinds.get(m) == "ablation"), (run.students or [""])[0])
    methods = [m for s, m in run.pairs if s == student and kinds.get(m) in ("ours", "ablation")]
    metrics = _metrics(metrics_paths)
    panels = {dataset: figure9_data(metrics, dataset, student, methods, n_resamples=run.n_bootstrap, seed=run.seed)
              for dataset in run.datasets}
    title = f"Figure 9 - LAS of the ablations ({student}; teacher {run.teacher})"
    missing = {m: [d for d, data in panels.items() if m not in set(data.dropna(subset=["mean"])["method"])]
               for m in methods}
    named = [m if len(where) == len(panels) else f"{m} ({', '.join(where)})" for m, where in missing.items() if where]
    if named:  # e.g. students that predicted no label: LAS has no simulation target (wrapped: 14 names fit no line)
        title += "\n" + textwrap.fill("no LAS for: " + ", ".join(named), 90)
    figure9(panels, out_png or paths.figure9(), title)
