"""Resumable work: finished pieces of a long job, kept until its output is written.

A long stage (teacher CoT generation, activation patching) writes each finished piece (a shard
of documents, one document) atomically into a hidden folder next to its output:

    {output folder}/.{output stem}.{kind}-{key}/{piece}

`key` is a hash of everything that determines the pieces (model, settings, inputs): a rerun
after a kill reuses the pieces of the same key, and a change of any of them starts a fresh
folder (older folders of the same output are removed). `clear()` removes the folder once the
output is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import pandas as pd

from .io import read_parquet, write_json, write_parquet

log = logging.getLogger(__name__)


def content_key(*parts: object) -> str:
    """A short, stable hash of JSON-serialisable parts (dict keys sorted)."""
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Shards:
    """The finished pieces of the job that writes `output`, under a folder keyed by `key`."""

    def __init__(self, output: str | Path, kind: str, key: str) -> None:
        output = Path(output)
        self.dir = output.parent / f".{output.stem}.{kind}-{key}"
        for stale in output.parent.glob(f".{output.stem}.{kind}-*"):
            if stale != self.dir:
                log.info("removing the pieces of an earlier configuration: %s", stale)
                shutil.rmtree(stale, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.dir / name

    def done(self, name: str) -> bool:
        return self.path(name).exists()

    def write_parquet(self, name: str, df: pd.DataFrame, kind: str | None = None) -> None:
        write_parquet(df, self.path(name), kind)

    def read_parquet(self, name: str) -> pd.DataFrame:
        return read_parquet(self.path(name))

    def write_json(self, name: str, obj: object) -> None:
        write_json(self.path(name), obj)

    def read_json(self, name: str) -> object:
        return json.loads(self.path(name).read_text())

    def clear(self) -> None:
        """Remove the folder (call once the output is written)."""
        shutil.rmtree(self.dir, ignore_errors=True)


def name_of(item: str) -> str:
    """A file-name-safe name for any id (a hash: doc ids may hold '/' or spaces)."""
    return hashlib.sha1(str(item).encode()).hexdigest()[:16]
