"""Clean prompts for characterization (Sec. 2): a short snippet with a strong coarse signal,
followed by a long, multi-domain label list, zero-shot.

The task prompts (`prompts.build_prompts`) are what the students are distilled on; they may guide
the model ("first name the broad area, then rule out close alternatives") and show a worked
exemplar. Characterizing the teacher on such prompts would measure the instruction, not the
mechanism. Head scores and patching therefore read this separate set:

- snippet: the `snippet_sentences` sentences (lines) of a source document most similar to its gold
  labels' titles, in document order, at most `snippet_chars` characters: the coarse signal;
- label list: the gold labels, `n_near_miss` near-misses (hierarchy siblings and cousins, or the
  nearest titles by embedding when the label space has no hierarchy), and distractors drawn in
  turn from every other top-level area of the hierarchy (ICD-10-CM chapters), or uniformly from
  the label space without one (LF-WikiSeeAlso titles span every domain), up to `n_labels`, shuffled;
- style: `neutral` (choose the labels, reasoning step by step before the answer; no word about
  phases: an Instruct teacher asked only for labels answers at once: an empty CoT has no early
  queries, and a one-line one rarely a refinement position), `guided` (a phase-teaching system prompt and
  instruction, `GUIDED_SYSTEM` / `GUIDED_INSTRUCTION`, fixed here so that it stays guided whatever
  the task prompts say), each optionally with a one-shot exemplar (`*_exemplar`) whose worked answer
  is `prompts.exemplar_answer` in the same style.

The style is recorded in the prompt rows (`prompt_style`, `exemplar`) and in the split's name
(`paths.clean_split`), so every artifact downstream says which prompts it measured.
"""

from __future__ import annotations

import json
import random
import re
from collections import defaultdict

import numpy as np
import pandas as pd

from ..labels import LabelSpace
from .prompts import build_messages, exemplar_answer, format_user_prompt

STYLES = ("neutral", "guided", "neutral_exemplar", "guided_exemplar")
NEUTRAL_SYSTEM = "You are an expert annotator."
NEUTRAL_INSTRUCTION = ("Choose the labels from the list that apply to the text. Reason step by step before you "
                       "answer, and close with the chosen labels as <answer>ID; ID</answer>.")
GUIDED_SYSTEM = "You are an expert annotator. Reason briefly, then answer with labels from the candidate list."
GUIDED_INSTRUCTION = ("Choose the labels that apply to the document. First name the broad area, then rule out "
                      "close alternatives, then give the final labels as <answer>ID; ID</answer>.")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def parse_style(style: str) -> tuple[str, bool]:
    """'guided_exemplar' -> ('guided', True); errors name the allowed styles."""
    if style not in STYLES:
        raise ValueError(f"unknown clean-prompt style {style!r}; allowed: {', '.join(STYLES)}")
    base, _, exemplar = style.partition("_")
    return base, bool(exemplar)


def sentences(text: str) -> list[str]:
    """Lines and sentences of a document, stripped, empty ones dropped."""
    return [s.strip() for s in _SENTENCE.split(text) if s and s.strip()]


def snippet(text: str, gold_titles: list[str], embedder, n_sentences: int, max_chars: int) -> str:
    """The `n_sentences` sentences most similar (cosine, max over gold titles) to the gold labels, in
    document order, cut to `max_chars` characters (whole sentences; the best one always kept)."""
    sents = sentences(text)
    if len(sents) <= n_sentences and len(text) <= max_chars:
        return "\n".join(sents)
    sim = (embedder.encode(sents) @ embedder.encode(gold_titles).T).max(1)   # [sentences]
    chosen: list[int] = []
    for i in np.argsort(-sim, kind="stable")[:n_sentences]:
        if not chosen or sum(len(sents[j]) + 1 for j in chosen) + len(sents[i]) <= max_chars:
            chosen.append(int(i))
    return "\n".join(sents[i] for i in sorted(chosen))[:max_chars]


def near_misses(gold: list[str], space: LabelSpace, n: int, embedder) -> list[str]:
    """Hierarchy near-misses when the space has a hierarchy, else the nearest titles by embedding."""
    if n == 0:
        return []
    if space.has_hierarchy:
        return space.hierarchy_near_misses(gold, n)
    labels = space.assignable
    sim = (embedder.encode([space.title[g] for g in gold]) @ embedder.encode([space.title[x] for x in labels]).T).max(0)
    return [labels[i] for i in np.argsort(-sim, kind="stable") if labels[i] not in gold][:n]


def multi_domain_list(gold: list[str], near: list[str], space: LabelSpace, n_labels: int, rng: random.Random,
                      max_title_chars: int = 90) -> list[str]:
    """Gold + near-misses + distractors up to `n_labels` (every gold label kept), shuffled.

    With a hierarchy, distractors come in turn from each top-level area other than the gold ones
    (one label per area per round), so the list spans every area; without one, uniformly at random.
    """
    chosen = list(dict.fromkeys(list(gold) + list(near)))
    pool = [lab for lab in space.assignable if lab not in chosen and len(space.title[lab]) <= max_title_chars]
    if space.has_hierarchy:
        gold_roots = {space.root(g) for g in gold}
        by_root: dict[str, list[str]] = defaultdict(list)
        for lab in pool:
            if space.root(lab) not in gold_roots:
                by_root[space.root(lab)].append(lab)
        queues = [rng.sample(labs, len(labs)) for _, labs in sorted(by_root.items())]
        while len(chosen) < n_labels and any(queues):
            for queue in queues:
                if queue and len(chosen) < n_labels:
                    chosen.append(queue.pop())
    else:
        chosen += rng.sample(pool, min(len(pool), max(0, n_labels - len(chosen))))
    rng.shuffle(chosen)
    return chosen


def build_clean_prompts(docs: pd.DataFrame, space: LabelSpace, settings: dict, style: str, seed: int, embedder,
                        exemplar_doc: pd.Series | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Source documents -> (clean documents, their prompts).

    docs: doc_id, text, labels (a source split); settings: the `clean_prompts` config (n_docs,
    n_labels, n_near_miss, snippet_sentences, snippet_chars); exemplar_doc: a training document for
    the exemplar styles. Returns documents (doc_id "clean-<source id>", text = snippet, labels, source_doc_id)
    and prompts (doc_id, candidates, prompt, messages, gold_in_candidates, prompt_style, exemplar).
    """
    base, with_exemplar = parse_style(style)
    system, instruction = (GUIDED_SYSTEM, GUIDED_INSTRUCTION) if base == "guided" else (NEUTRAL_SYSTEM, NEUTRAL_INSTRUCTION)
    docs = docs.head(settings["n_docs"]) if settings.get("n_docs") else docs

    def one(doc_id: str, text: str, gold: list[str]) -> tuple[str, list[str]]:
        rng = random.Random(f"{seed}:clean:{doc_id}")
        near = near_misses(gold, space, settings["n_near_miss"], embedder)
        return (snippet(text, [space.title[g] for g in gold], embedder, settings["snippet_sentences"],
                        settings["snippet_chars"]),
                multi_domain_list(gold, near, space, settings["n_labels"], rng))

    exemplar = None
    if with_exemplar:
        if exemplar_doc is None:
            raise ValueError(f"clean-prompt style {style!r} needs an exemplar document; the train split is empty")
        gold = list(exemplar_doc["labels"])
        text, cands = one(f"exemplar:{exemplar_doc['doc_id']}", exemplar_doc["text"], gold)
        exemplar = (format_user_prompt(text, cands, space, instruction), exemplar_answer(gold, cands, space, base))
    doc_rows, prompt_rows = [], []
    for doc_id, text, gold in docs[["doc_id", "text", "labels"]].itertuples(index=False):
        gold = list(gold)
        snip, cands = one(doc_id, text, gold)
        user = format_user_prompt(snip, cands, space, instruction)
        doc_rows.append((f"clean-{doc_id}", snip, gold, doc_id))
        prompt_rows.append((f"clean-{doc_id}", cands, user, json.dumps(build_messages(user, system, exemplar)),
                            1.0, style, with_exemplar))
    return (pd.DataFrame(doc_rows, columns=["doc_id", "text", "labels", "source_doc_id"]),
            pd.DataFrame(prompt_rows, columns=["doc_id", "candidates", "prompt", "messages", "gold_in_candidates",
                                               "prompt_style", "exemplar"]))
