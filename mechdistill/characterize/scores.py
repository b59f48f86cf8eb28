"""Per-head scores of the two reasoning phases: CoarseScore (Eq. 1) and RefineScore (Eq. 3).

Pure tensor functions: they keep the autograd graph (no ``.item()``, no NumPy), so the
distillation losses (Eqs. 5, 6) reuse them with gradients. Shapes are written in the docstrings;
``b`` = examples in a batch, ``H`` = heads of one layer (after the GQA repeat), ``nq`` = query
positions, ``k``/``nk`` = key positions, ``nr`` = refinement positions, ``d`` = d_model.

Missing values: a mean over an empty set is NaN (never a silent 0), so that aggregation can drop
it; `weighted_mean` ignores NaN entries. All NaNs are produced by ``torch.where`` on finite
intermediates, so gradients of the finite entries stay finite. Callers that combine outputs
(e.g. a product, as in Eq. 3) must zero the NaN entries with ``torch.where`` first: 0 * NaN in a
backward pass is NaN.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import local_values
from .settings import KEY_SETS, REFINE_RANKINGS, SHARPNESS_KINDS, CoarseVariant

Labels = Sequence[int] | Sequence[Sequence[int]]

# ---------------------------------------------------------------- helpers


def _nan_like(x: Tensor) -> Tensor:
    return torch.full_like(x, float("nan"))


def masked_mean_or_nan(x: Tensor, mask: Tensor | None, dim: int = -1, fill: float = float("nan")) -> Tensor:
    """Mean of `x` over `dim` restricted to `mask` (broadcast to x); `fill` (NaN) where nothing is
    valid, so aggregation can drop it (cf. distill.losses.mean_or_zero for loss terms). Half-precision
    x is averaged (and returned) in float32.

    Masked-out entries may hold NaN/inf: they are replaced before summing, so they reach neither
    the value nor the gradient.
    """
    x = _upcast(x)
    if mask is None:
        return x.mean(dim)
    mask = mask.to(torch.bool).expand_as(x)
    n = mask.sum(dim)
    total = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum(dim)
    mean = total / n.clamp(min=1).to(x.dtype)
    return torch.where(n > 0, mean, torch.full_like(mean, fill))


def _upcast(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32, before every reduction of this module (einsums, dot products, means,
    moments): fourth moments of attention weights underflow in half precision, and a bfloat16 q.k near
    100 is rounded to a multiple of 0.5, which erases the differences of means QK loop-back and the
    RefineScore's signs are made of. Gradients flow through the cast."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


# ---------------------------------------------------------------- Phase 1 (Eq. 1)


def _central_moments(p: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(n, m2, m4, any valid) of the valid entries of `p` over its last dim: [...] each."""
    if mask is None:
        mask = torch.ones_like(p, dtype=torch.bool)
    mask = mask.to(torch.bool).expand_as(p)
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    n = mask.sum(-1).clamp(min=1).to(p.dtype)  # [...]
    mu = torch.where(mask, p, zero).sum(-1, keepdim=True) / n.unsqueeze(-1)
    dev = torch.where(mask, p - mu, zero)  # [..., k]
    return n, dev.pow(2).sum(-1) / n, dev.pow(4).sum(-1) / n, mask.any(-1)


def excess_kurtosis(p: Tensor, eps: float = 1e-6, mask: Tensor | None = None) -> Tensor:
    """Excess kurtosis of the entries of `p` over its last dim (App. B):

        kappa(p) = m4 / (m2 + eps)^2 - 3,   m_r = (1/n) sum_j (p_j - mean(p))^r

    p: [..., k] (e.g. one attention row per query); mask: bool, broadcastable to p, True = valid
    key (causal / padding); then n and the mean count only valid keys. Returns [...];
    NaN where a row has no valid key. A uniform row has m2 = m4 = 0, so kappa = -3 exactly.
    Note: eps is absolute, so for rows over thousands of keys (m2 ~ 1/n^2) it damps kappa.
    kappa grows with n (a one-hot row has kappa ~ n): see `normalized_kurtosis`.
    """
    n, m2, m4, valid = _central_moments(_upcast(p), mask)
    kappa = m4 / (m2 + eps).pow(2) - 3.0
    return torch.where(valid, kappa, _nan_like(kappa))


def normalized_kurtosis(p: Tensor, eps: float = 1e-6, mask: Tensor | None = None) -> Tensor:
    """Length-independent sharpness: (kappa + 3) / n over the n valid keys of each row,

        s(p) = m4 / (n (m2 + eps / n)^2)        in [0, 1)

    Why: m4 / m2^2 of n numbers is at most n - 2 + 1/(n - 1) (one value apart from all the
    others), so raw kurtosis grows linearly with the number of keys: a row with its mass on one
    key scores ~95, ~2000, ~8000 over 100, 2000, 8000 keys, and a sequence-length difference
    (or an attention sink over a long prompt) outweighs any difference in attention shape.
    Dividing by n keeps the shape and drops the length: s = 0 for a uniform row, -> 1 for a
    row whose mass sits on one key over a flat rest (whatever that key's share: kurtosis is
    shift- and scale-free), ~1/m for m equal peaks over a flat rest. eps is taken relative to m2
    of a one-peak row (~1/n), so it damps every length alike. Same shapes and NaN rule as
    `excess_kurtosis`.
    """
    n, m2, m4, valid = _central_moments(_upcast(p), mask)
    value = m4 / (n * (m2 + eps / n).pow(2))
    return torch.where(valid, value, _nan_like(value))


SHARPNESS = {"kurtosis": excess_kurtosis, "normalized": normalized_kurtosis}
if tuple(SHARPNESS) != SHARPNESS_KINDS:  # CoarseVariant (settings.py, torch-free) checks against the names
    raise ImportError(f"SHARPNESS {tuple(SHARPNESS)} != settings.SHARPNESS_KINDS {SHARPNESS_KINDS}")


def sharpness(p: Tensor, kind: str = "normalized", eps: float = 1e-6, mask: Tensor | None = None) -> Tensor:
    """Sharpness of each attention row over its valid keys: [..., k] -> [...]; kind "kurtosis"
    (`excess_kurtosis`, the paper's) or "normalized" (`normalized_kurtosis`)."""
    if kind not in SHARPNESS:
        raise ValueError(f"sharpness kind must be one of {sorted(SHARPNESS)}, got {kind!r}")
    return SHARPNESS[kind](p, eps=eps, mask=mask)


COARSE_VARIANTS = tuple(CoarseVariant(keys, kind) for keys in KEY_SETS for kind in SHARPNESS)
DEFAULT_COARSE = CoarseVariant()  # the schema's default (heads.coarse): document keys, normalized


def refine_variant(ranking: str) -> str:
    """The refine head table's column of a RefineScore ranking (config `heads.refine.ranking`)."""
    if ranking not in REFINE_RANKINGS:
        raise ValueError(f"RefineScore ranking must be one of {REFINE_RANKINGS}, got {ranking!r}")
    return f"refine_{ranking}"


def coarse_key_mask(query_positions: Tensor, n_keys: int, document_positions: Sequence[int] | Tensor | None = None
                    ) -> Tensor:
    """Keys whose attention weights enter each query's sharpness: [b, nq] -> [b, nq, n_keys] bool.

    Causal keys j <= q; with document_positions (token indices shared by the batch) only those
    among them (CoarseVariant keys "document")."""
    keys = torch.arange(n_keys, device=query_positions.device)
    mask = keys[None, None, :] <= query_positions[:, :, None]
    if document_positions is None:
        return mask
    doc = torch.zeros(n_keys, dtype=torch.bool, device=query_positions.device)
    doc[torch.as_tensor(document_positions, dtype=torch.long, device=doc.device)] = True
    return mask & doc


def anchor_centroid(unembed: Tensor | nn.Module, label_token_ids: Sequence[Sequence[int]]) -> Tensor:
    """c_anchor = mean_{a in A} e(a), e(a) = mean of the unembedding rows of label a's tokens.

    unembed: [vocab, d] (or a module with such a `.weight`, e.g. `lm_head`);
    label_token_ids: one token-id list per anchor (empty lists are skipped). Returns [d].
    """
    if not any(len(ids) > 0 for ids in label_token_ids):
        raise ValueError("anchor_centroid: no anchor has any token")
    with local_values(unembed.weight if isinstance(unembed, nn.Module) else unembed) as weight:
        return torch.stack([weight[list(ids)].mean(0) for ids in label_token_ids if len(ids) > 0]).mean(0)


def anchor_alignment(writes: Tensor, anchor_centroid: Tensor) -> Tensor:
    """Align = cos(Delta, c_anchor) over the last dim.

    writes: [..., d] head writes Delta^h_q = (A^h_q V^h) W_O^h; anchor_centroid: [d] or
    broadcastable to writes (e.g. [b, 1, 1, d]). Returns [...] (0 for a zero write), in float32 for
    half-precision inputs.
    """
    return F.cosine_similarity(_upcast(writes), _upcast(anchor_centroid), dim=-1)


def coarse_score_components(
    rows: Tensor,
    writes: Tensor,
    centroid: Tensor,
    query_mask: Tensor,
    key_mask: Tensor | None = None,
    kind: str = "normalized",
    eps: float = 1e-6,
) -> dict[str, Tensor]:
    """Per-example CoarseScore of every head of one layer (Eq. 1):

        coarse[b, h] = mean_{q in E, valid} s(A^h_q) * cos(Delta^h_q, c_anchor(x_b))

    with s = `sharpness` of kind `kind` over the valid keys (kurtosis: Eq. 1 as written).
    rows: [b, H, nq, k] attention rows (after softmax and GQA repeat) of the early queries E;
    writes: [b, nq, H, d] per-head writes Delta^h_q; centroid: [b, d];
    query_mask: [b, nq] bool (False = padding); key_mask: [b, nq, k] bool (causal/padding, or
    `coarse_key_mask`) or None. Returns sharpness, alignment, coarse: [b, H] (means over valid
    queries; NaN for an example with no valid query or no valid key) and n_queries: [b].
    """
    kmask = None if key_mask is None else key_mask[:, None]  # [b, 1, nq, k]
    sharp = sharpness(rows, kind, eps=eps, mask=kmask)  # [b, H, nq]
    align = anchor_alignment(writes, centroid[:, None, None, :]).transpose(1, 2)  # [b, H, nq]
    align = align.to(sharp.dtype)
    qmask = query_mask.to(torch.bool)[:, None, :]  # [b, 1, nq]
    return {
        "sharpness": masked_mean_or_nan(sharp, qmask),
        "alignment": masked_mean_or_nan(align, qmask),
        "coarse": masked_mean_or_nan(sharp * align, qmask),
        "n_queries": query_mask.to(torch.bool).sum(-1),
    }


def coarse_variants(rows: Tensor, writes: Tensor, centroid: Tensor, query_mask: Tensor,
                    key_masks: dict[str, Tensor | None], eps: float = 1e-6) -> dict[str, Tensor]:
    """`coarse_score_components` of every CoarseVariant: key set name -> key mask ([b, nq, k] or
    None), each with every sharpness kind. Returns coarse_{keys}_{kind}, sharpness_{keys}_{kind}
    (CoarseVariant.name / .sharpness_name), alignment: [b, H] and n_queries: [b]."""
    out: dict[str, Tensor] = {}
    for variant in COARSE_VARIANTS:
        if variant.keys not in key_masks:
            continue
        comps = coarse_score_components(rows, writes, centroid, query_mask, key_masks[variant.keys],
                                        variant.sharpness, eps)
        out[variant.name], out[variant.sharpness_name] = comps["coarse"], comps["sharpness"]
        out["alignment"], out["n_queries"] = comps["alignment"], comps["n_queries"]
    return out


# ---------------------------------------------------------------- margin (Eq. 7)


def _margin_weights(targets: Labels, nearmisses: Labels, vocab: int, like: Tensor) -> Tensor:
    """w with margin = logits @ w: +1/|T| on each target's margin token, -1/|N| on each near-miss's.

    Flat lists give w: [vocab]; lists of per-example lists give w: [b, vocab].
    """
    def one(t: Sequence[int], n: Sequence[int]) -> Tensor:
        if len(t) == 0 or len(n) == 0:
            raise ValueError("margin needs at least one target and one near-miss token")
        w = torch.zeros(vocab, dtype=like.dtype, device=like.device)
        w.index_add_(0, torch.as_tensor(list(t), device=like.device), like.new_full((len(t),), 1 / len(t)))
        w.index_add_(0, torch.as_tensor(list(n), device=like.device), like.new_full((len(n),), -1 / len(n)))
        return w

    nested = len(targets) > 0 and hasattr(targets[0], "__len__")  # lists, tuples, numpy arrays
    if not nested:
        return one(targets, nearmisses)
    if len(targets) != len(nearmisses):
        raise ValueError("per-example targets and near-misses differ in length")
    return torch.stack([one(t, n) for t, n in zip(targets, nearmisses)])


def margin(logits_t: Tensor, target_tokens: Labels, nearmiss_tokens: Labels) -> Tensor:
    """M_t = mean_{a in targets} z_t[a*] - mean_{a in near-misses} z_t[a*] (Eq. 7).

    logits_t: [..., vocab]; the token lists hold one token a* per label (repeats count): its first
    token that differs from the other group's labels (`teacher_forcing.margin_tokens`). Either flat
    lists shared by all rows, or one list per example, in which case logits_t is [b, ..., vocab].
    Returns [...].
    """
    w = _margin_weights(target_tokens, nearmiss_tokens, logits_t.shape[-1], logits_t)
    if w.dim() == 1:
        return logits_t @ w
    w = w.reshape(w.shape[0], *([1] * (logits_t.dim() - 2)), w.shape[-1])  # [b, 1.., vocab]
    return (logits_t * w).sum(-1)


def _unembed(h: Tensor, unembed: Tensor | nn.Module) -> Tensor:
    return unembed(h) if isinstance(unembed, nn.Module) else h @ unembed.T


def margin_gradient(
    h_final: Tensor,
    final_norm: nn.Module,
    unembed: Tensor | nn.Module,
    target_tokens: Labels,
    nearmiss_tokens: Labels,
    create_graph: bool = False,
) -> Tensor:
    """grad_{h_final,t} M_t through the final norm and the unembedding.

    h_final: [b, d] residual stream before the final norm at position t (one row per example);
    final_norm: `attention.final_norm(model)`; unembed: `attention.unembed(model)` or a [vocab, d] matrix.
    Differentiates a detached leaf copy of h_final (its history is not touched); with
    create_graph=True the result stays differentiable w.r.t. the norm/unembedding parameters.
    Rows are independent (the norm acts per row), so the gradient of the sum is per row. Returns [b, d].
    """
    with torch.enable_grad():
        h = h_final.detach().clone().requires_grad_(True)
        m = margin(_unembed(final_norm(h), unembed), target_tokens, nearmiss_tokens)  # [b]
        (grad,) = torch.autograd.grad(m.sum(), h, create_graph=create_graph)
    return grad


# ---------------------------------------------------------------- Phase 2 (Eq. 3)


def earlier_mask(mention_mask: Tensor, query_positions: Tensor) -> Tensor:
    """Mentions strictly before each refinement position: S/N masks for `qk_loopback`.

    mention_mask: [b, nk] bool (key position is a shortlist / near-miss mention);
    query_positions: [b, nr] long token index of each refinement query (key index space),
    negative = padding. Returns [b, nr, nk] bool.
    """
    keys = torch.arange(mention_mask.shape[-1], device=mention_mask.device)
    before = keys[None, None, :] < query_positions[:, :, None]  # [b, nr, nk]
    return before & mention_mask.to(torch.bool)[:, None, :] & (query_positions[:, :, None] >= 0)


def qk_loopback(
    q: Tensor,
    k: Tensor,
    shortlist_mask: Tensor,
    nearmiss_mask: Tensor,
    scaling: float,
    empty: float = float("nan"),
) -> Tensor:
    """QK loop-back of each head at each refinement position t:

        QK_t = mean_{j in S_t} q_t.k_j * scaling - mean_{j in N_t} q_t.k_j * scaling

    q: [b, H, nr, dh] queries at refinement positions; k: [b, H, nk, dh] keys (after RoPE and the
    GQA repeat, i.e. the vectors whose dot product makes the attention logits); scaling: usually
    1/sqrt(dh); shortlist_mask, nearmiss_mask: [b, nr, nk] bool selecting the EARLIER shortlist /
    near-miss mention keys of each refinement position (see `earlier_mask`; the function does not
    check causality). Returns [b, H, nr]; NaN where S_t or N_t is empty (or `empty` as the mean
    of an empty set, e.g. 0.0 to keep the other term).
    """
    scores = torch.einsum("bhrd,bhkd->bhrk", _upcast(q), _upcast(k)) * scaling  # [b, H, nr, nk], float32 at least
    s = masked_mean_or_nan(scores, shortlist_mask[:, None], fill=empty)
    n = masked_mean_or_nan(scores, nearmiss_mask[:, None], fill=empty)
    return s - n


def _attended_write(rows_at_t: Tensor, value_writes: Tensor, shortlist_mask: Tensor, tau: float) -> Tensor:
    """sum_{j in S_t, A_tj > tau} A_tj v_j W_O^h: [b, H, nr, d] (float32 at least: neither the weights
    nor the sum are rounded to half precision)."""
    if rows_at_t.shape[-1] != value_writes.shape[-2]:
        raise ValueError("rows_at_t and value_writes must index the same key positions")
    keep = shortlist_mask.to(torch.bool)[:, None] & (rows_at_t > tau)  # [b, H, nr, nk]
    weights = torch.where(keep, rows_at_t, torch.zeros((), dtype=rows_at_t.dtype, device=rows_at_t.device))
    value_writes = _upcast(value_writes)
    return torch.einsum("bhrk,bhkd->bhrd", _upcast(weights).to(value_writes.dtype), value_writes)


def _no_shortlist_to_nan(x: Tensor, shortlist_mask: Tensor) -> Tensor:
    has_s = shortlist_mask.to(torch.bool).any(-1)[:, None]  # [b, 1, nr]
    return torch.where(has_s, x, _nan_like(x))


def ov_helpfulness(
    rows_at_t: Tensor, value_writes: Tensor, shortlist_mask: Tensor, grad: Tensor, tau: float
) -> Tensor:
    """OV helpfulness of each head at each refinement position t (Sec. 2, Eq. 3):

        OV_t = < sum_{j in S_t, A_tj > tau} A_tj v_j W_O^h , grad_{h_final,t} M_t >

    rows_at_t: [b, H, nr, nk] attention weights of refinement query t on the key positions
    (after softmax and GQA repeat); value_writes: [b, H, nk, d] per-key v_j W_O^h on the same key
    positions; shortlist_mask: [b, nr, nk] bool (earlier shortlist mentions); grad: [b, nr, d]
    (`margin_gradient` at t). Returns [b, H, nr]: 0 when S_t is non-empty but no key of it has
    A_tj > tau (the empty sum: the head wrote nothing there), NaN when S_t is empty.
    """
    write = _attended_write(rows_at_t, value_writes, shortlist_mask, tau)  # [b, H, nr, d]
    ov = (write * grad[:, None].to(write.dtype)).sum(-1)  # float32 at least (`_attended_write`)
    return _no_shortlist_to_nan(ov, shortlist_mask)


def ov_helpfulness_cos(
    rows_at_t: Tensor, value_writes: Tensor, shortlist_mask: Tensor, grad: Tensor, tau: float
) -> Tensor:
    """Cosine form of `ov_helpfulness` (scale-free; used to compare teacher and student, Eq. 6):

        OVcos_t = cos(sum_{j in S_t, A_tj > tau} A_tj v_j W_O^h, grad_{h_final,t} M_t)

    Same shapes and NaN rule; 0 when no shortlist key passes tau (cosine of a zero vector).
    """
    write = _attended_write(rows_at_t, value_writes, shortlist_mask, tau)
    cos = F.cosine_similarity(write, grad[:, None].to(write.dtype), dim=-1)
    return _no_shortlist_to_nan(cos, shortlist_mask)


def refine_score_components(
    q: Tensor,
    k: Tensor,
    rows_at_t: Tensor,
    value_writes: Tensor,
    shortlist_mask: Tensor,
    nearmiss_mask: Tensor,
    grad: Tensor,
    position_mask: Tensor,
    scaling: float,
    tau: float,
    cosine: bool = False,
) -> dict[str, Tensor]:
    """Per-example parts of the RefineScore of every head of one layer (Eq. 3):

        qk[b, h] = mean_{t in R_b} QK_t(h)       ov[b, h] = mean_{t in R_b} OV_t(h)
        refine_mean_product[b, h] = mean_{t in R_b} QK_t(h) * OV_t(h)     (a diagnostic)

    The paper's RefineScore is the product of QK and OV each averaged over positions AND
    documents (Sec. 2: "compute QK, OV averaged over positions and examples, then take the
    product"), so it is formed after aggregation (`weighted_mean`, then `refine_rankings`).
    q, k, rows_at_t, value_writes, shortlist_mask, nearmiss_mask, grad: as in `qk_loopback` /
    `ov_helpfulness`; position_mask: [b, nr] bool (False = padding). A refinement position counts
    only when it is valid and has both an earlier shortlist and an earlier near-miss mention
    (otherwise QK_t is undefined); qk, ov and refine_mean_product average over the same positions.
    cosine=True uses `ov_helpfulness_cos`. Returns qk, ov, refine_mean_product: [b, H] (NaN for an
    example with no counted position) and n_positions: [b].
    """
    qk = qk_loopback(q, k, shortlist_mask, nearmiss_mask, scaling)  # [b, H, nr]
    ov_fn = ov_helpfulness_cos if cosine else ov_helpfulness
    ov = ov_fn(rows_at_t, value_writes, shortlist_mask, grad, tau).to(qk.dtype)  # [b, H, nr]
    valid = (
        position_mask.to(torch.bool)
        & shortlist_mask.to(torch.bool).any(-1)
        & nearmiss_mask.to(torch.bool).any(-1)
    )  # [b, nr]
    vmask = valid[:, None, :]  # [b, 1, nr]
    zero = torch.zeros((), dtype=qk.dtype, device=qk.device)
    qk, ov = torch.where(vmask, qk, zero), torch.where(vmask, ov, zero)  # no NaN in the product's backward
    return {
        "qk": masked_mean_or_nan(qk, vmask),
        "ov": masked_mean_or_nan(ov, vmask),
        "refine_mean_product": masked_mean_or_nan(qk * ov, vmask),
        "n_positions": valid.sum(-1),
    }


def refine_rankings(qk: Tensor, ov: Tensor) -> dict[str, Tensor]:
    """RefineScore rankings from QK and OV ALREADY averaged over positions and documents ([...] each):

        refine_product       = qk * ov                               (Eq. 3 as the paper states it)
        refine_both_positive = qk * ov where qk > 0 and ov > 0, else 0

    A head that loops back to near-misses (qk < 0) AND writes against the target (ov < 0) has a
    positive product but does neither thing Phase 2 is about; both_positive scores it 0. NaN stays NaN.
    """
    product = qk * ov
    both = torch.where((qk > 0) & (ov > 0), product, torch.zeros_like(product))
    return {"refine_product": product, "refine_both_positive": torch.where(torch.isnan(product), product, both)}


# ---------------------------------------------------------------- aggregation over examples


class HeadMeans:
    """Weighted means over examples of per-head components, NaN entries ignored, added one example at a
    time: memory stays that of one example's components, whatever the number of examples.

    add({name: [...]}, n) adds an example whose components were averaged over n positions; `means()`:
    name -> sum_e n_e v_e / sum_e n_e over the examples where v_e is finite and n_e > 0 (NaN where there
    is none); `counts()`: positions summed over the examples where EVERY component is finite. Sums are
    taken in float64, in the order the examples are added: the same examples in the same order give the
    same bits.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}      # name -> [...] sum_e n_e v_e
        self.weights: dict[str, Tensor] = {}   # name -> [...] sum_e n_e
        self.count: Tensor | None = None       # [...] positions of the examples with every component finite
        self.n_examples = 0

    def add(self, values: dict[str, Tensor], n: int | Tensor) -> None:
        values = {k: torch.as_tensor(v).detach().double() for k, v in values.items()}
        all_finite = torch.stack([torch.isfinite(v) for v in values.values()]).all(0)
        n = torch.as_tensor(n)
        for name, v in values.items():
            w = n.to(v.dtype).expand_as(v)
            ok = torch.isfinite(v) & (w > 0)
            zero = torch.zeros((), dtype=v.dtype, device=v.device)
            value_sum, weight_sum = torch.where(ok, v * w, zero), torch.where(ok, w, zero)
            if name in self.sums:
                value_sum, weight_sum = self.sums[name] + value_sum, self.weights[name] + weight_sum
            self.sums[name], self.weights[name] = value_sum, weight_sum
        counted = torch.where(all_finite, n, torch.zeros((), dtype=n.dtype))
        self.count = counted if self.count is None else self.count + counted
        self.n_examples += 1

    def means(self) -> dict[str, Tensor]:
        out = {}
        for name, total in self.sums.items():
            weight = self.weights[name]
            mean = total / weight.clamp(min=torch.finfo(total.dtype).tiny)
            out[name] = torch.where(weight > 0, mean, _nan_like(mean))
        return out

    def counts(self) -> Tensor:
        if self.count is None:
            raise ValueError("HeadMeans: no example was added")
        return self.count

    def table(self, score: str, count_name: str = "n_queries",
              derived: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None) -> pd.DataFrame:
        """The `heads/{coarse,refine}.parquet` table of the means: columns layer (for [L, H] components),
        head, score, score_variant, the components, the `derived` columns (computed from the MEANS, e.g.
        `refine_rankings`: products of means), `count_name` (`counts()`). score: the component or derived
        column that becomes column `score`, and `score_variant` names it (Parquet keeps no attrs)."""
        means = self.means()
        means |= derived(means) if derived else {}
        if score not in means:
            raise KeyError(f"head_table: score {score!r} is not among the columns {sorted(means)}")
        shape = self.counts().shape
        index = torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape))
        cols: dict[str, list] = {}
        if len(shape) == 2:
            cols["layer"] = index[:, 0].tolist()
        cols["head"] = index[:, -1].tolist()
        cols["score"] = means[score].reshape(-1).tolist()
        cols["score_variant"] = [score] * len(cols["head"])
        cols |= {name: v.reshape(-1).tolist() for name, v in means.items()}
        cols[count_name] = self.counts().reshape(-1).tolist()
        return pd.DataFrame(cols)


def weighted_mean(values: Tensor, n: Tensor) -> Tensor:
    """Mean over examples weighted by their number of positions, ignoring NaN entries (`HeadMeans`).

    values: [E, ...] (e.g. [E, H]); n: [E]. Returns [...] (float64): sum_e n_e v_e / sum_e n_e over the
    examples where v_e is finite and n_e > 0; NaN where there is none.
    """
    means = HeadMeans()
    for value, weight in zip(values, n):
        means.add({"value": value}, weight)
    return means.means()["value"]


def head_table(
    per_example: dict[str, Tensor],
    n: Tensor,
    score: str,
    count_name: str = "n_queries",
    derived: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> pd.DataFrame:
    """Aggregate per-example head scores into the `heads/{coarse,refine}.parquet` table (`HeadMeans.table`).

    per_example: name -> [E, H] (one layer) or [E, L, H] (all layers), e.g. the output of
    `coarse_variants` concatenated over documents (count entries are skipped); n: [E] positions per
    example. Every component becomes the weighted mean over examples; derived maps those MEANS to more
    columns. Returns columns layer (when 3-D), head, score, score_variant, the components, the derived
    columns, `count_name` (positions summed over the examples where every component is finite).
    """
    comps = {k: v for k, v in per_example.items() if k not in ("n_queries", "n_positions")}
    means = HeadMeans()
    for e, weight in enumerate(n):
        means.add({k: v[e] for k, v in comps.items()}, weight)
    return means.table(score, count_name, derived)
