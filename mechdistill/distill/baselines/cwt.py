"""CWT / Skip-Thinking: chunk-wise CoT supervision, then learning to skip middle chunks.

Chen, Zhou, Liang, Sun and Liu, "Skip-Thinking: Chunk-wise Chain-of-Thought Distillation Enable
Smaller Language Models to Reason Better and Faster", EMNLP 2025 (arXiv 2505.18642).

The original method. Chunk-wise training (CWT) cuts each teacher rationale into semantically coherent
chunks, by average chunking (AC: chunks of about equal length) or search-based chunking (SBC: a
heuristic search over the boundaries), and trains the student on ONE chunk per iteration, given the
question and the chunks before it, so the few tokens that carry the reasoning make up a larger share
of each step's gradient. Skip-thinking training (STT) then marks middle chunks the student can leave
out without losing its answer and goes on training on the rationales without them, so the student
learns to skip them and answers sooner. No teacher data beyond the greedy traces.

As implemented (T CoT tokens x_1..x_T of the teacher's trace, prompt P, answer block A; a chunk is
a token range [b_j, b_{j+1}) with 0 = b_0 < b_1 < ... < b_n = T):

    average chunking   target b_k = round(k T / n), then moved to the nearest sentence or line start
                       within +- snap_window * T / n tokens (kept where there is none); n = n_chunks
                       (fewer when the CoT has fewer tokens; duplicate boundaries dropped)
    search chunking    from the average boundaries, left to right: b_k <- argmin over c = b_k or a
                       sentence start in [b_k - w, b_k + w] (strictly between b_{k-1} and b_{k+1}) of
                       mean_{i in [c, b_{k+1})} nll_i, where nll_i = -log p_student(x_i | P, x_<i) of the
                       student before training and w = search_window * T / n (ties: nearest to b_k)
    item (doc, j)      sequence P + chunk_0 .. chunk_j (+ A when j is the last chunk); supervised:
                       the tokens of chunk j (and A) only
    loss               L = cot.ce = -1/|S_j| sum_{i in S_j} log p(x_i | x_<i)    (S_j: chunk j's tokens)
    answer loss        ce_A(R) = -1/|A| sum_{a_i in A} log p(a_i | P, R, a_<i)   (R: a rationale)
    skippable          middle chunk j (0 < j < n-1) with ce_A(R without chunk j) - ce_A(R) <= skip_tolerance,
                       R the whole CoT, each chunk tested alone, with the student at the start of
                       epoch skip_from_epoch (`relabel`)
    epoch schedule     every epoch one item per document: the chunk drawn by
                       random.Random(f"{seed}:{epoch}:{doc_id}"); from skip_from_epoch on, the drawn
                       chunk is one of the chunks left once all skippable ones are removed, and its
                       item's prefix has none of them (`epoch_items`)

Adapted here:
- Student: a causal LM trained by the shared trainer with the budget and optimizer of every method
  here; the original's students, optimizer and schedule (not checked) are not used. Inference as
  vanilla (greedy generation of CoT + answer; no `predict` of its own).
- n_chunks: not checked in the paper; chosen 4 (demo CoTs are ~128 tokens).
- chunking: the paper's SBC is not checked in detail; chosen as above (greedy, one pass, candidates
  the sentence starts within search_window, the mean CE of the next chunk under the student before
  training); "average" is AC with boundaries snapped to sentence starts (snap_window, ours).
- skip test: the paper's criterion is not checked; chosen: the answer CE rises by at most
  skip_tolerance (nats per answer token) when the chunk alone is removed; all skippable chunks of a
  document are then removed together (their joint effect is not re-tested).
- skip_from_epoch: when STT starts is not checked; chosen epoch 1 (0-based; the demo's 24 steps on
  12 documents are two epochs: one CWT, one STT).
- The answer block goes with the last chunk, so the student learns to answer (as vanilla here).
- One item per document per epoch, so an epoch has as many steps as vanilla's and the budget per
  step is comparable; validation (`items`) scores every chunk of every document.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...teacher.answers import end_of_turn, supervised_output
from ...teacher.prompts import render_prompt
from ...text import token_offsets
from ..catalog import BASELINES
from ..recipe import Item, RecipeContext, baseline_recipe
from .causal_lm import across_ranks, cot_terms, encode, forward, next_token_ce

log = logging.getLogger(__name__)

LABEL_COLUMNS = ["doc_id", "chunk", "skippable", "answer_loss_full", "answer_loss_skip"]
SENTENCE_END = re.compile(r"[.!?]$")

# ----------------------------------------------------------------------------- chunk boundaries


def sentence_starts(text: str, starts: Sequence[int]) -> list[bool]:
    """Whether each token (char start `starts[k]` in `text`) begins a sentence or a line: the text
    before it ends a line, or ends with . ! ? and whitespace that is either before the token or the
    token's own leading space (" The"); a token of whitespace alone never does, so the whitespace
    between sentences always ends the earlier chunk or always starts the later one."""
    flags = []
    for k, start in enumerate(starts):
        before = text[:start]
        token = text[start:starts[k + 1] if k + 1 < len(starts) else len(text)]
        stripped = before.rstrip(" \t")
        spaced = stripped != before or token[:1].isspace()
        ends_sentence = bool(SENTENCE_END.search(stripped)) and spaced and not token.isspace()
        flags.append(k > 0 and (before.endswith("\n") or ends_sentence))
    return flags


def average_boundaries(is_start: Sequence[bool], n_chunks: int, snap_window: float) -> list[int]:
    """Token boundaries [0, b_1, .., T] of about equal chunks, each moved to the nearest sentence start
    within snap_window average chunks (ties: the earlier); fewer chunks if T < n_chunks."""
    n_tokens = len(is_start)
    n = max(1, min(n_chunks, n_tokens))
    size = n_tokens / n
    reach = int(snap_window * size)
    bounds = [0]
    for k in range(1, n):
        target = round(k * size)
        near = [t for t in range(target - reach, target + reach + 1) if bounds[-1] < t < n_tokens and is_start[t]]
        b = min(near, key=lambda t: (abs(t - target), t)) if near else target
        if bounds[-1] < b < n_tokens:
            bounds.append(b)
    return bounds + [n_tokens]


def search_boundaries(nll: Sequence[float], bounds: Sequence[int], reach: int,
                      is_start: Sequence[bool] | None = None) -> list[int]:
    """Boundaries moved left to right, each within +-reach tokens to where the next chunk's mean NLL
    (nll[c:b_{k+1}], per CoT token) is lowest (ties: nearest to the old boundary, then earlier).
    Candidates: the old boundary and the sentence starts in the window (every token without is_start)."""
    out = list(bounds)
    for k in range(1, len(out) - 1):
        lo, hi = max(out[k - 1] + 1, out[k] - reach), min(out[k + 1] - 1, out[k] + reach)
        old, end = out[k], out[k + 1]
        candidates = [c for c in range(lo, hi + 1) if c == old or is_start is None or is_start[c]]
        out[k] = min(candidates, key=lambda c: (sum(nll[c:end]) / (end - c), abs(c - old), c))
    return out


# ----------------------------------------------------------------------------- items


@contextlib.contextmanager
def scoring(model: nn.Module) -> Iterator[None]:
    """No grad and eval mode for scoring with the student; its train/eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def token_nll(model: nn.Module, input_ids: Tensor) -> Tensor:
    """-log p(x_i | x_<i) of every token of one sequence: [seq] (0 at position 0)."""
    logits, _ = forward(model, input_ids)                                        # [1, seq, V]
    nll = F.cross_entropy(logits[0, :-1].float(), input_ids[1:].to(logits.device), reduction="none")
    return torch.cat([nll.new_zeros(1), nll]).detach().cpu()


def chunk_plan(ctx: RecipeContext, messages: str, cot: str, output: str) -> dict[str, Any]:
    """What `chunk_cot` computes without the student: the CoT tokens' positions in prompt + output and char
    starts in the CoT, their sentence starts, the average boundaries, and the text a search scores."""
    p = ctx.params
    prompt = render_prompt(ctx.tokenizer, json.loads(messages))
    offsets = token_offsets(ctx.tokenizer, prompt + output)
    cot_tokens = [(i, s - len(prompt)) for i, (s, e) in enumerate(offsets)
                  if e > s and len(prompt) <= s < len(prompt) + len(cot)]
    starts = [s for _, s in cot_tokens]
    is_start = sentence_starts(cot, starts)
    bounds = average_boundaries(is_start, p["n_chunks"], p["snap_window"])
    return {"text": prompt + output, "positions": [i for i, _ in cot_tokens], "starts": starts, "is_start": is_start,
            "bounds": bounds, "cot_chars": len(cot), "search": p["chunking"] == "search" and len(bounds) > 2}


def plan_nll(ctx: RecipeContext, plan: Mapping[str, Any]) -> list[float]:
    """The student's NLL of the plan's CoT tokens (one forward; call under `scoring`)."""
    ids = torch.tensor(ctx.tokenizer(plan["text"], add_special_tokens=False)["input_ids"])
    return token_nll(ctx.model, ids)[plan["positions"]].tolist()


def plan_bounds(ctx: RecipeContext, plan: Mapping[str, Any], nll: Sequence[float] | None) -> list[int]:
    """Char boundaries [0, .., len(cot)] of a plan's chunks: its average boundaries, moved by the search
    over `nll` (`plan_nll`) when the plan searches."""
    bounds, starts = plan["bounds"], plan["starts"]
    if plan["search"]:
        reach = int(ctx.params["search_window"] * len(starts) / (len(bounds) - 1))
        bounds = search_boundaries(nll, bounds, reach, plan["is_start"])
    chars = [0] + [starts[b] for b in bounds[1:-1]] + [plan["cot_chars"]]
    return sorted(set(chars))


def chunk_cot(ctx: RecipeContext, messages: str, cot: str, output: str) -> list[int]:
    """Char boundaries [0, .., len(cot)] of the CoT's chunks (params chunking, n_chunks, windows),
    on the student's tokens of prompt + output."""
    plan = chunk_plan(ctx, messages, cot, output)
    nll = None
    if plan["search"]:
        _need_model(ctx)
        with scoring(ctx.model):
            nll = plan_nll(ctx, plan)
    return plan_bounds(ctx, plan, nll)


def _need_model(ctx: RecipeContext) -> None:
    if ctx.model is None:
        raise ValueError("cwt: chunking 'search' scores chunks with the student, but no model was given")


def chunk_item(tokenizer, doc_id: str, extra: Mapping[str, Any], order: Sequence[int], position: int) -> Item:
    """The item supervising chunk order[position] of the CoT made of the chunks `order` (original
    indices, ascending): prompt + those chunks up to it (+ the answer block after the last chunk)."""
    chunks, tail = extra["chunks"], extra["tail"]
    pieces = [(f"chunk{i}", chunks[i]) for i in order[:position + 1]]
    if position == len(order) - 1:
        pieces[-1] = (pieces[-1][0], pieces[-1][1] + tail)
    target = order[position]
    ids, supervised, spans = encode(tokenizer, extra["messages"], pieces, supervise=[f"chunk{target}"])
    skipped = sorted(set(range(len(chunks))) - set(order))
    return Item(doc_id=doc_id, input_ids=ids, supervised=supervised, spans={"chunks": [spans[n] for n, _ in pieces]},
                extra=dict(extra), record={"chunk": target, "n_chunks": len(chunks), "bounds": list(extra["bounds"]),
                                           "skipped": skipped})


def items(ctx: RecipeContext) -> list[Item]:
    """Every chunk of every document with a CoT (anchors order), chunk by chunk. A search's forwards are
    shared by the ranks (`across_ranks`); every rank gets every item."""
    split, docs, empty = ctx.split, {}, []
    for doc_id in ctx.split.anchors["doc_id"]:
        cot = split.cot.loc[doc_id, "cot"] if doc_id in split.cot.index else ""
        if not cot.strip():
            empty.append(doc_id)
            continue
        output = supervised_output(cot, split.cot.loc[doc_id, "raw"] if "raw" in split.cot.columns else None,
                                   end_of_turn(ctx.tokenizer))
        messages = split.prompts.loc[doc_id, "messages"]
        docs[doc_id] = (cot, output, messages, chunk_plan(ctx, messages, cot, output))
    searched = [doc_id for doc_id, (*_, plan) in docs.items() if plan["search"]]
    nll: dict[str, list[float]] = {}
    if searched:
        _need_model(ctx)
        with scoring(ctx.model):
            nll = dict(zip(searched, across_ranks(lambda doc_id: plan_nll(ctx, docs[doc_id][3]), searched, ctx.rank,
                                                  ctx.world, f"cwt chunk search {ctx.split_name}")))
    out = []
    for doc_id, (cot, output, messages, plan) in docs.items():
        bounds = plan_bounds(ctx, plan, nll.get(doc_id))
        extra = {"messages": messages, "bounds": bounds, "tail": output[len(cot):],
                 "chunks": [cot[a:b] for a, b in zip(bounds, bounds[1:])]}
        order = list(range(len(extra["chunks"])))
        out += [chunk_item(ctx.tokenizer, doc_id, extra, order, j) for j in order]
    if empty:
        log.warning("%s: %d documents have an empty CoT and are skipped: %s", split.source, len(empty), empty[:5])
    log.info("cwt %s: %d chunk items of %d documents", ctx.split_name, len(out), len({i.doc_id for i in out}))
    return out


def loss(model: nn.Module, item: Item, params: Mapping[str, Any]) -> dict[str, Tensor]:
    """CE on the item's chunk (and the answer block after the last chunk)."""
    logits, _ = forward(model, item.input_ids)                                   # [1, seq, V]
    ce = next_token_ce(logits, item.input_ids, item.supervised)
    return {"loss": ce, **cot_terms(ce)}


# ----------------------------------------------------------------------------- skipping


def documents(items: Sequence[Item]) -> dict[str, Item]:
    """The first item of each document, in item order (every item of a document has its chunks)."""
    first: dict[str, Item] = {}
    for item in items:
        first.setdefault(item.doc_id, item)
    return first


def answer_ce(model: nn.Module, tokenizer, messages: str, rationale: str, tail: str) -> float:
    """Mean CE of the answer block `tail` after prompt + `rationale` (teacher-forced)."""
    ids, supervised, _ = encode(tokenizer, messages, [("cot", rationale), ("answer", tail)], supervise=["answer"])
    logits, _ = forward(model, ids)
    return float(next_token_ce(logits, ids, supervised).detach())


def skip_tests(extra: Mapping[str, Any]) -> list[int | None]:
    """The rationales a document's skip labels score: the whole CoT (None), then without each middle chunk j;
    none for a CoT without an answer block or without a middle chunk."""
    middle = list(range(1, len(extra["chunks"]) - 1)) if extra["tail"] else []
    return [None, *middle] if middle else []


def skip_rows(doc_id: str, extra: Mapping[str, Any], tolerance: float, ce: Callable[[int | None], float]) -> list[dict]:
    """One row per chunk: a middle chunk is skippable when the answer CE without it, ce(j), rises over the CE
    with the whole CoT, ce(None), by at most `tolerance`; the first and last chunks never are (nor any chunk
    of a CoT without an answer block)."""
    tests = skip_tests(extra)
    full = ce(None) if tests else float("nan")
    rows = []
    for j in range(len(extra["chunks"])):
        without = ce(j) if j in tests else float("nan")
        rows.append({"doc_id": doc_id, "chunk": j, "skippable": bool(without - full <= tolerance),
                     "answer_loss_full": full, "answer_loss_skip": without})
    return rows


def relabel(ctx: RecipeContext, items: list[Item], model: nn.Module) -> pd.DataFrame:
    """The skippable chunks of every document, scored with `model` as it is now: the answer CEs shared by the
    ranks (`across_ranks`, one forward each), every rank gets every label."""
    docs = documents(items)
    requests = [(doc_id, j) for doc_id, item in docs.items() for j in skip_tests(item.extra)]

    def score(request: tuple[str, int | None]) -> float:
        doc_id, j = request
        extra = docs[doc_id].extra
        chunks = extra["chunks"] if j is None else extra["chunks"][:j] + extra["chunks"][j + 1:]
        return answer_ce(model, ctx.tokenizer, extra["messages"], "".join(chunks), extra["tail"])

    with scoring(model):
        ces = dict(zip(requests, across_ranks(score, requests, ctx.rank, ctx.world, "cwt skip labels")))
    rows = [row for doc_id, item in docs.items()
            for row in skip_rows(doc_id, item.extra, ctx.params["skip_tolerance"], lambda j, d=doc_id: ces[(d, j)])]
    labels = pd.DataFrame(rows, columns=LABEL_COLUMNS)
    log.info("cwt: %d of %d chunks skippable", int(labels["skippable"].sum()), len(labels))
    return labels


def skipped_chunks(labels: pd.DataFrame | None) -> dict[str, set[int]]:
    """{doc_id: its skippable chunks} of a relabel frame (empty for None)."""
    if labels is None:
        return {}
    marked = labels[labels["skippable"].astype(bool)]
    return {doc: set(int(c) for c in group["chunk"]) for doc, group in marked.groupby("doc_id")}


def epoch_items(ctx: RecipeContext, items: list[Item], epoch: int, labels: pd.DataFrame | None) -> list[Item]:
    """One item per document: its chunk drawn with random.Random(f"{seed}:{epoch}:{doc_id}") among the
    chunks kept (all before skip_from_epoch; without the skippable ones from then on, when labelled)."""
    fixed = {(item.doc_id, item.record["chunk"]): item for item in items}
    skip = skipped_chunks(labels) if epoch >= ctx.params["skip_from_epoch"] else {}
    out = []
    for doc_id, item in documents(items).items():
        skipped = skip.get(doc_id, set())
        order = [j for j in range(len(item.extra["chunks"])) if j not in skipped]
        position = random.Random(f"{ctx.seed}:{epoch}:{doc_id}").randrange(len(order))
        out.append(chunk_item(ctx.tokenizer, doc_id, item.extra, order, position) if skipped
                   else fixed[(doc_id, order[position])])
    return out


RECIPE = baseline_recipe(BASELINES["cwt"], items=items, items_need_student=True, loss=loss, relabel=relabel, epoch_items=epoch_items)
