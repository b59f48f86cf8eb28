"""One function per pipeline stage: read input artifacts, call the library, write outputs.

Used by the thin Snakemake scripts in workflow_scripts/ and by `python -m mechdistill <stage>`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from . import paths
from .data import prepare_dataset
from .data.base import SPLITS
from .generate import generate_cot
from .io import read_parquet, write_json, write_parquet
from .labels import LabelSpace
from .prompts import build_prompts

log = logging.getLogger(__name__)


def run_prepare_dataset(config: dict, dataset: str, out_dir: str | Path | None = None) -> None:
    """-> data/{train,val,test}.parquet, data/labels.parquet, data/stats.json (+ excluded_pairs)."""
    out = Path(out_dir or Path(paths.LABELS.format(dataset=dataset)).parent)
    prepared = prepare_dataset(config, dataset)
    for split in SPLITS:
        write_parquet(prepared.splits[split], out / f"{split}.parquet", "documents")
    if prepared.excluded_pairs is not None:
        write_parquet(prepared.excluded_pairs, out / "excluded_pairs.parquet")
    write_json(out / "stats.json", prepared.stats)
    write_parquet(prepared.labels, out / "labels.parquet", "labels")  # last: the rule's marker


def run_build_prompts(config: dict, dataset: str, split: str, data_dir: str | Path | None = None,
                      out_path: str | Path | None = None) -> None:
    data_dir = Path(data_dir or Path(paths.LABELS.format(dataset=dataset)).parent)
    docs = read_parquet(data_dir / f"{split}.parquet", "documents")
    space = LabelSpace(read_parquet(data_dir / "labels.parquet", "labels"))
    train = read_parquet(data_dir / "train.parquet", "documents")
    entry = config["datasets"][dataset]
    embedder = None
    if entry["candidates"]["strategy"] == "retrieval":
        from .embed import SentenceEmbedder
        embedder = SentenceEmbedder(config.get("embedder", "all-MiniLM-L6-v2"))
    exemplar = train.iloc[0] if len(train) else None
    prompts = build_prompts(docs, space, entry["candidates"], config["prompts"], config.get("seed", 0),
                            exemplar_doc=exemplar, embedder=embedder)
    recall = float(prompts["gold_in_candidates"].mean()) if len(prompts) else float("nan")
    log.info("prompts %s/%s: %d documents, %d candidates each, candidate recall = %.3f",
             dataset, split, len(prompts), entry["candidates"]["size"], recall)
    write_parquet(prompts, out_path or paths.PROMPTS.format(dataset=dataset, split=split), "prompts")


def run_teacher_cot(config: dict, dataset: str, split: str, prompts_path: str | Path | None = None,
                    labels_path: str | Path | None = None, out_path: str | Path | None = None,
                    model: str | None = None) -> None:
    model = model or config["teacher"]
    prompts = read_parquet(prompts_path or paths.PROMPTS.format(dataset=dataset, split=split), "prompts")
    space = LabelSpace(read_parquet(labels_path or paths.LABELS.format(dataset=dataset), "labels"))
    out_path = out_path or paths.COT.format(dataset=dataset, teacher=model, split=split)
    generate_cot(config, model, prompts, space, out_path, dataset=dataset, split=split)
