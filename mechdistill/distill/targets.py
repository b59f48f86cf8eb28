"""Teacher targets: the teacher's side of every loss, computed once per document and stored.

`target_tensors` runs the teacher over every example (`objective.teacher_targets`) and returns
the flat tensors ("{doc_id}/{name}") and one summary row per document; `save_targets` writes them
(safetensors for the tensors, Parquet for the rows) and `load_targets` reads the tensors back
(`TargetsFile`: one document at a time, from the memory-mapped file, as training reads them),
so training never needs the teacher in memory. `OnlineTargets` computes the same tensors on
demand with the teacher in memory (`distill.targets: online`): both give the same loss.

`interaction_scales` measures the teacher's interaction signals (Phase 1: kappa Align, Phase 2:
QK OV) over a split's targets; the training split's values are stored with its tensors and divide
the interaction differences in the losses, so those terms are O(1) whatever the sequence length
(raw kurtosis grows with it) and the model's scale.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..characterize.scores import DEFAULT_COARSE, CoarseVariant
from ..inflight import in_flight
from ..io import atomic_path, canonical_safetensors_header, write_parquet
from ..shards import Shards
from .objective import teacher_targets
from .pools import HeadPool, pools_json
from .signals import Example, SplitExamples

log = logging.getLogger(__name__)

TABLE_COLUMNS = ["doc_id", "n_tokens", "n_cot", "n_early", "n_refine", "has_phase1", "has_phase2"]
# The factors of each phase's interaction term in the targets, and the valid-position mask.
INTERACTION_SIGNALS = {"phase1": ("p1.sharpness", "p1.align", "p1.mask"),
                       "phase2": ("p2.loopback", "p2.helpfulness", "p2.mask")}


def document_targets(model: nn.Module, ex: Example, pools: dict[str, HeadPool], tau: float, top_k: int,
                     coarse: CoarseVariant = DEFAULT_COARSE) -> tuple[dict[str, Tensor], dict]:
    """One document's flat tensors ({"{doc_id}/{name}": tensor}, `objective.teacher_targets`) and its
    table row (TABLE_COLUMNS)."""
    t = teacher_targets(model, ex, pools, tau, top_k, coarse=coarse)
    row = dict(doc_id=ex.doc_id, n_tokens=len(ex.input_ids), n_cot=len(t["topk_values"]),
               n_early=len(t.get("p1.mask", [])), n_refine=len(t.get("p2.mask", [])),
               has_phase1="p1.mask" in t, has_phase2="p2.mask" in t)
    return {f"{ex.doc_id}/{k}": v.contiguous() for k, v in t.items()}, row


def target_tensors(model: nn.Module, examples: list[Example], pools: dict[str, HeadPool], tau: float,
                   top_k: int, desc: str = "teacher targets", coarse: CoarseVariant = DEFAULT_COARSE
                   ) -> tuple[dict[str, Tensor], pd.DataFrame]:
    """({"{doc_id}/{name}": tensor}, one row per document: doc_id, n_tokens, n_cot, n_early,
    n_refine, has_phase1, has_phase2) of every example, in memory. coarse: the Phase-1 sharpness
    (config heads.coarse). `compute_target_shards` + `merge_target_shards` write the same files a
    shard at a time."""
    tensors, rows = {}, []
    for ex in tqdm(examples, desc=desc, unit="doc"):
        doc_tensors, row = document_targets(model, ex, pools, tau, top_k, coarse)
        tensors.update(doc_tensors)
        rows.append(row)
    return tensors, pd.DataFrame(rows, columns=TABLE_COLUMNS)


InteractionSums = dict[str, tuple[float, int]]  # {phase: (sum of squared interaction signals, valid positions)}


def interaction_sums(target: Mapping[str, Tensor]) -> InteractionSums:
    """One document's part of `interaction_scales`: {phase: (sum_q valid (a_q b_q)^2, number of valid q)},
    for the phases it has."""
    sums = {}
    for phase, (a, b, mask) in INTERACTION_SIGNALS.items():
        if mask in target:
            keep = target[mask].to(torch.bool)
            sums[phase] = (float((target[a][keep].double() * target[b][keep].double()).pow(2).sum()), int(keep.sum()))
    return sums


def scales_of_sums(documents: Iterable[InteractionSums]) -> dict[str, float]:
    """`interaction_scales` from each document's `interaction_sums`, added in the documents' order (so a
    streamed split gives the same floats as one in memory)."""
    totals = {phase: [0.0, 0] for phase in INTERACTION_SIGNALS}
    for sums in documents:
        for phase, (total, n) in sums.items():
            totals[phase][0] += total
            totals[phase][1] += n
    rms = {phase: (total / n) ** 0.5 if n else 0.0 for phase, (total, n) in totals.items()}
    return {phase: value if value > 0 else 1.0 for phase, value in rms.items()}


def interaction_scales(targets: Iterable[Mapping[str, Tensor]]) -> dict[str, float]:
    """{phase: RMS of the teacher's interaction signal} over every valid position of every document:

        s1 = sqrt(mean_{d, q valid} (kappa^T_q Align^T_q)^2)     s2 = sqrt(mean_{d, t valid} (QK^T_t OV^T_t)^2)

    targets: per-document target dicts (`teacher_targets`, or `by_document` of the flat tensors).
    A phase with no valid position, or an RMS of 0, gets 1.0 (the raw term)."""
    return scales_of_sums(interaction_sums(t) for t in targets)


def _targets_metadata(pools: dict[str, HeadPool], teacher: str, top_k: int, scales: Mapping[str, float]) -> dict[str, str]:
    """The metadata of targets/{split}.safetensors."""
    return {"teacher": teacher, "pools": pools_json(pools), "top_k": str(top_k),
            "interaction_scales": json.dumps(dict(scales))}


def save_targets(tensors: dict[str, Tensor], table: pd.DataFrame, pools: dict[str, HeadPool], teacher: str,
                 top_k: int, table_path: str | os.PathLike, tensors_path: str | os.PathLike,
                 scales: Mapping[str, float] | None = None) -> None:
    """Write the tensors (safetensors, metadata: teacher, pools, top_k, interaction_scales), then the
    table (the rule's output, last), both atomically; the table gets the pools as a JSON column.
    scales: `interaction_scales` of these targets (default: computed from them)."""
    scales = dict(scales) if scales is not None else interaction_scales(by_document(tensors).values())
    with atomic_path(tensors_path) as tmp:
        save_file(tensors, str(tmp), metadata=_targets_metadata(pools, teacher, top_k, scales))
        canonical_safetensors_header(tmp)  # the same targets, the same bytes
    write_parquet(table.assign(pools=pools_json(pools)), table_path)


# Resumable targets: the documents of a split in shards of `shard_size`, each finished shard one small
# safetensors file ({"{doc_id}/{name}": tensor}; metadata: its table rows and interaction sums) in a
# `shards.Shards` folder; `merge_target_shards` streams them into the files `save_targets` writes.
SHARD_ROWS, SHARD_SUMS = "rows", "interaction_sums"


def shard_names(n_docs: int, shard_size: int) -> dict[int, str]:
    """{first document's index: shard file name} of a split of `n_docs` documents."""
    return {start: f"shard-{start // shard_size:05d}.safetensors" for start in range(0, n_docs, shard_size)}


def compute_target_shards(model: nn.Module, examples: list[Example], pools: dict[str, HeadPool], tau: float,
                          top_k: int, shards: Shards, shard_size: int, workers: int = 1,
                          coarse: CoarseVariant = DEFAULT_COARSE, desc: str = "teacher targets",
                          on_shard: Callable[[str], None] | None = None) -> list[Path]:
    """Every shard of `examples` in `shards`, computing only those not already there (a killed run
    resumes at its first unfinished shard) -> the shards' paths, in the documents' order.

    The documents of the unfinished shards run through `inflight.in_flight` (up to `workers` at once on
    the model; the next shard's documents start while a shard is written). Each shard is written
    atomically as soon as its last document is done, then `on_shard(name)` is called. Host memory: one
    shard's tensors and `workers` documents' in flight."""
    names = shard_names(len(examples), shard_size)
    todo = [start for start, name in names.items() if not shards.done(name)]
    if len(todo) < len(names):
        log.info("resuming: %d of %d shards already done in %s", len(names) - len(todo), len(names), shards.dir)
    documents = [ex for start in todo for ex in examples[start:start + shard_size]]
    results = in_flight(partial(document_targets, model, pools=pools, tau=tau, top_k=top_k, coarse=coarse),
                        documents, workers)
    with tqdm(total=len(examples), initial=len(examples) - len(documents), desc=desc, unit="doc") as bar:
        for start in todo:
            done = []
            for _ in examples[start:start + shard_size]:
                done.append(next(results))
                bar.update(1)
            write_target_shard(shards.path(names[start]), done)
            if on_shard is not None:
                on_shard(names[start])
    return [shards.path(name) for name in names.values()]


def write_target_shard(path: Path, documents: list[tuple[dict[str, Tensor], dict]]) -> None:
    """One shard's documents ((flat tensors, table row) each) -> one safetensors file, atomically."""
    tensors = {name: value for doc_tensors, _ in documents for name, value in doc_tensors.items()}
    sums = [interaction_sums({name.removeprefix(f"{row['doc_id']}/"): value for name, value in doc_tensors.items()})
            for doc_tensors, row in documents]
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={SHARD_ROWS: json.dumps([row for _, row in documents]),
                                               SHARD_SUMS: json.dumps(sums)})


@dataclass(frozen=True)
class _Stored:
    """Where one tensor's bytes are in a safetensors file."""

    path: Path
    dtype: str
    shape: list[int]
    start: int  # absolute byte offset in the file
    size: int  # bytes


def _read_header(path: Path) -> tuple[dict[str, str], dict[str, _Stored]]:
    """A safetensors file's (metadata, {tensor name: where its bytes are}), reading the header only."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    metadata = header.pop("__metadata__", None) or {}
    return metadata, {name: _Stored(path, entry["dtype"], entry["shape"], 8 + length + entry["data_offsets"][0],
                                    entry["data_offsets"][1] - entry["data_offsets"][0])
                      for name, entry in header.items()}


# The torch dtype of each safetensors dtype name that targets hold (`_dtype_ranks` asks the library's order).
_TORCH_DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
                 "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
                 "F64": torch.float64}


def _dtype_ranks(dtypes: set[str]) -> dict[str, int]:
    """{safetensors dtype name: its place in the library's data layout} (`save_file` lays the tensors out
    by dtype, then by name), asked of the library itself with one 1-element tensor per dtype."""
    unknown = dtypes - set(_TORCH_DTYPES)
    if unknown:
        raise ValueError(f"teacher targets: no torch dtype known for safetensors dtype(s) {sorted(unknown)}")
    probe = save({name: torch.zeros(1, dtype=_TORCH_DTYPES[name]) for name in sorted(dtypes)})
    (length,) = struct.unpack("<Q", probe[:8])
    header = json.loads(probe[8:8 + length])
    header.pop("__metadata__", None)
    return {name: rank for rank, name in enumerate(sorted(header, key=lambda n: header[n]["data_offsets"]))}


COPY_CHUNK = 1 << 22  # bytes copied at a time by `merge_target_shards` (4 MiB)


def merge_target_shards(shard_paths: list[Path], pools: dict[str, HeadPool], teacher: str, top_k: int,
                        table_path: str | os.PathLike, tensors_path: str | os.PathLike) -> dict[str, float]:
    """The shards (`compute_target_shards`, in the documents' order) -> the files `save_targets` writes
    for all their tensors and rows, byte for byte; returns the interaction scales.

    Streamed: the shards' headers give every tensor's dtype, shape and place; the merged header (the
    library's layout: by dtype, then by name) is written first, then each tensor's bytes are copied from
    its shard through one COPY_CHUNK buffer. Host memory: the header and the table rows (O(documents), no
    tensor data) and the buffer."""
    stored: dict[str, _Stored] = {}
    rows: list[dict] = []
    sums: list[InteractionSums] = []
    for path in shard_paths:
        metadata, tensors = _read_header(Path(path))
        duplicated = stored.keys() & tensors.keys()
        if duplicated:
            raise ValueError(f"teacher targets: {path} repeats tensors of an earlier shard, e.g. {min(duplicated)}")
        stored.update(tensors)
        rows += json.loads(metadata[SHARD_ROWS])
        sums += json.loads(metadata[SHARD_SUMS])
    scales = scales_of_sums({phase: tuple(value) for phase, value in doc.items()} for doc in sums)
    ranks = _dtype_ranks({t.dtype for t in stored.values()})
    order = sorted(stored, key=lambda name: (ranks[stored[name].dtype], name))
    header: dict[str, object] = {"__metadata__": _targets_metadata(pools, teacher, top_k, scales)}
    offset = 0
    for name in order:
        header[name] = {"dtype": stored[name].dtype, "shape": stored[name].shape,
                        "data_offsets": [offset, offset + stored[name].size]}
        offset += stored[name].size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # the library pads its header to a multiple of 8 bytes
    with atomic_path(tensors_path) as tmp:
        with open(tmp, "wb") as out, _Readers() as readers:
            out.write(struct.pack("<Q", len(text)) + text)
            buffer = bytearray(COPY_CHUNK)
            for name in order:
                where = stored[name]
                _copy_bytes(readers.open(where.path), where.start, where.size, out, buffer)
        canonical_safetensors_header(tmp)  # the same targets, the same bytes
    write_parquet(pd.DataFrame(rows, columns=TABLE_COLUMNS).assign(pools=pools_json(pools)), table_path)
    return scales


class _Readers:
    """The shard files being read, open for reading; at most `limit` at once (the least recently opened
    is closed first)."""

    def __init__(self, limit: int = 64) -> None:
        self.limit, self.files = limit, {}

    def open(self, path: Path) -> BinaryIO:
        if path not in self.files:
            if len(self.files) >= self.limit:
                self.files.pop(next(iter(self.files))).close()
            self.files[path] = open(path, "rb")  # noqa: SIM115 (closed by close() or on eviction)
        return self.files[path]

    def __enter__(self) -> _Readers:
        return self

    def __exit__(self, *exc: object) -> None:
        for f in self.files.values():
            f.close()
        self.files.clear()


def _copy_bytes(source: BinaryIO, start: int, size: int, out: BinaryIO, buffer: bytearray) -> None:
    """Copy `size` bytes of `source` from byte `start` to `out` through `buffer` (a chunk at a time)."""
    source.seek(start)
    view = memoryview(buffer)
    while size > 0:
        n = source.readinto(view[:min(size, len(buffer))])
        if not n:
            raise ValueError(f"teacher targets: {source.name} ends before its header says")
        out.write(view[:n])
        size -= n


def by_document(tensors: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """Flat {"{doc_id}/{name}": tensor} -> {doc_id: {name: tensor}}."""
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        doc_id, name = key.split("/", 1)
        out.setdefault(doc_id, {})[name] = value
    return out


def load_targets(tensors_path: str | os.PathLike) -> dict[str, dict[str, Tensor]]:
    """targets/{split}.safetensors -> {doc_id: {name: tensor}}."""
    return by_document(load_file(str(tensors_path)))


def load_interaction_scales(tensors_path: str | os.PathLike) -> dict[str, float]:
    """The `interaction_scales` stored with targets/{split}.safetensors (from its metadata)."""
    with safe_open(str(tensors_path), "pt") as f:
        stored = (f.metadata() or {}).get("interaction_scales")
    if stored is None:
        raise ValueError(f"{tensors_path}: no interaction_scales in its metadata (written before they were "
                         "stored): rerun teacher_targets")
    return {phase: float(v) for phase, v in json.loads(stored).items()}


class TargetsFile(Mapping[str, Mapping[str, Tensor]]):
    """targets/{split}.safetensors as {doc_id: {name: tensor}}, each document's tensors read when asked for
    (safetensors' `safe_open`: the file is memory-mapped, a read copies out that document's tensors only),
    so a rank holds the targets of the document it trains on, not the split's. `load_targets` reads all."""

    def __init__(self, tensors_path: str | os.PathLike) -> None:
        self.path = str(tensors_path)
        self.file = safe_open(self.path, "pt")
        self.names: dict[str, tuple[str, ...]] = {}
        for key in self.file.keys():
            doc_id, name = key.split("/", 1)
            self.names[doc_id] = (*self.names.get(doc_id, ()), sys.intern(name))

    def __getitem__(self, doc_id: str) -> dict[str, Tensor]:
        return {name: self.file.get_tensor(f"{doc_id}/{name}") for name in self.names[doc_id]}

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, doc_id: object) -> bool:
        return doc_id in self.names


class OnlineTargets:
    """Teacher targets computed on demand by a teacher in memory (distill.targets: online)."""

    def __init__(self, model: nn.Module, pools: dict[str, HeadPool], tau: float, top_k: int,
                 coarse: CoarseVariant = DEFAULT_COARSE) -> None:
        self.model, self.pools, self.tau, self.top_k, self.coarse = model, pools, tau, top_k, coarse
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.examples: dict[str, Callable[[], Example]] = {}  # doc_id -> its Example, built when asked for

    def add(self, examples: Sequence[Example]) -> None:
        if isinstance(examples, SplitExamples):  # built when a document's targets are asked for
            self.examples.update({doc_id: lambda doc_id=doc_id: examples.by_doc_id(doc_id)
                                  for doc_id in examples.doc_ids})
        else:
            self.examples.update({e.doc_id: lambda e=e: e for e in examples})

    def __call__(self, doc_id: str) -> dict[str, torch.Tensor]:
        return teacher_targets(self.model, self.examples[doc_id](), self.pools, self.tau, self.top_k,
                               coarse=self.coarse)


class TeacherTargets:
    """The teacher's targets of a run's splits by document, precomputed (`from_files`) or computed on
    demand by a teacher in memory (`online`), and the interaction scales of the training split."""

    def __init__(self, lookups: Mapping[str, Callable[[str], Mapping[str, Tensor]]],
                 doc_ids: Mapping[str, set[str]], scales: Mapping[str, float]) -> None:
        self.lookups, self.doc_ids, self.scales = dict(lookups), dict(doc_ids), dict(scales)

    def has(self, split: str, doc_id: str) -> bool:
        return doc_id in self.doc_ids[split]

    def get(self, split: str, doc_id: str) -> Mapping[str, Tensor]:
        """The targets of document `doc_id` of `split` ({name: tensor}, `objective.teacher_targets`)."""
        return self.lookups[split](doc_id)

    @classmethod
    def from_files(cls, tensors_paths: Mapping[str, str | os.PathLike], scales_split: str = "train") -> TeacherTargets:
        """Targets read from each split's targets/{split}.safetensors, a document at a time (`TargetsFile`);
        the scales stored with `scales_split`'s (the training targets' scale, for train and val alike)."""
        files = {split: TargetsFile(path) for split, path in tensors_paths.items()}
        return cls({split: file.__getitem__ for split, file in files.items()},
                   {split: set(file) for split, file in files.items()},
                   load_interaction_scales(tensors_paths[scales_split]))

    @classmethod
    def online(cls, online: OnlineTargets, examples: Mapping[str, Sequence[Example]],
               scales_split: str = "train") -> TeacherTargets:
        """Targets computed on demand by `online` for the teacher's `examples` of each split; the scales
        measured over `scales_split`'s documents."""
        doc_ids = {split: [ex.doc_id for ex in split_examples] if not isinstance(split_examples, SplitExamples)
                   else split_examples.doc_ids for split, split_examples in examples.items()}
        for split_examples in examples.values():
            online.add(split_examples)
        scales = interaction_scales(online(doc_id) for doc_id in doc_ids[scales_split])
        return cls({split: online for split in examples}, {split: set(ids) for split, ids in doc_ids.items()}, scales)
