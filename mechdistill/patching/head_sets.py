"""Head sets to patch: cumulative bins of the top-ranked heads and count-matched controls, as in
Figs 5 and 8. Each control answers a different question about the top set:

    near_zero       the k heads whose score is closest to 0 (|score| smallest): heads the score
                    calls inert, the negative control that should not move the metric
    most_negative   the ranking's last k (the lowest scores): heads strongly anti-aligned with the
                    phase's signal, which may well move the metric (the other way); not inert
    random          count-matched random heads (n_random seeds), drawn from every ranked head

near_zero and most_negative read a signed score: the ranking's own, or, for a ranking that clips
(RefineScore's both_positive), the signed product it clips (SIGNED_SCORE).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # only a type: the figures and claims that read head sets need no torch
    from ..characterize.attention import Head

DEFAULT_BINS: tuple[int, ...] = (3, 8, 16, 40, 100)
SIGNED_SCORE: dict[str, str] = {"refine_both_positive": "refine_product"}
"""Ranking variant (`score_variant` of a head table) -> the signed column the controls read instead of
`score`. both_positive sets every head without QK > 0 and OV > 0 to 0, lumping inert heads with
anti-aligned ones (QK < 0 or OV < 0); the product QK * OV keeps them apart."""
CONTROLS: tuple[str, ...] = ("near_zero", "most_negative", "random")
"""The control head sets every bin of top heads is compared with (`control_head_sets`)."""


def cumulative_bins(ranked_heads: Sequence[Head], bins: Sequence[int] = DEFAULT_BINS) -> dict[int, list[Head]]:
    """{k: top-k heads} for each bin size, capped at the number of heads; bins that become equal
    after capping appear once (30 heads -> keys 3, 8, 16, 30)."""
    heads = [tuple(h) for h in ranked_heads]
    sizes = sorted({min(int(b), len(heads)) for b in bins if b > 0})
    return {k: heads[:k] for k in sizes if k > 0}


def _check_k(k: int) -> None:
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")


def most_negative_heads(ranked_heads: Sequence[Head], k: int, scores: Sequence[float] | None = None) -> list[Head]:
    """The k heads with the lowest scores (lowest first), capped at the head count: the ranking's
    last k, or, given `scores` (scores[i] of ranked_heads[i], e.g. a signed control score), the k
    lowest of those (ties: the later-ranked first)."""
    _check_k(k)
    if scores is None:
        return [tuple(h) for h in reversed(ranked_heads)][:k]
    if len(scores) != len(ranked_heads):
        raise ValueError(f"{len(scores)} scores for {len(ranked_heads)} ranked heads")
    order = sorted(reversed(range(len(ranked_heads))), key=lambda i: float(scores[i]))
    return [tuple(ranked_heads[i]) for i in order[:k]]


def near_zero_heads(ranked_heads: Sequence[Head], scores: Sequence[float], k: int) -> list[Head]:
    """The k heads whose scores are closest to 0 (|score| smallest first; ties in ranking order),
    capped at the head count. scores[i] is the score of ranked_heads[i]."""
    _check_k(k)
    if len(scores) != len(ranked_heads):
        raise ValueError(f"{len(scores)} scores for {len(ranked_heads)} ranked heads")
    order = sorted(range(len(ranked_heads)), key=lambda i: abs(float(scores[i])))  # stable: ranking order on ties
    return [tuple(ranked_heads[i]) for i in order[:k]]


def random_head_sets(all_heads: Sequence[Head], k: int, n_seeds: int, seed: int = 0,
                     exclude: Iterable[Head] | None = None) -> list[list[Head]]:
    """`n_seeds` distinct random sets of k heads (each sorted), drawn from `all_heads` minus `exclude`.

    Deterministic for a given `seed`. Raises ValueError when k heads (or n_seeds distinct sets)
    cannot be drawn from the pool.
    """
    excluded = {tuple(h) for h in exclude or ()}
    pool = sorted({tuple(h) for h in all_heads} - excluded)
    if not 0 <= k <= len(pool):
        raise ValueError(f"cannot draw {k} heads from a pool of {len(pool)}")
    if math.comb(len(pool), k) < n_seeds:
        raise ValueError(f"only {math.comb(len(pool), k)} distinct sets of {k} heads exist; asked {n_seeds}")
    rng = np.random.default_rng(seed)
    sets: list[list[Head]] = []
    seen: set[frozenset] = set()
    while len(sets) < n_seeds:
        chosen = sorted(pool[i] for i in rng.choice(len(pool), size=k, replace=False))
        if frozenset(chosen) not in seen:
            seen.add(frozenset(chosen))
            sets.append(chosen)
    return sets


def control_head_sets(ranked_heads: Sequence[Head], scores: Sequence[float], bins: Sequence[int] = DEFAULT_BINS,
                      n_random: int = 3, seed: int = 0,
                      control_scores: Sequence[float] | None = None) -> dict[int, dict[str, list]]:
    """Per bin size k: {"top": top-k, "near_zero": the k scores closest to 0, "most_negative": the k
    lowest scores, "random": n_random count-matched random sets drawn from all ranked heads}.

    ranked_heads: every scored head, highest score first; scores: theirs, in the same order;
    control_scores: the signed scores near_zero and most_negative read (default `scores`; see
    SIGNED_SCORE), in the same order.
    """
    if any(a < b for a, b in zip(scores, scores[1:])):
        raise ValueError("ranked_heads must be sorted by descending score")
    signed = scores if control_scores is None else control_scores
    return {k: {"top": top, "near_zero": near_zero_heads(ranked_heads, signed, k),
                "most_negative": most_negative_heads(ranked_heads, k, signed),
                "random": random_head_sets(ranked_heads, k, min(n_random, math.comb(len(ranked_heads), k)),
                                           seed=seed + k)}
            for k, top in cumulative_bins(ranked_heads, bins).items()}


