"""The label space of a dataset: titles and (optional) hierarchy, with near-miss lookups."""

from __future__ import annotations

from collections import defaultdict
from functools import cached_property

import pandas as pd


class LabelSpace:
    """Wraps `labels.parquet` (label_id, title, parent, ancestors, assignable)."""

    def __init__(self, labels: pd.DataFrame) -> None:
        self.df = labels.reset_index(drop=True)
        self.title: dict[str, str] = dict(zip(self.df["label_id"], self.df["title"]))
        self.ancestors: dict[str, list[str]] = {
            lab: list(anc) for lab, anc in zip(self.df["label_id"], self.df["ancestors"])
        }
        self.assignable: list[str] = self.df.loc[self.df["assignable"], "label_id"].tolist()
        self.assignable_set = set(self.assignable)

    def __contains__(self, label_id: str) -> bool:
        return label_id in self.assignable_set

    @property
    def has_hierarchy(self) -> bool:
        return any(self.ancestors[lab] for lab in self.assignable[:1000])

    @cached_property
    def descendants(self) -> dict[str, list[str]]:
        """hierarchy node -> assignable labels below it, in label-table order."""
        out: dict[str, list[str]] = defaultdict(list)
        for lab in self.assignable:
            for anc in self.ancestors[lab]:
                out[anc].append(lab)
        return out

    def root(self, label_id: str) -> str:
        anc = self.ancestors.get(label_id) or [label_id]
        return anc[-1]

    def hierarchy_near_misses(self, gold: list[str], n: int, exclude: set[str] | None = None) -> list[str]:
        """Up to `n` non-gold labels closest to the gold labels in the hierarchy.

        For each gold label: its siblings (same parent) first, then cousins under the
        grandparent, and so on up to (not including) the root; gold labels take turns, so each
        contributes. Deterministic.
        """
        exclude = set(gold) | (exclude or set())
        rings = []
        for lab in gold:
            ring = dict.fromkeys(
                c for anc in self.ancestors.get(lab, [])[:-1] for c in self.descendants.get(anc, [])
            )
            rings.append([c for c in ring if c not in exclude])
        out: list[str] = []
        for depth in range(max((len(r) for r in rings), default=0)):
            for ring in rings:
                if depth < len(ring) and ring[depth] not in out:
                    out.append(ring[depth])
                if len(out) == n:
                    return out
        return out
