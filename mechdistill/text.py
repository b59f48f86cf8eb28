"""Text and token positions, shared by every phase that maps text to a model's tokens.

A span is a half-open character range `(start, end)` into a text (`text[start:end]`); it is model-agnostic,
and each model maps it to its own token indices through its tokenizer's offset mapping (`token_offsets`
+ `char_span_to_tokens` / `spans_to_token_positions`). `shift_spans` moves spans into a longer text
(CoT spans into prompt + CoT); `sentence_spans` cuts a text into sentences; `token_units` cuts it at
its token starts. `encode_windowed` embeds a text longer than a sentence embedder reads (MiniLM:
256 word-pieces) whole, in windows (the last section).

Token windows ("the first N tokens" of a CoT: the early segment E of Focus, CoarseScore and the
mechanism losses) are defined once, on the TEACHER's tokens, as a character span
(`first_tokens_span`), whatever model's CoT it is; each model then takes the tokens overlapping that
span (`char_span_to_tokens`; as units of Focus / Confusion: `window_units`). So a Qwen3 or Gemma 3
student's window covers the same characters as a Llama teacher's, not its own first N tokens.
"""

from __future__ import annotations

import re

import numpy as np

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


# ---------------------------------------------------------------- texts longer than the model reads


def token_budget(embedder) -> tuple[object, int] | None:
    """(tokenizer, content word-pieces per text) of a sentence-transformers embedder (`.model.tokenizer`,
    `.model.max_seq_length`, which counts the special tokens); None for one without a token limit."""
    model = getattr(embedder, "model", None)
    tokenizer, max_length = getattr(model, "tokenizer", None), getattr(model, "max_seq_length", None)
    if tokenizer is None or max_length is None:
        return None
    return tokenizer, max_length - tokenizer.num_special_tokens_to_add()


def word_starts(text: str, offsets: list[tuple[int, int]]) -> list[bool]:
    """Whether each token starts a word (a window may begin there): the first token, a token after a
    gap, or one where the characters on either side of the junction are not both alphanumeric. A
    window cut there re-tokenises to the same word-pieces (WordPiece splits at spaces and punctuation)."""
    def starts(i: int) -> bool:
        (a, _), (_, prev_end) = offsets[i], offsets[i - 1]
        if a < prev_end:  # several tokens of one character (byte-level BPE)
            return False
        return a > prev_end or not (text[a - 1].isalnum() and text[a:a + 1].isalnum())

    return [i == 0 or starts(i) for i in range(len(offsets))]


def token_windows(word_start: list[bool], max_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of at most max_tokens tokens covering all len(word_start) tokens.

    Windows run from the front and start and end at word starts (cuts), each starting at the last
    cut at least `overlap` tokens before the previous one ends (at the next word if none is; the
    overlap is then smaller); the last window is anchored at the end, so it is as full as the
    others. Only a word longer than max_tokens is cut inside.
    """
    n = len(word_start)
    if n <= max_tokens:
        return [(0, n)]
    cuts = [i for i, s in enumerate(word_start) if s] + [n]

    def cuts_in(lo: int, hi: int) -> list[int]:  # cuts c with lo < c <= hi
        return [c for c in cuts if lo < c <= hi]

    windows, start, end = [], 0, 0
    while n - start > max_tokens:  # each window ends at the last cut it reaches past the previous end
        end = max(cuts_in(end, start + max_tokens), default=start + max_tokens)
        windows.append((start, end))
        overlapping, later = cuts_in(start, end - overlap), cuts_in(start, end)
        start = max(overlapping) if overlapping else min(later) if later else max(end - overlap, start + 1)
    windows.append((min(cuts_in(n - max_tokens - 1, end), default=n - max_tokens), n))  # no gap, fits
    return windows


def window_texts(embedder, text: str, overlap: int = 32) -> list[str]:
    """`text` cut into windows the embedder reads whole (`encode_windowed`); [text] when it fits."""
    budget = token_budget(embedder)
    if budget is None:
        return [text]
    tokenizer, max_tokens = budget
    if len(text.encode()) < max_tokens:  # every token covers a byte or more (at most one prefix token)
        return [text]
    if len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) <= max_tokens:
        return [text]
    offsets = token_offsets(tokenizer, text)
    spans = token_windows(word_starts(text, offsets), max_tokens, min(overlap, max_tokens // 2))
    return [text[offsets[a][0]:offsets[b - 1][1]] for a, b in spans]


def encode_windowed(embedder, texts: list[str], overlap: int = 32) -> np.ndarray:
    """Like `embedder.encode(texts)` -> [n, d] unit rows, but a text longer than the embedder reads is
    embedded whole: windows of at most its `max_seq_length` word-pieces (consecutive windows share
    `overlap` of them; cuts fall between words; `window_texts`), each embedded, the mean of their unit
    vectors renormalised. A text that fits is one window: exactly its `encode` embedding. Every
    window of every text goes to one `encode` call. Used by Confusion (`anchors.trajectories`), the
    patching effects and the teacher's candidate retrieval (`teacher.prompts.retrieval_candidates`)."""
    windows = [window_texts(embedder, t, overlap) for t in texts]
    vectors = embedder.encode([w for ws in windows for w in ws])  # [n_windows, d]
    if all(len(ws) == 1 for ws in windows):
        return vectors
    counts = np.array([len(ws) for ws in windows])
    ends = np.cumsum(counts)
    rows = []
    for start, end in zip(ends - counts, ends):
        mean = vectors[start:end].astype(np.float64).mean(0)  # [d]; one window: its own vector
        norm = np.linalg.norm(mean)
        rows.append(mean / norm if end - start > 1 and norm > 0 else mean)
    return np.stack(rows).astype(vectors.dtype)
