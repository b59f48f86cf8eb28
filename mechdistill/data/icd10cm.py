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


def lineage(code: str) -> tuple[str | None, list[str]]:
    """(parent, ancestors nearest first) of a node, each node once and never the node itself.

    39 ICD-10-CM blocks hold a single category of the same name (B10, B20, ..., Z68): simple-icd-10-cm
    lists such a name twice in `get_all_codes`, gives it itself as parent and repeats it among the
    ancestors of its codes (B10.0: ['B10', 'B10', '1']). Here the name is the category, whose parent is
    the block's parent (the chapter)."""
    ancestors = [a for a in dict.fromkeys(icd.get_ancestors(code)) if a != code]
    return (ancestors[0] if ancestors else None), ancestors


@functools.lru_cache(maxsize=1)
def label_table() -> pd.DataFrame:
    """Every ICD-10-CM node once: leaves are assignable labels, chapters/blocks/categories are not.

    Columns: label_id, title, parent, ancestors (nearest first), assignable.
    """
    codes = list(dict.fromkeys(icd.get_all_codes(True)))  # a block named like its only category: once
    rows = [(c, title(c), *lineage(c), icd.is_leaf(c)) for c in codes]
    return pd.DataFrame(rows, columns=["label_id", "title", "parent", "ancestors", "assignable"])


def leaves_under(node: str) -> list[str]:
    return [c for c in icd.get_descendants(node) if icd.is_leaf(c)]
