"""Text and token positions, shared by every phase that maps text to a model's tokens.

A span is a half-open character range `(start, end)` into a text (`text[start:end]`); it is model-agnostic,
and each model maps it to its own token indices through its tokenizer's offset mapping (`token_offsets`
+ `char_span_to_tokens` / `spans_to_token_positions`). `shift_spans` moves spans into a longer text
(CoT spans into prompt + CoT); `sentence_spans` cuts a text into sentences; `token_units` cuts it at
its token starts.
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


def token_units(tokenizer, text: str) -> list[str]:
    """`text` cut at its token starts: contiguous pieces whose concatenation is `text` (one per
    token, leading whitespace kept), the units of Focus / Confusion."""
    starts = [a for a, _ in token_offsets(tokenizer, text)]
    return [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]


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
