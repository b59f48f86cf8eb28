"""LF-WikiSeeAlso-320K adapter, from the Extreme Classification Repository's raw-text files.

Files under `root` (each `.json.gz`, or the same name without `.gz`): `trn.json.gz`,
`tst.json.gz`, `lbl.json.gz`, and optionally `filter_labels_test.txt`.

Verified from code that reads these files (the repository's README page itself was not
available here):
- One JSON object per line. trn/tst rows carry `uid`, `title`, `content` and `target_ind`, a list
  of 0-based row indices into lbl.json.gz; lbl rows carry `uid`, `title`, `content`, and the label
  count is the number of lbl rows (Extreme-classification tools `extract_raw_text` /
  `count_num_labels`, which join the fields "title" and "content" for non-"Titles" datasets;
  several other readers use `json.loads(line)["target_ind"]` the same way).
- `filter_labels_test.txt`: whitespace-separated integer pairs "test_row label_row", loaded with
  `np.loadtxt` and used as (row, column) of the test label matrix to drop from evaluation
  (DEXA/NGAME/ANCE-XML style evaluators); it may be empty.
- `target_rel` is present in these files (per-label relevance) and is ignored here.
Not verified: whether `uid` is a JSON string or number (both are accepted and turned into str),
and whether titles use spaces or underscores (kept verbatim).

Output: doc text = title + "\\n\\n" + content (either alone when the other is empty); doc_id =
the row's uid; label_id = the lbl uid; train/val are carved from trn by a seeded permutation,
test = tst. Documents whose target_ind is empty are dropped (the contract needs a label; counts
in `stats`), as are their excluded pairs. Every lbl row is a label (flat: no parent, no ancestors).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError, InputError
from ..io import named_read_errors
from .base import PreparedDataset
from .sources import WIKI_FILTER, WIKI_SUFFIXES, first_existing

FIX_DOWNLOAD = ("download LF-WikiSeeAlso-320K raw text from the Extreme Classification Repository "
                "(http://manikvarma.org/downloads/XC/XMLRepository.html) and unpack trn.json.gz, "
                "tst.json.gz, lbl.json.gz and filter_labels_test.txt into the dataset root.")
FIX_FILE = "re-extract the file from the original LF-WikiSeeAlso-320K download."


def load_wikiseealso(root: str, *, val_fraction: float = 0.05, seed: int = 0) -> PreparedDataset:
    """Prepare LF-WikiSeeAlso-320K (see the module docstring).

    val_fraction: share of trn rows moved to "val", chosen by a permutation seeded with `seed`.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}.")
    stats: dict[str, object] = {}
    lbl_path = _find(root, "lbl")
    labels = _read_labels(lbl_path)
    label_ids = labels["label_id"].tolist()

    seen: dict[str, tuple[Path, int]] = {}
    trn_path, tst_path = _find(root, "trn"), _find(root, "tst")
    trn = _read_docs(trn_path, label_ids, seen, stats)
    tst = _read_docs(tst_path, label_ids, seen, stats)
    for path, df in ((trn_path, trn), (tst_path, tst)):  # before filter_labels_test.txt is read against it
        if df.empty:
            raise InputError("the file holds no document.", file=str(path), fix=FIX_FILE)
    tst_row_ids = tst["doc_id"].tolist()  # filter_labels_test.txt indexes all tst rows
    for name, df in (("trn", trn), ("tst", tst)):  # the contract needs >= 1 label per document
        stats[f"docs_without_labels_dropped_{name}"] = int((df["labels"].apply(len) == 0).sum())
    trn = trn[trn["labels"].apply(len) > 0].reset_index(drop=True)
    tst = tst[tst["labels"].apply(len) > 0].reset_index(drop=True)

    n_val = int(round(val_fraction * len(trn)))
    val_rows = np.zeros(len(trn), dtype=bool)
    val_rows[np.random.default_rng(seed).permutation(len(trn))[:n_val]] = True
    splits = {"train": trn[~val_rows].reset_index(drop=True), "val": trn[val_rows].reset_index(drop=True),
              "test": tst}
    for name, df in splits.items():
        stats[f"n_{name}"] = len(df)
    stats["n_labels"] = len(labels)

    excluded = None
    filter_path = Path(root) / WIKI_FILTER
    if filter_path.is_file():
        excluded = _read_filter(filter_path, tst_row_ids, label_ids, tst_path, lbl_path)
        kept = excluded["doc_id"].isin(tst["doc_id"])
        stats["excluded_pairs_of_dropped_docs"] = int((~kept).sum())
        excluded = excluded[kept].reset_index(drop=True)
        stats["n_excluded_pairs"] = len(excluded)
    else:
        stats["n_excluded_pairs"] = None
    return PreparedDataset(splits=splits, labels=labels, excluded_pairs=excluded, stats=stats)


def _find(root: str, stem: str) -> Path:
    path = first_existing(root, stem, WIKI_SUFFIXES)
    if path is not None:
        return path
    raise InputError(f"missing file (looked for {stem}.json.gz and {stem}.json).",
                     file=str(Path(root) / f"{stem}.json.gz"), fix=FIX_DOWNLOAD)


def _lines(path: Path, keys: tuple[str, ...]) -> Iterator[tuple[int, dict]]:
    """Yield (1-based line number, object) for each line; blank lines only at the end."""
    opener = gzip.open if path.name.endswith(".gz") else open
    blank_at, n = None, 0
    with named_read_errors(path, lambda: n), opener(path, "rb") as fh:  # bytes: a bad byte is named by its line
        for n, raw in enumerate(fh, start=1):  # noqa: B007 (named_read_errors reads n)
            line = raw.decode("utf-8")
            if not line.strip():
                blank_at = blank_at or n
                continue
            if blank_at is not None:
                raise InputError("blank line inside the file; row indices would shift.", file=str(path),
                                 row=blank_at, fix=FIX_FILE)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"line is not valid JSON ({err.msg} at column {err.colno}).",
                                 file=str(path), row=n, fix=FIX_FILE) from None
            if not isinstance(obj, dict):
                raise InputError("line is not a JSON object.", file=str(path), row=n, fix=FIX_FILE)
            missing = [k for k in keys if k not in obj]
            if missing:
                raise InputError(f"missing key(s) {missing}; keys found: {sorted(obj)}.", file=str(path),
                                 row=n, fix=FIX_FILE)
            yield n, obj


def _text(value: object) -> str:
    return "" if value is None else str(value).strip()


def _read_labels(path: Path) -> pd.DataFrame:
    ids, titles = [], []
    first_line: dict[str, int] = {}
    for n, obj in _lines(path, ("uid", "title")):
        uid, title = _text(obj["uid"]), _text(obj["title"])
        if not uid or not title:
            raise InputError(f"label has an empty {'uid' if not uid else 'title'}.", file=str(path), row=n,
                             fix=FIX_FILE)
        if uid in first_line:
            raise InputError(f"label uid {uid} repeats line {first_line[uid]}.", file=str(path), row=n,
                             fix=FIX_FILE)
        first_line[uid] = n
        ids.append(uid)
        titles.append(title)
    return pd.DataFrame({
        "label_id": pd.Series(ids, dtype=object), "title": pd.Series(titles, dtype=object),
        "parent": pd.Series([None] * len(ids), dtype=object),
        "ancestors": pd.Series([[] for _ in ids], dtype=object),
        "assignable": pd.Series([True] * len(ids), dtype=bool)})


def _read_docs(path: Path, label_ids: list[str], seen: dict[str, tuple[Path, int]],
               stats: dict) -> pd.DataFrame:
    """Rows of trn/tst; `seen` (uid -> (file, line)) catches a uid repeated across both files."""
    n_labels = len(label_ids)
    doc_ids, texts, labels = [], [], []
    repeats = 0
    for n, obj in _lines(path, ("uid", "title", "content", "target_ind")):
        uid, title, content = _text(obj["uid"]), _text(obj["title"]), _text(obj["content"])
        if not uid:
            raise InputError("empty uid.", file=str(path), row=n, fix=FIX_FILE)
        if uid in seen:
            where = seen[uid]
            raise InputError(f"uid {uid} repeats {where[0].name} line {where[1]}.", file=str(path), row=n,
                             fix=FIX_FILE)
        seen[uid] = (path, n)
        if not title and not content:
            raise InputError(f"document {uid} has an empty title and empty content.", file=str(path), row=n,
                             fix=FIX_FILE)
        ind = obj["target_ind"]
        if not isinstance(ind, list):
            raise InputError(f"target_ind must be a list of label row indices, got {ind!r}.",
                             file=str(path), row=n, fix=FIX_FILE)
        rows: list[int] = []
        for v in ind:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < n_labels:
                raise InputError(f"target_ind value {v!r} is out of range: the label file has {n_labels} "
                                 f"rows (valid 0..{n_labels - 1}).", file=str(path), row=n,
                                 fix="use trn/tst/lbl files from the same download.")
            if v not in rows:
                rows.append(v)
        repeats += len(ind) - len(rows)
        doc_ids.append(uid)
        texts.append(f"{title}\n\n{content}" if title and content else title or content)
        labels.append([label_ids[v] for v in rows])
    stats[f"repeated_target_ind_dropped_{path.name.split('.')[0]}"] = repeats
    return pd.DataFrame({"doc_id": pd.Series(doc_ids, dtype=object), "text": pd.Series(texts, dtype=object),
                         "labels": pd.Series(labels, dtype=object)})


def _read_filter(path: Path, test_ids: list[str], label_ids: list[str], tst_path: Path,
                 lbl_path: Path) -> pd.DataFrame:
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != 2:
                    raise ValueError
                i, j = int(fields[0]), int(fields[1])
            except ValueError:
                raise InputError(f"expected two integers 'test_row label_row', got {line.strip()!r}.",
                                 file=str(path), row=n, fix=FIX_FILE) from None
            if not 0 <= i < len(test_ids) or not 0 <= j < len(label_ids):
                raise InputError(f"pair ({i}, {j}) is out of range: {tst_path.name} has {len(test_ids)} rows "
                                 f"and {lbl_path.name} has {len(label_ids)} rows.", file=str(path), row=n,
                                 fix="use the filter file from the same download as tst/lbl.")
            pairs.append((test_ids[i], label_ids[j]))
    df = pd.DataFrame(pairs, columns=["doc_id", "label_id"], dtype=object)
    return df.drop_duplicates().reset_index(drop=True)
