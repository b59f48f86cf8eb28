"""rules/anchors.smk: anchors, trajectories, figure1."""

from __future__ import annotations

import logging
import os

import pandas as pd

from .. import paths
from ..anchors.anchor_table import anchor_table, phase_yield, phase_yield_warnings
from ..anchors.concepts import extract_concepts
from ..anchors.embed import SentenceEmbedder
from ..anchors.settings import AnchorSettings, TrajectorySettings
from ..anchors.trajectories import trajectory_tables
from ..io import read_parquet, write_parquet
from ..labels import LabelSpace
from ..models import ModelCatalog, load_tokenizer
from ..teacher.backends import TransformersBackend

log = logging.getLogger(__name__)
PathLike = str | os.PathLike


def run_anchors(config: dict, dataset: str, teacher: str, split: str, *, cot_path: PathLike | None = None,
                prompts_path: PathLike | None = None, docs_path: PathLike | None = None,
                labels_path: PathLike | None = None, out_path: PathLike | None = None) -> None:
    """Teacher CoT + prompts + documents of a split -> {teacher}/anchors/{split}.parquet."""
    anchor_settings = AnchorSettings.from_config(config)
    settings = anchor_settings.section
    cot = read_parquet(cot_path or paths.cot(dataset, teacher, split), "cot").set_index("doc_id")
    prompts = read_parquet(prompts_path or paths.prompts(dataset, split), "prompts").set_index("doc_id")
    docs = read_parquet(docs_path or paths.data(dataset, split), "documents")
    space = LabelSpace(read_parquet(labels_path or paths.labels(dataset), "labels"))
    catalog = ModelCatalog.from_config(config)
    tokenizer = load_tokenizer(catalog, teacher)
    needs_embedder = "embedding" in settings["near_miss"]["strategies"]
    embedder = SentenceEmbedder(anchor_settings.embedder) if needs_embedder else None
    concepts = None
    if settings["mode"] == "llm":
        generation = {**anchor_settings.generation.mapping(), "max_new_tokens": settings["llm"]["max_new_tokens"]}
        backend = TransformersBackend(catalog, settings["llm"].get("model", teacher), generation)
        concepts = extract_concepts(lambda chats: [g.text for g in backend(chats)], docs["text"].tolist(),
                                    settings["llm"]["max_concepts"])
    out = anchor_table(docs, cot, prompts, space, tokenizer, settings, embedder, concepts)
    log.info("anchors %s/%s: %d documents; reasons %s", dataset, split, len(out),
             out["reason"].replace("", "ok").value_counts().to_dict() if len(out) else {})
    # per prompt style (a clean-prompt split holds one, `prompt_style`; a task split is its own)
    styles = (prompts["prompt_style"].reindex(out["doc_id"]).fillna(split) if "prompt_style" in prompts.columns
              else pd.Series(split, index=out.index))
    yields = phase_yield(out, styles)
    for row in yields.itertuples():
        log.info("anchors %s/%s, style %s: %d CoTs, %d with early queries, %d with refinement positions",
                 dataset, split, row.style, row.n_docs, row.n_early, row.n_refine)
    for message in phase_yield_warnings(yields, settings["min_phase_fraction"]):
        log.warning("anchors %s/%s: %s", dataset, split, message)
    write_parquet(out, out_path or paths.anchors(dataset, teacher, split))


def run_trajectories(config: dict, dataset: str, model: str, *, cot_path: PathLike | None = None,
                     anchors_path: PathLike | None = None,
                     labels_path: PathLike | None = None, curves_path: PathLike | None = None,
                     summary_path: PathLike | None = None) -> None:
    """A model's CoT (the teacher's, or a student's predictions: `model` = "{student}/{method}") on
    the trajectory split -> {model}/trajectories.parquet and trajectories_summary.parquet. Units are the
    model's tokens; the early window is the teacher's first `anchors.early_tokens` tokens (as characters)."""
    settings = TrajectorySettings.from_config(config)
    cot = read_parquet(cot_path or paths.model_cot(config, dataset, model)).set_index("doc_id")
    anchors = read_parquet(anchors_path or paths.anchors(dataset, settings.teacher, settings.split))
    space = LabelSpace(read_parquet(labels_path or paths.labels(dataset), "labels"))
    catalog, name = ModelCatalog.from_config(config), model.split("/")[0]
    teacher_tokenizer = load_tokenizer(catalog, settings.teacher)  # defines the early window of every model's CoT
    tokenizer = teacher_tokenizer if name == settings.teacher else load_tokenizer(catalog, name)
    curves, summary = trajectory_tables(model, cot, anchors, space, tokenizer, teacher_tokenizer,
                                        SentenceEmbedder(settings.embedder), settings.early_tokens,
                                        n_grid=settings.n_grid, max_points=settings.max_points)
    log.info("trajectories %s: %d documents, mean Focus %.3f, mean Confusion %.3f, NaN reasons %s",
             model, len(summary), summary["focus"].mean(), summary["confusion"].mean(),
             summary["reason"].replace("", "ok").value_counts().to_dict())
    write_parquet(summary, summary_path or paths.trajectory_summary(dataset, model))
    write_parquet(curves, curves_path or paths.trajectories(dataset, model))
