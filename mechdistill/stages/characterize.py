"""rules/characterize.smk: head_scores, head_figures."""

from __future__ import annotations

import logging
import os

from .. import paths
from ..characterize.head_scores import forced_documents, score_heads
from ..characterize.plots import figure4, figure7
from ..io import read_parquet, read_split, write_parquet
from ..models import load_model

log = logging.getLogger(__name__)
PathLike = str | os.PathLike


def run_head_scores(config: dict, dataset: str, model: str, *, inputs: dict[str, PathLike] | None = None,
                    coarse_path: PathLike | None = None, refine_path: PathLike | None = None,
                    example_path: PathLike | None = None) -> None:
    """CoarseScore and RefineScore of every head of `model` (teacher or student), teacher-forced on
    the teacher's CoT of the `heads.split` split -> {model}/heads/coarse.parquet, refine.parquet
    and coarse_example.parquet. inputs: the split's files (default `paths.split_files`)."""
    settings, teacher, split = config["heads"], config["teacher"], config["heads"]["split"]
    model_obj, tokenizer = load_model(config, model, device=settings["device"], dtype=settings["dtype"])
    data = read_split({**paths.split_files(dataset, teacher, split), **(inputs or {})}, settings.get("max_docs"))
    coarse, refine, example = score_heads(model_obj, tokenizer, forced_documents(tokenizer, data), tau=settings["tau"],
                                          n_stages=settings["n_stages"], desc=f"head scores {model}")
    for name, table in (("CoarseScore", coarse), ("RefineScore", refine)):
        top = table.dropna(subset=["score"]).nlargest(5, "score")
        log.info("%s top-5 heads of %s: %s", name, model,
                 ", ".join(f"L{r.layer}H{r.head}={r.score:.4g}" for r in top.itertuples()))
    write_parquet(example, example_path or paths.head_example(dataset, model))
    write_parquet(refine, refine_path or paths.head_scores(dataset, model, "refine"))
    write_parquet(coarse, coarse_path or paths.head_scores(dataset, model, "coarse"))


def run_head_figures(config: dict, dataset: str, *, coarse_path: PathLike | None = None,
                     refine_path: PathLike | None = None, example_path: PathLike | None = None,
                     figure4_path: PathLike | None = None, figure7_path: PathLike | None = None) -> None:
    """The teacher's head tables -> Figures 4 (Phase-1 heads) and 7 (Phase-2 heads)."""
    teacher, top_k = config["teacher"], config["heads"]["top_k"]
    figure4(read_parquet(coarse_path or paths.head_scores(dataset, teacher, "coarse")),
            read_parquet(example_path or paths.head_example(dataset, teacher)),
            figure4_path or paths.head_figure(4, dataset), f"{dataset}, {teacher}: Phase 1 heads", top_k=top_k)
    figure7(read_parquet(refine_path or paths.head_scores(dataset, teacher, "refine")),
            figure7_path or paths.head_figure(7, dataset), f"{dataset}, {teacher}: Phase 2 heads", top_k=top_k)
