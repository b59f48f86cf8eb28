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
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..characterize.scores import DEFAULT_COARSE, CoarseVariant
from ..io import atomic_path, canonical_safetensors_header, write_parquet
from .objective import teacher_targets
from .pools import HeadPool, pools_json
from .signals import Example, SplitExamples

TABLE_COLUMNS = ["doc_id", "n_tokens", "n_cot", "n_early", "n_refine", "has_phase1", "has_phase2"]
# The factors of each phase's interaction term in the targets, and the valid-position mask.
INTERACTION_SIGNALS = {"phase1": ("p1.sharpness", "p1.align", "p1.mask"),
                       "phase2": ("p2.loopback", "p2.helpfulness", "p2.mask")}


def target_tensors(model: nn.Module, examples: list[Example], pools: dict[str, HeadPool], tau: float,
                   top_k: int, desc: str = "teacher targets", coarse: CoarseVariant = DEFAULT_COARSE
                   ) -> tuple[dict[str, Tensor], pd.DataFrame]:
    """({"{doc_id}/{name}": tensor}, one row per document: doc_id, n_tokens, n_cot, n_early,
    n_refine, has_phase1, has_phase2). coarse: the Phase-1 sharpness (config heads.coarse)."""
    tensors, rows = {}, []
    for ex in tqdm(examples, desc=desc, unit="doc"):
        t = teacher_targets(model, ex, pools, tau, top_k, coarse=coarse)
        tensors.update({f"{ex.doc_id}/{k}": v.contiguous() for k, v in t.items()})
        rows.append(dict(doc_id=ex.doc_id, n_tokens=len(ex.input_ids), n_cot=len(t["topk_values"]),
                         n_early=len(t.get("p1.mask", [])), n_refine=len(t.get("p2.mask", [])),
                         has_phase1="p1.mask" in t, has_phase2="p2.mask" in t))
    return tensors, pd.DataFrame(rows, columns=TABLE_COLUMNS)


def interaction_scales(targets: Iterable[Mapping[str, Tensor]]) -> dict[str, float]:
    """{phase: RMS of the teacher's interaction signal} over every valid position of every document:

        s1 = sqrt(mean_{d, q valid} (kappa^T_q Align^T_q)^2)     s2 = sqrt(mean_{d, t valid} (QK^T_t OV^T_t)^2)

    targets: per-document target dicts (`teacher_targets`, or `by_document` of the flat tensors).
    A phase with no valid position, or an RMS of 0, gets 1.0 (the raw term)."""
    sums = {phase: [0.0, 0] for phase in INTERACTION_SIGNALS}
    for t in targets:
        for phase, (a, b, mask) in INTERACTION_SIGNALS.items():
            if mask in t:
                keep = t[mask].to(torch.bool)
                sums[phase][0] += float((t[a][keep].double() * t[b][keep].double()).pow(2).sum())
                sums[phase][1] += int(keep.sum())
    rms = {phase: (total / n) ** 0.5 if n else 0.0 for phase, (total, n) in sums.items()}
    return {phase: value if value > 0 else 1.0 for phase, value in rms.items()}


def save_targets(tensors: dict[str, Tensor], table: pd.DataFrame, pools: dict[str, HeadPool], teacher: str,
                 top_k: int, table_path: str | os.PathLike, tensors_path: str | os.PathLike,
                 scales: Mapping[str, float] | None = None) -> None:
    """Write the tensors (safetensors, metadata: teacher, pools, top_k, interaction_scales), then the
    table (the rule's output, last), both atomically; the table gets the pools as a JSON column.
    scales: `interaction_scales` of these targets (default: computed from them)."""
    scales = dict(scales) if scales is not None else interaction_scales(by_document(tensors).values())
    with atomic_path(tensors_path) as tmp:
        save_file(tensors, str(tmp), metadata={"teacher": teacher, "pools": pools_json(pools), "top_k": str(top_k),
                                               "interaction_scales": json.dumps(scales)})
        canonical_safetensors_header(tmp)  # the same targets, the same bytes
    write_parquet(table.assign(pools=pools_json(pools)), table_path)


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
