"""rules/characterize.smk: head_scores (and style_head_scores), head_comparison, head_figures."""

from __future__ import annotations

import logging
import os

from .. import paths
from ..characterize.head_scores import forced_documents, score_heads
from ..characterize.settings import HeadSettings
from ..characterize.teacher_forcing import length_cap
from ..inflight import in_flight_workers
from ..io import read_split, write_parquet
from ..models import ModelCatalog, load_model

log = logging.getLogger(__name__)
PathLike = str | os.PathLike


def run_head_scores(config: dict, dataset: str, model: str, split: str | None = None, *,
                    inputs: dict[str, PathLike] | None = None, coarse_path: PathLike | None = None,
                    refine_path: PathLike | None = None, example_path: PathLike | None = None) -> None:
    """CoarseScore and RefineScore of every head of `model` (teacher or student), teacher-forced on
    the teacher's CoT of `split` (default `heads.split`; "clean" = the clean-prompt set) ->
    {model}/heads/coarse.parquet, refine.parquet and coarse_example.parquet (another clean-prompt
    style: `paths.style_head_scores`). Both tables say which prompts they measured (`prompt_split`).
    inputs: the split's files (default `paths.split_files`)."""
    settings, teacher = HeadSettings.from_config(config), config["teacher"]
    split = paths.prompt_split(split or settings.split, settings.clean_style)
    main = split == paths.prompt_split(settings.split, settings.clean_style)
    model_obj, tokenizer = load_model(ModelCatalog.from_config(config), model, device=settings.device, dtype=settings.dtype,
                                      **settings.placement)
    data = read_split({**paths.split_files(dataset, teacher, split), **(inputs or {})}, settings.max_docs)
    documents = forced_documents(tokenizer, data, length_cap(settings.max_tokens, model_obj))
    coarse, refine, example = score_heads(model_obj, tokenizer, documents, tau=settings.signals.tau,
                                          n_stages=settings.n_stages, desc=f"head scores {model}",
                                          coarse_variant=settings.signals.coarse,
                                          refine_ranking=settings.signals.refine_ranking,
                                          in_flight_docs=in_flight_workers(model_obj, settings.in_flight))
    for name, table in (("CoarseScore", coarse), ("RefineScore", refine)):
        top = table.dropna(subset=["score"]).nlargest(5, "score")
        log.info("%s (%s) top-5 heads of %s: %s", name, table["score_variant"].iloc[0], model,
                 ", ".join(f"L{r.layer}H{r.head}={r.score:.4g}" for r in top.itertuples()))

    def table_path(kind: str) -> str:
        return paths.head_scores(dataset, model, kind) if main else paths.style_head_scores(dataset, model, split, kind)

    if main or example_path:  # Figure 4's example comes from the characterization split only
        write_parquet(example, example_path or paths.head_example(dataset, model))
    write_parquet(refine.assign(prompt_split=split), refine_path or table_path("refine"))
    write_parquet(coarse.assign(prompt_split=split), coarse_path or table_path("coarse"))
