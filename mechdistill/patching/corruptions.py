"""Corruptions of a clean document for activation patching (Sec. 2, Figs 5 and 8).

Each corruption is token-aligned with the clean text (same number of tokens in the patched
model's tokenizer), so attention patterns can be swapped position by position:

- Phase 1 removes coarse semantic signal: every semantically loaded term (anchor and gold-label
  words, or the words all heads together attend to most) becomes a clinically empty word
  ("finding", "issue", ...);
- Phase 2 steers toward a near-miss: the words that tell the gold code from a sibling are
  swapped ("Chronic systolic heart failure" -> "Acute systolic heart failure"), plus optional
  explicit value swaps ({"EF 35%": "EF 55%"}).

Token alignment is checked on the whole document (tokenizers are not additive over substrings in
general): replacements are made left to right and each one must leave the running corrupted text
with the clean text's token count. A replacement that cannot do so (no neutral candidate of the
right length, and padding with filler words disabled or impossible) rejects the whole pair:
`Corruption.aligned` is False and `reason` says why; callers count and drop those pairs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field

NEUTRAL_TERMS: tuple[str, ...] = (
    "finding", "issue", "condition", "matter", "item", "problem", "event", "status", "detail",
    "factor", "aspect", "feature", "note", "point", "topic", "thing", "case", "element", "entry",
    "record", "observation", "situation", "circumstance", "consideration",
    "findings", "problems", "features", "elements", "conditions", "situations", "observations",
)
"""Clinically empty words used as replacements and fillers in Phase-1 corruptions."""


# ---------------------------------------------------------------- corruptions

@dataclass
class Replacement:
    """One replaced occurrence: `old` at clean[start:end] became `new` in the corrupted text."""

    start: int
    end: int
    old: str
    new: str


@dataclass
class Corruption:
    """A clean document, its corrupted counterpart and how they were made."""

    clean: str
    corrupted: str
    replacements: list[Replacement] = field(default_factory=list)
    aligned: bool = False
    reason: str = ""
    n_tokens_clean: int = 0
    n_tokens_corrupted: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def count_tokens(text: str, tokenizer) -> int:
    """Number of tokens of `text` in `tokenizer`, without special tokens."""
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def match_case(new: str, old: str) -> str:
    """`new` written in the case pattern of `old` (ALL CAPS, Capitalised or lower case)."""
    if len(old) > 1 and old.isupper():
        return new.upper()
    if old[:1].isupper():
        return new[:1].upper() + new[1:]
    if old[:1].islower():
        return new[:1].lower() + new[1:]
    return new


def term_pattern(terms: Iterable[str]) -> re.Pattern | None:
    """Case-insensitive, word-bounded regex matching any of `terms`, longest first.

    Whitespace inside a term matches any run of whitespace, so "heart failure" also matches
    "heart\\nfailure". Returns None when no term is given.
    """
    unique = sorted({t.strip() for t in terms if t and t.strip()}, key=len, reverse=True)
    if not unique:
        return None
    alternatives = [r"\s+".join(re.escape(word) for word in term.split()) for term in unique]
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)", re.IGNORECASE)


def find_occurrences(text: str, terms: Iterable[str]) -> list[tuple[int, int]]:
    """Non-overlapping (start, end) char spans of `terms` in `text`; the longest term wins."""
    pattern = term_pattern(terms)
    return [] if pattern is None else [m.span() for m in pattern.finditer(text)]


def _padded(base: str, prefix: str, suffix: str, target: int, tokenizer,
            fillers: Sequence[str]) -> str | None:
    """`base` followed by filler words so that prefix + padded + suffix has exactly `target`
    tokens (each step adds the filler that adds the most tokens without overshooting); None when
    no filler sequence hits the count."""
    new = base
    count = count_tokens(prefix + new + suffix, tokenizer)
    while count < target:
        best = None
        for filler in fillers:
            trial = count_tokens(f"{prefix}{new} {filler}{suffix}", tokenizer)
            if count < trial <= target and (best is None or trial > best[1]):
                best = (f"{new} {filler}", trial)
        if best is None:
            return None
        new, count = best
    return new if count == target else None


def _aligned_replacement(prefix: str, old: str, suffix: str, candidates: Sequence[str], target: int,
                         tokenizer, fillers: Sequence[str], pad: bool) -> str | None:
    """The first candidate (case-matched to `old`) that keeps prefix + candidate + suffix at
    `target` tokens; failing that, a candidate padded with filler words; None if neither works."""
    options = [match_case(c, old) for c in candidates if c.strip() and c.lower() != old.lower()]
    for option in options:
        if count_tokens(prefix + option + suffix, tokenizer) == target:
            return option
    if pad:
        for option in options:
            padded = _padded(option, prefix, suffix, target, tokenizer, fillers)
            if padded is not None:
                return padded
    return None


def replace_aligned(text: str, spans: Sequence[tuple[int, int]], candidates_for, tokenizer,
                    fillers: Sequence[str] = NEUTRAL_TERMS, pad: bool = True) -> Corruption:
    """Replace each char span of `text` (left to right, non-overlapping) keeping the token count.

    `candidates_for(old)` lists the replacement candidates of the matched text `old`. The result is
    rejected (aligned=False) at the first span no candidate can replace without changing the
    document's token count; `corrupted` then holds the replacements made before it.
    """
    target = count_tokens(text, tokenizer)
    corruption = Corruption(clean=text, corrupted=text, n_tokens_clean=target, n_tokens_corrupted=target)
    if not spans:
        corruption.reason = "no term to corrupt occurs in the text"
        return corruption
    done, cursor = "", 0  # corrupted text up to clean[cursor:]
    for start, end in sorted(spans):
        old = text[start:end]
        new = _aligned_replacement(done + text[cursor:start], old, text[end:], candidates_for(old),
                                   target, tokenizer, fillers, pad)
        if new is None:
            corruption.corrupted = done + text[cursor:]
            corruption.reason = (f"cannot replace {old!r} at char {start} without changing the token count"
                                 f" ({'no candidate or padding fits' if pad else 'no candidate fits; padding disabled'})")
            return corruption
        corruption.replacements.append(Replacement(start, end, old, new))
        done, cursor = done + text[cursor:start] + new, end
    corruption.corrupted = done + text[cursor:]
    corruption.n_tokens_corrupted = count_tokens(corruption.corrupted, tokenizer)
    corruption.aligned = corruption.n_tokens_corrupted == target
    corruption.reason = "aligned" if corruption.aligned else "token counts differ after replacement"
    return corruption


def align_token_length(clean: str, corrupt: str, tokenizer, fillers: Sequence[str] = NEUTRAL_TERMS,
                       pad: bool = True) -> tuple[str | None, str]:
    """Make an arbitrary corrupted text as long (in tokens) as `clean`, or reject it.

    Equal counts: returned unchanged. Shorter: filler words are appended at the end (when `pad`)
    until the counts match. Longer, or no filler sequence hits the count exactly: (None, reason).
    Prefer `replace_aligned`, which pads next to each replacement and so keeps later positions aligned.
    """
    target, count = count_tokens(clean, tokenizer), count_tokens(corrupt, tokenizer)
    if count == target:
        return corrupt, "aligned"
    if count > target:
        return None, f"corrupted text is {count - target} token(s) longer than the clean text"
    if not pad:
        return None, f"corrupted text is {target - count} token(s) shorter and padding is disabled"
    padding = _padded("", corrupt, "", target, tokenizer, fillers)
    if padding is None:
        return None, f"no filler sequence makes up the {target - count} missing token(s)"
    return corrupt + padding, f"aligned by appending {padding.strip()!r}"


def occurrences_in(text: str, terms: Iterable[str], region: tuple[int, int] | None = None) -> list[tuple[int, int]]:
    """`find_occurrences` limited to text[region[0]:region[1]] (e.g. the document inside a prompt);
    spans index `text`."""
    if region is None:
        return find_occurrences(text, terms)
    start, end = region
    return [(a + start, b + start) for a, b in find_occurrences(text[start:end], terms)]


def phase1_corruption(text: str, terms: Sequence[str], neutral_terms: Sequence[str] = NEUTRAL_TERMS,
                      tokenizer=None, pad: bool = True, region: tuple[int, int] | None = None) -> Corruption:
    """Phase-1 corruption: replace every occurrence of the semantically loaded `terms` (anchor and
    gold-label words, or all-head peak terms; case-insensitive, whole words) with a neutral term
    keeping the document's token count in `tokenizer` (padding with neutral filler words if needed).
    `region` limits replacements to text[start:end] (the document inside a rendered prompt).
    """
    if tokenizer is None:
        raise ValueError("phase1_corruption needs the tokenizer of the model to be patched")
    return replace_aligned(text, occurrences_in(text, terms, region), lambda old: list(neutral_terms),
                           tokenizer, fillers=neutral_terms, pad=pad)


# ---------------------------------------------------------------- Phase-2 (near-miss) swaps

def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def distinguishing_swaps(gold_text: str, sibling_text: str) -> dict[str, str]:
    """Word runs that differ between two label texts: {gold words: sibling words}.

    Only substitutions count (a deletion or insertion has no counterpart to swap in), e.g.
    "Chronic systolic (congestive) heart failure" vs "Acute systolic (congestive) heart failure"
    gives {"Chronic": "Acute"}.
    """
    gold, sibling = _words(gold_text), _words(sibling_text)
    matcher = difflib.SequenceMatcher(a=[w.lower() for w in gold], b=[w.lower() for w in sibling],
                                      autojunk=False)
    return {" ".join(gold[i1:i2]): " ".join(sibling[j1:j2])
            for op, i1, i2, j1, j2 in matcher.get_opcodes() if op == "replace"}


def _icd():
    """simple-icd-10-cm, imported on first use: it parses all of ICD-10-CM at import (~5 s), and only
    Phase-2 swaps between ICD-10-CM codes need it."""
    import simple_icd_10_cm  # heavy at import: see the docstring

    return simple_icd_10_cm


def _icd_texts(code: str) -> tuple[str, list[str]]:
    icd = _icd()
    return icd.get_description(code), list(icd.get_inclusion_term(code))


def icd_sibling_swaps(gold_code: str, sibling_code: str) -> dict[str, str]:
    """Swaps steering from `gold_code` toward `sibling_code` (ICD-10-CM): the diff of their
    descriptions, then of each gold inclusion term with the sibling's most similar one."""
    gold_description, gold_inclusions = _icd_texts(gold_code)
    sibling_description, sibling_inclusions = _icd_texts(sibling_code)
    swaps = distinguishing_swaps(gold_description, sibling_description)
    for term in gold_inclusions:
        if not sibling_inclusions:
            break
        closest = max(sibling_inclusions,
                      key=lambda s: difflib.SequenceMatcher(a=term.lower(), b=s.lower()).ratio())
        for old, new in distinguishing_swaps(term, closest).items():
            swaps.setdefault(old, new)
    return swaps


def swap_corruption(text: str, swaps: dict[str, str], tokenizer, fillers: Sequence[str] = NEUTRAL_TERMS,
                    pad: bool = True, region: tuple[int, int] | None = None) -> Corruption:
    """Replace every occurrence of each key of `swaps` (case-insensitive, whole words) by its value,
    keeping the token count (padding with `fillers` when needed); `region` as in phase1_corruption."""
    by_key = {" ".join(old.lower().split()): new for old, new in swaps.items()}
    return replace_aligned(text, occurrences_in(text, swaps, region),
                           lambda old: [by_key[" ".join(old.lower().split())]],
                           tokenizer, fillers=fillers, pad=pad)


def phase2_corruption(text: str, gold_code: str, sibling_code: str, tokenizer,
                      swaps: dict[str, str] | None = None, fillers: Sequence[str] = NEUTRAL_TERMS,
                      pad: bool = True, region: tuple[int, int] | None = None) -> Corruption:
    """Phase-2 corruption (ICD-10-CM): steer the document toward the near-miss `sibling_code`.

    Occurrences of the words that distinguish the gold code's description / inclusion terms from the
    sibling's are swapped for the sibling's words ("Chronic" -> "Acute"), together with the explicit
    `swaps` ({"EF 35%": "EF 55%"}, which win over derived ones). Token count kept as in Phase 1.
    """
    return swap_corruption(text, {**icd_sibling_swaps(gold_code, sibling_code), **(swaps or {})}, tokenizer,
                           fillers=fillers, pad=pad, region=region)


def near_miss_swaps(gold: str, near_miss: str, title: dict[str, str]) -> dict[str, str]:
    """Swaps steering a document from `gold` toward `near_miss`: ICD-10-CM descriptions and
    inclusion terms when both are ICD-10-CM codes, otherwise the diff of their titles."""
    if _icd().is_valid_item(gold) and _icd().is_valid_item(near_miss):
        return icd_sibling_swaps(gold, near_miss)
    return distinguishing_swaps(title.get(gold, ""), title.get(near_miss, ""))
