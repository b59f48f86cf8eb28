"""Head pools for mechanistic distillation and the pooled quantities computed from a HeadCapture.

Paper Sec. 3 (docs/equations.md, "Head pools"): for each phase, the top-k heads by their phase score
(CoarseScore for Phase 1, RefineScore for Phase 2), restricted to a band of layers given as
fractions of the depth, weighted by

    w_h = softmax_h(score_h / T)                      (over the pool's heads only)

Pooled quantities (each model with its own pool; gradients flow through the capture):

    Pbar_q      = sum_h w_h A^h_q                     # pooled attention row     [batch, n_query, seq]
    Deltabar_q  = sum_h w_h Delta^h_q                 # pooled head write        [batch, n_query, d_model]
    QKbar_t     = sum_h w_h QK^h_t                    # pooled QK loop-back      [batch, n_refine]
    OVbar_t     = sum_h w_h OVcos^h_t                 # pooled OV helpfulness    [batch, n_refine]

QK^h_t and OVcos^h_t are the per-head Phase 2 signals of `scores.qk_loopback` and
`scores.ov_helpfulness_cos` (cosine form, so models of different width compare); they are
pooled per head first, then weighted ("per-head-then-pooled").
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import pandas as pd
import torch
from torch import Tensor, nn

from ..characterize.attention import Head, attention_modules, head_out
from ..characterize.capture import HeadCapture
from ..characterize.scores import ov_helpfulness_cos, qk_loopback
from ..io import read_parquet
from .pool_ranges import layers_in_range

log = logging.getLogger(__name__)


@dataclass
class HeadPool:
    """A weighted set of heads. heads: [(layer, head)], weights: [n] (sum to 1), scores: [n]."""

    heads: list[Head]
    weights: Tensor
    scores: Tensor | None = None

    @property
    def layers(self) -> list[int]:
        """Layers that hold at least one pooled head (pass as `capture_heads(layers=...)`)."""
        return sorted({layer for layer, _ in self.heads})

    def by_layer(self) -> dict[int, tuple[list[int], Tensor]]:
        """layer -> (head indices, their weights [n_layer_heads])."""
        out: dict[int, tuple[list[int], list[int]]] = {}
        for i, (layer, head) in enumerate(self.heads):
            heads, idx = out.setdefault(layer, ([], []))
            heads.append(head)
            idx.append(i)
        return {layer: (heads, self.weights[idx]) for layer, (heads, idx) in sorted(out.items())}


def select_pool(head_table: pd.DataFrame, n_layers: int, k: int, temperature: float | str,
                layer_range: tuple[float, float]) -> HeadPool:
    """Top-k heads by `score` among layers l with lo <= l / n_layers < hi (hi = 1.0: up to the last layer).

    head_table: columns layer, head, score (e.g. heads/coarse.parquet); NaN scores are excluded.
    Ties break by (layer, head). Fewer than k qualifying heads: all of them are used.
    Weights: w_h = softmax(score_h / temperature) over the selected heads. temperature="auto" uses the
    standard deviation of the selected scores (softmax of z-scores): raw scores have model-dependent
    scales (a CoarseScore of raw kurtosis ~ 10-10^3, of normalized kurtosis in (-1, 1)), and T = 1 on
    large scores puts all weight on one head.
    """
    if k < 1:
        raise ValueError(f"select_pool: k must be >= 1, got {k}")
    if temperature != "auto" and not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(f"select_pool: temperature must be > 0 or 'auto', got {temperature!r}")
    layers = layers_in_range(layer_range, n_layers)
    table = head_table[head_table["layer"].isin(layers) & head_table["score"].notna()]
    if table.empty:
        raise ValueError(f"select_pool: no head with a finite score in layer range {layer_range} "
                         f"(layers {layers} of {n_layers}); widen the range or check the head table")
    table = table.sort_values(["score", "layer", "head"], ascending=[False, True, True]).head(k)
    scores = torch.tensor(table["score"].to_numpy(), dtype=torch.float32)  # [n]
    heads = [(int(layer), int(head)) for layer, head in zip(table["layer"], table["head"])]
    if temperature == "auto":
        spread = float(scores.std()) if len(scores) > 1 else 0.0
        temperature = spread if spread > 0 else 1.0
    return HeadPool(heads=heads, weights=torch.softmax(scores / temperature, dim=0), scores=scores)


def head_pools(settings: dict, n_layers: int, coarse: pd.DataFrame, refine: pd.DataFrame,
               source: str = "") -> dict[str, HeadPool]:
    """A model's Phase 1 pool from its CoarseScore table and Phase 2 pool from its RefineScore table.

    settings: config["distill"]["pools"] ({phase: {k, temperature, layers}}). A phase whose layer band
    holds no layer of this model, or whose table has no finite score in the band, gets no pool: its
    losses are off and its mechanism metrics unmeasured for this model, with a warning that names
    `source`. (A band that holds no layer of a model whose method trains on it is stopped at start-up:
    `pool_ranges.check_pool_ranges`.)
    """
    pools = {}
    for phase, table in (("phase1", coarse), ("phase2", refine)):
        cfg = settings[phase]
        layers = layers_in_range(cfg["layers"], n_layers)
        score = "CoarseScore" if phase == "phase1" else "RefineScore"
        if not layers:
            log.warning("%s: distill.pools.%s.layers %s holds no layer of this %d-layer model; no %s pool",
                        source, phase, list(cfg["layers"]), n_layers, phase)
        elif table.loc[table["layer"].isin(layers), "score"].notna().any():
            pools[phase] = select_pool(table, n_layers, cfg["k"], cfg["temperature"], tuple(cfg["layers"]))
        else:
            log.warning("%s: no finite %s head score in layers %s; %s losses are off for this model", source,
                        score, layers, phase)
    return pools


def model_pools(settings: dict, model: nn.Module, coarse_path: str | os.PathLike,
                refine_path: str | os.PathLike) -> dict[str, HeadPool]:
    """`head_pools` of a loaded model, from its heads/coarse.parquet and heads/refine.parquet."""
    return head_pools(settings, len(attention_modules(model)), read_parquet(coarse_path), read_parquet(refine_path),
                      source=f"{coarse_path} / {refine_path}")


def pools_json(pools: dict[str, HeadPool]) -> str:
    """{phase: [[layer, head, weight], ...]} as JSON (stored with the teacher targets)."""
    return json.dumps({p: [[layer, head, float(w)] for (layer, head), w in zip(pool.heads, pool.weights.tolist())]
                       for p, pool in pools.items()})


# ---------------------------------------------------------------------------------------------
# Phase 1: pooled rows and writes


def _need(d: dict[int, Tensor], layer: int, what: str) -> Tensor:
    if layer not in d:
        raise KeyError(f"capture has no {what!r} for layer {layer}: capture_heads(layers=pool.layers, what=...)")
    return d[layer]


def pooled_rows(cap: HeadCapture, pool: HeadPool) -> Tensor:
    """Pbar_q = sum_h w_h A^h_q over the pool's heads: [batch, n_query, seq]."""
    total = None
    for layer, (heads, w) in pool.by_layer().items():
        rows = _need(cap.rows, layer, "rows")[:, heads]  # [batch, n_pool_l, n_query, seq]
        part = (rows * w.to(rows)[None, :, None, None]).sum(1)  # [batch, n_query, seq]
        total = part if total is None else total + part
    return total


def pooled_writes(cap: HeadCapture, pool: HeadPool, model: nn.Module | None = None) -> Tensor:
    """Deltabar_q = sum_h w_h Delta^h_q: [batch, n_query, d_model].

    Uses cap.writes; where a layer only has cap.z (d_model/head_dim times less memory), pass the
    model and Delta^h_q = z^h_q W_O^h is formed for the pooled heads only.
    """
    total = None
    for layer, (heads, w) in pool.by_layer().items():
        if layer in cap.writes:
            writes = cap.writes[layer][:, :, heads]  # [batch, n_query, n_pool_l, d_model]
        elif layer in cap.z and model is not None:
            writes = head_out(attention_modules(model)[layer], cap.z[layer])[:, :, heads]  # [b, nq, n_pool_l, D]
        else:
            raise KeyError(f"capture has no 'writes' (or 'z' plus a model) for layer {layer}")
        part = (writes * w.to(writes)[None, None, :, None]).sum(2)  # [batch, n_query, d_model]
        total = part if total is None else total + part
    return total


# ---------------------------------------------------------------------------------------------
# Phase 2: per-head signals, then pooled


def _pool_heads(per_head: Tensor, w: Tensor) -> Tensor:
    """sum_h w_h x_h over dim 1 of [batch, n_pool_l, n_refine], NaN entries counted as 0."""
    finite = torch.isfinite(per_head)
    x = torch.where(finite, per_head, torch.zeros((), dtype=per_head.dtype, device=per_head.device))
    return (x * w.to(x)[None, :, None]).sum(1)  # [batch, n_refine]


def pooled_loopback(cap: HeadCapture, pool: HeadPool, shortlist_mask: Tensor, nearmiss_mask: Tensor) -> Tensor:
    """QKbar_t = sum_h w_h QK^h_t (scores.qk_loopback, scaled q.k): [batch, n_refine].

    cap: captured with query_positions = refinement positions, key_positions = mention positions,
    what including "qk"; shortlist_mask, nearmiss_mask: [batch, n_refine, n_key] bool (earlier
    shortlist / near-miss mentions, `scores.earlier_mask`). NaN where S_t or N_t is empty.
    """
    total = None
    for layer, (heads, w) in pool.by_layer().items():
        q = _need(cap.queries, layer, "qk")[:, heads]  # [batch, n_pool_l, n_refine, head_dim]
        k = _need(cap.keys, layer, "qk")[:, heads]  # [batch, n_pool_l, n_key, head_dim]
        part = _pool_heads(qk_loopback(q, k, shortlist_mask, nearmiss_mask, cap.scaling[layer]), w)
        total = part if total is None else total + part
    valid = shortlist_mask.to(torch.bool).any(-1) & nearmiss_mask.to(torch.bool).any(-1)  # [batch, n_refine]
    return torch.where(valid, total, torch.full_like(total, float("nan")))


def rows_at_keys(cap: HeadCapture, layer: int) -> Tensor:
    """Attention rows of layer `layer` restricted to cap.key_positions: [batch, n_heads, n_query, n_key]."""
    rows = _need(cap.rows, layer, "rows")  # [batch, H, n_query, seq]
    kpos = cap.key_positions  # [batch, n_key]
    if kpos is None:
        raise ValueError("capture has no key_positions: capture_heads(key_positions=mention positions)")
    idx = kpos[:, None, None, :].expand(-1, rows.shape[1], rows.shape[2], -1)
    return torch.gather(rows, -1, idx)


def pooled_helpfulness(cap: HeadCapture, pool: HeadPool, shortlist_mask: Tensor, grad: Tensor, tau: float,
                       model: nn.Module | None = None) -> Tensor:
    """OVbar_t = sum_h w_h cos(sum_{j in S_t, A^h_tj > tau} A^h_tj v_j W_O^h, grad M_t): [batch, n_refine].

    Per head `scores.ov_helpfulness_cos`; grad: [batch, n_refine, d_model] (`scores.margin_gradient`).
    Uses cap.value_writes, or cap.values plus the model's W_O. NaN where S_t is empty.
    """
    total = None
    for layer, (heads, w) in pool.by_layer().items():
        rows = rows_at_keys(cap, layer)[:, heads]  # [batch, n_pool_l, n_refine, n_key]
        if layer in cap.value_writes:
            vw = cap.value_writes[layer][:, heads]  # [batch, n_pool_l, n_key, d_model]
        elif layer in cap.values and model is not None:
            values = cap.values[layer].transpose(1, 2)  # [batch, n_key, H, head_dim]
            vw = head_out(attention_modules(model)[layer], values).transpose(1, 2)[:, heads]  # [b, n_pool_l, nk, D]
        else:
            raise KeyError(f"capture has no 'value_writes' (or 'values' plus a model) for layer {layer}")
        part = _pool_heads(ov_helpfulness_cos(rows, vw, shortlist_mask, grad, tau), w)
        total = part if total is None else total + part
    valid = shortlist_mask.to(torch.bool).any(-1)  # [batch, n_refine]
    return torch.where(valid, total, torch.full_like(total, float("nan")))
