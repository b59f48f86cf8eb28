"""Distillation losses: standard CoT distillation plus the Phase 1 (Eq. 5) and Phase 2 (Eq. 6) terms.

Every mechanistic term is computed from PHASE SIGNALS, dicts of plain tensors made by
`phase1_signals` / `phase2_signals`, so the teacher's side can be computed online (under
no_grad) or loaded from a precomputed targets file. Each model uses its own head pool
(`pools.select_pool`) on the same teacher-forced [prompt; CoT] text.

Phase 1 (early queries q in E; Pbar = pooled attention row, Deltabar = pooled write):

    Align_q = cos(Deltabar_q, c_anchor)           kappa_q = sharpness(Pbar_q) over the chosen keys
    L_attn  = mean_q KL(Pbar^T_q || Pbar^S_q)
    L_write = mean_q (Align^T_q - Align^S_q)^2
    L_int   = mean_q (kappa^T_q Align^T_q - kappa^S_q Align^S_q)^2 / s1^2

(kappa: `characterize.scores.sharpness` of the configured CoarseVariant, the one that ranked the
heads; s1: the RMS of kappa^T Align^T over the teacher's training targets, `targets.interaction_scales`,
so the term is O(1) whatever the sequence length and sharpness scale.)

Phase 2 (refinement positions t in R; QKbar / OVbar = pooled loop-back / cosine helpfulness):

    L_qk  = mean_t (QKbar^T_t - QKbar^S_t)^2
    L_ov  = mean_t (OVbar^T_t - OVbar^S_t)^2
    L_int = mean_t (QKbar^T_t OVbar^T_t - QKbar^S_t OVbar^S_t)^2 / s2^2    (s2: RMS of QKbar^T OVbar^T)

CoT (positions of the CoT, teacher-forced next tokens y_i):

    L_CE = mean_i -log p_S(y_i)
    L_KL = tau^2 mean_i KL(p_T^tau || p_S^tau) over the teacher's top-k ids (see `cot_loss`)

Total: L = L_CoT + alpha L_P1 + beta L_P2, each term with its own weight and switch (`total_loss`).

Teacher signals are detached inside every loss, so gradients reach only the student. A mean
over an empty set of positions is 0 (a term with nothing to compare contributes nothing).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..characterize.attention import final_norm, unembed
from ..characterize.capture import HeadCapture
from ..characterize.scores import anchor_alignment, coarse_key_mask, margin_gradient, sharpness
from .pools import HeadPool, pooled_helpfulness, pooled_loopback, pooled_rows, pooled_writes

Spans = Tensor | Sequence[Sequence[int]]
EPS = 1e-12  # floor of probabilities inside logs

TERMS: dict[str, tuple[str, ...]] = {
    "cot": ("ce", "kl"),
    "phase1": ("attn", "write", "interaction"),
    "phase2": ("qk", "ov", "interaction"),
}
PHASE_WEIGHT = {"cot": None, "phase1": "alpha", "phase2": "beta"}


def mean_or_zero(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of x over all its entries where mask is True; 0 (still attached to the graph) when none
    is, so a loss term with nothing to compare contributes nothing (cf. scores.masked_mean_or_nan)."""
    if mask is None:
        return x.mean() if x.numel() else x.sum()
    mask = mask.to(torch.bool).expand_as(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(mask, x, zero).sum() / mask.sum().clamp(min=1).to(x.dtype)


def _joint_mask(t: Mapping[str, Tensor], s: Mapping[str, Tensor], like: Tensor) -> Tensor:
    mt, ms = t.get("mask"), s.get("mask")
    mask = torch.ones(like.shape, dtype=torch.bool, device=like.device)
    for m in (mt, ms):
        if m is not None:
            mask = mask & m.to(device=like.device, dtype=torch.bool)
    return mask


def _check_shapes(t: Mapping[str, Tensor], s: Mapping[str, Tensor], keys: Sequence[str]) -> None:
    for key in keys:
        if t[key].shape != s[key].shape:
            hint = " (map both to shared units with map_rows_to_spans)" if key == "rows" else ""
            raise ValueError(f"teacher and student {key!r} differ in shape: "
                             f"{tuple(t[key].shape)} vs {tuple(s[key].shape)}{hint}")


# ---------------------------------------------------------------------------------------------
# Shared key units for attention rows (different tokenizers)


def span_overlap_matrix(token_char_spans: Spans, target_spans: Spans) -> Tensor:
    """M[i, u] = |chars(token i) & chars(unit u)| / |chars(token i)|: [seq, n_units] (float32).

    Zero-width tokens (special tokens reported as (0, 0)) have an all-zero row.
    """
    tok = torch.as_tensor(token_char_spans, dtype=torch.long).reshape(-1, 2)  # [seq, 2]
    units = torch.as_tensor(target_spans, dtype=torch.long).reshape(-1, 2)  # [n_units, 2]
    start = torch.maximum(tok[:, None, 0], units[None, :, 0])
    end = torch.minimum(tok[:, None, 1], units[None, :, 1])
    overlap = (end - start).clamp(min=0).float()  # [seq, n_units]
    width = (tok[:, 1] - tok[:, 0]).clamp(min=1).float()  # [seq]
    return overlap / width[:, None]


def map_rows_to_spans(rows: Tensor, token_char_spans: Spans, target_spans: Spans) -> Tensor:
    """Attention rows over a model's tokens -> rows over shared character units: [..., seq] -> [..., n_units].

        P_u = sum_i M[i, u] p_i / sum_u' sum_i M[i, u'] p_i      (M = `span_overlap_matrix`)

    A token's mass goes to the units it overlaps, split by the share of its characters; mass of
    tokens outside every unit (e.g. chat-template specials) is dropped and each row renormalised
    (an all-zero row stays zero). token_char_spans [seq, 2] and target_spans [n_units, 2] must
    be in the same character coordinates (e.g. both into the shared CoT text). Units can be
    words or the other tokenizer's tokens. Identical spans (same tokenizer): returns `rows`.
    """
    tok = torch.as_tensor(token_char_spans, dtype=torch.long)
    units = torch.as_tensor(target_spans, dtype=torch.long)
    if tok.shape == units.shape and torch.equal(tok, units):
        return rows
    m = span_overlap_matrix(tok, units).to(device=rows.device, dtype=rows.dtype)  # [seq, n_units]
    mapped = rows @ m  # [..., n_units]
    return mapped / mapped.sum(-1, keepdim=True).clamp(min=EPS)


def _map_key_mask(key_mask: Tensor, token_char_spans: Spans, target_spans: Spans) -> Tensor:
    """A unit is a valid key when some valid token overlaps it: [..., seq] -> [..., n_units]."""
    tok = torch.as_tensor(token_char_spans, dtype=torch.long)
    units = torch.as_tensor(target_spans, dtype=torch.long)
    if tok.shape == units.shape and torch.equal(tok, units):
        return key_mask
    m = span_overlap_matrix(tok, units).to(key_mask.device)
    return (key_mask.float() @ m) > 0


# ---------------------------------------------------------------------------------------------
# Phase 1 (Eq. 5)


def phase1_signals(model: nn.Module | None, cap: HeadCapture, pool: HeadPool, anchor_centroid: Tensor,
                   key_mask: Tensor | None = None, query_mask: Tensor | None = None,
                   spans: tuple[Spans, Spans] | None = None, kind: str = "normalized") -> dict[str, Tensor]:
    """Phase 1 signals of one model at its early queries (cap from `capture_heads(what={"rows","writes"})`).

    rows:      Pbar_q = sum_h w_h A^h_q                        [batch, n_query, seq or n_units]
    align:     cos(Deltabar_q, c_anchor)                       [batch, n_query]
    sharpness: scores.sharpness(Pbar_q, kind) over valid keys  [batch, n_query]
    mask:      valid queries                                   [batch, n_query]

    anchor_centroid: [d_model] or [batch, d_model], the model's OWN c_anchor (its unembedding
    rows, `scores.anchor_centroid`); it is detached: the loss shapes the writes, not the
    unembedding. key_mask: [batch, n_query, seq] bool (default causal, keys <= q; the document's keys:
    `scores.coarse_key_mask`); kind: "kurtosis" or "normalized" (`scores.sharpness`).
    spans: (token_char_spans, target_spans) maps rows and key mask to shared units first
    (`map_rows_to_spans`; the same spans for every batch row), for teacher and student with
    different tokenizers; sharpness is then taken over the units. model: only needed when the
    capture holds "z" instead of "writes".
    """
    rows = pooled_rows(cap, pool)  # [batch, n_query, seq]
    if key_mask is None:
        key_mask = coarse_key_mask(cap.query_positions, rows.shape[-1])  # [batch, n_query, seq] causal
    if spans is not None:
        rows = map_rows_to_spans(rows, *spans)  # [batch, n_query, n_units]
        key_mask = _map_key_mask(key_mask, *spans)
    centroid = anchor_centroid.detach()
    centroid = centroid[:, None, :] if centroid.dim() == 2 else centroid  # [batch, 1, d] or [d]
    writes = pooled_writes(cap, pool, model)  # [batch, n_query, d_model]
    align = anchor_alignment(writes, centroid.to(writes)).to(rows.dtype)  # [batch, n_query]
    kappa = sharpness(rows, kind, mask=key_mask)  # [batch, n_query]
    mask = torch.isfinite(kappa) if query_mask is None else query_mask.to(torch.bool) & torch.isfinite(kappa)
    kappa = torch.where(mask, kappa, torch.zeros((), dtype=kappa.dtype, device=kappa.device))
    return {"rows": rows, "align": align, "sharpness": kappa, "mask": mask}


def attention_kl(p_teacher: Tensor, p_student: Tensor) -> Tensor:
    """KL(P_T || P_S) = sum_j P_T,j (log P_T,j - log P_S,j) over the last dim; 0 * log 0 = 0. [...]"""
    log_t = torch.log(p_teacher.clamp(min=EPS))
    log_s = torch.log(p_student.clamp(min=EPS))
    return (p_teacher * (log_t - log_s)).sum(-1)


def phase1_losses(teacher_sig: Mapping[str, Tensor], student_sig: Mapping[str, Tensor],
                  interaction_scale: float = 1.0) -> dict[str, Tensor]:
    """Eq. 5 terms, means over the queries valid in both (teacher detached):

    attn = mean_q KL(Pbar^T_q || Pbar^S_q); write = mean_q (Align^T_q - Align^S_q)^2;
    interaction = mean_q ((kappa^T_q Align^T_q - kappa^S_q Align^S_q) / interaction_scale)^2, with
    interaction_scale the teacher's RMS of kappa Align (`targets.interaction_scales`; 1 = raw).
    """
    _check_shapes(teacher_sig, student_sig, ("rows", "align", "sharpness"))
    t = {k: v.detach() for k, v in teacher_sig.items()}
    s = student_sig
    mask = _joint_mask(t, s, s["align"])  # [batch, n_query]
    coarse_t, coarse_s = t["sharpness"] * t["align"], s["sharpness"] * s["align"]
    return {
        "attn": mean_or_zero(attention_kl(t["rows"].to(s["rows"]), s["rows"]), mask),
        "write": mean_or_zero((t["align"] - s["align"]).pow(2), mask),
        "interaction": mean_or_zero(((coarse_t - coarse_s) / interaction_scale).pow(2), mask),
    }


# ---------------------------------------------------------------------------------------------
# Phase 2 (Eq. 6)


def refine_margin_grad(model: nn.Module, h_final: Tensor, target_tokens: Sequence[int],
                       nearmiss_tokens: Sequence[int]) -> Tensor:
    """grad_{h_final,t} M_t at every refinement position: [batch, n_refine, d] -> [batch, n_refine, d].

    h_final: residual stream entering the final norm (`characterize.final_residual`) at the
    refinement positions; token lists: margin tokens of the target / near-miss labels, shared by
    the batch (`teacher_forcing.margin_tokens`). The result is a constant direction (no graph).
    """
    b, nr, d = h_final.shape
    grad = margin_gradient(h_final.reshape(b * nr, d), final_norm(model), unembed(model),
                           target_tokens, nearmiss_tokens)
    return grad.reshape(b, nr, d)


def phase2_signals(model: nn.Module | None, cap: HeadCapture, pool: HeadPool, grad: Tensor,
                   shortlist_mask: Tensor, nearmiss_mask: Tensor, tau: float,
                   position_mask: Tensor | None = None) -> dict[str, Tensor]:
    """Phase 2 signals of one model at its refinement positions.

    cap: `capture_heads(query_positions=refine, key_positions=mentions, what={"rows","qk","value_writes"})`;
    grad: [batch, n_refine, d] (`refine_margin_grad`, constant); shortlist_mask, nearmiss_mask:
    [batch, n_refine, n_key] bool, the EARLIER shortlist / near-miss mentions (`scores.earlier_mask`);
    tau: attention threshold of the OV term; position_mask: [batch, n_refine] (False = padding).

    loopback:    QKbar_t = sum_h w_h QK^h_t                                   [batch, n_refine]
    helpfulness: OVbar_t = sum_h w_h OVcos^h_t                                [batch, n_refine]
    mask:        valid position with an earlier shortlist AND near-miss mention [batch, n_refine]
    Invalid entries are 0 (not NaN) so products stay NaN-free in the backward pass.
    """
    qk = pooled_loopback(cap, pool, shortlist_mask, nearmiss_mask)  # [batch, n_refine]
    ov = pooled_helpfulness(cap, pool, shortlist_mask, grad, tau, model).to(qk.dtype)  # [batch, n_refine]
    mask = torch.isfinite(qk) & torch.isfinite(ov)
    if position_mask is not None:
        mask = mask & position_mask.to(torch.bool)
    zero = torch.zeros((), dtype=qk.dtype, device=qk.device)
    return {"loopback": torch.where(mask, qk, zero), "helpfulness": torch.where(mask, ov, zero), "mask": mask}


def phase2_losses(teacher_sig: Mapping[str, Tensor], student_sig: Mapping[str, Tensor],
                  interaction_scale: float = 1.0) -> dict[str, Tensor]:
    """Eq. 6 terms, means over the refinement positions valid in both (teacher detached):

    qk = mean_t (QKbar^T_t - QKbar^S_t)^2; ov = mean_t (OVbar^T_t - OVbar^S_t)^2;
    interaction = mean_t ((QKbar^T_t OVbar^T_t - QKbar^S_t OVbar^S_t) / interaction_scale)^2, with
    interaction_scale the teacher's RMS of QKbar OVbar (`targets.interaction_scales`; 1 = raw).
    """
    _check_shapes(teacher_sig, student_sig, ("loopback", "helpfulness"))
    t = {k: v.detach() for k, v in teacher_sig.items()}
    s = student_sig
    mask = _joint_mask(t, s, s["loopback"])  # [batch, n_refine]
    refine_t, refine_s = t["loopback"] * t["helpfulness"], s["loopback"] * s["helpfulness"]
    return {
        "qk": mean_or_zero((t["loopback"] - s["loopback"]).pow(2), mask),
        "ov": mean_or_zero((t["helpfulness"] - s["helpfulness"]).pow(2), mask),
        "interaction": mean_or_zero(((refine_t - refine_s) / interaction_scale).pow(2), mask),
    }


# ---------------------------------------------------------------------------------------------
# CoT distillation


def topk_targets(teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The teacher's top-k logits and ids per position (what a targets file stores): ([.., k], [.., k])."""
    values, indices = torch.topk(teacher_logits.detach().float(), k, dim=-1)
    return values, indices


def topk_kl(student_logits: Tensor, teacher_topk_values: Tensor, teacher_topk_indices: Tensor,
            temperature: float = 1.0) -> Tensor:
    """Per-position KL(p_T || p_S) over the teacher's top-k ids, both renormalised there: [...].

        p_T = softmax(v / tau)                      v: teacher top-k logits (or log-probs)
        p_S = softmax(z_S[idx] / tau)               the student restricted to the same k ids
        KL  = sum_k p_T (log p_T - log p_S)

    Restricting the student too makes the term exactly 0 when the student equals the teacher.
    """
    log_t = F.log_softmax(teacher_topk_values.detach().float() / temperature, dim=-1)  # [..., k]
    z_s = torch.gather(student_logits, -1, teacher_topk_indices).float()  # [..., k]
    log_s = F.log_softmax(z_s / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1)


def cot_loss(student_logits: Tensor, labels_mask: Tensor, teacher_topk_values: Tensor,
             teacher_topk_indices: Tensor, temperature: float = 1.0, ce_weight: float = 1.0,
             kl_weight: float = 1.0, *, labels: Tensor | None = None) -> dict[str, Tensor]:
    """Standard CoT distillation (App. B) on teacher-forced positions.

    All tensors are aligned per position: student_logits[:, i] predicts labels[:, i] (the caller
    shifts: logits[:, :-1] with labels = input_ids[:, 1:]). student_logits: [batch, seq, vocab];
    labels: [batch, seq] long, the teacher's CoT tokens (required when ce_weight != 0);
    labels_mask: [batch, seq] bool (positions inside the CoT); teacher_topk_values / _indices:
    [batch, seq, k] (`topk_targets`).

        ce   = mean_i -log softmax(z_S,i)[y_i]
        kl   = tau^2 * mean_i KL(p_T || p_S), `topk_kl` (both renormalised over the teacher's top-k)
        loss = ce_weight * ce + kl_weight * kl

    Returns {"ce", "kl", "loss"}. The tau^2 factor (Hinton et al.) keeps gradient scale
    independent of tau. Positions outside labels_mask are ignored; with none, every term is 0.
    """
    mask = labels_mask.to(torch.bool)
    kl = temperature ** 2 * mean_or_zero(
        topk_kl(student_logits, teacher_topk_values, teacher_topk_indices, temperature), mask)
    if labels is None:
        if ce_weight != 0:
            raise ValueError("cot_loss: pass labels= (the teacher-forced next tokens, e.g. input_ids[:, 1:]) "
                             "for the CE term, or ce_weight=0")
        ce = torch.zeros((), dtype=kl.dtype, device=kl.device)
    else:
        nll = F.cross_entropy(student_logits.float().flatten(0, -2), labels.flatten(), reduction="none")
        ce = mean_or_zero(nll.view(labels.shape), mask)
    return {"ce": ce, "kl": kl, "loss": ce_weight * ce + kl_weight * kl}


def aligned_positions(teacher_char_spans: Spans, student_char_spans: Spans) -> tuple[Tensor, Tensor]:
    """Token pairs (i_T, i_S) of two tokenizations of the same text that END at the same character.

    The logits there predict next tokens that start at the same character, so the two next-token
    distributions are comparable. Zero-width tokens are skipped. Returns two LongTensors [n_pairs].
    """
    t = torch.as_tensor(teacher_char_spans, dtype=torch.long).reshape(-1, 2)
    s = torch.as_tensor(student_char_spans, dtype=torch.long).reshape(-1, 2)
    end_to_s = {int(e): j for j, (b, e) in enumerate(s.tolist()) if e > b}  # last student token ending at e
    pairs = [(i, end_to_s[e]) for i, (b, e) in enumerate(t.tolist()) if e > b and e in end_to_s]
    if not pairs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    ti, si = zip(*pairs)
    return torch.tensor(ti), torch.tensor(si)


def cross_tokenizer_kl(student_logits: Tensor, teacher_topk_values: Tensor, student_positions: Tensor,
                       teacher_positions: Tensor, temperature: float = 1.0,
                       pair_mask: Tensor | None = None) -> Tensor:
    """CoT distribution loss for DIFFERENT vocabularies: Universal Logit Distillation (Boizard et al. 2024).

    Not a KL (ids of two vocabularies do not correspond); the name mirrors the shared-vocab KL it
    replaces. At character-aligned positions (`aligned_positions`), compare the SORTED
    probabilities of the teacher's top-k and the student's own top-k, both renormalised there:

        p_T = sort_desc(softmax(v_T / tau))          p_S = sort_desc(softmax(topk(z_S, k) / tau))
        L   = mean_pairs sum_r |p_T,r - p_S,r|       (Wasserstein-1 between the sorted distributions)

    student_logits: [batch, seq_S, vocab_S]; teacher_topk_values: [batch, seq_T, k];
    student_positions, teacher_positions: [batch, n] or [n] (shared) token indices of the pairs;
    pair_mask: [batch, n] bool (padding). 0 when the student's top-k distribution equals the
    teacher's up to a permutation of ids; a vocab smaller than k is zero-padded.
    """
    b = student_logits.shape[0]
    s_pos = torch.as_tensor(student_positions, device=student_logits.device).long()
    t_pos = torch.as_tensor(teacher_positions, device=student_logits.device).long()
    s_pos = s_pos.expand(b, -1) if s_pos.dim() == 1 else s_pos  # [batch, n]
    t_pos = t_pos.expand(b, -1) if t_pos.dim() == 1 else t_pos
    k = teacher_topk_values.shape[-1]
    v_t = torch.gather(teacher_topk_values.detach().float(), 1,
                       t_pos[..., None].expand(-1, -1, k))  # [batch, n, k]
    p_t = torch.softmax(v_t / temperature, -1).sort(-1, descending=True).values
    z_s = torch.gather(student_logits, 1, s_pos[..., None].expand(-1, -1, student_logits.shape[-1]))
    k_s = min(k, z_s.shape[-1])
    p_s = torch.softmax(torch.topk(z_s.float(), k_s, dim=-1).values / temperature, -1)  # [batch, n, k_s] sorted
    if k_s < k:
        p_s = F.pad(p_s, (0, k - k_s))
    if s_pos.shape[1] == 0:
        warnings.warn("cross_tokenizer_kl: no aligned positions; the term is 0", stacklevel=2)
    return mean_or_zero((p_t - p_s).abs().sum(-1), pair_mask)


# ---------------------------------------------------------------------------------------------
# Total


def _check_keys(d: Mapping[str, object], allowed: set[str], what: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"total_loss: unknown {what} {sorted(unknown)}; allowed: {sorted(allowed)}")


def total_loss(terms: Mapping[str, Mapping[str, Tensor] | Tensor], weights: Mapping[str, float] | None = None,
               switches: Mapping[str, bool] | None = None) -> Tensor:
    """L = L_CoT + alpha L_P1 + beta L_P2, with L_group = sum_term weight[group.term] * term.

    terms: {"cot": cot_loss(...), "phase1": phase1_losses(...), "phase2": phase2_losses(...)};
    a group may also be a single Tensor (its own term). Entries named "loss" are ignored (the
    weighted sum `cot_loss` returns for standalone use; weights are applied here).
    weights: "alpha", "beta" and per term "cot.ce", "cot.kl", "phase1.attn", "phase1.write",
    "phase1.interaction", "phase2.qk", "phase2.ov", "phase2.interaction" (missing = 1).
    switches: a group ("cot", "phase1", "phase2") or a term (same names as weights) set False
    drops it (ablations); missing = on. Dropped terms (also weight 0, alpha/beta 0) may be absent from `terms`; a term that is
    on but absent raises KeyError. With every term off, returns a constant 0.
    """
    weights, switches = dict(weights or {}), dict(switches or {})
    term_keys = {f"{g}.{t}" for g, names in TERMS.items() for t in names}
    _check_keys(weights, term_keys | {"alpha", "beta"}, "weights")
    _check_keys(switches, term_keys | set(TERMS), "switches")
    total: Tensor | None = None
    for group, names in TERMS.items():
        if not switches.get(group, True):
            continue
        phase_w = 1.0 if PHASE_WEIGHT[group] is None else weights.get(PHASE_WEIGHT[group], 1.0)
        if phase_w == 0:
            continue
        value = terms.get(group)
        if isinstance(value, Tensor):
            parts = {group: value}
        else:
            parts = {}
            for name in names:
                key = f"{group}.{name}"
                w = weights.get(key, 1.0)
                if not switches.get(key, True) or w == 0:
                    continue
                if value is None or name not in value:
                    raise KeyError(f"total_loss: term {key!r} is switched on but missing from terms")
                parts[key] = w * value[name]
        for part in parts.values():
            total = phase_w * part if total is None else total + phase_w * part
    return torch.zeros(()) if total is None else total
