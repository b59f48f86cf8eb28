"""SemCoT: condensed reasoning, items, the loss against a direct computation, implicit-state decoding."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mechdistill.distill.baselines import semcot
from mechdistill.distill.recipe import RecipeContext, TeacherDataContext
from mechdistill.io import SplitArtifacts
from mechdistill.labels import LabelSpace
from mechdistill.models import byte_tokenizer
from mechdistill.teacher.generate import COT_COLUMNS
from mechdistill.teacher.prompts import render_prompt
from tests.helpers import tiny_llama

COTS = {"d0": "The work-up focused on blood pressure. Essential hypertension [I10] fits rather than asthma.",
        "d1": "", "d2": "Sugar was high. Type 2 diabetes fits.", "d3": "Wheezing noted. Asthma [J45] fits."}
RAWS = {"d0": COTS["d0"] + "\n<answer>I10</answer>\n", "d1": "", "d2": COTS["d2"], "d3": COTS["d3"] + " <answer>J45"}
PRED = {"d0": ["I10"], "d1": [], "d2": ["E11"], "d3": ["J45"]}
PARAMS = {**semcot.RECIPE.spec.defaults, "K": 3, "placeholder": ".", "condense": "heuristic", "n_negatives": 2}


def chat(note: str) -> str:
    return json.dumps([{"role": "user", "content": f"Note: {note}. Candidates: I10, E11, J45."}])


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture(scope="module")
def split():
    ids = list(COTS)
    space = LabelSpace(pd.DataFrame({"label_id": ["I10", "E11", "J45"],
                                     "title": ["Essential hypertension", "Type 2 diabetes", "Asthma"],
                                     "parent": [None] * 3, "ancestors": [[], [], []], "assignable": [True] * 3}))
    return SplitArtifacts(
        docs=pd.DataFrame({"doc_id": ids, "labels": [["I10"], ["E11"], ["E11"], ["J45"]]}).set_index("doc_id"),
        prompts=pd.DataFrame({"doc_id": ids, "messages": [chat(f"note {d}") for d in ids],
                              "candidates": [["I10", "E11", "J45"]] * 4}).set_index("doc_id"),
        cot=pd.DataFrame({"doc_id": ids, "cot": [COTS[d] for d in ids], "raw": [RAWS[d] for d in ids],
                          "pred_labels": [PRED[d] for d in ids]}).set_index("doc_id"),
        anchors=pd.DataFrame({"doc_id": ids}), space=space)


@pytest.fixture(scope="module")
def items(tok, split):
    return semcot.items(RecipeContext(tok, split, "train", PARAMS, seed=0))


def test_heuristic_keeps_the_sentences_naming_a_label():
    cot = "First we look. Essential hypertension is likely here. Then I10 again. Other words."
    assert semcot.heuristic_condense(cot, ["I10", "essential HYPERTENSION"], 30) == \
        "Essential hypertension is likely here. Then I10 again."
    assert semcot.heuristic_condense(cot, ["I10", "Essential hypertension"], 4) == "Essential hypertension is likely"
    assert semcot.heuristic_condense(cot, ["Z99"], 30) == "First we look."


def test_teacher_data_condenses_with_the_teacher_and_falls_back(split):
    calls = []

    def generate(texts, max_new_tokens, temperature, seed):
        calls.append((texts, max_new_tokens, temperature))
        return ["Blood pressure high, so I10. <answer>I10</answer>", "  ", "one two three four five six"]

    ctx = TeacherDataContext(generate, lambda m: "USER:" + m[0]["content"], split, "train",
                             {**PARAMS, "condense": "teacher", "condense_words": 5}, seed=0)
    frame = semcot.teacher_data(ctx)
    assert frame["doc_id"].tolist() == ["d0", "d2", "d3"]  # d1 has no CoT
    assert frame["condensed"].tolist() == ["Blood pressure high, so I10.", "Type 2 diabetes fits.",
                                           "one two three four five"]
    assert frame["source"].tolist() == ["teacher", "heuristic (empty teacher output)", "teacher"]
    texts, max_new, temperature = calls[0]
    assert COTS["d2"] in texts[1] and max_new == PARAMS["condense_max_new_tokens"] and temperature == 0.0
    heuristic = semcot.teacher_data(ctx.__class__(generate, str, split, "train", {**PARAMS, "condense_words": 5}, 0))
    assert heuristic["condensed"].tolist() == ["Essential hypertension [I10] fits rather",
                                               "Type 2 diabetes fits.", "Asthma [J45] fits."]
    assert len(calls) == 1


def test_items_lay_out_prompt_placeholders_and_the_supervised_answer(tok, split, items):
    assert [it.doc_id for it in items] == ["d0", "d2", "d3"]  # d1: empty CoT
    d0, d2, d3 = items
    prompt = render_prompt(tok, json.loads(chat("note d0")))
    (n, end), = d0.spans["implicit"]
    assert d0.spans["prompt"] == [(0, n)] and end - n == 3 and d0.spans["answer"] == [(end, len(d0.input_ids))]
    assert tok.decode(d0.input_ids[:n]) == prompt
    assert tok.decode(d0.input_ids[n:end]) == "..."
    assert tok.decode(d0.input_ids[end:]) == "<answer>I10</answer><|im_end|>"
    assert tok.decode(d0.input_ids[d0.supervised]) == "I10</answer><|im_end|>"  # then the end of turn
    assert tok.decode(d2.input_ids[d2.supervised]) == "E11</answer><|im_end|>"  # no block: the predicted labels
    assert tok.decode(d3.input_ids[d3.supervised]) == "J45"           # a block cut before its close
    assert tok.decode(d0.extra["reason_ids"]) == COTS["d0"]
    assert d0.record["condensed"] == "Essential hypertension [I10] fits rather than asthma."
    assert tok.decode(d0.extra["condensed_ids"]) == d0.record["condensed"]
    assert [it.record["negatives"] for it in items] == [["d2", "d3"], ["d3", "d0"], ["d0", "d2"]]
    assert torch.equal(d0.extra["negative_ids"][1], d3.extra["condensed_ids"])
    with_teacher = semcot.items(RecipeContext(tok, split, "train", PARAMS, 0, teacher_data=pd.DataFrame(
        {"doc_id": ["d0"], "condensed": ["short"]})))
    assert [it.record["condensed"] for it in with_teacher][:2] == ["short", items[1].record["condensed"]]


def direct_loss(model, item, alpha, weight, tau):
    """The loss computed from the model's parts by hand (numpy for the cosines and the softmax)."""
    ids = item.input_ids
    (n, end), = item.spans["implicit"]
    table = model.model.embed_tokens.weight
    with torch.no_grad():
        h = model(input_ids=ids[None, :end], output_hidden_states=True).hidden_states[-1][0, n:end]
        scale = table[ids[:n]].norm(dim=-1).mean()
        h = h / h.norm(dim=-1, keepdim=True) * scale
        logits = model(inputs_embeds=torch.cat([table[ids[:n]], h, table[ids[end:]]])[None]).logits[0]
        targets = torch.nonzero(item.supervised).flatten()
        ce = F.cross_entropy(logits[targets - 1], ids[targets]).item()

        def encode(x):
            return model(inputs_embeds=x[None], output_hidden_states=True).hidden_states[-1][0].mean(0).numpy()

        def cos(a, b):
            return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))

        reason, implicit = encode(table[item.extra["reason_ids"]]), encode(h)
        cands = [encode(table[c]) for c in [item.extra["condensed_ids"], *item.extra["negative_ids"]]]
    sims = np.array([cos(reason, c) for c in cands]) / tau
    nce = -(sims[0] - np.log(np.exp(sims).sum()))
    align = 1 - cos(implicit, reason)
    return alpha * align + (1 - alpha) * ce + weight * nce, ce, align, nce


def test_loss_matches_a_direct_computation(tok, items):
    model = tiny_llama(vocab=len(tok), seed=0)
    params = {**PARAMS, "alpha": 0.3, "contrastive_weight": 0.5, "tau": 0.5}
    out = semcot.loss(model, items[0], params)
    total, ce, align, nce = direct_loss(model, items[0], 0.3, 0.5, 0.5)
    assert out["loss"].requires_grad
    assert set(out) == {"loss", "cot.ce", "cot.kl", "semcot.align", "semcot.contrastive"}
    assert out["cot.ce"].item() == pytest.approx(ce, rel=1e-4)
    assert out["semcot.align"].item() == pytest.approx(align, rel=1e-4, abs=1e-6)
    assert out["semcot.contrastive"].item() == pytest.approx(nce, rel=1e-4)
    assert out["loss"].item() == pytest.approx(total, rel=1e-4)
    assert out["cot.kl"].item() == 0.0
    plain = semcot.loss(model, items[0], {**params, "contrastive_weight": 0.0})
    assert plain["semcot.contrastive"].item() == 0.0
    assert plain["loss"].item() == pytest.approx(0.3 * align + 0.7 * ce, rel=1e-4)


def test_training_lowers_the_loss(tok, items):
    model = tiny_llama(vocab=len(tok), seed=1).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        out = semcot.loss(model, items[0], PARAMS)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0]


def manual_greedy(model, inputs_embeds, n_new):
    """Greedy decoding by recomputing the whole sequence every step (no cache)."""
    table, x, out = model.model.embed_tokens.weight, inputs_embeds, []
    for _ in range(n_new):
        token = int(model(inputs_embeds=x[None]).logits[0, -1].argmax())
        out.append(token)
        x = torch.cat([x, table[token][None]])
    return out


def test_predict_decodes_from_the_implicit_states(tok, split):
    """48 implicit states after a short prompt, so that they change what the random model writes."""
    model, params = tiny_llama(vocab=len(tok), seed=0), {**PARAMS, "K": 48}
    prompts = pd.DataFrame({"doc_id": ["q"], "messages": [chat("x")], "candidates": [["I10"]]})
    pred = semcot.predict(model, tok, prompts, split.space, {"force_answer_tokens": 6, "repetition_penalty": 1.0, "fuzzy_threshold": 90}, params)
    assert list(pred.columns) == COT_COLUMNS and len(pred) == 1
    row = pred.iloc[0]
    prompt = torch.tensor(tok(render_prompt(tok, json.loads(chat("x"))), add_special_tokens=False)["input_ids"])
    dots = torch.full((48,), tok.convert_tokens_to_ids("."))
    table, opened = model.model.embed_tokens.weight, model.model.embed_tokens.weight[semcot.token_ids(tok, "<answer>")]
    with torch.no_grad():
        h = model(input_ids=torch.cat([prompt, dots])[None], output_hidden_states=True).hidden_states[-1][0, -48:]
        h = h / h.norm(dim=-1, keepdim=True) * table[prompt].norm(dim=-1).mean()
        expected = manual_greedy(model, torch.cat([table[prompt], h, opened]), 6)
        with_dots = manual_greedy(model, torch.cat([table[prompt], table[dots], opened]), 6)
        without = manual_greedy(model, torch.cat([table[prompt], opened]), 6)
    assert expected != with_dots and expected != without  # the implicit states matter here
    assert row["raw"] == "<answer>" + tok.decode(expected, skip_special_tokens=True)
    assert row["cot"] == "" and row["has_answer_block"] and not row["forced_answer"]
    assert row["n_tokens"] == 6 and row["finish_reason"] == "length"
    assert not model.training


class Scripted(torch.nn.Module):
    """A stand-in LM that writes `script` greedily, one token per call (the step count rides in the cache)."""

    def __init__(self, script: list[int], vocab: int, runner_up: int = 0) -> None:
        super().__init__()
        self.script, self.vocab, self.runner_up = script, vocab, runner_up
        self.generation_config = SimpleNamespace(eos_token_id=None)
        self.embedding = torch.nn.Embedding(vocab, 8)

    def get_input_embeddings(self):
        return self.embedding

    def forward(self, inputs_embeds=None, input_ids=None, past_key_values=None, use_cache=True):
        step = 0 if past_key_values is None else past_key_values + 1
        logits = torch.zeros(1, 1, self.vocab)
        logits[0, 0, self.runner_up] = 0.8
        logits[0, 0, self.script[min(step, len(self.script) - 1)]] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=step)


@pytest.mark.parametrize("text, budget, expected, finish", [
    ("I10</answer>tail", 30, "I10</answer>", "stop"),
    ("I10; E11", 5, "I10; ", "length"),
])
def test_greedy_answer_stops_at_the_close_tag_or_the_budget(tok, text, budget, expected, finish):
    model = Scripted(semcot.token_ids(tok, text).tolist(), len(tok))
    tokens, reason = semcot.greedy_answer(model, tok, torch.zeros(4, 8), budget, 1.0)
    assert (tok.decode(tokens), reason) == (expected, finish)


def test_greedy_answer_stops_at_end_of_turn(tok):
    model = Scripted(semcot.token_ids(tok, "I1").tolist() + [tok.eos_token_id], len(tok))
    tokens, reason = semcot.greedy_answer(model, tok, torch.zeros(4, 8), 30, 1.0)
    assert (tok.decode(tokens, skip_special_tokens=True), len(tokens), reason) == ("I1", 3, "stop")


@pytest.mark.parametrize("penalty, expected", [(1.0, "aaa"), (1.5, "aba")])
def test_greedy_answer_penalizes_repeated_tokens(tok, penalty, expected):
    """logit 1.0 for the scripted "a", 0.8 for "b": "a" once written scores 1/1.5 < 0.8."""
    model = Scripted(semcot.token_ids(tok, "aaa").tolist(), len(tok), runner_up=tok.convert_tokens_to_ids("b"))
    tokens, _ = semcot.greedy_answer(model, tok, torch.zeros(4, 8), 3, penalty)
    assert tok.decode(tokens) == expected


class Counted(Scripted):
    """Scripted, counting its forwards (each one a collective under ZeRO-3)."""

    calls = 0

    def forward(self, **kwargs):
        self.calls += 1
        return super().forward(**kwargs)


@pytest.mark.parametrize("text", ["I10</answer>tail", "I1"])
def test_greedy_answer_synced_runs_every_forward_of_the_budget_and_answers_the_same(tok, text):
    """ZeRO-3 ranks (val_macro_f1 of SemCoT across ranks): a rank that stops early must go on stepping as the
    others do, so every rank makes 1 + budget forwards; its answer is the unsynced one."""
    script = semcot.token_ids(tok, text).tolist() + [tok.eos_token_id]
    alone, synced = Counted(script, len(tok)), Counted(script, len(tok))
    budget = 12
    assert semcot.greedy_answer(synced, tok, torch.zeros(4, 8), budget, 1.0, synced=True) == \
        semcot.greedy_answer(alone, tok, torch.zeros(4, 8), budget, 1.0)
    assert alone.calls < synced.calls == 1 + budget
