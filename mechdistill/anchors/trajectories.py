"""Reasoning Focus and Near-Miss Confusion trajectories (paper App. B, Fig. 1).

Focus      F(t) = (1/t) sum_{i<=t} cos(E(r_i), c(x))            r_i: i-th early CoT unit
Confusion  C(t) = cos(E(anchor_text + r_late[1..t]), c_near(x))

c(x) is the mean embedding of the anchor texts (gold labels, their ancestors, or LLM concepts),
c_near(x) the mean embedding of the near-miss label texts. Centroids of unit vectors are not
unit-norm, so every cosine here is a true cosine. Units are the CoT's tokens as text (from any
tokenizer, whitespace kept), so the curves are tokenizer-agnostic. The early / late split is the
teacher's: the early units are the model's tokens overlapping the character span of the TEACHER's
first `early_tokens` tokens of this CoT (`text.first_tokens_span`, `text.window_units`), so every
model's window covers the same text, whatever its tokenizer. A Confusion prefix longer
than the embedder reads (MiniLM: 256 word-pieces) is embedded whole, in windows
(`embed.encode_windowed`).

Normalised positions (Fig. 1): the early segment is stretched onto [0, boundary] (Focus panel),
the late segment onto [boundary, 1] (Confusion panel); boundary = 0.5.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
import pandas as pd
from scipy import stats

from ..labels import LabelSpace
from ..text import first_tokens_span, token_offsets, window_units
from .embed import encode_windowed, window_texts


class Embedder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...  # [n, d], unit-norm rows


def cosine(vectors: np.ndarray, target: np.ndarray) -> np.ndarray:
    """cos of each row of `vectors` [n, d] with `target` [d] -> [n]; NaN where a norm is 0."""
    norms = np.linalg.norm(vectors, axis=-1) * np.linalg.norm(target)  # [n]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norms > 0, vectors @ target / np.where(norms > 0, norms, 1.0), np.nan)


def centroid(texts: list[str], embedder: Embedder) -> np.ndarray | None:
    """Mean embedding of `texts` -> [d] (not unit-norm), or None for no texts."""
    if not texts:
        return None
    return embedder.encode(list(texts)).astype(np.float64).mean(axis=0)  # [d]


def focus_curve(early_units: list[str], anchor_centroid: np.ndarray, embedder: Embedder) -> np.ndarray:
    """F(1..T) for the T early units -> [T] (running mean of per-unit cosines)."""
    if not early_units:
        return np.zeros(0)
    unit_cos = cosine(embedder.encode(list(early_units)).astype(np.float64), anchor_centroid)  # [T]
    return np.cumsum(unit_cos) / np.arange(1, len(unit_cos) + 1)


def prefix_points(T: int, max_points: int | None) -> np.ndarray:
    """Prefix lengths t at which to evaluate: 1..T, or ~max_points evenly spaced incl. T -> [P]."""
    if max_points is None or T <= max_points:
        return np.arange(1, T + 1)
    return np.unique(np.round(np.linspace(1, T, max(max_points, 2))).astype(int))


def confusion_prefixes(anchor_text: str, late_units: list[str], t_index: np.ndarray, sep: str = " ") -> list[str]:
    """anchor_text + r_late[1..t] for each t (t = 0: the anchor text alone).

    `sep` goes between the two only when neither side has whitespace at the junction.
    """
    joiner = "" if anchor_text[-1:].isspace() or not late_units or late_units[0][:1].isspace() else sep
    return [anchor_text + joiner + "".join(late_units[:t]) if t > 0 else anchor_text for t in t_index]


def confusion_curve(anchor_text: str, late_units: list[str], nearmiss_centroid: np.ndarray, embedder: Embedder,
                    max_points: int | None = None, include_start: bool = False,
                    sep: str = " ") -> tuple[np.ndarray, np.ndarray]:
    """C(t) on anchor-text + late-prefix texts -> (t_index [P] ints, values [P]).

    t_index is 1..T, or ~max_points evenly spaced t always including T (embedding every prefix
    of a long CoT is costly); include_start prepends t = 0 (the anchor text alone).
    Units keep their own whitespace; `sep` is added after the anchor text only when needed.
    """
    t_index = prefix_points(len(late_units), max_points)
    if include_start:
        t_index = np.concatenate([[0], t_index]).astype(int)
    if len(t_index) == 0:
        return t_index, np.zeros(0)
    prefixes = confusion_prefixes(anchor_text, late_units, t_index, sep)
    return t_index, cosine(encode_windowed(embedder, prefixes).astype(np.float64), nearmiss_centroid)


def to_grid(values: np.ndarray, t_index: np.ndarray, T: int, lo: float, hi: float,
            n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Linearly interpolate values at prefix lengths t_index (of T) onto n_points in [lo, hi].

    Prefix length t sits at lo + (hi - lo) * t / T; grid points outside the evaluated range
    (e.g. lo, when t starts at 1) take the nearest end value. Returns (grid [n], values [n]).
    """
    grid = np.linspace(lo, hi, n_points)  # [n]
    positions = lo + (hi - lo) * np.asarray(t_index, dtype=np.float64) / max(T, 1)  # [P]
    return grid, np.interp(grid, positions, np.asarray(values, dtype=np.float64))


def needed_texts(early_units: list[str], late_units: list[str], anchor_centroid_texts: list[str],
                 anchor_text: str, nearmiss_texts: list[str], max_points: int | None = 64,
                 sep: str = " ") -> list[str]:
    """Every text document_trajectories will embed (same arguments). Encode these for many documents
    in one `encode_windowed` call first, so a caching embedder batches them (and the windows of long
    Confusion prefixes) length-sorted across documents."""
    t_index = np.concatenate([[0], prefix_points(len(late_units), max_points)]).astype(int)
    return (list(anchor_centroid_texts) + list(early_units) + list(nearmiss_texts)
            + (confusion_prefixes(anchor_text, late_units, t_index, sep) if late_units else []))


def document_trajectories(doc_id: str, early_units: list[str], late_units: list[str],
                          anchor_centroid_texts: list[str], anchor_text: str, nearmiss_texts: list[str],
                          embedder: Embedder, n_grid: int = 20, max_points: int | None = 64,
                          boundary: float = 0.5, sep: str = " ") -> tuple[list[dict], dict]:
    """Focus and Confusion of one CoT, on a normalised grid -> (rows, summary).

    rows: {doc_id, phase: "focus"|"confusion", t, value}; Focus on n_grid points in [0, boundary]
    (F(1) held at t = 0), Confusion on n_grid points in [boundary, 1] (t = boundary is the anchor
    text alone, C(0)). A phase that cannot be computed has no rows.
    summary: {doc_id, focus = F(T_early), confusion = C(T_late), n_early, n_late, n_windows (windows
    the whole-CoT Confusion prefix was embedded in: 1 when it fits the embedder, 0 without Confusion),
    reason}; a value that cannot be computed is NaN and `reason` says why ("; "-joined, "" when fine).
    """
    rows: list[dict] = []
    reasons: list[str] = []
    focus = confusion = math.nan
    n_windows = 0
    if not early_units and not late_units:
        reasons.append("empty CoT")
    else:
        anchor_c = centroid(anchor_centroid_texts, embedder)
        if not early_units:
            reasons.append("no early tokens")
        elif anchor_c is None:
            reasons.append("no anchors")
        else:
            curve = focus_curve(early_units, anchor_c, embedder)  # [T_early]
            focus = float(curve[-1])
            grid, values = to_grid(curve, np.arange(1, len(curve) + 1), len(curve), 0.0, boundary, n_grid)
            rows += [dict(doc_id=doc_id, phase="focus", t=round(float(t), 6), value=float(v))
                     for t, v in zip(grid, values)]
        near_c = centroid(nearmiss_texts, embedder)
        if not late_units:
            reasons.append("no late tokens")
        elif near_c is None:
            reasons.append("no near-misses")
        elif not anchor_text.strip():
            reasons.append("no anchors")
        else:
            t_index, curve = confusion_curve(anchor_text, late_units, near_c, embedder, max_points,
                                             include_start=True, sep=sep)  # [P]
            confusion = float(curve[-1])
            n_windows = len(window_texts(embedder, confusion_prefixes(anchor_text, late_units, t_index[-1:], sep)[0]))
            grid, values = to_grid(curve, t_index, len(late_units), boundary, 1.0, n_grid)
            rows += [dict(doc_id=doc_id, phase="confusion", t=round(float(t), 6), value=float(v))
                     for t, v in zip(grid, values)]
    reason = "; ".join(dict.fromkeys(reasons))
    summary = dict(doc_id=doc_id, focus=focus, confusion=confusion, n_early=len(early_units),
                   n_late=len(late_units), n_windows=n_windows, reason=reason)
    return rows, summary


def mean_with_ci(df: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """Per (model, phase, t): n, mean, and a Student-t confidence interval of the mean.

    df has columns model, phase, t, value (one row per document); NaN values are dropped.
    CI = mean +- t_{(1+level)/2, n-1} * sd / sqrt(n) (sd with ddof=1); NaN when n < 2.
    """
    keys = [k for k in ("model", "phase", "t") if k in df.columns]
    out = (df.dropna(subset=["value"]).groupby(keys, sort=True)["value"]
           .agg(n="count", mean="mean", sd="std").reset_index())
    n = out["n"].to_numpy()
    half = np.full(len(out), np.nan)
    ok = n >= 2
    half[ok] = stats.t.ppf((1 + level) / 2, n[ok] - 1) * out["sd"].to_numpy()[ok] / np.sqrt(n[ok])
    out["ci_low"], out["ci_high"] = out["mean"] - half, out["mean"] + half
    return out.drop(columns="sd")


def early_late_units(text: str, tokenizer, teacher_tokenizer, early_tokens: int) -> tuple[list[str], list[str]]:
    """A CoT's units (`tokenizer`'s tokens as text; early + late joined == text), split at the token
    window: the early ones are the tokens overlapping the characters of `teacher_tokenizer`'s first
    `early_tokens` tokens of `text` (the teacher's window, whichever model wrote `text`)."""
    window = first_tokens_span(text, token_offsets(teacher_tokenizer, text), early_tokens)
    return window_units(tokenizer, text, window)


def trajectory_tables(model: str, cot: pd.DataFrame, anchors: pd.DataFrame, space: LabelSpace, tokenizer,
                      teacher_tokenizer, embedder: Embedder, early_tokens: int, n_grid: int = 20,
                      max_points: int | None = 48) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Focus and Confusion of `model`'s CoT for every document of the anchors table.

    cot: the model's CoT (teacher traces or a student's predictions), indexed by doc_id; a
    document without one counts as an empty CoT. Units are `tokenizer`'s (the model's) tokens as
    text; the early segment is the units overlapping `teacher_tokenizer`'s first `early_tokens`
    tokens (`early_late_units`). Returns (curves: model, doc_id, phase, t, value;
    summary: model, doc_id, focus, confusion, n_early, n_late, n_windows, reason).
    """
    docs = []
    for row in anchors.itertuples(index=False):
        text = cot.loc[row.doc_id, "cot"] if row.doc_id in cot.index else ""
        early, late = early_late_units(text, tokenizer, teacher_tokenizer, early_tokens)
        docs.append((row.doc_id, early, late, list(row.anchors), row.anchor_text,
                     [space.title[lab] for lab in row.near_misses]))
    # One batched, de-duplicated pass over every text the curves need; the loop then hits the cache.
    encode_windowed(embedder, [t for d in docs for t in needed_texts(*d[1:], max_points=max_points)])
    curves, summaries = [], []
    for doc in docs:
        points, summary = document_trajectories(*doc, embedder, n_grid=n_grid, max_points=max_points)
        curves += points
        summaries.append(summary)
    curves_df = pd.DataFrame(curves, columns=["doc_id", "phase", "t", "value"])
    summary_df = pd.DataFrame(summaries)
    curves_df.insert(0, "model", model)
    summary_df.insert(0, "model", model)
    return curves_df, summary_df
