"""CoT segmentation into character spans, and their mapping to each model's token positions.

Every span is a half-open character range `(start, end)` into the CoT text (`cot[start:end]`),
so it is model-agnostic: teacher and student map the same spans to their own tokens through the
tokenizer's offset mapping (`text.token_offsets` + `text.spans_to_token_positions`). If a model
tokenizes prompt + CoT together, shift the spans by `len(prompt)` first (`text.shift_spans`).

The spans of one CoT:
- early span: the characters of the teacher's first `early_tokens` CoT tokens (Phase 1 segment E,
  `text.first_tokens_span`: the one token window every model maps to its own tokens);
- mention spans: every occurrence of a label ("[ID]", bare ID, or its exact title);
  shortlist spans (labels the CoT keeps) and near-miss spans (near-miss labels) are mention spans;
- refine spans: whole sentences with contrastive reasoning. The refinement POSITION used
  downstream is the last token of each refine span (the sentence end), so the sentence's own
  shortlist and near-miss mentions are earlier positions it can look back at.
"""

from __future__ import annotations

import re

from ..labels import LabelSpace
from ..text import Span, first_tokens_span, sentence_spans

# Contrast cues: a label right after one of these is being ruled out. "not" skips ICD title
# phrases ("not specified", "not elsewhere classified", "not intractable", ...).
DEFAULT_REFINE_PATTERNS: list[str] = [
    r"\brul(?:e|es|ed|ing)\s+out\b",
    r"\brather\s+than\b",
    r"\bvs\.?(?=\s)",
    r"\bversus\b",
    r"\bnot\b(?!\s+(?:specified|elsewhere|otherwise|intractable|in\s+remission)\b)",
    r"\binstead\s+of\b",
    r"\bas\s+opposed\s+to\b",
    r"\bfavou?r(?:s|ed|ing)?\b",
    r"\bexclud(?:e|es|ed|ing)\b",
    r"\b(?:unlikely|less\s+likely)\b",
    r"\bno\s+evidence\s+of\b",
]

_ID_TOKEN = re.compile(r"(\[)?(?<![\w.\-])([A-Za-z0-9](?:[A-Za-z0-9._\-]*[A-Za-z0-9])?)(?![\w\-]|\.\w)(\])?")
_LIST_GLUE = re.compile(r"^[\s,/()\-]*(?:or|and|nor)\b", re.IGNORECASE)


def _cue_regex(patterns: list[str] | None) -> re.Pattern | None:
    """One case-insensitive regex for the cues; None means the defaults, [] means no cue."""
    patterns = DEFAULT_REFINE_PATTERNS if patterns is None else patterns
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.IGNORECASE) if patterns else None


# ---------------------------------------------------------------- mentions

def find_mentions(cot: str, space: LabelSpace, labels: list[str] | None = None) -> list[tuple[int, int, str]]:
    """Label mentions `(start, end, label_id)` in `cot`, sorted and non-overlapping.

    IDs are found for every assignable label of the space (and every label in `labels`), as
    "[ID]" or bare (bare only for IDs with a letter, so numbers in the text are not labels).
    Titles are matched (exact, case-insensitive, on word boundaries) only for `labels`.
    Overlaps: the earliest, then the longest match wins. A title directly followed by its own
    "[ID]" is one mention.
    """
    wanted = set(labels or [])
    found: list[tuple[int, int, str]] = []
    for m in _ID_TOKEN.finditer(cot):
        lab, bracketed = m.group(2), bool(m.group(1) and m.group(3))
        if lab not in wanted and lab not in space:
            lab = lab.upper() if bracketed else ""          # "[i50.22]" still counts; bare "i10" not
            if lab not in wanted and lab not in space:
                continue
        if bracketed:
            found.append((m.start(), m.end(), lab))
        elif any(ch.isalpha() for ch in lab):
            found.append((m.start(2), m.end(2), lab))
    for lab in wanted:
        title = str(space.title.get(lab) or "").strip()
        if title:
            pat = re.compile(r"(?<!\w)" + re.escape(title) + r"(?!\w)", re.IGNORECASE)
            found += [(m.start(), m.end(), lab) for m in pat.finditer(cot)]
    found.sort(key=lambda x: (x[0], x[0] - x[1]))
    kept: list[tuple[int, int, str]] = []
    for s, e, lab in found:
        if kept and s < kept[-1][1]:
            continue
        prev = kept[-1] if kept else None
        if (prev and prev[2] == lab and cot[s] == "[" and not cot[prev[1]:s].strip()
                and cot[prev[0]] != "["):
            kept[-1] = (prev[0], e, lab)                     # "Title [ID]" -> one mention
        else:
            kept.append((s, e, lab))
    return kept


def ruled_out(cot: str, mentions: list[tuple[int, int, str]],
              patterns: list[str] | None = None) -> list[bool]:
    """For each mention: is it ruled out (right after a contrast cue, in the same sentence)?

    "Right after": a cue lies between the previous mention (or the sentence start) and this one,
    or the previous mention in the sentence was ruled out and the text between starts with
    "or"/"and"/"nor" ("rather than A [x] or B [y]" rules out both).
    """
    cue = _cue_regex(patterns)
    sentences = sentence_spans(cot)
    flags: list[bool] = []
    prev_end, prev_sent, prev_flag = 0, -1, False
    for s, e, _ in mentions:
        sent = next((i for i, (a, b) in enumerate(sentences) if a <= s < b), -1)
        gap_start = prev_end if sent == prev_sent else (sentences[sent][0] if sent >= 0 else s)
        gap = cot[gap_start:s].rsplit(";", 1)[-1]            # a ";" starts a new clause
        flag = bool(cue and cue.search(gap)) or (sent == prev_sent and prev_flag and bool(_LIST_GLUE.match(gap)))
        flags.append(flag)
        prev_end, prev_sent, prev_flag = e, sent, flag
    return flags


def mention_spans(cot: str, label_ids: list[str], space: LabelSpace,
                  candidates: list[str] | None = None) -> list[Span]:
    """Spans of every mention of `label_ids` in `cot` (sorted, non-overlapping).

    Titles of `candidates` are matched too, so a label's title inside a longer candidate title
    is not counted as a mention of it.
    """
    want = set(label_ids)
    return [(s, e) for s, e, lab in find_mentions(cot, space, list(dict.fromkeys([*label_ids, *(candidates or [])])))
            if lab in want]


# ---------------------------------------------------------------- refinement

def refine_spans(cot: str, patterns: list[str] | None, shortlist_spans: list[Span],
                 nearmiss_spans: list[Span]) -> list[Span]:
    """Sentences with contrastive reasoning: a cue (`patterns`; None: DEFAULT_REFINE_PATTERNS,
    []: none) or, label-aware, a shortlist mention and a near-miss mention in the same sentence.

    Each span is the whole sentence (whitespace trimmed); the refinement position is its last token.
    """
    cue = _cue_regex(patterns)

    def inside(spans: list[Span], a: int, b: int) -> bool:
        return any(s < b and e > a for s, e in spans)

    return [(a, b) for a, b in sentence_spans(cot)
            if (cue and cue.search(cot[a:b])) or (inside(shortlist_spans, a, b) and inside(nearmiss_spans, a, b))]


def segment_cot(cot: str, offsets: list[Span], early_tokens: int, shortlist: list[str],
                near_misses: list[str], space: LabelSpace, candidates: list[str] | None = None,
                patterns: list[str] | None = None) -> dict:
    """All spans of one CoT, plus `reason` ("" when every kind of span was found).

    `offsets` are the CoT's token offsets under the model that defines E (the teacher's tokenizer).
    """
    cands = list(dict.fromkeys([*shortlist, *near_misses, *(candidates or [])]))
    short = mention_spans(cot, shortlist, space, cands)
    near = mention_spans(cot, near_misses, space, cands)
    out = {"early_span": first_tokens_span(cot, offsets, early_tokens),
           "refine_spans": refine_spans(cot, patterns, short, near),
           "shortlist_spans": short, "nearmiss_spans": near}
    if not cot.strip():
        reason = "empty CoT"
    elif not near_misses:
        reason = "no near-misses"
    elif not out["refine_spans"]:
        reason = "no refinement position"
    elif not short:
        reason = "no shortlist mention"
    elif not near:
        reason = "no near-miss mention"
    else:
        reason = ""
    return {**out, "reason": reason}
