"""The ICD-10-CM ontology from `simple-icd-10-cm` (April 2026 release) as a label table."""

from __future__ import annotations

import functools
import re

import pandas as pd
import simple_icd_10_cm as icd

_RANGE = re.compile(r"\s*\([A-Z0-9.]+-[A-Z0-9.]+\)\s*$")


def title(code: str) -> str:
    """Description of a code, block or chapter, without a trailing '(I30-I5A)' range."""
    return _RANGE.sub("", icd.get_description(code))


def chapter_of(code: str) -> str:
    return icd.get_ancestors(code)[-1]


def block_of(code: str) -> str:
    return icd.get_ancestors(code)[-2]


@functools.lru_cache(maxsize=1)
def label_table() -> pd.DataFrame:
    """Every ICD-10-CM node: leaves are assignable labels, chapters/blocks/categories are not.

    Columns: label_id, title, parent, ancestors (nearest first), assignable.
    """
    codes = icd.get_all_codes(True)
    rows = [
        (c, title(c), icd.get_parent(c) or None, icd.get_ancestors(c), icd.is_leaf(c))
        for c in codes
    ]
    return pd.DataFrame(rows, columns=["label_id", "title", "parent", "ancestors", "assignable"])


def leaves_under(node: str) -> list[str]:
    return [c for c in icd.get_descendants(node) if icd.is_leaf(c)]
