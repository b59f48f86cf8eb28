"""The causal-LM pieces the four baselines share: a prompt followed by named text pieces as token
ids with their spans, one forward, the next-token CE of the supervised tokens, span means, a
baseline's CoT loss terms, a progress bar for per-document work, and that work shared by the ranks
(`across_ranks`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...models import input_device
from ...teacher.prompts import render_prompt
from ...text import char_span_to_tokens, token_offsets
from ..launch import gather_to_all, shard
from ..recipe import Span

T, R = TypeVar("T"), TypeVar("R")


def encode(tokenizer, messages_json: str, pieces: Sequence[tuple[str, str]], supervise: Sequence[str] | None = None
           ) -> tuple[Tensor, Tensor, dict[str, Span]]:
    """The prompt (chat template of `messages_json`) followed by the text `pieces` [(name, text), ...].

    Returns input_ids [seq], supervised [seq] bool (the tokens of the pieces named in `supervise`,
    default all pieces) and each piece's token span {name: (start, end)} (a token straddling two
    pieces belongs to the first; a piece with no token of its own gets an empty span).
    """
    prompt = render_prompt(tokenizer, json.loads(messages_json))
    text, bounds = prompt, {}
    for name, piece in pieces:
        bounds[name] = (len(text), len(text) + len(piece))
        text += piece
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    offsets = token_offsets(tokenizer, text)
    spans, taken = {}, 0
    for name, (start, end) in bounds.items():
        tokens = [t for t in char_span_to_tokens(offsets, (start, end)) if t >= taken]
        spans[name] = (tokens[0], tokens[-1] + 1) if tokens else (taken, taken)
        taken = max(taken, spans[name][1])
    supervised = torch.zeros(len(ids), dtype=torch.bool)
    for name in (supervise if supervise is not None else bounds):
        start, end = spans[name]
        supervised[start:end] = True
    return torch.tensor(ids, dtype=torch.long), supervised, spans


def forward(model: nn.Module, input_ids: Tensor, hidden: bool = False) -> tuple[Tensor, Tensor | None]:
    """Logits [1, seq, vocab] of one sequence, and its last hidden states [1, seq, d] when asked."""
    out = model(input_ids=input_ids[None].to(input_device(model)), output_hidden_states=hidden, use_cache=False)
    return out.logits, (out.hidden_states[-1] if hidden else None)


def next_token_ce(logits: Tensor, input_ids: Tensor, supervised: Tensor) -> Tensor:
    """Mean CE of the supervised tokens: -1/|S| sum_{i in S} log p(x_i | x_<i) (logits [1, seq, V] of the
    same sequence; position 0 is never a target). 0 (with grad) when nothing is supervised."""
    targets = supervised[1:].to(logits.device)                                 # [seq-1]
    if not targets.any():
        return logits.sum() * 0.0
    nll = F.cross_entropy(logits[0, :-1].float(), input_ids[1:].to(logits.device), reduction="none")
    return nll[targets].mean()


def span_means(hidden: Tensor, spans: Sequence[Span]) -> Tensor:
    """Mean hidden state over each token span: hidden [1, seq, d] -> [n_spans, d] (an empty span: zeros)."""
    rows = [hidden[0, start:end].mean(0) if end > start else hidden.new_zeros(hidden.shape[-1])
            for start, end in spans]
    return torch.stack(rows) if rows else hidden.new_zeros(0, hidden.shape[-1])


def cot_terms(ce: Tensor) -> dict[str, Tensor]:
    """The CoT terms of a baseline's loss dict: its CE, and a KL of 0 (no logit distillation)."""
    return {"cot.ce": ce, "cot.kl": ce.new_zeros(())}


def progress(iterable, desc: str, total: int | None = None):
    """A progress bar for a recipe's per-document work (scoring, labelling)."""
    return tqdm(iterable, desc=desc, total=total, unit="doc", leave=False)



def across_ranks(score: Callable[[T], R], requests: Sequence[T], rank: int = 0, world: int = 1,
                 desc: str = "") -> list[R]:
    """`score` of every request, shared by `world` ranks: rank r scores requests r, r + world, ... (`launch.shard`,
    padded by wrapping to the same count on every rank: under ZeRO-3 a forward is collective, so `score` must
    make one forward, or the same number, for every request), and the results are gathered: every rank
    returns all of them, in request order, as one process would. One rank: every request in order.
    desc: a progress bar's (over this rank's requests)."""
    if world == 1:
        return [score(request) for request in progress(requests, desc)] if desc else list(map(score, requests))
    mine = shard(range(len(requests)), rank, world)  # ceil(n / world) on every rank, the padding repeated
    own = len(range(rank, len(requests), world))
    scored = [score(requests[i]) for i in (progress(mine, f"{desc} (rank {rank} of {world})") if desc else mine)]
    shards = gather_to_all(scored[:own])  # [world][requests of the rank]
    return [shards[i % world][i // world] for i in range(len(requests))]
