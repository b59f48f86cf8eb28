"""Teacher targets: the teacher's side of every loss, computed once per document and stored.

`target_tensors` runs the teacher over every example (`objective.teacher_targets`) and returns
the flat tensors ("{doc_id}/{name}") and one summary row per document; `save_targets` writes them
(safetensors for the tensors, Parquet for the rows) and `load_targets` reads the tensors back,
so training never needs the teacher in memory. `OnlineTargets` computes the same tensors on
demand with the teacher in memory (`distill.targets: online`): both give the same loss.
"""

from __future__ import annotations

import os

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..io import atomic_path, write_parquet
from .objective import teacher_targets
from .pools import HeadPool, pools_json
from .signals import Example

TABLE_COLUMNS = ["doc_id", "n_tokens", "n_cot", "n_early", "n_refine", "has_phase1", "has_phase2"]


def target_tensors(model: nn.Module, examples: list[Example], pools: dict[str, HeadPool], tau: float,
                   top_k: int, desc: str = "teacher targets") -> tuple[dict[str, Tensor], pd.DataFrame]:
    """({"{doc_id}/{name}": tensor}, one row per document: doc_id, n_tokens, n_cot, n_early,
    n_refine, has_phase1, has_phase2)."""
    tensors, rows = {}, []
    for ex in tqdm(examples, desc=desc, unit="doc"):
        t = teacher_targets(model, ex, pools, tau, top_k)
        tensors.update({f"{ex.doc_id}/{k}": v.contiguous() for k, v in t.items()})
        rows.append(dict(doc_id=ex.doc_id, n_tokens=len(ex.input_ids), n_cot=len(t["topk_values"]),
                         n_early=len(t.get("p1.mask", [])), n_refine=len(t.get("p2.mask", [])),
                         has_phase1="p1.mask" in t, has_phase2="p2.mask" in t))
    return tensors, pd.DataFrame(rows, columns=TABLE_COLUMNS)


def save_targets(tensors: dict[str, Tensor], table: pd.DataFrame, pools: dict[str, HeadPool], teacher: str,
                 top_k: int, table_path: str | os.PathLike, tensors_path: str | os.PathLike) -> None:
    """Write the tensors (safetensors, metadata: teacher, pools, top_k), then the table (the rule's
    output, last), both atomically; the table gets the pools as a JSON column."""
    with atomic_path(tensors_path) as tmp:
        save_file(tensors, str(tmp), metadata={"teacher": teacher, "pools": pools_json(pools), "top_k": str(top_k)})
    write_parquet(table.assign(pools=pools_json(pools)), table_path)


def load_targets(tensors_path: str | os.PathLike) -> dict[str, dict[str, Tensor]]:
    """targets/{split}.safetensors -> {doc_id: {name: tensor}}."""
    by_doc: dict[str, dict[str, Tensor]] = {}
    for key, value in load_file(str(tensors_path)).items():
        doc_id, name = key.split("/", 1)
        by_doc.setdefault(doc_id, {})[name] = value
    return by_doc


class OnlineTargets:
    """Teacher targets computed on demand by a teacher in memory (distill.targets: online)."""

    def __init__(self, model: nn.Module, pools: dict[str, HeadPool], tau: float, top_k: int) -> None:
        self.model, self.pools, self.tau, self.top_k = model, pools, tau, top_k
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.examples: dict[str, Example] = {}

    def add(self, examples: list[Example]) -> None:
        self.examples.update({e.doc_id: e for e in examples})

    def __call__(self, doc_id: str) -> dict[str, torch.Tensor]:
        return teacher_targets(self.model, self.examples[doc_id], self.pools, self.tau, self.top_k)
