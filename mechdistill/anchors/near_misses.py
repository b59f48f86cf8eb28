"""Near-miss labels and the CoT shortlist of one document (App. B).

- near-misses: plausible but wrong labels (hierarchy neighbours, embedding neighbours, labels the
  CoT names and rules out); never gold;
- shortlist: labels the CoT mentions and keeps.
"""

from __future__ import annotations

import numpy as np

from ..labels import LabelSpace
from .segment import find_mentions, ruled_out

NEAR_MISS_STRATEGIES = ("hierarchy", "embedding", "cot")


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
