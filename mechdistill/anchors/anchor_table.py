"""The anchors artifact: one row per document with its anchors, near-misses, shortlist and CoT spans.

Columns: doc_id, anchors, anchor_text, near_misses, shortlist, early_span, refine_spans,
shortlist_spans, nearmiss_spans (character offsets into the CoT: mentions of the near-misses and of
any other label the CoT rules out), reason ("" when every span
could be found; otherwise why a later stage will get NaN, e.g. "empty CoT", "no near-misses"; a trace whose
prompt was too long to generate says so: "empty CoT (prompt_too_long)").
"""

from __future__ import annotations

import pandas as pd

from ..labels import LabelSpace
from ..text import token_offsets
from .concepts import anchor_text, label_anchors
from .near_misses import cot_near_misses, near_misses, shortlist
from .segment import segment_cot

COLUMNS = ["doc_id", "anchors", "anchor_text", "near_misses", "shortlist", "early_span", "refine_spans",
           "shortlist_spans", "nearmiss_spans", "reason"]


def _spans(spans) -> list[list[int]]:
    return [[int(a), int(b)] for a, b in spans]


def anchor_table(docs: pd.DataFrame, cot: pd.DataFrame, prompts: pd.DataFrame, space: LabelSpace, tokenizer,
                 settings: dict, embedder=None, concepts: list[list[str]] | None = None) -> pd.DataFrame:
    """Anchor rows of every document of `docs` (in its order).

    docs: doc_id, labels (gold); cot and prompts: indexed by doc_id (a document without a CoT
    row gets an empty CoT); tokenizer: the teacher's (the early span is its first
    `settings["early_tokens"]` CoT tokens); settings: config["anchors"]; embedder: needed by the
    "embedding" near-miss strategy; concepts: per document, anchors extracted by an LLM (None:
    the gold label titles, `label_anchors`).
    """
    strategies, n = settings["near_miss"]["strategies"], settings["near_miss"]["n"]
    rows = []
    for i, (doc_id, gold) in enumerate(zip(docs["doc_id"], docs["labels"])):
        text = cot.loc[doc_id, "cot"] if doc_id in cot.index else ""
        candidates, gold = list(prompts.loc[doc_id, "candidates"]), list(gold)
        anchors = concepts[i] if concepts is not None else label_anchors(gold, space, settings["ancestor_levels"])
        kept = shortlist(text, candidates, space)
        # Near-misses are alternatives the CoT does not keep: disjoint from the shortlist, so the
        # shortlist (S) and near-miss (N) positions of RefineScore never share a mention.
        near = [lab for lab in near_misses(gold, text, candidates, space, strategies, n + len(kept), embedder)
                if lab not in kept][:n]
        # N positions of RefineScore (Sec. 2: "subcategories previously shortlisted but since ruled out"):
        # mentions of the near-misses and of every label the CoT rules out. The near-miss list itself
        # (Confusion's centroid, the margin) need not read the CoT (anchors.near_miss.strategies).
        ruled = [lab for lab in cot_near_misses(text, gold, candidates, space) if lab not in kept and lab not in near]
        seg = segment_cot(text, token_offsets(tokenizer, text), settings["early_tokens"], kept, near + ruled, space,
                          candidates=candidates, patterns=settings.get("refine_patterns"))
        reason = seg["reason"] or ("no anchors" if not anchors else "")
        skipped = cot.loc[doc_id, "skipped"] if doc_id in cot.index and "skipped" in cot.columns else ""
        if isinstance(skipped, str) and skipped:  # never generated (teacher.backends.PROMPT_TOO_LONG)
            reason = f"{reason} ({skipped})"
        rows.append(dict(doc_id=doc_id, anchors=anchors, anchor_text=anchor_text(anchors), near_misses=near,
                         shortlist=kept, early_span=list(seg["early_span"]),
                         refine_spans=_spans(seg["refine_spans"]), shortlist_spans=_spans(seg["shortlist_spans"]),
                         nearmiss_spans=_spans(seg["nearmiss_spans"]), reason=reason))
    return pd.DataFrame(rows, columns=COLUMNS)


# ---------------------------------------------------------------- what a prompt style yields


def phase_yield(table: pd.DataFrame, styles: pd.Series) -> pd.DataFrame:
    """Per prompt style: how many of its CoTs the phase measurements can use.

    table: anchor rows (`anchor_table`); styles: the prompt style of each row (aligned with `table`,
    e.g. the clean prompts' `prompt_style`, or the split's name). A CoT has early queries when its
    early span is non-empty (CoarseScore, Phase 1 signals and patching query there) and refinement
    positions when it has a refine span (RefineScore, Phase 2). Returns one row per style (in order of
    first appearance): style, n_docs, n_early, n_refine, early_fraction, refine_fraction.
    """
    early = table["early_span"].map(lambda span: len(span) == 2 and span[1] > span[0]).to_numpy()   # [docs]
    refine = table["refine_spans"].map(len).gt(0).to_numpy()                                        # [docs]
    frame = pd.DataFrame({"style": list(styles), "early": early, "refine": refine})
    out = frame.groupby("style", sort=False).agg(n_docs=("early", "size"), n_early=("early", "sum"),
                                                 n_refine=("refine", "sum")).reset_index()
    out = out.astype({"n_docs": int, "n_early": int, "n_refine": int})
    return out.assign(early_fraction=out["n_early"] / out["n_docs"], refine_fraction=out["n_refine"] / out["n_docs"])


def phase_yield_warnings(yields: pd.DataFrame, min_fraction: float) -> list[str]:
    """One message per style and kind (early queries, refinement positions) whose fraction of CoTs is
    below `min_fraction` (`anchors.min_phase_fraction`): too few for Figs 4-8, the pools and claims 1-4."""
    messages = []
    for row in yields.itertuples():
        for kind, count, fraction in (("early queries", row.n_early, row.early_fraction),
                                      ("refinement positions", row.n_refine, row.refine_fraction)):
            if fraction < min_fraction:
                messages.append(f"prompt style {row.style}: only {count} of {row.n_docs} CoTs have {kind} "
                                f"({fraction:.0%} < anchors.min_phase_fraction {min_fraction:.0%}); the measurements "
                                f"that read them (head scores, pools, patching, claims) rest on few documents or are NaN")
    return messages
