"""SemCoT: the reasoning as K implicit thought states, aligned with the explicit CoT, answered from them.

He et al., "SemCoT: Accelerating Chain-of-Thought Reasoning through Semantically-Aligned Implicit
Tokens", NeurIPS 2025 (code: github.com/YinhanHe123/SemCoT). The original has three models: a
frozen LLM that answers, a lightweight "contemplation generator" (a small LM + a linear projection
to the LLM's width) that writes K implicit thought states in one forward pass over the query
followed by K "<thought>" tokens, and a sentence encoder (the LLM's layers 16-20 + norm, mean
pooling, a linear projection) that is first trained contrastively on (reasoning, condensed
reasoning) pairs written by GPT-4o-mini, then frozen. The generator is then trained with

    align  = 1 - cos(E(z_1..K), E(reasoning))         E: the sentence encoder, mean-pooled
    ce     = -1/|A| sum_{i in A} log p_LLM(a_i | [embed(query); z_1..K; embed(answer prompt); a_<i])
    loss   = alpha * align + (1 - alpha) * ce         alpha per dataset, 0.25-0.75
    encoder pre-training (InfoNCE over a batch of B pairs, cosine similarity, temperature 1):
    contrastive = -1/B sum_i log( exp(cos(r_i, c_i)) / sum_j exp(cos(r_i, c_j)) )

and at inference the K states are inserted as input embeddings before the answer prompt.

Implemented here (one student model plays every part; no new parameters, so the saved model is a
plain HF checkpoint):

    h_1..K      = the student's last hidden states at K placeholder tokens appended after the prompt,
                  each rescaled to the mean norm of the prompt's input embeddings (`implicit_norm`)
    ce          = answer CE of the student on inputs_embeds [embed(prompt); h_1..K; embed(answer)],
                  over the answer block's tokens after "<answer>" ("cot.ce")
    E(x)        = mean over positions of the student's last hidden states on input embeddings x
    align       = 1 - cos(E(h_1..K), stopgrad E(embed(reasoning)))             ("semcot.align")
    contrastive = -log( exp(cos(r, c) / tau) / sum_{c' in {c} + negatives} exp(cos(r, c') / tau) ),
                  r = E(reasoning), c = E(condensed reasoning), negatives: the condensed reasoning
                  of the next `n_negatives` documents of the split, in order ("semcot.contrastive")
    loss        = alpha * align + (1 - alpha) * ce + contrastive_weight * contrastive

predict: the K implicit states of the prompt, then "<answer>" and greedy decoding (KV cache) until
"</answer>", the end of turn, or the token budget. Its `cot` is "": the reasoning is implicit.

Adapted here:
- the generator and the encoder are the student itself (the original: a separate small LM with a
  linear projection; an encoder cut from the LLM's layers 16-20 with its own projection); the states
  are taken at the K placeholders (the original: one position earlier, the last query token and the
  first K-1 thought tokens). `placeholder`: an existing token instead of a new "<thought>" token
  (a text of several tokens: its first token).
- `implicit_norm` "embed": the last hidden states are rescaled to the size of input embeddings, a
  parameter-free stand-in for the original's learned projection; "none" feeds them as they are.
- the encoder is trained jointly, by `contrastive_weight` * InfoNCE inside each step (the original:
  a separate pre-training stage, then frozen), with `n_negatives` negatives per document (original:
  in-batch, batch size 4, so 3) and temperature `tau` (original: 1). Its input is the student's input
  embeddings of the text (original: the LLM's layer-16 hidden states).
- `condense`: "teacher" asks the teacher, greedily, to condense its own CoT (the original asks
  GPT-4o-mini, with the problem, "within 10 words"; here the CoT alone, in one or two sentences, cut
  to `condense_words` words); "heuristic" keeps the CoT's sentences that name a gold or predicted
  label (title or id; none: its first sentence), cut to `condense_words` words. An empty teacher
  output falls back to the heuristic.
- the answer is the teacher's answer block, with "<answer>" in the input as the answer prompt (the
  original: "Answer:"); documents without an answer block or predicted labels are skipped.
- inference: greedy, K as in training (original: sampling, top-p 0.9, temperatures 0.1-0.9, K at
  evaluation a separate setting, 1 by default), answer budget gen["force_answer_tokens"] or
  `max_answer_tokens` (original: 30), with gen["repetition_penalty"] on the generated tokens.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...models import input_device
from ...teacher.answers import ANSWER_CLOSE, ANSWER_OPEN, AnswerParser, end_of_turn
from ...teacher.backends import SYNCED_GPUS
from ...teacher.generate import GENERATION_COLUMNS, parse_generations
from ...teacher.prompts import render_prompt
from ...text import sentence_spans
from ..catalog import BASELINES
from ..recipe import Item, RecipeContext, TeacherDataContext, baseline_recipe
from .causal_lm import cot_terms, forward, next_token_ce

log = logging.getLogger(__name__)

CONDENSE_INSTRUCTION = ("Condense the reasoning below into one or two sentences that keep its key steps "
                        "and the codes it settles on.\n\nReasoning: {cot}\n\nCondensed reasoning:")


# ----------------------------------------------------------------------------- condensed reasoning


def cut_words(text: str, n_words: int) -> str:
    """The first n_words whitespace-separated words of text."""
    return " ".join(text.split()[:n_words])


def heuristic_condense(cot: str, names: list[str], n_words: int) -> str:
    """The CoT's sentences that name one of `names` (case-insensitive; none: its first sentence), cut."""
    sentences = [cot[s:e] for s, e in sentence_spans(cot)]
    wanted = [n.casefold() for n in names if n]
    keep = [s for s in sentences if any(n in s.casefold() for n in wanted)] or sentences[:1]
    return cut_words(" ".join(keep), n_words)


def label_names(split, doc_id: str) -> list[str]:
    """Titles and ids of the document's gold and teacher-predicted labels."""
    labels = list(split.docs.loc[doc_id, "labels"]) + list(split.cot.loc[doc_id, "pred_labels"])
    return [name for lab in dict.fromkeys(labels) for name in (lab, split.space.title.get(lab, ""))]


def cot_text(split, doc_id: str) -> str:
    return split.cot.loc[doc_id, "cot"] if doc_id in split.cot.index else ""


def teacher_data(ctx: TeacherDataContext) -> pd.DataFrame:
    """One row per document with a CoT: doc_id, condensed (the condensed reasoning), source."""
    p, split = ctx.params, ctx.split
    doc_ids = [d for d in ctx.split.anchors["doc_id"] if cot_text(split, d).strip()]
    fallback = [heuristic_condense(cot_text(split, d), label_names(split, d), p["condense_words"]) for d in doc_ids]
    if p["condense"] == "heuristic":
        return pd.DataFrame({"doc_id": doc_ids, "condensed": fallback, "source": "heuristic"})
    if p["condense"] != "teacher":
        raise ValueError(f"semcot: condense must be 'teacher' or 'heuristic', not {p['condense']!r}")
    texts = [ctx.render([{"role": "user", "content": CONDENSE_INSTRUCTION.format(cot=cot_text(split, d))}])
             for d in doc_ids]
    outputs = ctx.generate(texts, p["condense_max_new_tokens"], temperature=0.0, seed=0) if texts else []
    condensed = [cut_words(out.split(ANSWER_OPEN)[0], p["condense_words"]) for out in outputs]
    rows = [(d, c or f, "teacher" if c else "heuristic (empty teacher output)")
            for d, c, f in zip(doc_ids, condensed, fallback)]
    log.info("semcot %s: %d of %d condensed by the teacher", ctx.split_name, sum(bool(c) for c in condensed), len(rows))
    return pd.DataFrame(rows, columns=["doc_id", "condensed", "source"])


# ----------------------------------------------------------------------------- items


def answer_body(cot_row: pd.Series) -> str:
    """The teacher's answer after "<answer>", through "</answer>" (ids of pred_labels when no block)."""
    raw = cot_row.get("raw") or ""
    start = raw.rfind(ANSWER_OPEN)
    if start < 0:
        labels = list(cot_row.get("pred_labels", []))
        return f"{'; '.join(labels)}{ANSWER_CLOSE}" if labels else ""
    body = raw[start + len(ANSWER_OPEN):]
    end = body.find(ANSWER_CLOSE)
    return body[:end + len(ANSWER_CLOSE)] if end >= 0 else body.rstrip()


def token_ids(tokenizer, text: str, limit: int | None = None) -> Tensor:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids[:limit], dtype=torch.long)


def placeholder_id(tokenizer, text: str) -> int:
    """The placeholder's token id (a text of several tokens: its first, with a warning)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        log.warning("semcot: placeholder %r is %d tokens %s; using the first", text, len(ids), ids)
    return ids[0]


def prompt_ids(tokenizer, messages_json: str) -> Tensor:
    """The prompt's tokens as the student sees it (chat template, generation prompt on)."""
    return token_ids(tokenizer, render_prompt(tokenizer, json.loads(messages_json)))


def items(ctx: RecipeContext) -> list[Item]:
    """Per document: prompt + K placeholders + "<answer>" + the teacher's answer (supervised)."""
    p, split, tok = ctx.params, ctx.split, ctx.tokenizer
    condensed = {} if ctx.teacher_data is None else dict(zip(ctx.teacher_data["doc_id"], ctx.teacher_data["condensed"]))
    ph, open_ids = placeholder_id(tok, p["placeholder"]), token_ids(tok, ANSWER_OPEN)
    out, skipped = [], []
    for doc_id in split.anchors["doc_id"]:
        cot = cot_text(split, doc_id)
        body = answer_body(split.cot.loc[doc_id]) if cot.strip() else ""
        if not cot.strip() or not body:
            skipped.append(doc_id)
            continue
        short = condensed.get(doc_id) or heuristic_condense(cot, label_names(split, doc_id), p["condense_words"])
        taught = body + end_of_turn(tok) if body.endswith(ANSWER_CLOSE) else body  # then stop, as supervised_output
        prompt, body_ids = prompt_ids(tok, split.prompts.loc[doc_id, "messages"]), token_ids(tok, taught)
        ids = torch.cat([prompt, torch.full((p["K"],), ph), open_ids, body_ids])          # [seq]
        supervised = torch.zeros(len(ids), dtype=torch.bool)
        supervised[len(ids) - len(body_ids):] = True
        n = len(prompt)
        out.append(Item(doc_id, ids, supervised,
                        spans={"prompt": [(0, n)], "implicit": [(n, n + p["K"])],
                               "answer": [(n + p["K"], len(ids))]},
                        extra={"reason_ids": token_ids(tok, cot, p["max_reason_tokens"]),
                               "condensed_ids": token_ids(tok, short, p["max_reason_tokens"])},
                        record={"condensed": short, "answer": body, "n_implicit": int(p["K"])}))
    for i, item in enumerate(out):  # negatives: the next documents' condensed reasoning, cyclically
        others = [out[(i + j) % len(out)] for j in range(1, min(p["n_negatives"], len(out) - 1) + 1)]
        item.extra["negative_ids"] = [o.extra["condensed_ids"] for o in others]
        item.record["negatives"] = [o.doc_id for o in others]
    if skipped:
        log.warning("semcot %s: %d documents without a CoT or an answer are skipped: %s",
                    ctx.split_name, len(skipped), skipped[:5])
    return out


# ----------------------------------------------------------------------------- the model's parts


def embed(model: nn.Module, ids: Tensor) -> Tensor:
    """Input embeddings of token ids: [n] -> [n, d]."""
    return model.get_input_embeddings()(ids.to(input_device(model)))


def implicit_states(model: nn.Module, prompt_and_placeholders: Tensor, k: int, norm: str) -> Tensor:
    """Last hidden states at the final k positions [k, d], as input embeddings (module docstring)."""
    _, hidden = forward(model, prompt_and_placeholders, hidden=True)                  # [1, seq, d]
    states = hidden[0, -k:]                                                           # [k, d]
    if norm == "none":
        return states
    if norm != "embed":
        raise ValueError(f"semcot: implicit_norm must be 'embed' or 'none', not {norm!r}")
    target = embed(model, prompt_and_placeholders[:-k]).detach().norm(dim=-1).mean()  # the prompt's
    return states * (target / states.norm(dim=-1, keepdim=True).clamp_min(1e-6))


def run_embeds(model: nn.Module, inputs_embeds: Tensor, **kwargs):
    """The model's output (logits [1, seq, V], ...) on one sequence of input embeddings [seq, d]."""
    dtype = model.get_input_embeddings().weight.dtype
    return model(inputs_embeds=inputs_embeds[None].to(dtype), **kwargs)


def sentence_embedding(model: nn.Module, inputs_embeds: Tensor) -> Tensor:
    """The encoder E: mean of the last hidden states over the positions, [n, d] -> [d]."""
    out = run_embeds(model, inputs_embeds, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1][0].float().mean(0)


def info_nce(anchor: Tensor, positive: Tensor, negatives: list[Tensor], tau: float) -> Tensor:
    """-log softmax of cos(anchor, positive) / tau among the positive and the negatives (all [d])."""
    candidates = torch.stack([positive, *negatives])                                   # [1 + n, d]
    sims = F.cosine_similarity(anchor[None], candidates, dim=-1) / tau                # [1 + n]
    return -torch.log_softmax(sims, dim=0)[0]


# ----------------------------------------------------------------------------- loss and inference


def loss(model: nn.Module, item: Item, params: Mapping) -> dict[str, Tensor]:
    """alpha * align + (1 - alpha) * answer CE + contrastive_weight * InfoNCE (module docstring)."""
    (n, end), = item.spans["implicit"]
    states = implicit_states(model, item.input_ids[:end], end - n, params["implicit_norm"])  # [K, d]
    ids = item.input_ids.to(input_device(model))
    inputs = torch.cat([embed(model, ids[:n]), states.to(ids.device), embed(model, ids[end:])])  # [seq, d]
    ce = next_token_ce(run_embeds(model, inputs, use_cache=False).logits, ids, item.supervised)
    with torch.set_grad_enabled(params["contrastive_weight"] > 0 and torch.is_grad_enabled()):
        reason = sentence_embedding(model, embed(model, item.extra["reason_ids"]))      # [d]
    align = 1 - F.cosine_similarity(sentence_embedding(model, states), reason.detach(), dim=0)
    contrastive = ce.new_zeros(())
    if params["contrastive_weight"] > 0:
        condensed = [sentence_embedding(model, embed(model, c))
                     for c in [item.extra["condensed_ids"], *item.extra["negative_ids"]]]
        contrastive = info_nce(reason, condensed[0], condensed[1:], params["tau"])
    alpha = params["alpha"]
    total = alpha * align + (1 - alpha) * ce + params["contrastive_weight"] * contrastive
    return {"loss": total, **cot_terms(ce.detach()), "semcot.align": align.detach(),
            "semcot.contrastive": contrastive.detach()}


def greedy_answer(model: nn.Module, tokenizer, inputs_embeds: Tensor, max_new: int, penalty: float,
                  synced: bool = False) -> tuple[list[int], str]:
    """Greedy continuation of inputs_embeds [seq, d] (KV cache): (token ids, finish_reason); stops
    after the end of turn or once the text holds "</answer>". synced (DeepSpeed ZeRO-3 ranks, each
    forward a collective): after the stop, the forwards go on to max_new, their tokens discarded, so
    every rank runs the same forwards."""
    model_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = {tokenizer.eos_token_id, *([model_eos] if isinstance(model_eos, int) else model_eos or [])}
    out = run_embeds(model, inputs_embeds, use_cache=True)
    generated: list[int] = []
    finish = "length"
    for _ in range(max_new):
        logits = out.logits[0, -1].float()                                             # [V]
        if finish == "length":
            if penalty != 1.0 and generated:
                seen = torch.tensor(sorted(set(generated)), device=logits.device)
                logits[seen] = torch.where(logits[seen] > 0, logits[seen] / penalty, logits[seen] * penalty)
            generated.append(int(logits.argmax()))
            if generated[-1] in eos or ANSWER_CLOSE in tokenizer.decode(generated):
                finish = "stop"
                if not synced:
                    break
        out = model(input_ids=torch.tensor([[generated[-1]]], device=logits.device),
                    past_key_values=out.past_key_values, use_cache=True)
    return generated, finish


def predict(model: nn.Module, tokenizer, prompts: pd.DataFrame, space, gen: dict, params: Mapping) -> pd.DataFrame:
    """Answers from the implicit states of each prompt (columns of `teacher.generate.COT_COLUMNS`)."""
    ph, open_ids = placeholder_id(tokenizer, params["placeholder"]), token_ids(tokenizer, ANSWER_OPEN)
    max_new = gen.get("force_answer_tokens") or params["max_answer_tokens"]
    was_training, rows = model.training, []
    model.eval()
    with torch.no_grad():
        for doc_id, messages in zip(prompts["doc_id"], prompts["messages"]):
            prompt = prompt_ids(tokenizer, messages).to(input_device(model))
            ids = torch.cat([prompt, torch.full((params["K"],), ph, device=prompt.device)])
            states = implicit_states(model, ids, params["K"], params["implicit_norm"])       # [K, d]
            inputs = torch.cat([embed(model, prompt), states, embed(model, open_ids)])      # [seq, d]
            tokens, finish = greedy_answer(model, tokenizer, inputs, max_new, gen["repetition_penalty"],
                                           bool(gen.get(SYNCED_GPUS)))
            raw = ANSWER_OPEN + tokenizer.decode(tokens, skip_special_tokens=True)
            rows.append(dict(doc_id=doc_id, raw=raw, n_tokens=len(tokens), finish_reason=finish,
                             forced_answer=False, engine="semcot implicit states (transformers)"))
    model.train(was_training)
    parser = AnswerParser(space, gen["fuzzy_threshold"])  # raw starts at <answer>: cot is ""
    return parse_generations(pd.DataFrame(rows, columns=GENERATION_COLUMNS), prompts, parser)


RECIPE = baseline_recipe(BASELINES["semcot"], items=items, loss=loss, teacher_data=teacher_data, predict=predict)
