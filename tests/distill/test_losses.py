"""Distillation losses (mechdistill.distill.losses / pools) on tiny random-init LLaMA models."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mechdistill.characterize.capture import capture_heads, final_residual
from mechdistill.characterize.scores import anchor_centroid
from mechdistill.distill.losses import (
    aligned_positions,
    cot_loss,
    cross_tokenizer_kl,
    map_rows_to_spans,
    phase1_losses,
    phase1_signals,
    phase2_losses,
    phase2_signals,
    refine_margin_grad,
    span_overlap_matrix,
    topk_targets,
    total_loss,
)
from mechdistill.distill.pools import pooled_rows, pooled_writes, select_pool
from mechdistill.text import token_offsets
from tests.helpers import tiny_llama

TEXT = ("Dyspnea, edema. Heart failure [I50] fits; not pneumonia [J18]. "
        "So heart failure [I50] rather than pneumonia [J18].")
COT_START = TEXT.index("Heart")
EARLY = list(range(COT_START - 1, COT_START + 9))           # positions producing the first early CoT tokens


def _char_positions(sub: str) -> list[int]:
    """Byte-tokenizer positions (one token per ASCII char) of every occurrence of `sub`."""
    out, start = [], 0
    while (i := TEXT.find(sub, start)) >= 0:
        out += list(range(i, i + len(sub)))
        start = i + 1
    return out


SHORTLIST = _char_positions("[I50]")
NEARMISS = _char_positions("[J18]")
KEYS = SHORTLIST + NEARMISS
REFINE = [TEXT.rindex("[I50]") + 4, len(TEXT) - 1]          # each has earlier S and N mentions


def head_table(seed: int) -> pd.DataFrame:
    g = torch.Generator().manual_seed(seed)
    return pd.DataFrame({"layer": [layer for layer in range(2) for _ in range(4)], "head": list(range(4)) * 2,
                         "score": torch.rand(8, generator=g).tolist()})


def pools(seed: int):
    table = head_table(seed)
    return (select_pool(table, n_layers=2, k=3, temperature=0.5, layer_range=(0.0, 0.5)),
            select_pool(table, n_layers=2, k=3, temperature=0.5, layer_range=(0.33, 1.0)))


@pytest.fixture(scope="module")
def ids(byte_tok):
    out = torch.tensor(byte_tok(TEXT, add_special_tokens=False)["input_ids"])
    assert len(out) == len(TEXT)
    return out


@pytest.fixture(scope="module")
def teacher(byte_tok):
    return tiny_llama(len(byte_tok), seed=0)


def signals(model, tok, ids, pool1, pool2, k: int = 8) -> dict:
    """Phase 1, Phase 2 and CoT inputs of one model on TEXT (gradients flow unless under no_grad)."""
    _, cap1 = capture_heads(model, ids[None], query_positions=[EARLY], layers=pool1.layers, what=("rows", "writes"))
    anchors = [tok(a, add_special_tokens=False)["input_ids"] for a in ("heart failure", "edema")]
    p1 = phase1_signals(model, cap1, pool1, anchor_centroid(model.lm_head.weight, anchors))
    with final_residual(model) as res:
        out, cap2 = capture_heads(model, ids[None], query_positions=[REFINE], key_positions=[KEYS],
                                  layers=pool2.layers, what=("rows", "qk", "value_writes"))
    first = [tok(t, add_special_tokens=False)["input_ids"][0] for t in ("I50", "J18")]
    grad = refine_margin_grad(model, res.h[:, REFINE], [first[0]], [first[1]])        # [1, nr, d]
    before = torch.tensor(KEYS)[None, None, :] < torch.tensor(REFINE)[None, :, None]  # [1, nr, nk]
    is_s = torch.tensor([i < len(SHORTLIST) for i in range(len(KEYS))])
    p2 = phase2_signals(model, cap2, pool2, grad, before & is_s, before & ~is_s, tau=0.0)
    logits = out.logits[:, :-1]                                                     # [1, seq-1, V]
    mask = (torch.arange(len(ids) - 1) >= COT_START - 1)[None]
    return {"phase1": p1, "phase2": p2, "logits": logits, "labels": ids[1:][None], "mask": mask,
            "topk": topk_targets(logits, k)}


def all_terms(t: dict, s: dict, tau: float = 2.0) -> dict:
    return {"cot": cot_loss(s["logits"], s["mask"], *t["topk"], temperature=tau, labels=s["labels"]),
            "phase1": phase1_losses(t["phase1"], s["phase1"]),
            "phase2": phase2_losses(t["phase2"], s["phase2"])}


# ------------------------------------------------------------------------------- pools


def test_select_pool_respects_k_range_and_softmax_weights():
    table = pd.DataFrame({"layer": [0, 0, 1, 1, 2, 2, 3, 3], "head": [0, 1] * 4,
                          "score": [0.1, 0.9, 0.5, float("nan"), 2.0, 0.3, float("nan"), float("nan")]})
    pool = select_pool(table, n_layers=4, k=2, temperature=0.5, layer_range=(0.0, 0.5))
    assert pool.heads == [(0, 1), (1, 0)]                  # layers 0, 1 only; NaN excluded; by score
    e = [math.exp(0.9 / 0.5), math.exp(0.5 / 0.5)]
    np.testing.assert_allclose(pool.weights.numpy(), [e[0] / sum(e), e[1] / sum(e)], rtol=1e-6)
    assert pool.layers == [0, 1]
    late = select_pool(table, n_layers=4, k=10, temperature=1.0, layer_range=(0.5, 1.0))
    assert late.heads == [(2, 0), (2, 1)]                  # fewer than k qualify: all of them
    np.testing.assert_allclose(late.weights.sum().item(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(0.75, 1.0\)"):
        select_pool(table, n_layers=4, k=2, temperature=1.0, layer_range=(0.75, 1.0))


def test_pooled_rows_and_writes_are_weighted_head_sums(teacher, ids):
    pool = select_pool(head_table(3), n_layers=2, k=5, temperature=1.0, layer_range=(0.0, 1.0))
    _, cap = capture_heads(teacher, ids[None], query_positions=[EARLY], what=("rows", "writes", "z"))
    rows = sum(w * cap.rows[layer][:, h] for (layer, h), w in zip(pool.heads, pool.weights.tolist()))
    writes = sum(w * cap.writes[layer][:, :, h] for (layer, h), w in zip(pool.heads, pool.weights.tolist()))
    torch.testing.assert_close(pooled_rows(cap, pool), rows)
    torch.testing.assert_close(pooled_writes(cap, pool), writes)
    cap.writes.clear()                                     # the z + W_O route gives the same writes
    torch.testing.assert_close(pooled_writes(cap, pool, teacher), writes, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- zero / positive / gradients


def test_every_term_zero_for_identical_student_positive_for_perturbed(teacher, byte_tok, ids):
    pool1, pool2 = pools(1)
    with torch.no_grad():
        t = signals(teacher, byte_tok, ids, pool1, pool2)
        same = all_terms(t, signals(copy.deepcopy(teacher), byte_tok, ids, pool1, pool2))
        student = copy.deepcopy(teacher)
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
        other = all_terms(t, signals(student, byte_tok, ids, pool1, pool2))
    assert t["phase1"]["mask"].all() and t["phase2"]["mask"].all()
    for group in ("phase1", "phase2"):
        for name, value in same[group].items():
            assert value.item() == pytest.approx(0.0, abs=1e-10), (group, name)
            assert other[group][name].item() > 1e-8, (group, name)
    assert same["cot"]["kl"].item() == pytest.approx(0.0, abs=1e-10)
    assert other["cot"]["kl"].item() > 1e-8
    assert same["cot"]["ce"].item() > 0                    # CE is on the teacher's tokens, not a discrepancy


def test_gradients_reach_student_and_never_teacher(teacher, byte_tok, ids):
    teacher = copy.deepcopy(teacher)                       # teacher signals computed WITH grad enabled
    student = tiny_llama(len(byte_tok), seed=5)
    pool1, pool2 = pools(1)
    loss = total_loss(all_terms(signals(teacher, byte_tok, ids, pool1, pool2),
                                signals(student, byte_tok, ids, *pools(2))))
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    for group, switch in (("phase1", "phase1"), ("phase2", "phase2")):
        student.zero_grad(set_to_none=True)
        terms = all_terms(signals(teacher, byte_tok, ids, pool1, pool2), signals(student, byte_tok, ids, *pools(2)))
        total_loss(terms, switches={"cot": False, "phase1": switch == "phase1", "phase2": switch == "phase2"}).backward()
        layer = 0 if group == "phase1" else 1
        attn = student.model.layers[layer].self_attn
        for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0, (group, proj)
        assert student.lm_head.weight.grad is None         # centroid and margin gradient are constants


# ------------------------------------------------------------------------------- CoT loss


def test_cot_loss_matches_hand_computation():
    logits = torch.tensor([[[0.5, -1.0, 0.2, 1.5, 0.0], [9.0, 9.0, 9.0, 9.0, 9.0]]], requires_grad=True)
    values = torch.tensor([[[2.0, 1.0, 0.0], [5.0, 4.0, 3.0]]])
    indices = torch.tensor([[[3, 0, 4], [1, 2, 3]]])
    labels, mask = torch.tensor([[3, 0]]), torch.tensor([[True, False]])   # 2nd position ignored
    tau = 2.0
    out = cot_loss(logits, mask, values, indices, temperature=tau, ce_weight=0.5, kl_weight=2.0, labels=labels)

    def softmax(x):
        e = [math.exp(v) for v in x]
        return [v / sum(e) for v in e]

    p_t = softmax([2.0 / tau, 1.0 / tau, 0.0])
    p_s = softmax([1.5 / tau, 0.5 / tau, 0.0 / tau])       # student logits at ids 3, 0, 4
    kl = tau ** 2 * sum(a * math.log(a / b) for a, b in zip(p_t, p_s))
    ce = -math.log(softmax([0.5, -1.0, 0.2, 1.5, 0.0])[3])
    assert out["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert out["ce"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.5 * ce + 2.0 * kl, rel=1e-5)
    out["loss"].backward()
    assert logits.grad[0, 1].abs().sum() == 0              # masked position gets no gradient
    with pytest.raises(ValueError, match="labels"):
        cot_loss(logits, mask, values, indices, temperature=tau)


def test_total_loss_weights_and_switches():
    t = torch.tensor
    terms = {"cot": {"ce": t(1.0), "kl": t(2.0), "loss": t(99.0)},
             "phase1": {"attn": t(3.0), "write": t(4.0), "interaction": t(5.0)},
             "phase2": {"qk": t(6.0), "ov": t(7.0), "interaction": t(8.0)}}
    assert total_loss(terms).item() == pytest.approx(36.0)
    weights = {"alpha": 2.0, "beta": 3.0, "phase1.write": 0.5, "phase2.ov": 0.0}
    expected = 1 + 2 + 2 * (3 + 0.5 * 4 + 5) + 3 * (6 + 8)
    assert total_loss(terms, weights).item() == pytest.approx(expected)
    switches = {"phase2": False, "cot.kl": False, "phase1.interaction": False}
    assert total_loss(terms, weights, switches).item() == pytest.approx(1 + 2 * (3 + 0.5 * 4))
    assert total_loss({"cot": terms["cot"]}, switches={"phase1": False, "phase2": False}).item() == 3.0
    with pytest.raises(KeyError, match="phase2.qk"):
        total_loss({"cot": terms["cot"], "phase1": terms["phase1"]})
    with pytest.raises(ValueError, match="unknown weights"):
        total_loss(terms, {"phase1.attention": 1.0})


# ------------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def bpe_tok():
    """A second tokenizer with merges (different vocab size from the byte tokenizer), trained in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    core.train_from_iterator([TEXT] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core)


def test_map_rows_identity_for_identical_tokenizers(byte_tok, ids):
    spans = token_offsets(byte_tok, TEXT)
    rows = torch.softmax(torch.randn(2, 3, len(spans)), -1)
    assert map_rows_to_spans(rows, spans, spans) is rows
    torch.testing.assert_close(span_overlap_matrix(spans, spans), torch.eye(len(spans)))  # general route too


def test_map_rows_mass_preserving_across_tokenizers(byte_tok, bpe_tok):
    src, units = token_offsets(byte_tok, TEXT), token_offsets(bpe_tok, TEXT)
    assert len(bpe_tok) != len(byte_tok) and len(units) < len(src)
    rows = torch.softmax(torch.randn(3, len(src), dtype=torch.float64), -1)
    mapped = map_rows_to_spans(rows, src, units)                       # [3, n_units]
    expected = torch.stack([rows[:, [i for i, (a, _) in enumerate(src) if s <= a < e]].sum(-1)
                            for s, e in units], -1)                    # ASCII: one char per byte token
    torch.testing.assert_close(mapped, expected)
    torch.testing.assert_close(mapped.sum(-1), torch.ones(3, dtype=torch.float64))
    half = map_rows_to_spans(rows, src, units[: len(units) // 2])      # uncovered mass: renormalised
    torch.testing.assert_close(half, expected[:, : len(units) // 2] / expected[:, : len(units) // 2].sum(-1, True))


def test_cross_tokenizer_kl_hand_numbers():
    values = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))              # teacher top-3 (sorted or not)
    probs = np.array([0.05, 0.30, 0.15, 0.10, 0.40])
    logits = torch.tensor(np.log(probs), dtype=torch.float32)[None, None].requires_grad_(True)
    loss = cross_tokenizer_kl(logits, values, torch.tensor([0]), torch.tensor([0]))
    top = np.sort(probs)[::-1][:3]
    expected = np.abs(np.array([0.5, 0.3, 0.2]) - top / top.sum()).sum()
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad.abs().sum() > 0
    permuted = torch.log(torch.tensor([[[0.2, 0.0001, 0.5, 0.3]]]))  # same top-3 probs on other ids
    permuted = permuted - torch.logsumexp(permuted[..., [0, 2, 3]], -1, keepdim=True)
    assert cross_tokenizer_kl(permuted, values, torch.tensor([0]), torch.tensor([0])).item() < 1e-6


def test_cross_tokenizer_losses_on_two_vocabularies(byte_tok, bpe_tok, teacher, ids):
    student = tiny_llama(len(bpe_tok), seed=3)
    s_ids = torch.tensor(bpe_tok(TEXT, add_special_tokens=False)["input_ids"])
    t_spans, s_spans = token_offsets(byte_tok, TEXT), token_offsets(bpe_tok, TEXT)
    t_pos, s_pos = aligned_positions(t_spans, s_spans)
    assert 0 < len(t_pos) == len(s_pos) < len(t_spans)
    assert all(t_spans[i][1] == s_spans[j][1] for i, j in zip(t_pos.tolist(), s_pos.tolist()))
    with torch.no_grad():
        t_logits = teacher(ids[None]).logits
    s_logits = student(s_ids[None]).logits
    values, _ = topk_targets(t_logits, 8)
    loss = cross_tokenizer_kl(s_logits, values, s_pos, t_pos, temperature=2.0)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0
    pos, _ = aligned_positions(t_spans, t_spans)          # same tokenizer: every position pairs with itself
    same = cross_tokenizer_kl(t_logits, values, pos, pos)
    assert same.item() == pytest.approx(0.0, abs=1e-6)

    # Phase 1 across tokenizers: aligned early queries, rows mapped onto the student's tokens.
    early = [(i, j) for i, j in zip(t_pos.tolist(), s_pos.tolist()) if COT_START - 1 <= i < len(TEXT) - 1][:6]
    pool_t, pool_s = pools(1)[0], pools(2)[0]
    anchors = "heart failure"
    with torch.no_grad():
        _, cap_t = capture_heads(teacher, ids[None], query_positions=[[i for i, _ in early]], what=("rows", "writes"))
        sig_t = phase1_signals(teacher, cap_t, pool_t, anchor_centroid(teacher.lm_head.weight, [byte_tok(anchors, add_special_tokens=False)["input_ids"]]),
                               spans=(t_spans, s_spans))
    _, cap_s = capture_heads(student, s_ids[None], query_positions=[[j for _, j in early]], what=("rows", "writes"))
    sig_s = phase1_signals(student, cap_s, pool_s, anchor_centroid(student.lm_head.weight, [bpe_tok(anchors, add_special_tokens=False)["input_ids"]]),
                           spans=(s_spans, s_spans))
    assert sig_t["rows"].shape == sig_s["rows"].shape == (1, len(early), len(s_spans))
    terms = phase1_losses(sig_t, sig_s)
    assert all(torch.isfinite(v) and v.item() > 0 for v in terms.values())


# ------------------------------------------------------------------------------- training


def test_student_loss_decreases_toward_fixed_teacher(teacher, byte_tok, ids):
    student = tiny_llama(len(byte_tok), seed=7).train()
    pool1, pool2 = pools(1)
    s_pools = pools(4)
    with torch.no_grad():
        t = signals(teacher, byte_tok, ids, pool1, pool2)
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    history = []
    for _ in range(20):
        terms = all_terms(t, signals(student, byte_tok, ids, *s_pools))
        loss = total_loss(terms)
        history.append((loss.item(), sum(v.item() for g in ("phase1", "phase2") for v in terms[g].values())))
        opt.zero_grad()
        loss.backward()
        opt.step()
    (first, first_mech), (last, last_mech) = history[0], history[-1]
    assert last < 0.8 * first
    assert last_mech < first_mech
