"""Teacher-forced sequences: [prompt; CoT] for any model, with CoT char spans mapped to tokens.

Spans in the anchors artifact are character offsets into the CoT (model-agnostic). A model
renders the prompt with its own chat template, appends the CoT, and maps every span to its
own token positions through the offset mapping. Query positions follow the paper: a CoT
token is *produced* at the position immediately preceding it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..models import context_length
from ..teacher.prompts import document_char_span, render_prompt
from ..text import char_span_to_tokens, shift_spans, token_offsets

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ForcedSequence:
    input_ids: torch.Tensor          # [seq]
    prompt_chars: int                # length of the rendered prompt text (CoT starts here)
    cot_token_start: int             # index of the first CoT token
    early_queries: list[int]         # positions producing the first early CoT tokens
    refine_positions: list[int]      # last token of each refinement span
    shortlist_positions: list[int]   # tokens of shortlist mentions
    nearmiss_positions: list[int]    # tokens of near-miss mentions
    document_positions: list[int]    # tokens of the last user message's document + candidate list (the
                                     # CoarseScore's "document" keys: teacher.prompts.document_char_span)


def _tokens(offsets, spans) -> list[int]:
    return sorted({i for span in spans for i in char_span_to_tokens(offsets, tuple(span))})


def forced_sequence(tokenizer, messages_json: str, cot: str, anchors_row) -> ForcedSequence:
    """Tokenise prompt + CoT for teacher forcing and map the anchors row's CoT spans to tokens."""
    messages = json.loads(messages_json)
    prompt = render_prompt(tokenizer, messages)
    text = prompt + cot
    offsets = token_offsets(tokenizer, text)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    cot_start = next((i for i, (a, b) in enumerate(offsets) if b > len(prompt)), len(ids))
    shift = len(prompt)
    early_tokens = _tokens(offsets, shift_spans([list(anchors_row["early_span"])], shift))
    refine = [max(char_span_to_tokens(offsets, tuple(s))) for s in shift_spans(list(anchors_row["refine_spans"]), shift)
              if char_span_to_tokens(offsets, tuple(s))]
    return ForcedSequence(
        input_ids=torch.tensor(ids),
        prompt_chars=len(prompt), cot_token_start=cot_start,
        early_queries=[p - 1 for p in early_tokens if p >= cot_start and p > 0],
        refine_positions=sorted(set(refine)),
        shortlist_positions=_tokens(offsets, shift_spans(list(anchors_row["shortlist_spans"]), shift)),
        nearmiss_positions=_tokens(offsets, shift_spans(list(anchors_row["nearmiss_spans"]), shift)),
        document_positions=_tokens(offsets, [document_char_span(prompt, messages)]),
    )


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def margin_tokens(tokenizer, target_titles: list[str], nearmiss_titles: list[str]) -> tuple[list[int], list[int]]:
    """One token per label for the margin M_t (Eq. 7): its first token that tells it from the other group.

    Each title is tokenised as it reads mid-sentence (" " + title, no special tokens: GPT-2 /
    Llama-3 BPE give a space-prefixed token there). A target's token is its token i, where i is
    its longest common token prefix with any near-miss (and vice versa for a near-miss), clamped
    to its last token. Siblings such as "Type 2 diabetes mellitus with hyperglycemia" vs "... with
    ketoacidosis" then put +1/|T| and -1/|N| on " hyper" and " keto", not both on " Type" (where
    they would cancel). Empty titles are skipped. Returns (target ids, near-miss ids), one per label.
    (A label's sequence log-probability would not avoid the cancellation: RefineScore's OV term
    differentiates M_t through position t's final norm and unembedding only, where the sequence
    term reduces to its first token's log-probability.)
    """
    def sequences(titles: list[str]) -> list[list[int]]:
        return [ids for ids in (tokenizer(" " + t.strip(), add_special_tokens=False)["input_ids"]
                                for t in titles if t.strip()) if ids]

    def discriminating(group: list[list[int]], other: list[list[int]]) -> list[int]:
        return [seq[min(max((_common_prefix(seq, o) for o in other), default=0), len(seq) - 1)] for seq in group]

    targets, nearmisses = sequences(target_titles), sequences(nearmiss_titles)
    return discriminating(targets, nearmisses), discriminating(nearmisses, targets)


def length_cap(max_tokens: int | None, model) -> int | None:
    """A stage's cap on teacher-forced length, in tokens: its `max_tokens` setting, else the model's
    context (`models.context_length`: max_position_embeddings of its text config); None when neither is known."""
    if max_tokens:
        return int(max_tokens)
    return context_length(model)


def within_cap(items: list[T], length: Callable[[T], int], doc_id: Callable[[T], str], cap: int | None,
               where: str) -> list[T]:
    """The items of at most `cap` tokens; the longer ones are left out with one warning naming each
    (doc_id and length), so a runaway trace costs a log line, not hours of quadratic attention."""
    if cap is None:
        return items
    long = [(doc_id(item), length(item)) for item in items if length(item) > cap]
    if long:
        log.warning("%s: %d of %d documents are longer than max_tokens=%d and are skipped: %s", where, len(long),
                    len(items), cap, ", ".join(f"{d} ({n} tokens)" for d, n in long[:10]))
    return [item for item in items if length(item) <= cap]
