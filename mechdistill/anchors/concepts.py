"""Semantic anchors A(x) of a document (App. B): the texts its labels are about.

- from labels: the titles of the gold labels, optionally with their ontological ancestors;
- from an auxiliary LLM, when a dataset has no usable label texts: key concepts it extracts;
- the anchor text: the short fixed text listing them (the prefix of Near-Miss Confusion).
"""

from __future__ import annotations

import re
from collections.abc import Callable

from ..labels import LabelSpace

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
