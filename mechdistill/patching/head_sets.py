"""Head sets to patch: cumulative bins of the top-ranked heads and count-matched controls
(random heads, lowest-ranked heads), as in Figs 5 and 8."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np

from ..characterize.attention import Head

DEFAULT_BINS: tuple[int, ...] = (3, 8, 16, 40, 100)


def cumulative_bins(ranked_heads: Sequence[Head], bins: Sequence[int] = DEFAULT_BINS) -> dict[int, list[Head]]:
    """{k: top-k heads} for each bin size, capped at the number of heads; bins that become equal
    after capping appear once (30 heads -> keys 3, 8, 16, 30)."""
    heads = [tuple(h) for h in ranked_heads]
    sizes = sorted({min(int(b), len(heads)) for b in bins if b > 0})
    return {k: heads[:k] for k in sizes if k > 0}


def lowest_heads(ranked_heads: Sequence[Head], k: int) -> list[Head]:
    """The k lowest-ranked heads (the ranking's last k, lowest first), capped at the head count."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return [tuple(h) for h in reversed(ranked_heads)][:k]


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


def control_head_sets(ranked_heads: Sequence[Head], bins: Sequence[int] = DEFAULT_BINS, n_random: int = 3,
                      seed: int = 0) -> dict[int, dict[str, list]]:
    """Per bin size k: {"top": top-k, "lowest": k lowest-ranked, "random": n_random count-matched
    random sets drawn from all ranked heads}."""
    return {k: {"top": top, "lowest": lowest_heads(ranked_heads, k),
                "random": random_head_sets(ranked_heads, k, min(n_random, math.comb(len(ranked_heads), k)),
                                           seed=seed + k)}
            for k, top in cumulative_bins(ranked_heads, bins).items()}


