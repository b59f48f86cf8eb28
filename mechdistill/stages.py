"""One function per pipeline stage: read input artifacts, call the library, write outputs.

Used by the thin Snakemake scripts in workflow_scripts/ and by `python -m mechdistill <stage>`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import pandas as pd

from . import paths
from .data import prepare_dataset
from .data.base import SPLITS
from .generate import generate_cot
from .io import read_parquet, write_json, write_parquet
from .labels import LabelSpace
from .prompts import build_prompts

log = logging.getLogger(__name__)


class SplitArtifacts(NamedTuple):
    """One split's artifacts, indexed by doc_id (anchors keep their row order, cut to max_docs)."""

    docs: pd.DataFrame
    prompts: pd.DataFrame
    cot: pd.DataFrame
    anchors: pd.DataFrame
    space: LabelSpace


def load_split(docs_path, prompts_path, cot_path, anchors_path, labels_path, max_docs: int | None = None
               ) -> SplitArtifacts:
    """Read the documents, prompts, teacher CoT, anchors and label space of one split."""
    anchors = read_parquet(anchors_path)
    return SplitArtifacts(docs=read_parquet(docs_path, "documents").set_index("doc_id"),
                          prompts=read_parquet(prompts_path, "prompts").set_index("doc_id"),
                          cot=read_parquet(cot_path, "cot").set_index("doc_id"),
                          anchors=anchors.head(max_docs) if max_docs else anchors,
                          space=LabelSpace(read_parquet(labels_path, "labels")))


def run_prepare_dataset(config: dict, dataset: str, out_dir: str | Path | None = None) -> None:
    """-> data/{train,val,test}.parquet, data/labels.parquet, data/stats.json (+ excluded_pairs)."""
    out = Path(out_dir or Path(paths.LABELS.format(dataset=dataset)).parent)
    prepared = prepare_dataset(config, dataset)
    for split in SPLITS:
        write_parquet(prepared.splits[split], out / f"{split}.parquet", "documents")
    if prepared.excluded_pairs is not None:
        write_parquet(prepared.excluded_pairs, out / "excluded_pairs.parquet")
    write_json(out / "stats.json", prepared.stats)
    write_parquet(prepared.labels, out / "labels.parquet", "labels")  # last: the rule's marker


def run_build_prompts(config: dict, dataset: str, split: str, data_dir: str | Path | None = None,
                      out_path: str | Path | None = None) -> None:
    data_dir = Path(data_dir or Path(paths.LABELS.format(dataset=dataset)).parent)
    docs = read_parquet(data_dir / f"{split}.parquet", "documents")
    space = LabelSpace(read_parquet(data_dir / "labels.parquet", "labels"))
    train = read_parquet(data_dir / "train.parquet", "documents")
    entry = config["datasets"][dataset]
    embedder = None
    if entry["candidates"]["strategy"] == "retrieval":
        from .embed import SentenceEmbedder
        embedder = SentenceEmbedder(config.get("embedder", "all-MiniLM-L6-v2"))
    exemplar = train.iloc[0] if len(train) else None
    prompts = build_prompts(docs, space, entry["candidates"], config["prompts"], config.get("seed", 0),
                            exemplar_doc=exemplar, embedder=embedder)
    recall = float(prompts["gold_in_candidates"].mean()) if len(prompts) else float("nan")
    log.info("prompts %s/%s: %d documents, %d candidates each, candidate recall = %.3f",
             dataset, split, len(prompts), entry["candidates"]["size"], recall)
    write_parquet(prompts, out_path or paths.PROMPTS.format(dataset=dataset, split=split), "prompts")


def run_teacher_cot(config: dict, dataset: str, split: str, prompts_path: str | Path | None = None,
                    labels_path: str | Path | None = None, out_path: str | Path | None = None,
                    model: str | None = None) -> None:
    model = model or config["teacher"]
    prompts = read_parquet(prompts_path or paths.PROMPTS.format(dataset=dataset, split=split), "prompts")
    space = LabelSpace(read_parquet(labels_path or paths.LABELS.format(dataset=dataset), "labels"))
    out_path = out_path or paths.COT.format(dataset=dataset, teacher=model, split=split)
    generate_cot(config, model, prompts, space, out_path, dataset=dataset, split=split)


def _spans(spans) -> list[list[int]]:
    return [[int(a), int(b)] for a, b in spans]


def run_anchors(config: dict, dataset: str, teacher: str, cot_path: str | Path, prompts_path: str | Path,
                docs_path: str | Path, labels_path: str | Path, out_path: str | Path) -> None:
    """-> anchors/{split}.parquet: anchors, anchor_text, near-misses, shortlist and CoT spans."""
    from .anchors import anchor_text, extract_concepts, label_anchors, near_misses, shortlist
    from .models import load_tokenizer
    from .segment import segment_cot, token_offsets

    acfg = config["anchors"]
    cot = read_parquet(cot_path, "cot").set_index("doc_id")
    prompts = read_parquet(prompts_path, "prompts").set_index("doc_id")
    docs = read_parquet(docs_path, "documents")
    space = LabelSpace(read_parquet(labels_path, "labels"))
    tok = load_tokenizer(config, teacher)
    strategies = acfg["near_miss"]["strategies"]
    embedder = None
    if "embedding" in strategies:
        from .embed import SentenceEmbedder
        embedder = SentenceEmbedder(config["embedder"])
    concepts = None
    if acfg["mode"] == "llm":
        from .generate import TransformersBackend
        gen = {**config["generation"], "max_new_tokens": acfg["llm"]["max_new_tokens"]}
        backend = TransformersBackend(config, acfg["llm"].get("model", teacher), gen)
        concepts = extract_concepts(lambda chats: [g.text for g in backend(chats)], docs["text"].tolist(),
                                    acfg["llm"]["max_concepts"])
    rows = []
    for i, (doc_id, gold) in enumerate(zip(docs["doc_id"], docs["labels"])):
        text = cot.loc[doc_id, "cot"] if doc_id in cot.index else ""
        candidates, gold = list(prompts.loc[doc_id, "candidates"]), list(gold)
        anchors = concepts[i] if concepts is not None else label_anchors(gold, space, acfg["ancestor_levels"])
        kept = shortlist(text, candidates, space)
        # Near-misses are alternatives the CoT does not keep: disjoint from the shortlist, so the
        # shortlist (S) and near-miss (N) positions of RefineScore never share a mention.
        n = acfg["near_miss"]["n"]
        near = [lab for lab in near_misses(gold, text, candidates, space, strategies, n + len(kept), embedder)
                if lab not in kept][:n]
        seg = segment_cot(text, token_offsets(tok, text), acfg["early_tokens"], kept, near, space,
                          candidates=candidates, patterns=acfg.get("refine_patterns"))
        reason = seg["reason"] or ("no anchors" if not anchors else "")
        rows.append(dict(doc_id=doc_id, anchors=anchors, anchor_text=anchor_text(anchors), near_misses=near,
                         shortlist=kept, early_span=list(seg["early_span"]),
                         refine_spans=_spans(seg["refine_spans"]), shortlist_spans=_spans(seg["shortlist_spans"]),
                         nearmiss_spans=_spans(seg["nearmiss_spans"]), reason=reason))
    out = pd.DataFrame(rows)
    log.info("anchors %s: %d documents; %d with refinement positions; reasons %s", dataset, len(out),
             int(out["refine_spans"].map(len).gt(0).sum()) if len(out) else 0,
             out["reason"].replace("", "ok").value_counts().to_dict() if len(out) else {})
    write_parquet(out, out_path)


def run_trajectories(config: dict, model: str, cot_path: str | Path, anchors_path: str | Path,
                     labels_path: str | Path, curves_path: str | Path, summary_path: str | Path) -> None:
    """-> trajectories.parquet (doc_id, phase, t, value) and trajectories_summary.parquet."""
    from .embed import SentenceEmbedder
    from .models import load_tokenizer
    from .segment import token_units
    from .trajectories import document_trajectories, needed_texts

    tcfg, early_tokens = config["trajectories"], config["anchors"]["early_tokens"]
    cot = read_parquet(cot_path).set_index("doc_id")
    anchors = read_parquet(anchors_path)
    space = LabelSpace(read_parquet(labels_path, "labels"))
    tok = load_tokenizer(config, model.split("/")[0])
    embedder = SentenceEmbedder(config["embedder"])
    docs = []
    for row in anchors.itertuples(index=False):
        text = cot.loc[row.doc_id, "cot"] if row.doc_id in cot.index else ""
        units = token_units(tok, text)  # contiguous: join == text
        docs.append((row.doc_id, units[:early_tokens], units[early_tokens:], list(row.anchors), row.anchor_text,
                     [space.title[lab] for lab in row.near_misses]))
    # One batched, de-duplicated pass over every text the curves need; the loop then hits the cache.
    embedder.encode([t for d in docs for t in needed_texts(*d[1:], max_points=tcfg["max_points"])])
    curves, summaries = [], []
    for doc in docs:
        points, summary = document_trajectories(*doc, embedder, n_grid=tcfg["n_grid"], max_points=tcfg["max_points"])
        curves += points
        summaries.append(summary)
    curves_df = pd.DataFrame(curves, columns=["doc_id", "phase", "t", "value"])
    summary_df = pd.DataFrame(summaries)
    curves_df.insert(0, "model", model)
    summary_df.insert(0, "model", model)
    log.info("trajectories %s: %d documents, mean Focus %.3f, mean Confusion %.3f, NaN reasons %s",
             model, len(summary_df), summary_df["focus"].mean(), summary_df["confusion"].mean(),
             summary_df["reason"].replace("", "ok").value_counts().to_dict())
    write_parquet(summary_df, summary_path)
    write_parquet(curves_df, curves_path)


def run_figure1(config: dict, dataset: str, curve_paths: list[str], out_png: str | Path) -> None:
    from .plots import figure1

    curves = pd.concat([read_parquet(p) for p in curve_paths], ignore_index=True)
    figure1(curves, str(out_png), title=f"{dataset}: Reasoning Focus and Near-Miss Confusion")


def run_head_scores(config: dict, model: str, cot_path: str | Path, anchors_path: str | Path,
                    prompts_path: str | Path, docs_path: str | Path, labels_path: str | Path,
                    coarse_path: str | Path, refine_path: str | Path, example_path: str | Path) -> None:
    """-> heads/coarse.parquet, heads/refine.parquet, heads/coarse_example.parquet for `model`,
    teacher-forced on the teacher's CoT (so students are scored on the same sequences)."""
    from .characterize import score_heads
    from .models import load_model
    from .teacher_forcing import forced_sequence

    hcfg = config["heads"]
    model_obj, tok = load_model(config, model, device=hcfg["device"], dtype=hcfg["dtype"])
    docs, prompts, cot, anchors, space = load_split(docs_path, prompts_path, cot_path, anchors_path, labels_path,
                                                    hcfg.get("max_docs"))
    documents = [dict(doc_id=row["doc_id"],
                      seq=forced_sequence(tok, prompts.loc[row["doc_id"], "messages"], cot.loc[row["doc_id"], "cot"], row),
                      anchors=list(row["anchors"]),
                      gold_titles=[space.title[g] for g in docs.loc[row["doc_id"], "labels"]],
                      nearmiss_titles=[space.title[n] for n in row["near_misses"]])
                 for _, row in anchors.iterrows()]
    coarse, refine, example = score_heads(model_obj, tok, documents, tau=hcfg["tau"], n_stages=hcfg["n_stages"],
                                          desc=f"head scores {model}")
    for name, table in (("CoarseScore", coarse), ("RefineScore", refine)):
        top = table.dropna(subset=["score"]).nlargest(5, "score")
        log.info("%s top-5 heads of %s: %s", name, model,
                 ", ".join(f"L{r.layer}H{r.head}={r.score:.4g}" for r in top.itertuples()))
    write_parquet(example, example_path)
    write_parquet(refine, refine_path)
    write_parquet(coarse, coarse_path)


def run_head_figures(config: dict, dataset: str, coarse_path: str | Path, refine_path: str | Path,
                     example_path: str | Path, figure4_path: str | Path, figure7_path: str | Path) -> None:
    from .plots import figure4, figure7

    teacher, top_k = config["teacher"], config["heads"]["top_k"]
    figure4(read_parquet(coarse_path), read_parquet(example_path), figure4_path,
            f"{dataset}, {teacher}: Phase 1 heads", top_k=top_k)
    figure7(read_parquet(refine_path), figure7_path, f"{dataset}, {teacher}: Phase 2 heads", top_k=top_k)


def patching_paths(summary_path: str | Path) -> dict[str, Path]:
    """patching/{phase}.parquet -> its companions {phase}_runs.parquet (every run) and
    {phase}_pairs.parquet (the clean/corrupted documents, rejected ones with the reason)."""
    summary = Path(summary_path)
    return {"summary": summary, "runs": summary.with_name(summary.stem + "_runs.parquet"),
            "pairs": summary.with_name(summary.stem + "_pairs.parquet")}


def run_patching(config: dict, phase: str, docs_path: str | Path, prompts_path: str | Path,
                 cot_path: str | Path, anchors_path: str | Path, labels_path: str | Path,
                 head_scores_path: str | Path, summary_path: str | Path) -> None:
    """Activation patching of the teacher for one phase -> patching/{phase}.parquet (+ _runs, _pairs)."""
    import hashlib
    import json
    import shutil
    import time

    from tqdm.auto import tqdm

    from .embed import SentenceEmbedder
    from .models import load_model, spec_key
    from .patch_experiment import (
        anchor_words,
        confusion_metric,
        document_region,
        early_cot_prefix,
        encode,
        focus_metric,
        peak_terms,
        phase1_pair,
        phase2_pair,
        run_document,
    )
    from .patch_runs import DocumentRuns, HeadSet
    from .patching import control_head_sets, document_effects, summarize_effects
    from .prompts import render_prompt
    from .segment import token_offsets

    pcfg, teacher = config["patching"], config["teacher"]
    early_tokens = pcfg.get("early_tokens") or config["anchors"]["early_tokens"]
    n_steps = early_tokens if phase == "phase1" else pcfg["late_tokens"]
    started = time.perf_counter()
    model, tok = load_model(config, teacher, device=pcfg["device"], dtype=pcfg["dtype"])
    embedder = SentenceEmbedder(config["embedder"])
    docs, prompts, cot, anchors, space = load_split(docs_path, prompts_path, cot_path, anchors_path, labels_path,
                                                    pcfg.get("max_docs"))
    scores = read_parquet(head_scores_path).dropna(subset=["score"]).sort_values("score", ascending=False, kind="stable")
    ranked = [(int(r.layer), int(r.head)) for r in scores.itertuples()]
    paths_out = patching_paths(summary_path)
    if not ranked:  # e.g. no document has refinement positions: nothing to rank, say so and move on
        log.warning("%s: no head has a finite score, so there is nothing to patch for %s; writing empty tables "
                    "(check the head_scores log: the documents may have no early / refinement positions)",
                    head_scores_path, phase)
        write_parquet(pd.DataFrame(columns=["doc_id", "phase", "aligned", "reason"]), paths_out["pairs"])
        write_parquet(pd.DataFrame(columns=["doc_id", "direction", "kind", "k", "seed", "value"]), paths_out["runs"])
        empty = summarize_effects(pd.DataFrame(columns=["direction", "kind", "k", "metric", "effect"]))
        write_parquet(empty.assign(phase=phase)[["phase", *empty.columns]], paths_out["summary"])
        return
    head_sets = [HeadSet(kind, k, seed, heads)
                 for k, sets in control_head_sets(ranked, pcfg["bins"], pcfg["n_random"], config["seed"]).items()
                 for kind, seed, heads in [("top", 0, sets["top"]), ("lowest", 0, sets["lowest"])]
                 + [("random", i, s) for i, s in enumerate(sets["random"])]]
    record_heads = sorted({h for s in head_sets for h in s.heads} | set(ranked[:pcfg["peak_heads"]]))
    rep_penalty = config["generation"]["repetition_penalty"]
    log.info("patching %s %s: %d documents, %d ranked heads, %d head sets per direction (bins %s), %d steps",
             teacher, phase, len(anchors), len(ranked), len(head_sets), sorted({s.k for s in head_sets}), n_steps)
    rows, pairs = [], []
    # one JSON file per finished document: a killed job resumes after its last finished document
    key = hashlib.sha1(json.dumps([phase, pcfg, early_tokens, spec_key(config, teacher), config["embedder"],
                                   rep_penalty, ranked, config["seed"]], sort_keys=True).encode()).hexdigest()[:16]
    shard_dir = paths_out["summary"].parent / f".{phase}.docs-{key}"
    for stale in paths_out["summary"].parent.glob(f".{phase}.docs-*"):
        if stale != shard_dir:
            shutil.rmtree(stale, ignore_errors=True)
    bar = tqdm(total=len(anchors) * 2 * len(head_sets), desc=f"patching {phase} (document x head set x direction)",
               unit="run")
    for row in anchors.itertuples(index=False):
        doc_id = row.doc_id
        shard = shard_dir / f"{hashlib.sha1(str(doc_id).encode()).hexdigest()[:16]}.json"
        if shard.exists():
            done = json.loads(shard.read_text())
            rows += done["rows"]
            pairs.append(done["pair"])
            bar.update(2 * len(head_sets))
            continue
        prompt_text = render_prompt(tok, json.loads(prompts.loc[doc_id, "messages"]))
        document = docs.loc[doc_id, "text"]
        runs = DocumentRuns(model, n_steps, record_heads, rep_penalty)
        if phase == "phase1":
            runs.reference("clean", encode(tok, prompt_text))
            region = document_region(prompt_text, document)
            peaks = (peak_terms(runs, ranked[:pcfg["peak_heads"]], prompt_text, token_offsets(tok, prompt_text),
                                region, pcfg["peak_terms"]) if region else [])
            pair = phase1_pair(doc_id, prompt_text, document, anchor_words(list(row.anchors)) + peaks, tok,
                               pad=pcfg["pad"])
            metric = focus_metric(tok, embedder, list(row.anchors))
        else:
            near_titles = [space.title[n] for n in row.near_misses]
            pair = phase2_pair(doc_id, prompt_text, document, early_cot_prefix(tok, cot.loc[doc_id, "cot"], early_tokens),
                               list(docs.loc[doc_id, "labels"]), list(row.near_misses), space.title, tok,
                               value_swaps=pcfg["value_swaps"], pad=pcfg["pad"])
            if pair.aligned and not near_titles:
                pair.aligned, pair.reason = False, "no near-misses (Confusion undefined)"
            if pair.aligned:
                runs.reference("clean", pair.clean_ids)
            metric = confusion_metric(tok, embedder, row.anchor_text, near_titles)
        doc_rows = []
        if pair.aligned:
            doc_rows = run_document(runs, pair, head_sets, pcfg["batch_size"], tok, metric, on_batch=bar.update)
        else:
            bar.update(2 * len(head_sets))
        rows += doc_rows
        pairs.append(pair.record())
        write_json(shard, {"rows": doc_rows, "pair": pairs[-1]})
    bar.close()
    pairs_df = pd.DataFrame(pairs)
    runs_df = pd.DataFrame(rows, columns=["doc_id", "direction", "kind", "k", "seed", "value", "clean_value",
                                          "corrupt_value", "text"])
    patched = runs_df[runs_df["direction"] != "reference"]
    summary = (summarize_effects(document_effects(patched, pcfg["min_gap"]), pcfg["n_bootstrap"], config["seed"])
               if len(patched) else summarize_effects(pd.DataFrame(columns=["direction", "kind", "k", "metric", "effect"])))
    summary.insert(0, "phase", phase)
    n_aligned = int(pairs_df["aligned"].sum()) if len(pairs_df) else 0
    log.info("patching %s: %d/%d pairs aligned; rejected: %s", phase, n_aligned, len(pairs_df),
             pairs_df.loc[~pairs_df["aligned"], "reason"].str.split(":").str[0].value_counts().to_dict()
             if len(pairs_df) else {})
    if not n_aligned:
        log.warning("patching %s: no aligned clean/corrupted pair; the effects table is empty", phase)
    else:
        refs = runs_df[runs_df["direction"] == "reference"].pivot(index="doc_id", columns="kind", values="value")
        log.info("patching %s: mean metric clean %.4f, corrupted %.4f (over %d documents)", phase,
                 refs["clean"].mean(), refs["corrupt"].mean(), len(refs))
        main = summary[summary["metric"].isin(["restoration", "disruption"])]
        for r in main.itertuples():
            log.info("  %-7s %-6s k=%-3d %s %.3f [%.3f, %.3f] (n=%d)", r.direction, r.head_set, r.k, r.metric,
                     r.effect, r.ci_low, r.ci_high, r.n_docs)
    log.info("patching %s took %.1f s", phase, time.perf_counter() - started)
    write_parquet(pairs_df, paths_out["pairs"])
    write_parquet(runs_df, paths_out["runs"])
    write_parquet(summary, paths_out["summary"])
    shutil.rmtree(shard_dir, ignore_errors=True)


def run_patching_figure(config: dict, dataset: str, phase: str, summary_path: str | Path, out_png: str | Path) -> None:
    from .plots import patching_figure

    number = {"phase1": 5, "phase2": 8}[phase]
    what = {"phase1": "Reasoning Focus (CoarseScore heads)", "phase2": "Near-Miss Confusion (RefineScore heads)"}[phase]
    patching_figure(read_parquet(summary_path), out_png,
                    f"Figure {number} - {dataset}, {config['teacher']}: patching {what}",
                    relative=phase == "phase2")
