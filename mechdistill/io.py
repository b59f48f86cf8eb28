"""Parquet I/O with explicit Arrow schemas and atomic writes, and the reader of a split's artifacts.

Every artifact is written to a temporary file in the destination directory and then renamed,
so a killed job never leaves a half-written file that Snakemake would take as done.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import InputError
from .labels import LabelSpace
from .paths import SPLIT_FILES

STR_LIST = pa.list_(pa.string())
_UMASK = os.umask(0)
os.umask(_UMASK)

# Artifact contracts (docs/pipeline.md). Extra columns are allowed; these must be present.
SCHEMAS: dict[str, pa.Schema] = {
    "documents": pa.schema([("doc_id", pa.string()), ("text", pa.string()), ("labels", STR_LIST)]),
    "labels": pa.schema([
        ("label_id", pa.string()), ("title", pa.string()), ("parent", pa.string()),
        ("ancestors", STR_LIST), ("assignable", pa.bool_()),
    ]),
    "prompts": pa.schema([
        ("doc_id", pa.string()), ("candidates", STR_LIST), ("prompt", pa.string()),
        ("messages", pa.string()), ("gold_in_candidates", pa.float64()),
    ]),
    "cot": pa.schema([
        ("doc_id", pa.string()), ("cot", pa.string()), ("answer", pa.string()),
        ("pred_labels", STR_LIST), ("unmapped", STR_LIST), ("n_tokens", pa.int64()),
        ("finish_reason", pa.string()), ("raw", pa.string()), ("has_answer_block", pa.bool_()),
        ("forced_answer", pa.bool_()),
    ]),
}


# Columns of a contract that may be absent (artifacts written before them) but, when present, have
# this type: a list column whose rows are all empty would otherwise be written as list<null>.
OPTIONAL: dict[str, dict[str, pa.DataType]] = {
    "cot": {"n_answer_blocks": pa.int64(), "outside_candidates": STR_LIST, "engine": pa.string(),
            "prompt_tokens": pa.int64(), "skipped": pa.string()},
}


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    tmp.chmod(0o666 & ~_UMASK)  # mkstemp makes 0600 files; artifacts are meant to be shared
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike) -> object:
    """A JSON artifact; a missing file names the stage to run."""
    if not Path(path).exists():
        raise InputError("file does not exist.", file=str(path),
                         fix="run the stage that produces it (e.g. `snakemake <path>`).")
    return json.loads(Path(path).read_text())


@contextlib.contextmanager
def named_read_errors(path: str | os.PathLike, line: Callable[[], int | None] | None = None) -> Iterator[None]:
    """Re-raise what decompressing and decoding `path` can fail with (a plain file named .gz, a gzip
    stream cut short, bytes that are not UTF-8: the parsers' errors name neither the file nor the line)
    as InputError naming the file and, when `line()` knows it, the line being read."""
    try:
        yield
    except gzip.BadGzipFile as exc:
        raise InputError("not a gzip file, though its name ends in .gz.", file=str(path),
                         fix="compress it with gzip, or drop .gz from its name.") from exc
    except (EOFError, zlib.error) as exc:
        raise InputError(f"truncated gzip file ({exc}).", file=str(path),
                         fix="the file is cut short or damaged (an interrupted copy?): copy or write it again.") from exc
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text (byte {exc.object[exc.start]:#04x}).", file=str(path),
                         row=line() if line is not None else None, fix=NOT_UTF8_FIX) from exc


NOT_UTF8_FIX = "save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
UNDECODED = re.compile("[\udc80-\udcff]")  # a byte that is not UTF-8, as errors="surrogateescape" keeps it


def read_csv(path: str | os.PathLike, id_columns: Sequence[str] = (), **kwargs) -> pd.DataFrame:
    """pandas.read_csv(path, **kwargs) whose errors name the file (`named_read_errors`). A byte that is not UTF-8
    is named with its row (1 = the first record after the header, as a quoted field may span lines), column
    and the row's value of the first of `id_columns` the file has (e.g. note_id): pandas' own error names none."""
    try:
        with named_read_errors(path):
            return pd.read_csv(path, **kwargs)
    except InputError as err:
        cell = _undecodable_csv_cell(path, id_columns) if isinstance(err.__cause__, UnicodeDecodeError) else None
        if cell is None:
            raise
        raise cell from err.__cause__


def _undecodable_csv_cell(path: str | os.PathLike, id_columns: Sequence[str]) -> InputError | None:
    """The first cell of the CSV `path` that holds a byte that is not UTF-8, as the InputError that names it
    (its header, or its row, column, id and the bytes around it); None if there is none. Read again in chunks
    with the bad bytes kept (a file this large is read twice only on this error)."""
    with named_read_errors(path):
        for chunk in pd.read_csv(path, dtype=object, keep_default_na=False, encoding_errors="surrogateescape",
                                 chunksize=10_000):
            columns = [str(c) for c in chunk.columns]
            bad = [c for c in columns if UNDECODED.search(c)]
            if bad:
                return InputError(f"not UTF-8 text in the header ({_bytes_around(bad[0], 0)!r}).", file=str(path),
                                  fix=NOT_UTF8_FIX)
            key = next((c for c in id_columns if c in columns), None)
            for row, values in zip(chunk.index + 1, chunk.itertuples(index=False, name=None)):
                for column, value in zip(columns, values):
                    hit = UNDECODED.search(value) if isinstance(value, str) else None
                    if hit:
                        ident = f" ({key} {values[columns.index(key)]})" if key else ""
                        return InputError(f"not UTF-8 text (byte {ord(hit.group()) - 0xDC00:#04x} in column "
                                          f"{column!r}: {_bytes_around(value, hit.start())!r}).", file=str(path),
                                          row=f"{row}{ident}", fix=NOT_UTF8_FIX)
    return None


def _bytes_around(text: str, at: int, width: int = 20) -> bytes:
    """The bytes of `text` (decoded with errors="surrogateescape") within `width` characters of position `at`."""
    return text[max(0, at - width):at + width].encode("utf-8", "surrogateescape")


def read_jsonl(path: str | os.PathLike) -> pd.DataFrame:
    """JSON lines, gzip-compressed when the name ends in `.gz`: one object per line, blank lines
    skipped; the index is each row's line number (from 1), which errors call its row. Bytes that are not UTF-8, a line that is
    not a JSON object, and a broken gzip stream raise InputError naming the file and the line."""
    path = Path(path)
    records, lines = [], []
    n = 0
    with named_read_errors(path, lambda: n), (gzip.open if path.name.endswith(".gz") else open)(path, "rb") as fh:
        for n, raw in enumerate(fh, start=1):  # noqa: B007 (named_read_errors reads n)
            text = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                raise InputError(f"not a JSON object ({exc.msg}, column {exc.colno}).", file=str(path), row=n,
                                 fix="write one JSON object per line.") from exc
            if not isinstance(obj, dict):
                raise InputError(f"not a JSON object (a {type(obj).__name__}).", file=str(path), row=n,
                                 fix="write one JSON object per line.")
            records.append(obj)
            lines.append(n)
    return pd.DataFrame.from_records(records, index=pd.Index(lines, name="line"))


def to_table(df: pd.DataFrame, kind: str | None = None) -> pa.Table:
    """Convert to Arrow, casting the contract columns of `kind` to their declared types."""
    if kind is None:
        return pa.Table.from_pandas(df, preserve_index=False)
    schema = SCHEMAS[kind]
    missing = [f.name for f in schema if f.name not in df.columns]
    if missing:
        raise ValueError(f"{kind} table lacks contract columns {missing}")
    extra = [c for c in df.columns if c not in schema.names]
    typed = OPTIONAL.get(kind, {})
    fields = list(schema) + [pa.field(c, typed[c]) if c in typed else
                             pa.Schema.from_pandas(df[[c]], preserve_index=False).field(c) for c in extra]
    return pa.Table.from_pandas(df[schema.names + extra], schema=pa.schema(fields), preserve_index=False)


def canonical_safetensors_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors file's JSON header in a fixed order: metadata keys sorted, then the tensors
    by offset. The safetensors library writes its metadata map in a random order, so two saves of the
    same tensors differ in bytes; after this they are equal. Only the header's key order changes (the
    same bytes in another order: the length is kept); the tensor data is not touched."""
    with open(path, "r+b") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
        ordered = {"__metadata__": dict(sorted(header.pop("__metadata__").items()))} if "__metadata__" in header else {}
        ordered.update(sorted(header.items(), key=lambda item: (item[1]["data_offsets"], item[0])))
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > length:  # not a reordering of what the library wrote: leave the file as it is
            return
        f.seek(8)
        f.write(text + b" " * (length - len(text)))


def file_digest(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha1 of a file's bytes (streamed): what a resumable state keys its inputs by."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_parquet(df: pd.DataFrame, path: str | os.PathLike, kind: str | None = None) -> None:
    """Write `df` atomically; if `kind` names a contract, enforce its columns and types."""
    table = to_table(df, kind)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | os.PathLike, kind: str | None = None,
                 columns: Sequence[str] | None = None) -> pd.DataFrame:
    """Read an artifact; with `kind`, check its contract columns are present."""
    path = Path(path)
    if not path.exists():
        raise InputError("file does not exist.", file=str(path),
                         fix="run the stage that produces it (e.g. `snakemake <path>`).")
    df = pd.read_parquet(path, columns=list(columns) if columns else None)
    if kind is not None:
        need = [n for n in SCHEMAS[kind].names if columns is None or n in columns]
        missing = [c for c in need if c not in df.columns]
        if missing:
            raise InputError(f"missing column(s) {missing} of the '{kind}' contract "
                             f"(has {list(df.columns)}).", file=str(path),
                             fix="regenerate it with this version of mechdistill.")
    return df


@dataclass(frozen=True)
class SplitArtifacts:
    """One split's documents, prompts and teacher CoT (indexed by doc_id), its anchors (in file
    order, cut to max_docs) and the label space; `source` names the CoT file for messages."""

    docs: pd.DataFrame
    prompts: pd.DataFrame
    cot: pd.DataFrame
    anchors: pd.DataFrame
    space: LabelSpace
    source: str = ""


def read_split(files: Mapping[str, str | os.PathLike], max_docs: int | None = None) -> SplitArtifacts:
    """Read one split's documents, prompts, teacher CoT, anchors and label space.

    files: their paths under the keys docs, prompts, cot, anchors, labels (`paths.split_files`).
    """
    missing = set(SPLIT_FILES) - set(files)
    if missing:
        raise ValueError(f"read_split: no path for {sorted(missing)}")
    anchors = read_parquet(files["anchors"])
    return SplitArtifacts(docs=read_parquet(files["docs"], "documents").set_index("doc_id"),
                          prompts=read_parquet(files["prompts"], "prompts").set_index("doc_id"),
                          cot=read_parquet(files["cot"], "cot").set_index("doc_id"),
                          anchors=anchors.head(max_docs) if max_docs else anchors,
                          space=LabelSpace(read_parquet(files["labels"], "labels")), source=str(files["cot"]))


def temp_dir_for(target: Path) -> Path:
    """The temp dir next to `target` that is published onto it (the same name on every rank)."""
    return target.with_name(f".{target.name}.tmp")


def make_empty_dir(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def publish_dir(tmp: Path, target: Path) -> None:
    """Move the finished dir `tmp` onto `target`.

    rename(2) cannot replace a non-empty directory, so the old `target` is first renamed to
    `target.old`; `recover_dir` puts it back if a kill lands between the two renames.
    """
    old = target.with_name(f"{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """Undo a half-done `publish_dir`: restore `target.old` when `target` is missing."""
    old = target.with_name(f"{target.name}.old")
    if not target.exists() and old.exists():
        os.replace(old, target)
