"""Patched greedy generation: the runs behind the activation-patching figures (Figs 5 and 8).

A document gives a clean and a token-aligned corrupted input (same length in the patched model's
tokenizer, see `corruptions.py`). Each is prefilled once, without its last token, and the KV cache
is kept; a *reference run* then generates `n_steps` greedy tokens from it while a PatternTape
records, at every step, the attention row of every head that any head set will patch. A
*patched run* restarts from a copy of one input's cache (batched: one batch row per head set)
and, at every step, gives the patched heads the other run's recorded pattern:

    denoising: corrupted input, clean patterns    (does restoring these heads restore the metric?)
    noising:   clean input, corrupted patterns    (does corrupting these heads destroy it?)

Only queries that produce generated tokens are patched (the last prompt position, then each new
token); the prompt's own positions keep their cached, unpatched states, which is what lets all
patched runs share the reference run's prefill. Patterns are taken step by step from the source
run, so key lengths match; patched heads write A_src V with their own run's values; every other
head and layer runs normally (`patterns.PatternPatch`).

Cost per document and phase: 2 prefills + 2 reference runs + ceil(n_sets / batch_size) batched
patched runs per direction, each `n_steps` decoding steps; n_sets = bins x (top + near_zero +
most_negative + n_random).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from transformers import RepetitionPenaltyLogitsProcessor

from ..characterize.attention import Head, attention_hooks, attention_modules, head_counts
from ..models import input_device
from .patterns import PatternPatch, PatternTape

DIRECTIONS = {"denoise": ("corrupt", "clean"), "noise": ("clean", "corrupt")}  # direction: (input, pattern source)


@dataclass
class HeadSet:
    """A named set of heads to patch: kind (top or a `head_sets.CONTROLS` name), k heads, seed (random sets)."""

    kind: str
    k: int
    seed: int
    heads: list[Head]


@dataclass
class Prefix:
    """An input prefilled once: the KV cache of ids[:-1] and the last token (generation starts there)."""

    cache: object
    last_token: int
    length: int


def prefill(model: nn.Module, ids: Tensor) -> Prefix:
    """Run ids[:-1] ([seq] LongTensor, seq >= 2) once and keep the cache."""
    if ids.ndim != 1 or ids.numel() < 2:
        raise ValueError(f"prefill needs a 1-D sequence of at least 2 tokens, got shape {tuple(ids.shape)}")
    with torch.no_grad():
        out = model(input_ids=ids[None, :-1].to(input_device(model)), use_cache=True)
    return Prefix(out.past_key_values, int(ids[-1]), int(ids.numel()))


def greedy_from(model: nn.Module, prefix: Prefix, n_steps: int, batch: int = 1,
                hooks: dict | None = None, repetition_penalty: float = 1.0,
                history: Tensor | None = None) -> Tensor:
    """Greedy-generate `n_steps` tokens for `batch` identical copies of `prefix` -> [batch, n_steps].

    The prefix cache is copied, never modified. `hooks` ({layer: attention hook}) run at every
    step, e.g. a PatternTape's or PatternPatch's. `repetition_penalty` (HF semantics) penalises
    tokens in `history` ([seq], the prefix ids) and in the tokens generated so far. Under a device
    map the cache holds each layer's keys and values on that layer's device.
    """
    device = input_device(model)
    cache = copy.deepcopy(prefix.cache)
    if batch > 1:
        cache.batch_repeat_interleave(batch)
    token = torch.full((batch, 1), prefix.last_token, dtype=torch.long, device=device)
    seen = (history.to(device)[None].expand(batch, -1) if history is not None
            else token.new_zeros((batch, 0)))
    penalty = RepetitionPenaltyLogitsProcessor(repetition_penalty) if repetition_penalty != 1.0 else None
    generated = []
    with torch.no_grad(), attention_hooks(model, hooks or {}):
        for _ in range(n_steps):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].float().to(device)
            seen = torch.cat([seen, token], dim=1)
            if penalty is not None:
                logits = penalty(seen, logits)
            token = logits.argmax(-1, keepdim=True)  # [batch, 1]
            generated.append(token)
    return torch.cat(generated, dim=1)


def model_heads(model: nn.Module) -> list[Head]:
    """Every (layer, head) of the model, in order."""
    mods = attention_modules(model)
    return [(layer, head) for layer, mod in enumerate(mods) for head in range(head_counts(mod)[0])]


def head_mask(head_sets: Sequence[Sequence[Head]], n_layers: int, n_heads: int) -> dict[int, Tensor]:
    """{layer: [n_sets, n_heads] bool}: row i marks the heads of set i in that layer."""
    mask = torch.zeros(n_layers, len(head_sets), n_heads, dtype=torch.bool)
    for i, heads in enumerate(head_sets):
        for layer, head in heads:
            mask[layer, i, head] = True
    return {layer: mask[layer] for layer in range(n_layers) if mask[layer].any()}


def heads_by_layer(heads: Sequence[Head]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        out.setdefault(int(layer), []).append(int(head))
    return out


@dataclass
class Reference:
    """A reference (unpatched) run: its prefill, recorded patterns and generated tokens [n_steps]."""

    prefix: Prefix
    tape: PatternTape
    tokens: Tensor
    history: Tensor


class DocumentRuns:
    """Clean and corrupted reference runs of one input pair, cached and reused by every patched run.

    record_heads: every head any head set may patch (the tapes hold only these).
    """

    def __init__(self, model: nn.Module, n_steps: int, record_heads: Sequence[Head],
                 repetition_penalty: float = 1.0):
        self.model = model
        self.n_steps = n_steps
        self.record_heads = heads_by_layer(record_heads)
        self.repetition_penalty = repetition_penalty
        mods = attention_modules(model)
        self.n_layers = len(mods)
        self.n_heads = head_counts(mods[0])[0]
        self.refs: dict[str, Reference] = {}

    def reference(self, name: str, ids: Tensor) -> Reference:
        """Prefill `ids` and run it unpatched, recording patterns; cached under `name`."""
        prefix = prefill(self.model, ids)
        tape = PatternTape(self.record_heads)
        tokens = greedy_from(self.model, prefix, self.n_steps, hooks=tape.hooks(),
                             repetition_penalty=self.repetition_penalty, history=ids)[0]
        self.refs[name] = Reference(prefix, tape, tokens, ids)
        return self.refs[name]

    def patched(self, direction: str, head_sets: Sequence[Sequence[Head]]) -> Tensor:
        """One batched patched run per direction: row i patches head_sets[i] -> [n_sets, n_steps]."""
        run_on, source = (self.refs[name] for name in DIRECTIONS[direction])
        if run_on.prefix.length != source.prefix.length:
            raise RuntimeError(f"{direction}: inputs differ in length ({run_on.prefix.length} vs "
                               f"{source.prefix.length} tokens); patterns need token-aligned inputs (key length)")
        patch = PatternPatch(source.tape, head_mask(head_sets, self.n_layers, self.n_heads))
        return greedy_from(self.model, run_on.prefix, self.n_steps, batch=len(head_sets), hooks=patch.hooks(),
                           repetition_penalty=self.repetition_penalty, history=run_on.history)


def batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def patched_runs(runs: DocumentRuns, head_sets: Sequence[HeadSet], batch_size: int,
                 on_batch: Callable[[int], None] | None = None) -> list[dict]:
    """Patched runs of every head set in both directions (reference runs must exist).

    Returns one record per (direction, head set): direction, kind, k, seed, tokens [n_steps].
    `on_batch(n)` is called after each batched run with the number of head sets it covered.
    """
    records = []
    for direction in DIRECTIONS:
        for chunk in batched(list(head_sets), batch_size):
            tokens = runs.patched(direction, [s.heads for s in chunk])
            records += [dict(direction=direction, kind=s.kind, k=s.k, seed=s.seed, tokens=tokens[i])
                        for i, s in enumerate(chunk)]
            if on_batch is not None:
                on_batch(len(chunk))
    return records
