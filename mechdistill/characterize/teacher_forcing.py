"""Teacher-forced sequences: [prompt; CoT] for any model, with CoT char spans mapped to tokens.

Spans in the anchors artifact are character offsets into the CoT (model-agnostic). A model
renders the prompt with its own chat template, appends the CoT, and maps every span to its
own token positions through the offset mapping. Query positions follow the paper: a CoT
token is *produced* at the position immediately preceding it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..anchors.segment import char_span_to_tokens, shift_spans, token_offsets
from ..teacher.prompts import render_prompt


@dataclass
class ForcedSequence:
    input_ids: torch.Tensor          # [seq]
    prompt_chars: int                # length of the rendered prompt text (CoT starts here)
    cot_token_start: int             # index of the first CoT token
    early_queries: list[int]         # positions producing the first early CoT tokens
    refine_positions: list[int]      # last token of each refinement span
    shortlist_positions: list[int]   # tokens of shortlist mentions
    nearmiss_positions: list[int]    # tokens of near-miss mentions


def _tokens(offsets, spans) -> list[int]:
    return sorted({i for span in spans for i in char_span_to_tokens(offsets, tuple(span))})


def forced_sequence(tokenizer, messages_json: str, cot: str, anchors_row) -> ForcedSequence:
    """Tokenise prompt + CoT for teacher forcing and map the anchors row's CoT spans to tokens."""
    prompt = render_prompt(tokenizer, json.loads(messages_json))
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
    )


def label_first_tokens(tokenizer, texts: list[str]) -> list[int]:
    """First token id of each label text as it starts a line in the CoT (Eq. 7 uses first tokens)."""
    return [tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in texts if t]
