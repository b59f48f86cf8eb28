"""MoRSD: answer correctness, near-duplicate removal, Rationale Difficulty, selection, teacher data, items, loss."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mechdistill.distill.baselines import morsd
from mechdistill.distill.recipe import RecipeContext, TeacherDataContext
from mechdistill.io import SplitArtifacts
from mechdistill.labels import LabelSpace
from mechdistill.models import byte_tokenizer
from tests.helpers import tiny_llama

GOLD_BLOCK, WRONG_BLOCK = "<answer>A01</answer>", "<answer>B02</answer>"
DEMO_GENERATION = {"max_new_tokens": 128, "force_answer_tokens": 32}  # config/config.yaml's generation budgets


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture()
def model(tokenizer):
    return tiny_llama(vocab=len(tokenizer), seed=0)


def messages(text: str) -> str:
    return json.dumps([{"role": "user", "content": text}])


def split_artifacts() -> SplitArtifacts:
    """d1: greedy wrong, three correct samples (s1 a near-duplicate of s0); d2: every answer wrong;
    d3: an empty greedy CoT."""
    space = LabelSpace(pd.DataFrame({"label_id": ["A01", "B02"], "title": ["Fever", "Cough"], "parent": [None, None],
                                     "ancestors": [[], []], "assignable": [True, True]}))
    ids = ["d1", "d2", "d3"]
    docs = pd.DataFrame({"doc_id": ids, "labels": [["A01"]] * 3}).set_index("doc_id")
    prompts = pd.DataFrame({"doc_id": ids, "messages": [messages(f"note {d}: hot") for d in ids],
                            "candidates": [["A01", "B02"]] * 3}).set_index("doc_id")
    cot = pd.DataFrame({"doc_id": ids, "cot": ["it is a cough", "maybe a cough", ""],
                        "raw": [f"it is a cough\n{WRONG_BLOCK}", f"maybe a cough\n{WRONG_BLOCK}", WRONG_BLOCK],
                        "answer": ["B02", "B02", "B02"], "pred_labels": [["B02"]] * 3}).set_index("doc_id")
    return SplitArtifacts(docs=docs, prompts=prompts, cot=cot, anchors=pd.DataFrame({"doc_id": ids}), space=space)


def teacher_frame() -> pd.DataFrame:
    rows = [("d1", -1, "greedy", "it is a cough", WRONG_BLOCK, ["B02"]),
            ("d1", 0, "sampled", "the note says hot so fever", GOLD_BLOCK, ["A01"]),
            ("d1", 1, "sampled", "The note says hot, so fever.", GOLD_BLOCK, ["A01"]),
            ("d1", 2, "sampled", "high temperature means A01", GOLD_BLOCK, ["A01"]),
            ("d2", -1, "greedy", "maybe a cough", WRONG_BLOCK, ["B02"]),
            ("d2", 0, "sampled", "cough again", WRONG_BLOCK, ["B02"]),
            ("d3", -1, "greedy", "", WRONG_BLOCK, ["B02"])]
    return pd.DataFrame([dict(doc_id=d, sample=s, source=src, cot=c, raw=f"{c}\n{b}", answer=b[8:11], pred_labels=p)
                         for d, s, src, c, b, p in rows])


# ----------------------------------------------------------------------------- pure selection


def test_correct_relative_to_the_greedy_answer():
    gold = ["A", "B", "C", "D"]
    assert morsd.answer_f1(["A", "B"], gold) == pytest.approx(2 / 3)      # 2*2 / (2+4)
    assert morsd.answer_f1(["A", "X"], gold) == pytest.approx(1 / 3)      # 2*1 / (2+4)
    assert morsd.correct(["A", "B"], gold, "greedy", greedy_f1=2 / 3)     # as good as the greedy answer
    assert not morsd.correct(["A", "X"], gold, "greedy", greedy_f1=2 / 3)  # worse than it
    assert morsd.correct(["A", "X"], gold, "greedy", greedy_f1=0.0)       # the greedy answer is wholly wrong
    assert not morsd.correct(["X"], gold, "greedy", greedy_f1=0.0)        # wholly wrong is never correct
    assert not morsd.correct(["A", "X"], gold, 0.5)                       # the old fixed threshold
    with pytest.raises(ValueError, match="min_f1"):
        morsd.correct(["A"], gold, "best")


def test_budgets_default_to_the_generation_settings():
    paper = {"max_new_tokens": 1024, "force_answer_tokens": 128}  # config/paper.yaml's generation
    params = morsd.RECIPE.spec.params(None, paper)
    assert (params["max_new_tokens"], params["force_answer_tokens"], params["min_f1"]) == (1024, 128, "greedy")
    assert morsd.RECIPE.spec.teacher_calls(params) == (2, 1152)
    assert morsd.RECIPE.spec.params({"force_answer_tokens": 16}, paper)["force_answer_tokens"] == 16


def test_correct_is_answer_f1_at_least_min_f1():
    assert morsd.answer_f1(["A", "B"], ["A", "C"]) == pytest.approx(0.5)      # 2*1 / (2+2)
    assert morsd.correct(["A", "B"], ["A", "C"], 0.5)
    assert not morsd.correct(["A", "B"], ["A", "C"], 0.6)
    assert morsd.correct(["A"], ["A"], 1.0)
    assert not morsd.correct([], ["A"], 0.1)


def test_deduplicate_drops_texts_above_the_jaccard_threshold():
    texts = ["the cat sat", "The cat, sat.", "a dog ran", "the cat sat down"]
    assert morsd.word_jaccard(texts[0], texts[3]) == pytest.approx(3 / 4)
    assert morsd.deduplicate(texts, 0.7) == [0, 2]          # 1: Jaccard 1; 3: 0.75 > 0.7
    assert morsd.deduplicate(texts, 0.8) == [0, 2, 3]


def test_select_by_rd_keeps_lowest_or_highest_with_nan_last():
    rds = [0.9, math.nan, 0.5, 0.5, 1.2]
    assert morsd.select_by_rd(rds, 2) == [2, 3]
    assert morsd.select_by_rd(rds, 2, "highest") == [4, 0]
    assert morsd.select_by_rd(rds, 10) == [2, 3, 0, 4, 1]
    with pytest.raises(ValueError, match="rd_keep"):
        morsd.select_by_rd(rds, 1, "middle")


# ----------------------------------------------------------------------------- rationale difficulty


def answer_nll(model, tokenizer, prompt_and_context: str, block: str) -> float:
    """Mean NLL of the last len(block) byte tokens, computed straight from the model's logits."""
    ids = torch.tensor(tokenizer(prompt_and_context + block, add_special_tokens=False)["input_ids"])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)   # [seq, V]
    n = len(block.encode())
    positions = range(len(ids) - n, len(ids))
    return -sum(logp[i - 1, ids[i]].item() for i in positions) / n


def test_rationale_difficulty_is_the_ratio_of_answer_ce_with_and_without_the_rationale(model, tokenizer):
    msgs = messages("note: hot")
    prompt = tokenizer.apply_chat_template(json.loads(msgs), tokenize=False, add_generation_prompt=True)
    expected = (answer_nll(model, tokenizer, prompt + "the note says hot so fever\n", GOLD_BLOCK)
                / answer_nll(model, tokenizer, prompt, GOLD_BLOCK))
    model.train()
    rd = morsd.rationale_difficulty(model, tokenizer, msgs, "the note says hot so fever", GOLD_BLOCK)
    assert rd == pytest.approx(expected, rel=1e-4)
    assert model.training                                       # mode restored
    assert math.isnan(morsd.rationale_difficulty(model, tokenizer, msgs, "no answer", ""))


# ----------------------------------------------------------------------------- teacher data


def test_teacher_data_samples_with_seeds_and_keeps_the_greedy_trace():
    split, calls = split_artifacts(), []

    def generate(texts, max_new_tokens, temperature=None, seed=None):
        calls.append((list(texts), max_new_tokens, temperature, seed))
        return [f"sampled {seed} for {t}\n<answer>A01</answer>" for t in texts]

    ctx = TeacherDataContext(generate=generate, render=lambda m: "R:" + m[0]["content"], split=split,
                             split_name="train", params=morsd.RECIPE.spec.params({"n_samples": 2}, DEMO_GENERATION), seed=10)
    frame = morsd.teacher_data(ctx)
    rendered = [f"R:note {d}: hot" for d in ["d1", "d2", "d3"]]
    assert calls == [(rendered, 128, 0.7, 10), (rendered, 128, 0.7, 11)]
    assert len(frame) == 9
    assert sorted(frame.loc[frame["doc_id"] == "d2", "sample"]) == [-1, 0, 1]
    greedy = frame[frame["sample"] == -1].set_index("doc_id")
    assert greedy.loc["d1", "cot"] == "it is a cough" and greedy.loc["d1", "source"] == "greedy"
    sampled = frame[(frame["doc_id"] == "d1") & (frame["sample"] == 1)].iloc[0]
    assert sampled["cot"] == "sampled 11 for R:note d1: hot" and sampled["pred_labels"] == ["A01"]
    assert sampled["raw"].endswith("<answer>A01</answer>") and sampled["source"] == "sampled"


def test_a_sample_without_an_answer_block_is_forced_to_answer():
    split, calls = split_artifacts(), []

    def generate(texts, max_new_tokens, temperature=0.0, seed=0):
        calls.append((list(texts), max_new_tokens, temperature))
        if max_new_tokens == 128:  # the sampling pass: d2's sample runs out of tokens before answering
            return [f"why {t}" + ("" if "d2" in t else "\n<answer>A01</answer>") for t in texts]
        return ["B02</answer>" for _ in texts]

    ctx = TeacherDataContext(generate=generate, render=lambda m: "R:" + m[0]["content"], split=split,
                             split_name="train", params=morsd.RECIPE.spec.params({"n_samples": 1}, DEMO_GENERATION), seed=0)
    frame = morsd.teacher_data(ctx).set_index(["doc_id", "sample"])
    # one greedy continuation of d2's prompt + sample + "\n<answer>", force_answer_tokens (32) long
    assert calls[1] == (["R:note d2: hot" + "why R:note d2: hot\n<answer>"], 32, 0.0)
    assert frame.loc[("d2", 0), "raw"] == "why R:note d2: hot\n<answer>B02</answer>"
    assert frame.loc[("d2", 0), "pred_labels"] == ["B02"] and frame.loc[("d1", 0), "pred_labels"] == ["A01"]


# ----------------------------------------------------------------------------- items


def test_items_filter_deduplicate_and_keep_the_lowest_rd(model, tokenizer):
    split = split_artifacts()
    ctx = RecipeContext(tokenizer=tokenizer, split=split, split_name="train", params=morsd.RECIPE.spec.params(None),
                        seed=0, teacher_data=teacher_frame(), model=model)
    items = morsd.items(ctx)
    assert [it.doc_id for it in items] == ["d1", "d2"]          # d3: empty greedy CoT, skipped
    d1, d2 = items
    msgs = split.prompts.loc["d1", "messages"]
    rds = {s: morsd.rationale_difficulty(model, tokenizer, msgs, c, GOLD_BLOCK + "<|im_end|>")  # block + end of turn
           for s, c in [(0, "the note says hot so fever"), (2, "high temperature means A01")]}
    best = min(rds, key=rds.get)
    assert d1.record["sample"] == best and d1.record["rd"] == pytest.approx(rds[best])
    assert {k: d1.record[k] for k in ("n_candidates", "n_correct", "n_unique", "source", "reason")} == dict(
        n_candidates=4, n_correct=3, n_unique=2, source="sampled", reason="")
    cot = teacher_frame().set_index(["doc_id", "sample"]).loc[("d1", best), "cot"]
    prompt = tokenizer.apply_chat_template(json.loads(msgs), tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(d1.input_ids) == prompt + cot + "\n" + GOLD_BLOCK + "<|im_end|>"
    assert int(d1.supervised.sum()) == len(cot) + 1 + len(GOLD_BLOCK) + 1  # byte tokens + the end of turn, all supervised
    assert d1.supervised[-1] and not d1.supervised[0]
    assert d2.record["sample"] == -1 and d2.record["source"] == "greedy"
    assert d2.record["reason"] == "no correct rationale: greedy trace" and d2.record["n_correct"] == 0


def test_items_without_teacher_data_use_the_greedy_trace_and_need_the_student(model, tokenizer):
    ctx = RecipeContext(tokenizer=tokenizer, split=split_artifacts(), split_name="val", params=morsd.RECIPE.spec.params(None),
                        seed=0, model=model)
    assert [(it.doc_id, it.record["sample"]) for it in morsd.items(ctx)] == [("d1", -1), ("d2", -1)]
    ctx.model = None
    with pytest.raises(ValueError, match="student"):
        morsd.items(ctx)


# ----------------------------------------------------------------------------- loss


def test_loss_is_the_cot_ce_and_training_lowers_it(model, tokenizer):
    ctx = RecipeContext(tokenizer=tokenizer, split=split_artifacts(), split_name="train",
                        params=morsd.RECIPE.spec.params(None), seed=0, teacher_data=teacher_frame(), model=model)
    item = morsd.items(ctx)[0]
    terms = morsd.loss(model, item, ctx.params)
    assert terms["loss"].requires_grad and terms["cot.kl"].item() == 0.0
    assert terms["cot.ce"].detach().item() == pytest.approx(terms["loss"].detach().item())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        out = morsd.loss(model, item, ctx.params)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert losses[-1] < losses[0] - 0.5
