"""The dataset-adapter contract shared by every loader."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from ..paths import SPLITS  # noqa: F401 (re-exported: the split names of every adapter)


@dataclass
class PreparedDataset:
    """What an adapter returns.

    splits: split name ("train", "val", "test") -> DataFrame with columns
        doc_id: str, text: str (non-empty), labels: list[str] (label ids, each in `labels`).
    labels: the label space, one row per label id:
        label_id: str, title: str, parent: str | None, ancestors: list[str] (nearest first),
        assignable: bool (False for hierarchy nodes that are not labels themselves).
    excluded_pairs: optional (doc_id, label_id) pairs removed from evaluation
        (LF-WikiSeeAlso `filter_labels_test.txt`); columns doc_id, label_id.
    stats: free-form numbers for the rule log (counts of dropped rows, codes, ...).
    """

    splits: dict[str, pd.DataFrame]
    labels: pd.DataFrame
    excluded_pairs: pd.DataFrame | None = None
    stats: dict[str, object] = field(default_factory=dict)
