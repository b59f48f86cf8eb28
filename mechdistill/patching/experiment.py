"""The activation-patching experiment of one document (Sec. 2, Figs 5 and 8).

Phase 1 (CoarseScore heads, metric Reasoning Focus F at the end of the generated early CoT):
    clean input     = the rendered prompt
    corrupted input = the prompt with the document's semantically loaded words made neutral: the
                      words of the anchors (gold label texts or LLM concepts) plus, with
                      `patching.phase1_corruption` "labels" (default), the words of the gold labels'
                      titles, or with "all_heads", the document words with the most attention mass
                      summed over EVERY head of the model in the clean run. Never the ranked heads':
                      a corruption defined by the heads whose restoration is then measured would
                      favour them (`phase1_document_pair`)
    generated       = the first `early_tokens` CoT tokens
Phase 2 (RefineScore heads, metric Near-Miss Confusion C of anchor text + generated late CoT):
    clean input     = the rendered prompt + the teacher's early CoT (its first `early_tokens` tokens)
    corrupted input = the same with the document steered toward a near-miss (the words that tell a
                      gold label from a near-miss sibling swapped, plus configured value swaps)
    generated       = the next `late_tokens` tokens (the late CoT)

Corruptions are made on the rendered prompt, only inside the document, and must keep the input's
token count in the patched model's tokenizer; pairs that cannot be aligned are rejected with a
reason (`Pair.reason`) and counted.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..anchors.embed import encode_windowed
from ..anchors.trajectories import centroid, confusion_prefixes, cosine, focus_curve
from ..characterize.attention import Head
from ..characterize.teacher_forcing import length_cap
from ..text import token_offsets, token_units
from .corruptions import (
    Corruption,
    find_occurrences,
    near_miss_swaps,
    occurrences_in,
    phase1_corruption,
    swap_corruption,
)
from .head_sets import control_head_sets
from .runs import DocumentRuns, HeadSet, heads_by_layer, model_heads, patched_runs

log = logging.getLogger(__name__)

STOPWORDS = frozenset("""
a an and are as at be been but by for from had has have he her his in into is it its not of on or
she that the their there these they this to was were which while who with without also after before
than then other other unspecified specified patient admitted admission discharge discharged summary
history hospital course reason year years old woman man male female known stable condition follow
specialty treated focused work note year-old follow-up work-up""".split())
PHASE1_CORRUPTIONS = ("labels", "all_heads")
"""`patching.phase1_corruption`: which words besides the anchors' a Phase-1 corruption neutralises."""


@dataclass
class Pair:
    """A clean/corrupted input pair of one document and phase, or why there is none."""

    doc_id: str
    phase: str
    aligned: bool
    reason: str
    clean_ids: torch.Tensor | None = None
    corrupt_ids: torch.Tensor | None = None
    corruption: Corruption | None = None
    region: tuple[int, int] = (0, 0)
    terms: list[str] = field(default_factory=list)
    term_sources: list[str] = field(default_factory=list)  # why each term is corrupted, as `terms`
    mode: str = ""  # how the terms were chosen: a PHASE1_CORRUPTIONS name, or "near_miss" (Phase 2)
    detail: str = ""  # Phase 2: "gold -> near-miss" used for the swaps

    def record(self) -> dict:
        """A Parquet row: the clean and corrupted document text and how they were made."""
        c = self.corruption
        start, end = self.region
        shift = len(c.corrupted) - len(c.clean) if c is not None else 0
        return dict(doc_id=self.doc_id, phase=self.phase, aligned=self.aligned, reason=self.reason,
                    clean=c.clean[start:end] if c else "", corrupted=c.corrupted[start:end + shift] if c else "",
                    n_replacements=len(c.replacements) if c else 0,
                    replacements=[f"{r.old} -> {r.new}" for r in c.replacements] if c else [],
                    corruption_mode=self.mode, terms=list(self.terms), term_sources=list(self.term_sources),
                    detail=self.detail,
                    n_tokens=int(self.clean_ids.numel()) if self.clean_ids is not None else 0)


PAIR_COLUMNS = list(Pair("", "", False, "").record())  # the pairs table's columns, in record() order


def document_region(prompt_text: str, document: str) -> tuple[int, int] | None:
    """Char span of the document inside the rendered prompt (the last occurrence: a one-shot
    exemplar comes first), or None."""
    doc = document.strip()
    start = prompt_text.rfind(doc) if doc else -1
    return None if start < 0 else (start, start + len(doc))


def content_words(texts: Sequence[str], min_len: int = 4) -> list[str]:
    """Content words of `texts` (anchors, label titles), lower-cased and sorted, stop-words and words
    shorter than `min_len` left out (one neutral word per replaced word keeps the token alignment easy)."""
    words = {w.lower() for text in texts for w in re.findall(r"[A-Za-z][A-Za-z-]+", text)}
    return sorted(w for w in words if len(w) >= min_len and w not in STOPWORDS)


def phase1_terms(document: str, sources: Mapping[str, Sequence[str]]) -> dict[str, str]:
    """{word: why} for the words a Phase-1 corruption neutralises: the words of each named source
    ({"anchor": [...], "gold label": [...]}) that occur in `document` (whole words, any case), in
    source order; a word of several sources names them all ("anchor, gold label")."""
    why: dict[str, list[str]] = {}
    for source, words in sources.items():
        for word in words:
            if find_occurrences(document, [word]):
                why.setdefault(word, []).append(source)
    return {word: ", ".join(names) for word, names in why.items()}


def peak_terms(runs: DocumentRuns, heads: Sequence[Head], text: str, offsets: list[tuple[int, int]],
               region: tuple[int, int], n_terms: int, min_len: int = 4) -> list[str]:
    """Document words the given heads (all recorded in the clean reference run) attend to most there.

    Attention mass of every (head, generated step) on the tokens inside `region` is summed per word
    (lower-cased) and the `n_terms` heaviest content words are returned. Sliding-window layers
    record only their window: key index i of a row at step t is absolute position P + t - kv + i.
    """
    tape, length = runs.refs["clean"].tape, runs.refs["clean"].prefix.length
    token_mass = np.zeros(len(offsets))
    for layer, layer_heads in heads_by_layer(heads).items():
        for t, row in enumerate(tape.rows.get(layer, [])):
            weights = row[0, layer_heads].double().sum(0).cpu().numpy()  # [kv]: summed over the heads
            first = length + t - weights.shape[0]
            inside = slice(max(first, 0), min(first + weights.shape[0], len(offsets)))
            token_mass[inside] += weights[inside.start - first: inside.stop - first]
    words = Counter()
    spans = [(m.start(), m.end(), m.group().lower()) for m in re.finditer(r"[A-Za-z][A-Za-z-]+", text[slice(*region)])]
    for (a, _end), mass in zip(offsets, token_mass):
        if mass <= 0 or not region[0] <= a < region[1]:
            continue
        for ws, we, word in spans:
            if ws <= a - region[0] < we:
                words[word] += mass
                break
    return [w for w, _ in words.most_common() if len(w) >= min_len and w not in STOPWORDS][:n_terms]


def encode(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


def phase1_pair(doc_id: str, prompt_text: str, document: str, terms: Mapping[str, str], tokenizer,
                pad: bool = True, mode: str = "") -> Pair:
    """Clean prompt and its Phase-1 corruption (terms made neutral inside the document).
    terms: {word: why it is corrupted} (`phase1_terms`); mode: how they were chosen (recorded)."""
    region = document_region(prompt_text, document)
    if region is None:
        return Pair(doc_id, "phase1", False, "document text not found in the rendered prompt", mode=mode)
    corruption = phase1_corruption(prompt_text, list(terms), tokenizer=tokenizer, pad=pad, region=region)
    pair = Pair(doc_id, "phase1", corruption.aligned, corruption.reason, encode(tokenizer, prompt_text),
                corruption=corruption, region=region, terms=list(terms), term_sources=list(terms.values()),
                mode=mode)
    if corruption.aligned:
        pair.corrupt_ids = encode(tokenizer, corruption.corrupted)
    return pair


def early_cot_prefix(tokenizer, cot: str, early_tokens: int) -> str:
    """The CoT's first `early_tokens` tokens as text (the Phase-2 runs start after them)."""
    return "".join(token_units(tokenizer, cot)[:early_tokens])


def phase2_pair(doc_id: str, prompt_text: str, document: str, cot_prefix: str, gold: Sequence[str],
                near_misses: Sequence[str], title: dict[str, str], tokenizer,
                value_swaps: dict[str, str] | None = None, pad: bool = True) -> Pair:
    """Clean prompt + early CoT and its Phase-2 corruption toward a near-miss.

    (gold, near-miss) pairs are tried in order; the first whose swaps occur in the document and keep
    the token count is used. The CoT prefix is appended to both texts and the whole must still align.
    """
    region = document_region(prompt_text, document)
    if region is None:
        return Pair(doc_id, "phase2", False, "document text not found in the rendered prompt", mode="near_miss")
    reasons = []
    for g in gold:
        for nm in near_misses:
            swaps = {**near_miss_swaps(g, nm, title), **(value_swaps or {})}
            if not swaps:
                continue
            if not occurrences_in(prompt_text, swaps, region):
                continue
            corruption = swap_corruption(prompt_text, swaps, tokenizer, pad=pad, region=region)
            sources = [("value swap" if term in (value_swaps or {}) else f"tells {g} from {nm}") for term in sorted(swaps)]
            pair = Pair(doc_id, "phase2", False, corruption.reason, encode(tokenizer, prompt_text + cot_prefix),
                        corruption=corruption, region=region, terms=sorted(swaps), term_sources=sources,
                        mode="near_miss", detail=f"{g} -> {nm}")
            if not corruption.aligned:
                reasons.append(f"{g} -> {nm}: {corruption.reason}")
                continue
            pair.corrupt_ids = encode(tokenizer, corruption.corrupted + cot_prefix)
            if pair.corrupt_ids.numel() != pair.clean_ids.numel():
                reasons.append(f"{g} -> {nm}: the CoT prefix tokenizes differently after the document")
                continue
            pair.aligned, pair.reason = True, "aligned"
            return pair
    reason = "; ".join(reasons) if reasons else "no distinguishing words of a near-miss occur in the document"
    return Pair(doc_id, "phase2", False, reason, mode="near_miss")


def generated_text(tokenizer, tokens: torch.Tensor) -> str:
    """Decode generated tokens up to (not including) the first special token (end of turn, EOS)."""
    ids = tokens.tolist()
    special = set(tokenizer.all_special_ids)
    cut = next((i for i, t in enumerate(ids) if t in special), len(ids))
    return tokenizer.decode(ids[:cut], skip_special_tokens=True)


def focus_metric(tokenizer, embedder, anchors: Sequence[str]) -> Callable[[list[str]], np.ndarray]:
    """texts -> Reasoning Focus F(T) of each generated early CoT (NaN for an empty one)."""
    anchor_c = centroid(list(anchors), embedder)

    def metric(texts: list[str]) -> np.ndarray:
        units = [token_units(tokenizer, t) for t in texts]
        embedder.encode(sorted({u for us in units for u in us}))  # one batched pass, then cached
        return np.array([focus_curve(us, anchor_c, embedder)[-1] if us else np.nan for us in units])

    return metric


def confusion_metric(tokenizer, embedder, anchor_text: str, nearmiss_texts: Sequence[str]
                     ) -> Callable[[list[str]], np.ndarray]:
    """texts -> Near-Miss Confusion C of anchor text + each generated late CoT."""
    near_c = centroid(list(nearmiss_texts), embedder)

    def metric(texts: list[str]) -> np.ndarray:
        units = [token_units(tokenizer, t) for t in texts]
        prefixes = [confusion_prefixes(anchor_text, us, [len(us)])[0] for us in units]  # anchor text + whole late CoT
        return cosine(encode_windowed(embedder, prefixes).astype(np.float64), near_c)  # whole text, in windows

    return metric


def generate_runs(runs: DocumentRuns, pair: Pair, head_sets: Sequence[HeadSet], batch_size: int, tokenizer,
                  on_batch=None) -> list[dict]:
    """Corrupted reference run + every patched run of an aligned pair (the clean reference must exist),
    before any metric -> one record per run, the two references first: direction, kind, k, seed, text."""
    runs.reference("corrupt", pair.corrupt_ids)
    patched = patched_runs(runs, head_sets, batch_size, on_batch=on_batch)
    references = [dict(direction="reference", kind=name, k=0, seed=0, tokens=runs.refs[name].tokens)
                  for name in ("clean", "corrupt")]
    return [dict(direction=r["direction"], kind=r["kind"], k=r["k"], seed=r["seed"],
                 text=generated_text(tokenizer, r["tokens"])) for r in references + patched]


def score_runs(doc_id: str, records: Sequence[dict], metric: Callable[[list[str]], np.ndarray]) -> list[dict]:
    """The metric of every generated text (`generate_runs`' records) -> one row per run: doc_id, direction,
    kind, k, seed, value, clean_value, corrupt_value, text."""
    values = metric([r["text"] for r in records])
    clean_value, corrupt_value = float(values[0]), float(values[1])
    return [dict(doc_id=doc_id, direction=r["direction"], kind=r["kind"], k=r["k"], seed=r["seed"],
                 value=float(v), clean_value=clean_value, corrupt_value=corrupt_value, text=r["text"])
            for r, v in zip(records, values)]


def control_sets(ranked: Sequence[Head], scores: Sequence[float], bins: Sequence[int], n_random: int,
                 seed: int, control_scores: Sequence[float] | None = None) -> list[HeadSet]:
    """Every head set one direction patches: per cumulative bin k, the top-k heads and their controls
    (`head_sets.control_head_sets`: near_zero, most_negative, `n_random` count-matched random sets).
    ranked: every scored head, highest score first; scores: theirs, in the same order; control_scores:
    the signed scores the controls read (default scores; `head_sets.SIGNED_SCORE`)."""
    return [HeadSet(kind, k, set_seed, heads)
            for k, sets in control_head_sets(ranked, scores, bins, n_random, seed, control_scores).items()
            for kind, set_seed, heads in [(kind, 0, sets[kind]) for kind in ("top", "near_zero", "most_negative")]
            + [("random", i, s) for i, s in enumerate(sets["random"])]]


def phase1_document_pair(runs: DocumentRuns, tokenizer, doc_id: str, prompt_text: str, document: str,
                         anchors: Sequence[str], gold_titles: Sequence[str], mode: str, n_peak_terms: int,
                         pad: bool = True) -> Pair:
    """One document's Phase-1 pair. The neutralised words never depend on the ranked heads:

        labels     the anchors' words and the gold labels' title words found in the document
        all_heads  the anchors' words and the `n_peak_terms` document words with the most attention
                   mass summed over every head of the model in the clean reference run (which this
                   runs; `runs` must record every head)
    """
    if mode not in PHASE1_CORRUPTIONS:
        raise ValueError(f"unknown Phase-1 corruption {mode!r}; expected one of {PHASE1_CORRUPTIONS}")
    sources = {"anchor": content_words(anchors)}
    region = document_region(prompt_text, document)
    if mode == "labels":
        sources["gold label"] = content_words(gold_titles)
    elif region is not None:
        runs.reference("clean", encode(tokenizer, prompt_text))
        sources["all-head peak"] = peak_terms(runs, model_heads(runs.model), prompt_text,
                                              token_offsets(tokenizer, prompt_text), region, n_peak_terms)
    return phase1_pair(doc_id, prompt_text, document, phase1_terms(document, sources), tokenizer, pad=pad, mode=mode)


@dataclass
class GeneratedDocument:
    """One document's runs for a phase, before the metric (`generate_document`): its pair and the records
    of its generated texts (empty when the pair is not aligned)."""

    phase: str
    pair: Pair
    records: list[dict]


def generate_document(phase: str, model, tokenizer, doc_id: str, prompt_text: str, document: str,
                      anchors: Sequence[str], cot: str, gold: Sequence[str], near_misses: Sequence[str],
                      titles: dict[str, str], head_sets: Sequence[HeadSet], settings: dict, early_tokens: int,
                      repetition_penalty: float, on_batch=None) -> GeneratedDocument:
    """The model's part of one document's experiment for `phase` (`patch_document`): the pair, the
    reference and patched runs, their generated texts. It touches no embedder, so documents may run
    it at once in threads (`inflight.in_flight`) while their metrics are taken in order (`score_document`)."""
    n_steps = early_tokens if phase == "phase1" else settings["late_tokens"]
    every_head = phase == "phase1" and settings["phase1_corruption"] == "all_heads"
    record_heads = model_heads(model) if every_head else sorted({h for s in head_sets for h in s.heads})
    runs = DocumentRuns(model, n_steps, record_heads, repetition_penalty)
    if phase == "phase1":
        pair = phase1_document_pair(runs, tokenizer, doc_id, prompt_text, document, anchors,
                                    [titles[g] for g in gold if g in titles], settings["phase1_corruption"],
                                    settings["peak_terms"], pad=settings["pad"])
    else:
        pair = phase2_pair(doc_id, prompt_text, document, early_cot_prefix(tokenizer, cot, early_tokens),
                           list(gold), list(near_misses), titles, tokenizer,
                           value_swaps=settings["value_swaps"], pad=settings["pad"])
        if pair.aligned and not near_misses:
            pair.aligned, pair.reason = False, "no near-misses (Confusion undefined)"
    cap = length_cap(settings.get("max_tokens"), model)
    if pair.aligned and cap is not None:
        longest = max(len(pair.clean_ids), len(pair.corrupt_ids)) + n_steps
        if longest > cap:
            pair.aligned, pair.reason = False, f"too long: {longest} tokens with the generated ones > max_tokens {cap}"
            log.warning("patching %s %s: %s", phase, doc_id, pair.reason)
    records = []
    if pair.aligned:
        if "clean" not in runs.refs:
            runs.reference("clean", pair.clean_ids)
        records = generate_runs(runs, pair, head_sets, settings["batch_size"], tokenizer, on_batch=on_batch)
    elif on_batch is not None:
        on_batch(2 * len(head_sets))
    return GeneratedDocument(phase, pair, records)


def score_document(generated: GeneratedDocument, tokenizer, embedder, anchors: Sequence[str], anchor_text: str,
                   near_misses: Sequence[str], titles: dict[str, str]) -> tuple[list[dict], dict]:
    """The metric of a generated document's texts -> (run rows, its pair record): Reasoning Focus of the
    anchors (Phase 1) or Near-Miss Confusion of anchor text + late CoT against the near-misses (Phase 2)."""
    if generated.phase == "phase1":  # made for every pair, as the embedder's cache has always been filled
        metric = focus_metric(tokenizer, embedder, list(anchors))
    else:
        metric = confusion_metric(tokenizer, embedder, anchor_text, [titles[n] for n in near_misses])
    rows = score_runs(generated.pair.doc_id, generated.records, metric) if generated.records else []
    return rows, generated.pair.record()


def patch_document(phase: str, model, tokenizer, embedder, doc_id: str, prompt_text: str, document: str,
                   anchors: Sequence[str], anchor_text: str, cot: str, gold: Sequence[str],
                   near_misses: Sequence[str], titles: dict[str, str], head_sets: Sequence[HeadSet],
                   settings: dict, early_tokens: int, repetition_penalty: float,
                   on_batch=None) -> tuple[list[dict], dict]:
    """One document's experiment for `phase` -> (run rows, its pair record).

    Phase 1: clean prompt vs the prompt with the anchors' words and, per
    `settings["phase1_corruption"]`, the gold labels' title words or the all-head peak terms made
    neutral (`phase1_document_pair`); `early_tokens` tokens generated; metric Reasoning Focus.
    Phase 2: prompt + the teacher's early CoT vs the same steered toward a near-miss;
    `settings["late_tokens"]` generated; metric Near-Miss Confusion. settings: config["patching"].
    A pair that cannot be aligned gives no runs (its record says why); `on_batch(n)` counts the
    head-set runs done (or skipped) of the 2 x len(head_sets). A pair longer than `settings["max_tokens"]`
    (default: the model's context) with its generated tokens is not run (reason "too long: ...").
    The model's part (`generate_document`) and the metric's (`score_document`) may also be called apart.
    """
    generated = generate_document(phase, model, tokenizer, doc_id, prompt_text, document, anchors, cot, gold,
                                  near_misses, titles, head_sets, settings, early_tokens, repetition_penalty,
                                  on_batch=on_batch)
    return score_document(generated, tokenizer, embedder, anchors, anchor_text, near_misses, titles)
