"""Score every attention head of a model on teacher-forced [prompt; CoT] sequences.

CoarseScore (Eq. 1) on early-CoT queries; RefineScore (Eq. 3) at refinement positions with
their earlier shortlist (S) and near-miss (N) mentions as keys; plus, for Fig. 7 right, the
per-stage (early -> late bins of refinement positions) QK to S, QK to N and OV helpfulness of
every head. One document per forward (batch 1), `heads.in_flight` documents at once; each document's
values are added to running sums (`scores.HeadMeans`), so memory is that of the captures in flight,
whatever the number of documents. Captures are reduced in float32 at least (`scores._upcast`), also
when the model runs in bfloat16.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from ..inflight import in_flight
from ..io import SplitArtifacts
from ..models import input_device
from .attention import final_norm, unembed
from .capture import capture_heads, final_residual
from .scores import (
    DEFAULT_COARSE,
    CoarseVariant,
    HeadMeans,
    anchor_centroid,
    coarse_key_mask,
    coarse_variants,
    margin_gradient,
    ov_helpfulness,
    qk_loopback,
    refine_rankings,
    refine_score_components,
    refine_variant,
)
from .teacher_forcing import ForcedSequence, forced_sequence, margin_tokens, within_cap

log = logging.getLogger(__name__)


@torch.no_grad()
def score_document(model, tokenizer, seq: ForcedSequence, anchors: list[str], gold_titles: list[str],
                   nearmiss_titles: list[str], tau: float, n_stages: int) -> dict:
    """Per-head values of one document; arrays are [layers, heads] (or [layers, heads, stages]).

    coarse: every CoarseVariant (`scores.coarse_variants`: sharpness over all causal keys and over the
    document's keys, kurtosis and normalized) and alignment; refine: qk, ov, refine_mean_product.
    Each layer is scored on the device its capture sits on (a device map spreads the layers)."""
    out: dict = {"n_queries": len(seq.early_queries), "n_positions": 0}
    ids = seq.input_ids
    if seq.early_queries and anchors:
        _, cap = capture_heads(model, ids[None].to(input_device(model)), query_positions=[seq.early_queries],
                               what=("rows", "writes"), logits_to_keep=1)  # scores read no logit: no [s, V]
        centroid = anchor_centroid(unembed(model), [tokenizer(a, add_special_tokens=False)["input_ids"] for a in anchors])
        qpos = torch.tensor([seq.early_queries])                                          # [1, nq]
        key_masks = {"all": coarse_key_mask(qpos, len(ids)),                              # [1, nq, seq]
                     "document": coarse_key_mask(qpos, len(ids), seq.document_positions)}
        comps = []
        for layer in sorted(cap.rows):
            on = cap.rows[layer].device
            comps.append(coarse_variants(cap.rows[layer], cap.writes[layer], centroid[None].to(on),
                                         torch.ones(1, qpos.shape[1], dtype=torch.bool, device=on),
                                         {keys: mask.to(on) for keys, mask in key_masks.items()}))
        out["coarse"] = {k: torch.stack([c[k][0].cpu() for c in comps]).numpy() for k in comps[0] if k != "n_queries"}
        out["example_rows"] = torch.stack([cap.rows[layer][0, :, 0, :seq.cot_token_start].cpu()
                                           for layer in sorted(cap.rows)]).numpy()  # [L, H, prompt]
    keys = seq.shortlist_positions + seq.nearmiss_positions
    refine = [t for t in seq.refine_positions
              if any(p < t for p in seq.shortlist_positions) and any(p < t for p in seq.nearmiss_positions)]
    targets, nearmisses = margin_tokens(tokenizer, gold_titles, nearmiss_titles)
    if refine and targets and nearmisses:
        with final_residual(model) as residual:
            _, cap = capture_heads(model, ids[None].to(input_device(model)), query_positions=[refine],
                                   key_positions=[keys], what=("rows", "qk", "value_writes"), logits_to_keep=1)
        h_final = residual.h[0, refine]                                                 # [nr, d]
        grad = margin_gradient(h_final, final_norm(model), unembed(model), targets, nearmisses)[None]  # [1, nr, d]
        is_s = torch.tensor([i < len(seq.shortlist_positions) for i in range(len(keys))])    # [nk]
        before = torch.tensor(keys)[None, None, :] < torch.tensor(refine)[None, :, None]      # [1, nr, nk]
        s_mask, n_mask = before & is_s, before & ~is_s            # earlier shortlist / near-miss mentions
        none = torch.zeros_like(s_mask)
        stage = np.minimum(n_stages - 1, (n_stages * (np.array(refine) - seq.cot_token_start)
                                          / max(1, len(ids) - seq.cot_token_start)).astype(int))
        per_layer = {k: [] for k in ("refine_mean_product", "qk", "ov", "qk_s", "qk_n", "ov_t")}
        for layer in sorted(cap.rows):
            on = cap.rows[layer].device
            s_on, n_on, none_on, grad_on = (t.to(on) for t in (s_mask, n_mask, none, grad))
            rows_at_t = cap.rows[layer][..., torch.tensor(keys, device=on)]             # [1, H, nr, nk]
            q, k, vw, scale = cap.queries[layer], cap.keys[layer], cap.value_writes[layer], cap.scaling[layer]
            comps = refine_score_components(q, k, rows_at_t, vw, s_on, n_on, grad_on,
                                            torch.ones(1, len(refine), dtype=torch.bool, device=on), scale, tau)
            for name in ("refine_mean_product", "qk", "ov"):
                per_layer[name].append(comps[name][0].cpu())
            per_layer["qk_s"].append(qk_loopback(q, k, s_on, none_on, scale, empty=0.0)[0].cpu())      # [H, nr]
            per_layer["qk_n"].append(-qk_loopback(q, k, none_on, n_on, scale, empty=0.0)[0].cpu())
            per_layer["ov_t"].append(ov_helpfulness(rows_at_t, vw, s_on, grad_on, tau)[0].cpu())
        out["refine"] = {k: torch.stack(per_layer[k]).numpy() for k in ("qk", "ov", "refine_mean_product")}
        out["stages"] = {name: _stage_means(torch.stack(per_layer[src]).numpy(), stage, n_stages)
                         for name, src in (("qk_shortlist", "qk_s"), ("qk_nearmiss", "qk_n"), ("ov", "ov_t"))}
        out["n_positions"] = len(refine)
    return out


def _stage_means(values: np.ndarray, stage: np.ndarray, n_stages: int) -> np.ndarray:
    """values [L, H, nr], stage [nr] -> [L, H, n_stages] mean per stage (NaN where a stage is empty)."""
    out = np.full(values.shape[:2] + (n_stages,), np.nan)
    for b in range(n_stages):
        if (stage == b).any():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                out[..., b] = np.nanmean(values[..., stage == b], -1)
    return out


def forced_documents(tokenizer, split: SplitArtifacts, max_tokens: int | None = None) -> list[dict]:
    """The documents `score_heads` takes, for `tokenizer`: every anchors row of the split, teacher-forced
    on the teacher's CoT (so students are scored on the same sequences as the teacher), but for those
    longer than `max_tokens` (skipped with a warning: `teacher_forcing.within_cap`)."""
    docs, prompts, cot, space = split.docs, split.prompts, split.cot, split.space
    return within_cap([dict(doc_id=row["doc_id"],
                 seq=forced_sequence(tokenizer, prompts.loc[row["doc_id"], "messages"], cot.loc[row["doc_id"], "cot"],
                                     row),
                 anchors=list(row["anchors"]),
                 gold_titles=[space.title[g] for g in docs.loc[row["doc_id"], "labels"]],
                 nearmiss_titles=[space.title[n] for n in row["near_misses"]])
            for _, row in split.anchors.iterrows()],
                      lambda d: len(d["seq"].input_ids), lambda d: d["doc_id"], max_tokens, split.source)


def score_heads(model, tokenizer, documents: Iterable[dict], tau: float = 0.01, n_stages: int = 4,
                desc: str = "head scores", coarse_variant: CoarseVariant = DEFAULT_COARSE,
                refine_ranking: str = "both_positive", in_flight_docs: int = 1,
                ) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Score all heads over `documents` (dicts: doc_id, seq, anchors, gold_titles, nearmiss_titles).

    Both tables hold every variant (coarse: coarse_{all,document}_{kurtosis,normalized} and their
    sharpness_* factors, alignment; refine: qk, ov, refine_product, refine_both_positive from the
    document-aggregated qk and ov, refine_mean_product); `score` is the chosen one (`coarse_variant`,
    `refine_ranking`), named in `score_variant`. Returns (coarse table, refine table, Fig. 4
    example: the top coarse head's attention over the prompt tokens from the first early query of
    the first scored document).

    Memory does not grow with the number of documents: each document's values are added to running
    sums (`scores.HeadMeans`) as it is scored, in document order, and only the first scored document's
    Fig. 4 rows ([layers, heads, prompt]) are kept. in_flight_docs: documents scored at once
    (`inflight.in_flight`: a device-mapped model keeps more than one GPU busy); the tables do not depend
    on it.
    """
    coarse_means, refine_means, stage_means = HeadMeans(), HeadMeans(), HeadMeans()
    example_doc, example_rows = None, None       # the first scored document's, for Fig. 4

    def score(doc: dict) -> tuple[dict, dict]:
        return doc, score_document(model, tokenizer, doc["seq"], doc["anchors"], doc["gold_titles"],
                                   doc["nearmiss_titles"], tau, n_stages)

    n_docs = 0
    for doc, result in tqdm(in_flight(score, documents, in_flight_docs), desc=desc, unit="doc"):
        n_docs += 1
        if "coarse" in result:
            coarse_means.add(result["coarse"], result["n_queries"])
            if example_doc is None:
                example_doc, example_rows = doc, result["example_rows"]
        if "refine" in result:
            refine_means.add(result["refine"], result["n_positions"])
            stage_means.add(result["stages"], 1)          # each document counts once per stage (NaN: empty)
    log.info("%s: %d documents, %d with early queries and anchors, %d with refinement positions "
             "(earlier shortlist and near-miss mentions)", desc, n_docs, coarse_means.n_examples,
             refine_means.n_examples)
    coarse = _table(coarse_means, coarse_variant.name, "n_queries", model)
    refine = _table(refine_means, refine_variant(refine_ranking), "n_positions", model,
                    derived=lambda means: refine_rankings(means["qk"], means["ov"]))
    if refine_means.n_examples:
        for name, mean in stage_means.means().items():                                    # [L, H, S]
            refine[f"{name}_by_stage"] = list(mean.reshape(-1, mean.shape[-1]).numpy())  # [L*H] of [S]
    example = pd.DataFrame(columns=["doc_id", "layer", "head", "position", "token", "weight"])
    if example_doc is not None and coarse["score"].notna().any():
        top = coarse.loc[coarse["score"].idxmax()]
        weights = example_rows[int(top["layer"]), int(top["head"])]
        ids = example_doc["seq"].input_ids[: len(weights)].tolist()
        example = pd.DataFrame({"doc_id": example_doc["doc_id"], "layer": int(top["layer"]), "head": int(top["head"]),
                                "position": range(len(ids)), "token": [tokenizer.decode([i]) for i in ids],
                                "weight": weights})
    return coarse, refine, example


def _table(means: HeadMeans, score: str, count: str, model, derived=None) -> pd.DataFrame:
    """The head table of `means` (`HeadMeans.table`); every head with score NaN when no document counted."""
    if not means.n_examples:
        cfg = model.config
        grid = [(layer, head) for layer in range(cfg.num_hidden_layers) for head in range(cfg.num_attention_heads)]
        return pd.DataFrame({"layer": [g[0] for g in grid], "head": [g[1] for g in grid], "score": np.nan,
                             "score_variant": score, count: 0})
    return means.table(score, count_name=count, derived=derived)
