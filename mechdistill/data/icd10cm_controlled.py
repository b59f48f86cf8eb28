"""`icd10cm_controlled`: the offline demo dataset. SYNTHETIC clinical vignettes.

These are the paper's "clean prompts" (Sec. 2): short discharge-summary-like snippets with a
strong, controlled semantic signal. Each document is built from 2-5 related real ICD-10-CM
leaf codes (drawn from one block of one chapter, so they share a broad area), using their
official descriptions and inclusion terms, and a specialty line naming the area. Gold labels
are the codes used; near-misses come from the real hierarchy (siblings and cousins).
Fully deterministic given the seed. Not real patients, not real notes.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict

import pandas as pd
import simple_icd_10_cm as icd

from . import icd10cm
from .base import SPLITS, PreparedDataset

DEFAULT_CHAPTERS = ("4", "6", "9", "10", "11")
SPECIALTY = {"4": "endocrinology", "6": "neurology", "9": "cardiology", "10": "pulmonology",
             "11": "gastroenterology", "14": "nephrology", "1": "infectious diseases",
             "2": "oncology", "3": "hematology", "5": "psychiatry", "7": "ophthalmology",
             "8": "otolaryngology", "12": "dermatology", "13": "rheumatology"}
_SKIP = re.compile(r"unspecified|other|encounter|sequela|\bNOS\b|elsewhere|\[|/|;", re.IGNORECASE)
_FEMALE = re.compile(r"\b(female|wom[ae]n|uter\w*|ovar\w*|vagin\w*|vulv\w*|pregnan\w*|breast)\b", re.I)
_MALE = re.compile(r"\b(male|men|prostat\w*|testi\w*|scrot\w*|penis|penile)\b", re.I)


def eligible_codes(chapters: tuple[str, ...] | list[str] = DEFAULT_CHAPTERS) -> dict[str, list[str]]:
    """Leaf codes with a clean, short description, grouped by block (only blocks with codes
    from at least two categories, so a document can mix related conditions)."""
    by_block: dict[str, list[str]] = defaultdict(list)
    for chapter in chapters:
        for code in icd10cm.leaves_under(chapter):
            desc = icd.get_description(code)
            if len(desc) <= 80 and not _SKIP.search(desc):
                by_block[icd10cm.block_of(code)].append(code)
    return {b: sorted(cs) for b, cs in sorted(by_block.items())
            if len({c[:3] for c in cs}) >= 2}


def _phrase(code: str, rng: random.Random) -> str:
    options = [icd.get_description(code)]
    options += [t for t in icd.get_inclusion_term(code) if len(t) <= 80 and not _SKIP.search(t)]
    text = rng.choice(options)
    return text if text[1:2].isupper() else text[:1].lower() + text[1:]


def vignette(codes: list[str], rng: random.Random) -> str:
    """A discharge-summary snippet mentioning each code once; the first code is the main one."""
    main, rest = codes[0], codes[1:]
    chapter = icd10cm.chapter_of(main)
    area = icd10cm.title(icd10cm.block_of(main)).lower()
    descriptions = " ".join(icd.get_description(c) for c in codes)
    age, sex = rng.randint(35, 89), rng.choice(["man", "woman"])
    if _FEMALE.search(descriptions):
        sex = "woman"
    elif _MALE.search(descriptions):
        sex = "man"
    lines = [
        "DISCHARGE SUMMARY",
        f"Patient: {age}-year-old {sex}, admitted to {SPECIALTY.get(chapter, 'internal medicine')}.",
        f"Reason for admission: {_phrase(main, rng)}.",
    ]
    if rest:
        lines.append(f"History: known {_phrase(rest[0], rng)}.")
    course = f"Hospital course: work-up focused on {area}"
    if len(rest) > 1:
        course += "; also treated for " + ", ".join(_phrase(c, rng) for c in rest[1:])
    lines.append(course + ".")
    lines.append("Discharged in stable condition with specialty follow-up.")
    return "\n".join(lines)


def load_icd10cm_controlled(n_docs: dict[str, int] | None = None, codes_per_doc: tuple[int, int] = (2, 4),
                            seed: int = 0, chapters: list[str] | None = None) -> PreparedDataset:
    """Build the demo set: `n_docs[split]` vignettes, each from `codes_per_doc` (min, max) codes."""
    n_docs = {"train": 12, "val": 4, "test": 8, **(n_docs or {})}
    lo, hi = codes_per_doc
    rng = random.Random(seed)
    blocks = eligible_codes(tuple(chapters or DEFAULT_CHAPTERS))
    block_names = sorted(blocks)
    splits, i = {}, 0
    for split in SPLITS:
        rows = []
        for _ in range(n_docs.get(split, 0)):
            block = rng.choice(block_names)
            by_cat: dict[str, list[str]] = defaultdict(list)
            for c in blocks[block]:
                by_cat[c[:3]].append(c)
            cats = rng.sample(sorted(by_cat), min(len(by_cat), rng.randint(lo, hi)))
            codes = [rng.choice(by_cat[cat]) for cat in cats]
            rows.append((f"ctl-{i:05d}", vignette(codes, rng), codes))
            i += 1
        splits[split] = pd.DataFrame(rows, columns=["doc_id", "text", "labels"])
    return PreparedDataset(splits=splits, labels=icd10cm.label_table(),
                           stats={"eligible_blocks": len(blocks),
                                  "eligible_codes": sum(len(v) for v in blocks.values())})
