"""CWT / Skip-Thinking: chunk boundaries, per-chunk supervision, skip labels, the epoch schedule, training."""

from __future__ import annotations

import json
import random

import pandas as pd
import pytest
import torch
from torch import nn

from mechdistill.distill.baselines import cwt
from mechdistill.distill.recipe import RecipeContext
from mechdistill.io import SplitArtifacts
from mechdistill.labels import LabelSpace
from mechdistill.models import byte_tokenizer
from mechdistill.teacher.prompts import render_prompt
from tests.helpers import tiny_llama

MESSAGES = json.dumps([{"role": "user", "content": "Code the note."}])
# 4 sentences of 6 characters (byte tokens) each, the last without its trailing space: 23 tokens
COT = "Aaaa. Bbbb. Cccc. Dddd."
ANSWER = "<answer>X1</answer>"
PARAMS = {**cwt.RECIPE.spec.defaults, "chunking": "average"}


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def split_of(cots: dict[str, str], raw_tail: str = "\n" + ANSWER) -> SplitArtifacts:
    ids = list(cots)
    space = LabelSpace(pd.DataFrame({"label_id": ["X1"], "title": ["x"], "parent": [None], "ancestors": [[]],
                                     "assignable": [True]}))
    return SplitArtifacts(
        docs=pd.DataFrame({"doc_id": ids, "labels": [["X1"]] * len(ids)}).set_index("doc_id"),
        prompts=pd.DataFrame({"doc_id": ids, "messages": [MESSAGES] * len(ids),
                              "candidates": [["X1"]] * len(ids)}).set_index("doc_id"),
        cot=pd.DataFrame({"doc_id": ids, "cot": list(cots.values()), "raw": [c + raw_tail for c in cots.values()],
                          "pred_labels": [["X1"]] * len(ids)}).set_index("doc_id"),
        anchors=pd.DataFrame({"doc_id": ids}), space=space)


def context(tok, cots: dict[str, str], model=None, **params) -> RecipeContext:
    return RecipeContext(tokenizer=tok, split=split_of(cots), split_name="train", params={**PARAMS, **params},
                         seed=7, model=model)


# ----------------------------------------------------------------------------- boundaries


def test_sentence_starts_follow_sentence_and_line_ends():
    text = "Ab. Cd\nEf 3.5 x"
    flags = cwt.sentence_starts(text, list(range(len(text))))
    assert [i for i, f in enumerate(flags) if f] == [4, 7]  # "C" after ". ", "E" after "\n"; not " ", "5" in 3.5
    bpe = "Ab. Cd\n Ef"  # tokens "Ab", ".", " Cd", "\n", " Ef": a leading space counts, a lone "\n" not
    assert cwt.sentence_starts(bpe, [0, 2, 3, 6, 7]) == [False, False, True, False, True]


def test_average_boundaries_snap_to_the_nearest_sentence_start():
    is_start = [False] * 20
    for t in (4, 11, 18):
        is_start[t] = True
    # targets 5, 10, 15, reach int(0.4 * 5) = 2: 5 -> 4, 10 -> 11, 15 has none in 13..17 and stays
    assert cwt.average_boundaries(is_start, 4, 0.4) == [0, 4, 11, 15, 20]
    is_start[6] = True  # 4 and 6 both 1 from target 5: the earlier
    assert cwt.average_boundaries(is_start, 4, 0.4)[1] == 4
    assert cwt.average_boundaries([False] * 3, 4, 0.4) == [0, 1, 2, 3]  # fewer tokens than chunks


def test_search_moves_a_boundary_to_the_lowest_next_chunk_loss():
    nll = [1, 1, 1, 1, 5, 1, 1, 1]
    # boundary 4 may move to 2..6 (end 8): next-chunk means 2: 11/6, 3: 9/5, 4: 8/4, 5: 3/3, 6: 2/2 -> 5 and 6
    # tie at 1.0, the nearer to 4 wins
    assert cwt.search_boundaries(nll, [0, 4, 8], reach=2) == [0, 5, 8]
    assert cwt.search_boundaries(nll, [0, 4, 8], reach=0) == [0, 4, 8]
    only_6 = [t == 6 for t in range(8)]  # candidates 4 (the old boundary, mean 2) and 6 (mean 1)
    assert cwt.search_boundaries(nll, [0, 4, 8], reach=2, is_start=only_6) == [0, 6, 8]
    assert cwt.search_boundaries(nll, [0, 4, 8], reach=1, is_start=only_6) == [0, 4, 8]  # 6 out of reach


def test_items_supervise_exactly_their_chunk(tok):
    out = cwt.items(context(tok, {"d0": COT, "empty": "  "}))
    # 23 tokens / 4: targets 6, 12 (round(11.5)), 17; sentence starts 6, 12, 18 within reach 1 -> 6, 12, 18
    assert [i.record["chunk"] for i in out] == [0, 1, 2, 3] and {i.doc_id for i in out} == {"d0"}
    assert out[0].record["bounds"] == [0, 6, 12, 18, 23] and out[0].record["skipped"] == []
    chunks = ["Aaaa. ", "Bbbb. ", "Cccc. ", "Dddd." + "\n" + ANSWER + tok.eos_token]  # the end of turn: one token
    prompt = render_prompt(tok, json.loads(MESSAGES))
    for j, item in enumerate(out):
        assert tok.decode(item.input_ids[item.supervised]) == chunks[j]
        assert tok.decode(item.input_ids[~item.supervised]) == prompt + "".join(chunks[:j])
        assert item.summary()["n_supervised"] == len(chunks[j].replace(tok.eos_token, "E"))


def test_search_chunking_needs_the_student_and_leaves_its_mode(tok, monkeypatch):
    with pytest.raises(ValueError, match="no model"):
        cwt.items(context(tok, {"d0": COT}, chunking="search"))
    short = "Ab. Cd. Ef. Gh. Ij. Kl."  # 23 tokens, sentence starts 4, 8, 12, 16, 20
    average = cwt.items(context(tok, {"d0": short}, n_chunks=2))
    assert average[0].record["bounds"] == [0, 12, 23]  # target round(11.5) = 12, a sentence start
    model = tiny_llama(vocab=len(tok), seed=0).train()
    nll = torch.zeros(200)
    prompt_len = len(tok(render_prompt(tok, json.loads(MESSAGES)), add_special_tokens=False)["input_ids"])
    nll[prompt_len + 16] = 9.0  # "I": a second chunk starting at or before it is costly
    monkeypatch.setattr(cwt, "token_nll", lambda m, ids: nll[:len(ids)])
    out = cwt.items(context(tok, {"d0": short}, model=model, chunking="search", n_chunks=2, search_window=1.0))
    # from 12, search reach int(1.0 * 23 / 2) = 11 -> starts
    # 4, 8, 12, 16, 20: next-chunk means 9/19, 9/15, 9/11, 9/7, 0 -> 20
    assert out[0].record["bounds"] == [0, 20, 23]
    assert out[0].extra["chunks"] == ["Ab. Cd. Ef. Gh. Ij. ", "Kl."]
    assert model.training


# ----------------------------------------------------------------------------- skipping


def test_skip_labels_mark_middle_chunks_whose_removal_keeps_the_answer(tok, monkeypatch):
    lines = "A\nB\nC\nD\nE"  # 9 tokens, 5 chunks: targets 2, 4, 5, 7 snap (reach 1) to the line starts 2, 4, 6, 8
    ctx = context(tok, {"d0": lines, "d1": lines}, n_chunks=5, snap_window=1.0, skip_tolerance=0.05)
    ctx.split.cot.loc["d1", "raw"] = lines  # no answer block: nothing to keep, nothing skippable
    fixed = cwt.items(ctx)
    assert fixed[0].extra["chunks"] == ["A\n", "B\n", "C\n", "D\n", "E"]
    losses = {"ABCDE": 1.0, "ACDE": 1.5, "ABDE": 1.03, "ABCE": 0.9, "BCDE": 0.1, "ABCD": 0.1}

    def fake_answer_ce(model, tokenizer, messages, rationale, tail):
        assert not torch.is_grad_enabled() and not model.training and tail
        return losses["".join(c for c in rationale if c.isupper())]

    monkeypatch.setattr(cwt, "answer_ce", fake_answer_ce)
    model = nn.Linear(2, 2).train()
    labels = cwt.relabel(ctx, fixed, model)
    assert model.training
    assert list(labels.columns) == cwt.LABEL_COLUMNS
    d0 = labels[labels["doc_id"] == "d0"].set_index("chunk")
    assert d0["skippable"].tolist() == [False, False, True, True, False]  # +0.5 no, +0.03 and -0.1 yes
    assert d0["answer_loss_skip"].tolist()[1:4] == [1.5, 1.03, 0.9] and d0["answer_loss_skip"].isna().tolist()[::4] == [True, True]
    assert (d0["answer_loss_full"] == 1.0).all()
    d1 = labels[labels["doc_id"] == "d1"]
    assert len(d1) == 5 and not d1["skippable"].any()


def test_answer_ce_and_token_nll_against_log_softmax(tok):
    model = tiny_llama(vocab=len(tok), seed=0)
    ids, supervised, _ = cwt.encode(tok, MESSAGES, [("cot", COT), ("answer", "\n" + ANSWER)], supervise=["answer"])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[None]).logits[0].float(), -1)        # [seq, V]
    answer = [i for i in range(len(ids)) if supervised[i]]
    expected = -sum(float(logp[i - 1, ids[i]]) for i in answer) / len(answer)
    assert len(answer) == len("\n" + ANSWER)
    assert cwt.answer_ce(model, tok, MESSAGES, COT, "\n" + ANSWER) == pytest.approx(expected, rel=1e-5)
    nll = cwt.token_nll(model, ids)  # what the search reads: every token's -log p
    assert nll[0] == 0 and nll[answer[0]] == pytest.approx(-float(logp[answer[0] - 1, ids[answer[0]]]), rel=1e-5)


def test_epoch_schedule_is_deterministic_and_skips_from_skip_from_epoch(tok):
    ctx = context(tok, {f"d{k}": COT for k in range(5)}, skip_from_epoch=2)
    fixed = cwt.items(ctx)
    labels = pd.DataFrame({"doc_id": ["d0", "d0", "d3"], "chunk": [1, 2, 1], "skippable": [True, True, False],
                           "answer_loss_full": 1.0, "answer_loss_skip": 1.0})
    for epoch in (0, 1, 2, 3):
        first = cwt.epoch_items(ctx, fixed, epoch, labels)
        assert [(i.doc_id, i.record["chunk"]) for i in first] == \
            [(i.doc_id, i.record["chunk"]) for i in cwt.epoch_items(ctx, fixed, epoch, labels)]
        assert [i.doc_id for i in first] == [f"d{k}" for k in range(5)]
        for item in first:
            order = [0, 3] if item.doc_id == "d0" and epoch >= 2 else [0, 1, 2, 3]
            drawn = order[random.Random(f"7:{epoch}:{item.doc_id}").randrange(len(order))]
            assert item.record["chunk"] == drawn
            assert item.record["skipped"] == ([1, 2] if len(order) == 2 else [])
    epoch = next(e for e in range(2, 50) if random.Random(f"7:{e}:d0").randrange(2) == 1)  # d0 draws chunk 3
    (late, *_) = cwt.epoch_items(ctx, fixed, epoch, labels)
    # the prefix without chunks 1 and 2; the answer block ends with the end of turn (supervised_output)
    assert tok.decode(late.input_ids).endswith("Aaaa. Dddd.\n" + ANSWER + tok.eos_token)
    assert tok.decode(late.input_ids[late.supervised]) == "Dddd.\n" + ANSWER + tok.eos_token


# ----------------------------------------------------------------------------- training


def test_training_on_a_chunk_lowers_its_loss(tok):
    (item, *_) = cwt.items(context(tok, {"d0": COT}))
    model = tiny_llama(vocab=len(tok), seed=0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        out = cwt.loss(model, item, PARAMS)
        assert out["loss"].requires_grad and float(out["cot.kl"]) == 0.0 and out["cot.ce"].dim() == 0
        losses.append(float(out["loss"].detach()))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.5
