"""Phase 1: the documents and the label space (dataset adapters and the generic `prepare_dataset` step).

An adapter is a function `(**params) -> PreparedDataset`. Register new ones in ADAPTERS (and in
`config/schema.yaml`'s adapter enum with their params), and the raw files it reads in
`sources.SOURCE_FILES`, so that Snakemake reruns `prepare_dataset` when one of them changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pandas as pd

from ..errors import InputError
from .base import SPLITS, PreparedDataset
from .settings import DatasetSettings

log = logging.getLogger(__name__)

# The ICD-10 adapters import simple-icd-10-cm, which parses all of ICD-10-CM at import (~5 s):
# each adapter module is imported only when a config names it.


def _icd10cm_controlled(**params) -> PreparedDataset:
    from .icd10cm_controlled import load_icd10cm_controlled  # simple-icd-10-cm: see above

    return load_icd10cm_controlled(**params)


def _mimic4_icd10(**params) -> PreparedDataset:
    from .mimic4_icd10 import load_mimic4_icd10  # simple-icd-10-cm: see above

    return load_mimic4_icd10(**params)


def _wikiseealso(**params) -> PreparedDataset:
    from .wikiseealso import load_wikiseealso  # imported like the others, on demand

    return load_wikiseealso(**params)


ADAPTERS: dict[str, Callable[..., PreparedDataset]] = {
    "icd10cm_controlled": _icd10cm_controlled,
    "mimic4_icd10": _mimic4_icd10,
    "wikiseealso": _wikiseealso,
}


def check_label_table(labels: pd.DataFrame, source: str) -> None:
    """The label table is a forest: every label_id once, no label its own parent or ancestor, and
    following parents from any label ends at a root (no cycle). Errors name the row."""
    ids = labels["label_id"].tolist()
    row_of: dict[str, int] = {}
    for row, label in enumerate(ids):
        if label in row_of:
            raise InputError(f"label_id {label!r} appears twice in the label table (rows {row_of[label]} and {row}).",
                             file=source, row=row, fix="keep one row per label id.")
        row_of[label] = row
    parent_of = dict(zip(ids, labels["parent"]))
    for row, (label, ancestors) in enumerate(zip(ids, labels["ancestors"])):
        if parent_of[label] == label or label in list(ancestors if ancestors is not None else []):
            raise InputError(f"label {label!r} is its own parent or ancestor.", file=source, row=row,
                             fix="a label's parent and ancestors are other labels (nearest first).")
    for row, label in enumerate(ids):
        path, node = {label}, parent_of[label]
        while isinstance(node, str) and node in parent_of:
            if node in path:
                raise InputError(f"the parents of label {label!r} form a cycle through {node!r}.", file=source,
                                 row=row, fix="the label table's parents must lead to a root.")
            path.add(node)
            node = parent_of[node]


def check_prepared(prepared: PreparedDataset, source: str) -> None:
    """Enforce the documents/labels contract; errors name the split and row."""
    check_label_table(prepared.labels, source)
    assignable = set(prepared.labels.loc[prepared.labels["assignable"], "label_id"])
    seen: dict[str, str] = {}
    for split in SPLITS:
        df = prepared.splits.get(split)
        if df is None:
            raise InputError(f"adapter returned no '{split}' split.", file=source)
        if len(df) == 0:  # the DAG would fail minutes later on an empty prompt file, blaming something else
            raise InputError(f"the {split} split has no document: every split needs at least one (train to "
                             "distill, val to select, test to evaluate).", file=source,
                             fix=f"check the adapter's files and params (n_docs, max_docs) for {split}.")
        for row, (doc_id, text, labels) in enumerate(zip(df["doc_id"], df["text"], df["labels"])):
            where = f"{split} row {row} (doc_id {doc_id})"
            if doc_id in seen:
                raise InputError(f"doc_id {doc_id!r} appears in both {seen[doc_id]} and {split}.",
                                 file=source, row=row, fix="make document ids unique.")
            seen[doc_id] = split
            if not isinstance(text, str) or not text.strip():
                raise InputError(f"{where}: empty text.", file=source, fix="drop or fill the document.")
            if labels is None or len(labels) == 0:
                raise InputError(f"{where}: no labels.", file=source, fix="drop documents without labels.")
            unknown = [lab for lab in labels if lab not in assignable]
            if unknown:
                raise InputError(f"{where}: labels {unknown[:5]} are not in the label space.",
                                 file=source, fix="add them to the label table or drop them.")


def subsample(df: pd.DataFrame, n: int | None, seed: int) -> pd.DataFrame:
    if n is None or n >= len(df):
        return df.reset_index(drop=True)
    return df.sample(n=n, random_state=seed).sort_index().reset_index(drop=True)


def prepare_dataset(settings: DatasetSettings, dataset: str) -> PreparedDataset:
    """Build `dataset` from its settings (its config entry and the seed): run the adapter, subsample,
    check the contract."""
    prepared = ADAPTERS[settings.adapter](**settings.arguments)
    for split in SPLITS:
        df = prepared.splits[split]
        prepared.stats[f"n_{split}_source"] = len(df)  # the adapter's output (the files), before max_docs
        df["labels"] = df["labels"].map(list)
        prepared.splits[split] = subsample(df, settings.max_docs.get(split), settings.seed)
    files = ", ".join(str(v) for k, v in settings.arguments.items() if k in ("root", "path", "files"))
    check_prepared(prepared, source=f"dataset {dataset} ({settings.adapter}{': ' + files if files else ''})")
    prepared.stats.update({f"n_{s}": len(prepared.splits[s]) for s in SPLITS})
    prepared.stats["n_labels"] = int(prepared.labels["assignable"].sum())
    log.info("dataset %s: %s", dataset, prepared.stats)
    return prepared
