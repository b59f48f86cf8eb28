"""Semantic anchors, near-miss labels and the CoT shortlist of one document (App. B).

- anchors A(x): texts of the gold labels (optionally of their ontological ancestors), or, when a
  dataset has no labels, key concepts an auxiliary LLM extracts from the document;
- anchor text: the short fixed text listing them (prefix of Near-Miss Confusion);
- near-misses: plausible but wrong labels (hierarchy neighbours, embedding neighbours, labels the
  CoT names and rules out); never gold;
- shortlist: labels the CoT mentions and keeps.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

from .labels import LabelSpace
from .segment import find_mentions, ruled_out

NEAR_MISS_STRATEGIES = ("hierarchy", "embedding", "cot")
CONCEPTS_OPEN, CONCEPTS_CLOSE = "<concepts>", "</concepts>"


# ---------------------------------------------------------------- anchors from labels

def label_anchors(gold: list[str], space: LabelSpace, ancestor_levels: int = 0) -> list[str]:
    """Titles of the gold labels, then of their first `ancestor_levels` ancestors (deduplicated)."""
    texts = [space.title.get(g, g) for g in gold]
    for g in gold:
        texts += [space.title.get(a, a) for a in space.ancestors.get(g, [])[:ancestor_levels]]
    return list(dict.fromkeys(t.strip() for t in texts if t and t.strip()))


def anchor_text(anchors: list[str]) -> str:
    """The fixed anchor text: "Key concepts: a; b; c." ("" when there are no anchors)."""
    anchors = [a.strip().rstrip(".") for a in anchors if a.strip()]
    return f"Key concepts: {'; '.join(anchors)}." if anchors else ""


# ---------------------------------------------------------------- anchors from an auxiliary LLM

def concept_prompt(document: str, max_concepts: int = 5) -> list[dict]:
    """Chat asking for the document's key concepts inside <concepts>...</concepts>."""
    return [
        {"role": "system", "content": "You extract the key concepts of a document."},
        {"role": "user", "content": (
            f"List at most {max_concepts} short key concepts (2-5 words each) of the document below, "
            f"one per line, between {CONCEPTS_OPEN} and {CONCEPTS_CLOSE}.\n\n"
            f"Document:\n{document.strip()}")},
    ]


_BULLET = re.compile(r"^\s*(?:[-*•·>]+|\(?\d+[.):]|\(?[a-zA-Z][.)])\s*")


def parse_concepts(output: str, max_concepts: int = 5) -> list[str]:
    """Concepts from a generation: the <concepts> block if any (else the whole text), split at
    newlines and ";", bullets/numbering/quotes stripped, deduplicated (case-insensitive), capped."""
    text = output or ""
    start = text.find(CONCEPTS_OPEN)
    if start >= 0:
        text = text[start + len(CONCEPTS_OPEN):]
        end = text.find(CONCEPTS_CLOSE)
        text = text[:end] if end >= 0 else text
    out: dict[str, str] = {}
    for item in re.split(r"[;\n]+", text):
        item = _BULLET.sub("", item).strip().strip("\"'`*_.,:").strip()
        item = re.sub(r"</?\w*>?", "", item).strip()     # stray or partial tags
        if item and any(ch.isalnum() for ch in item) and len(item) <= 100:
            out.setdefault(item.casefold(), item)
    return list(out.values())[:max_concepts]


def extract_concepts(generate_fn: Callable[[list[list[dict]]], list[str]], documents: list[str],
                     max_concepts: int = 5) -> list[list[str]]:
    """Key concepts per document; `generate_fn(chats) -> texts`, e.g.
    `lambda chats: [g.text for g in TransformersBackend(...)(chats)]`."""
    if not documents:
        return []
    outputs = generate_fn([concept_prompt(d, max_concepts) for d in documents])
    return [parse_concepts(o, max_concepts) for o in outputs]


# ---------------------------------------------------------------- near-misses and shortlist

def cot_near_misses(cot: str, gold: list[str], candidates: list[str] | None, space: LabelSpace) -> list[str]:
    """Non-gold labels the CoT names right after a contrast cue ("rather than", "not", ...)."""
    mentions = find_mentions(cot, space, candidates)
    labs = [lab for (_, _, lab), out in zip(mentions, ruled_out(cot, mentions)) if out]
    return [lab for lab in dict.fromkeys(labs) if lab not in set(gold)]


def embedding_near_misses(gold: list[str], candidates: list[str] | None, space: LabelSpace,
                          embedder, n: int) -> list[str]:
    """The `n` non-gold labels whose titles are nearest (cosine) to the centroid of the gold titles,
    among the candidates (or all assignable labels)."""
    gold_titles = [space.title[g] for g in gold if g in space.title]
    pool = [lab for lab in (candidates if candidates else space.assignable) if lab not in set(gold)]
    if not gold_titles or not pool or n <= 0:
        return []
    centroid = embedder.encode(gold_titles).mean(0)                          # [d]
    sims = embedder.encode([space.title[lab] for lab in pool]) @ centroid     # [pool]
    order = np.argsort(-sims, kind="stable")[:n]
    return [pool[i] for i in order]


def near_misses(gold: list[str], cot: str, candidates: list[str] | None, space: LabelSpace,
                strategies: list[str], n: int, embedder=None) -> list[str]:
    """Union of the strategies' near-misses, in the order of `strategies`, capped at `n`, never gold.

    "hierarchy": siblings, then cousins (LabelSpace.hierarchy_near_misses); when candidates are
    given, those among the candidates come first. "embedding": nearest titles to the gold centroid
    (needs `embedder`). "cot": labels the CoT rules out.
    """
    unknown = set(strategies) - set(NEAR_MISS_STRATEGIES)
    if unknown:
        raise ValueError(f"unknown near-miss strategies {sorted(unknown)}; use {NEAR_MISS_STRATEGIES}")
    gold_set, out = set(gold), []
    for strategy in strategies:
        if strategy == "hierarchy":
            if candidates:
                ranked = space.hierarchy_near_misses(gold, len(space.assignable))
                cand = set(candidates)
                found = ([c for c in ranked if c in cand] + [c for c in ranked if c not in cand])[:n]
            else:
                found = space.hierarchy_near_misses(gold, n)
        elif strategy == "embedding":
            if embedder is None:
                raise ValueError("near-miss strategy 'embedding' needs an embedder")
            found = embedding_near_misses(gold, candidates, space, embedder, n)
        else:
            found = cot_near_misses(cot, gold, candidates, space)
        out += [lab for lab in found if lab not in gold_set and lab not in out]
    return out[:n]


def shortlist(cot: str, candidates: list[str] | None, space: LabelSpace) -> list[str]:
    """Labels the CoT mentions and keeps (at least one mention not right after a contrast cue),
    in order of first mention. IDs count for any label of the space, titles for the candidates."""
    mentions = find_mentions(cot, space, candidates)
    kept = [lab for (_, _, lab), out in zip(mentions, ruled_out(cot, mentions)) if not out]
    return list(dict.fromkeys(kept))
