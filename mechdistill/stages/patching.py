"""rules/patching.smk: patching, patching_figures."""

from __future__ import annotations

import json
import logging
import os
import time

import pandas as pd
from tqdm.auto import tqdm

from .. import paths
from ..anchors.embed import SentenceEmbedder
from ..inflight import in_flight, in_flight_workers
from ..io import file_digest, read_parquet, read_split, write_parquet
from ..models import ModelCatalog, load_model, spec_key
from ..patching import experiment
from ..patching.effects import summarize_patching
from ..patching.head_sets import SIGNED_SCORE
from ..patching.settings import PatchingSettings, check_bins
from ..shards import Shards, content_key, name_of
from ..teacher.prompts import render_prompt

log = logging.getLogger(__name__)
PathLike = str | os.PathLike

RUN_COLUMNS = ["doc_id", "direction", "kind", "k", "seed", "value", "clean_value", "corrupt_value", "text"]


def run_patching(config: dict, dataset: str, phase: str, *, inputs: dict[str, PathLike] | None = None,
                 head_scores_path: PathLike | None = None, summary_path: PathLike | None = None,
                 runs_path: PathLike | None = None, pairs_path: PathLike | None = None) -> None:
    """Activation patching of the teacher for one phase, on the `patching.split` documents ranked by
    the phase's head score -> patching/{phase}.parquet (+ {phase}_runs, {phase}_pairs).
    inputs: the split's files (default `paths.split_files`).

    `patching.in_flight` documents run at once on the model (their forwards in threads; the results are
    those of one at a time). One finished document at a time is kept (`shards.Shards`): a killed job
    resumes after its last finished document, if the settings, the model, the head ranking and the bytes of the split's files
    are those of the killed run (else it starts afresh).
    """
    patching, teacher = PatchingSettings.from_config(config), config["teacher"]
    settings, seed = patching.section, patching.seed
    split = paths.prompt_split(settings["split"], patching.clean_style)
    summary_path = summary_path or paths.patching(dataset, teacher, phase)
    runs_path = runs_path or paths.patching_runs(dataset, teacher, phase)
    pairs_path = pairs_path or paths.patching_pairs(dataset, teacher, phase)
    head_scores_path = head_scores_path or paths.head_scores(dataset, teacher, paths.PATCHING_SCORES[phase])
    early_tokens, repetition_penalty = patching.early_tokens, patching.repetition_penalty
    started = time.perf_counter()
    # before the teacher loads: its head scores hold one row per head (those without a score included)
    head_count = len(read_parquet(head_scores_path).drop_duplicates(["layer", "head"]))
    if head_count:  # an empty table: nothing to patch (below)
        check_bins(settings["bins"], head_count, teacher, str(head_scores_path))
    catalog = ModelCatalog.from_config(config)
    model, tokenizer = load_model(catalog, teacher, device=settings["device"], dtype=settings["dtype"],
                                  **patching.placement)
    embedder = SentenceEmbedder(patching.embedder)
    files = {**paths.split_files(dataset, teacher, split), **(inputs or {})}
    data = read_split(files, settings["max_docs"])
    ranked, ranked_scores, variant, signed, control_scores = _head_ranking(head_scores_path)
    if not ranked:  # e.g. no document has refinement positions: nothing to rank, say so and move on
        log.warning("%s: no head has a finite score, so there is nothing to patch for %s; writing empty tables "
                    "(check the head_scores log: the documents may have no early / refinement positions)",
                    head_scores_path, phase)
        _write_tables(pd.DataFrame(columns=["doc_id", "phase", "aligned", "reason"]),
                      pd.DataFrame(columns=["doc_id", "direction", "kind", "k", "seed", "value"]),
                      summarize_patching(pd.DataFrame(), phase), split, pairs_path, runs_path, summary_path)
        return
    head_sets = experiment.control_sets(ranked, ranked_scores, settings["bins"], settings["n_random"], seed,
                                        control_scores)
    log.info("patching %s %s: %d documents, %d heads ranked by %s (controls by %s), %d head sets per direction "
             "(bins %s), %d steps", teacher, phase, len(data.anchors), len(ranked), variant, signed, len(head_sets),
             sorted({s.k for s in head_sets}), early_tokens if phase == "phase1" else settings["late_tokens"])
    shards = Shards(summary_path, "docs", content_key(phase, settings, early_tokens, spec_key(catalog, teacher),
                                                       patching.embedder, repetition_penalty, ranked, ranked_scores,
                                                       control_scores, seed,
                                                       {k: file_digest(f) for k, f in sorted(files.items())}))
    rows, pairs = _patch_documents(phase, model, tokenizer, embedder, data, head_sets, patching, shards)
    pairs_df = pd.DataFrame(pairs, columns=experiment.PAIR_COLUMNS)  # a resumed pair comes back with sorted keys
    runs_df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    summary = summarize_patching(runs_df, phase, settings["min_gap"], settings["n_bootstrap"], seed)
    _log_patching(phase, pairs_df, runs_df, summary)
    log.info("patching %s took %.1f s", phase, time.perf_counter() - started)
    _write_tables(pairs_df, runs_df, summary, split, pairs_path, runs_path, summary_path)
    shards.clear()


def _patch_documents(phase: str, model, tokenizer, embedder: SentenceEmbedder, data, head_sets: list,
                     patching: PatchingSettings, shards: Shards) -> tuple[list[dict], list[dict]]:
    """Every document's patched runs and pair (`experiment.generate_document`, then `score_document`), in
    document order: (run rows, pairs). A document finished before a kill is read back from `shards`, a new
    one written there; `patching.in_flight` documents run their model part at once."""
    settings, early_tokens, repetition_penalty = patching.section, patching.early_tokens, patching.repetition_penalty
    rows, pairs = [], []
    bar = tqdm(total=len(data.anchors) * 2 * len(head_sets),
               desc=f"patching {phase} (document x head set x direction)", unit="run")

    def inputs(row) -> dict:
        """One document's inputs to `experiment.generate_document`, read here in the main thread."""
        return dict(doc_id=row.doc_id,
                    prompt_text=render_prompt(tokenizer, json.loads(data.prompts.loc[row.doc_id, "messages"])),
                    document=data.docs.loc[row.doc_id, "text"], anchors=list(row.anchors),
                    cot=data.cot.loc[row.doc_id, "cot"] if row.doc_id in data.cot.index else "",
                    gold=list(data.docs.loc[row.doc_id, "labels"]), near_misses=list(row.near_misses))

    def generate(document: dict | None) -> experiment.GeneratedDocument | None:
        """The model's part of one unfinished document (None for a finished one), run in flight."""
        if document is None:
            return None
        return experiment.generate_document(phase, model, tokenizer, titles=data.space.title, head_sets=head_sets,
                                            settings=settings, early_tokens=early_tokens,
                                            repetition_penalty=repetition_penalty, on_batch=bar.update, **document)

    # patching.in_flight documents run their forwards at once (on a device-mapped teacher, on different
    # GPUs); their inputs are read, and their metrics and pieces taken, here, in document order
    rows_in_order = list(data.anchors.itertuples(index=False))
    documents = (None if shards.done(f"{name_of(row.doc_id)}.json") else inputs(row) for row in rows_in_order)
    workers = in_flight_workers(model, patching.in_flight)
    for row, generated in zip(rows_in_order, in_flight(generate, documents, workers)):
        shard = f"{name_of(row.doc_id)}.json"
        if generated is None:
            done = shards.read_json(shard)
            bar.update(2 * len(head_sets))
        else:
            doc_rows, pair = experiment.score_document(generated, tokenizer, embedder, list(row.anchors),
                                                       row.anchor_text, list(row.near_misses), data.space.title)
            done = {"rows": doc_rows, "pair": pair}
            shards.write_json(shard, done)
        rows += done["rows"]
        pairs.append(done["pair"])
    bar.close()
    return rows, pairs


def _head_ranking(head_scores_path: PathLike) -> tuple[list[tuple[int, int]], list[float], str, str, list[float]]:
    """The heads by descending score: (layer, head) pairs, their scores, the score variant, the signed column
    the near_zero / most_negative controls read (`SIGNED_SCORE`) and its values; heads without a score left out."""
    scores = read_parquet(head_scores_path).dropna(subset=["score"]).sort_values("score", ascending=False, kind="stable")
    ranked = [(int(r.layer), int(r.head)) for r in scores.itertuples()]
    variant = scores["score_variant"].iloc[0] if "score_variant" in scores and len(scores) else "score"
    signed = SIGNED_SCORE.get(variant, "score")
    return (ranked, [float(x) for x in scores["score"]], variant, signed,
            [float(x) for x in scores[signed].fillna(0.0)])


def _write_tables(pairs: pd.DataFrame, runs: pd.DataFrame, summary: pd.DataFrame, split: str, pairs_path: PathLike,
                  runs_path: PathLike, summary_path: PathLike) -> None:
    """The phase's three tables, the summary (the rule's first output) last; pairs and summary name the split."""
    write_parquet(pairs.assign(prompt_split=split), pairs_path)  # which prompts were patched
    write_parquet(runs, runs_path)
    write_parquet(summary.assign(prompt_split=split), summary_path)


def _log_patching(phase: str, pairs: pd.DataFrame, runs: pd.DataFrame, summary: pd.DataFrame) -> None:
    n_aligned = int(pairs["aligned"].sum()) if len(pairs) else 0
    log.info("patching %s: %d/%d pairs aligned; rejected: %s", phase, n_aligned, len(pairs),
             pairs.loc[~pairs["aligned"], "reason"].str.split(":").str[0].value_counts().to_dict()
             if len(pairs) else {})
    if not n_aligned:
        log.warning("patching %s: no aligned clean/corrupted pair; the effects table is empty", phase)
        return
    refs = runs[runs["direction"] == "reference"].pivot(index="doc_id", columns="kind", values="value")
    log.info("patching %s: mean metric clean %.4f, corrupted %.4f (over %d documents)", phase,
             refs["clean"].mean(), refs["corrupt"].mean(), len(refs))
    for r in summary[summary["metric"].isin(["restoration", "disruption"])].itertuples():
        log.info("  %-7s %-13s k=%-3d %s %.3f [%.3f, %.3f] (CI width %.3f, n=%d)", r.direction, r.head_set, r.k,
                 r.metric, r.effect, r.ci_low, r.ci_high, r.ci_width, r.n_docs)
