"""Text and token positions, shared by every phase that maps text to a model's tokens.

A span is a half-open character range `(start, end)` into a text (`text[start:end]`); it is model-agnostic,
and each model maps it to its own token indices through its tokenizer's offset mapping (`token_offsets`
+ `char_span_to_tokens` / `spans_to_token_positions`). `shift_spans` moves spans into a longer text
(CoT spans into prompt + CoT); `sentence_spans` cuts a text into sentences; `token_units` cuts it at
its token starts.

Token windows ("the first N tokens" of a CoT: the early segment E of Focus, CoarseScore and the
mechanism losses) are defined once, on the TEACHER's tokens, as a character span
(`first_tokens_span`), whatever model's CoT it is; each model then takes the tokens overlapping that
span (`char_span_to_tokens`; as units of Focus / Confusion: `window_units`). So a Qwen3 or Gemma 3
student's window covers the same characters as a Llama teacher's, not its own first N tokens.
"""

from __future__ import annotations

import re

from .errors import ConfigError

Span = tuple[int, int]

_ABBREV = re.compile(r"(?:\bvs|\be\.g|\bi\.e|\betc|\bcf|\bapprox|\bDr|\bno)\.$", re.IGNORECASE)
_BOUNDARY = re.compile(r"[.!?]+(?=\s|$)|\n")


def token_offsets(tokenizer, text: str) -> list[Span]:
    """Character span of each token of `text` (no special tokens added).

    Special tokens that some tokenizers report as (0, 0) are kept as zero-width spans: they cover
    no character, so no span maps to them. Byte-level tokens of one multi-byte character all
    report that character's span.
    """
    if not text:
        return []
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"tokenizer {type(tokenizer).__name__} has no offset mapping (not a fast "
                          "tokenizer). Fix: load it with use_fast=True or give a tokenizer.json.")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [(int(s), int(e)) for s, e in enc["offset_mapping"]]


def units_at(text: str, offsets: list[Span]) -> list[str]:
    """`text` cut at the starts of the tokens whose `offsets` are given: contiguous pieces whose
    concatenation is `text` (one per token, the text between two token starts kept)."""
    starts = [a for a, _ in offsets]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


def token_units(tokenizer, text: str) -> list[str]:
    """`text` cut at its token starts (`units_at`), the units of Focus / Confusion."""
    return units_at(text, token_offsets(tokenizer, text))


def first_tokens_span(text: str, offsets: list[Span], n_tokens: int) -> Span:
    """The token window "first `n_tokens` tokens" of `text` as characters: (0, end of the last of the
    first `n_tokens` tokens that covers a character), capped at len(text); (0, 0) if none.

    `offsets` are the TEACHER's (`token_offsets(teacher_tokenizer, text)`), for every model's text: the
    one definition of a token window (module docstring). A token that is one byte of a multi-byte
    character ends where the character ends, so the window never splits a character."""
    ends = [e for s, e in offsets[:max(n_tokens, 0)] if e > s]
    return (0, min(max(ends), len(text))) if ends else (0, 0)


def window_units(tokenizer, text: str, window: Span) -> tuple[list[str], list[str]]:
    """`text` cut at `tokenizer`'s token starts (`token_units`), split into (the units of the tokens
    that overlap the character span `window`, the rest). `window` starts the text (a
    `first_tokens_span`), so its tokens (`char_span_to_tokens`) are the leading ones; a token that
    straddles the window's end is in it."""
    offsets = token_offsets(tokenizer, text)
    units = units_at(text, offsets)
    inside = char_span_to_tokens(offsets, window)
    n_inside = inside[-1] + 1 if inside else 0
    return units[:n_inside], units[n_inside:]


def char_span_to_tokens(offsets: list[Span], span: Span) -> list[int]:
    """Indices of the tokens that overlap the character span (zero-width tokens never do)."""
    s, e = span
    return [i for i, (a, b) in enumerate(offsets) if a < b and a < e and b > s]


def spans_to_token_positions(offsets: list[Span], spans: list[Span]) -> list[list[int]]:
    """Token indices overlapping each span (an empty list where the span covers no token)."""
    return [char_span_to_tokens(offsets, sp) for sp in spans]


def shift_spans(spans: list[Span], by: int) -> list[Span]:
    """Spans moved by `by` characters (CoT spans -> spans into prompt + CoT)."""
    return [(s + by, e + by) for s, e in spans]



def sentence_spans(text: str) -> list[Span]:
    """Sentences split at . ! ? (followed by space/end) and newlines, whitespace trimmed.

    IDs like "I50.22" and abbreviations like "vs." / "e.g." do not end a sentence.
    """
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        if m.group() != "\n" and _ABBREV.search(text[start:m.end()]):
            continue
        out.append((start, m.end()))
        start = m.end()
    out.append((start, len(text)))
    spans = []
    for s, e in out:
        seg = text[s:e]
        lead = len(seg) - len(seg.lstrip())
        s2, e2 = s + lead, s + len(seg.rstrip())
        if e2 > s2:
            spans.append((s2, e2))
    return spans
