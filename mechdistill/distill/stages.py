"""Distillation stages: teacher targets, training one (student, method), student predictions.

Thin functions from artifact paths to artifacts (the Snakemake rules call them); the science is
in signals.py / objective.py / losses.py / trainer.py.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time
from dataclasses import fields
from pathlib import Path

import pandas as pd
import torch

from ..errors import ConfigError
from ..io import atomic_path, read_parquet, write_parquet
from ..labels import LabelSpace
from .methods import resolve_method
from .pools import HeadPool, select_pool
from .signals import Example, has_phase, make_example

log = logging.getLogger(__name__)

DEFAULT_POOL_LAYERS = {"phase1": (0.0, 0.5), "phase2": (0.33, 1.0)}  # early / mid-to-late layers (fractions)


def tensors_path(targets_parquet: str | Path) -> Path:
    """targets/{split}.parquet -> targets/{split}.safetensors (the tensors)."""
    return Path(targets_parquet).with_suffix(".safetensors")


def load_examples(config: dict, model_name: str, tokenizer, docs_path, prompts_path, cot_path, anchors_path,
                  labels_path, max_docs: int | None = None) -> list[Example]:
    """Teacher-forced examples of one split for `model_name`'s tokenizer (documents with an empty
    CoT are skipped with a warning)."""
    from ..stages import load_split

    docs, prompts, cot, anchors, space = load_split(docs_path, prompts_path, cot_path, anchors_path, labels_path,
                                                    max_docs)
    examples, empty = [], []
    for _, row in anchors.iterrows():
        doc_id = row["doc_id"]
        text = cot.loc[doc_id, "cot"] if doc_id in cot.index else ""
        if not text.strip():
            empty.append(doc_id)
            continue
        examples.append(make_example(tokenizer, doc_id, prompts.loc[doc_id, "messages"], text, row,
                                     list(row["anchors"]), [space.title[g] for g in docs.loc[doc_id, "labels"]],
                                     [space.title[n] for n in row["near_misses"]]))
    if empty:
        log.warning("%s: %d documents have an empty CoT and are skipped: %s", cot_path, len(empty), empty[:5])
    log.info("%s: %d examples for %s (%d with Phase 1 positions, %d with Phase 2 positions)", cot_path,
             len(examples), model_name, sum(has_phase(e, "phase1") for e in examples),
             sum(has_phase(e, "phase2") for e in examples))
    return examples


def head_pools(config: dict, model, coarse_path, refine_path) -> dict[str, HeadPool]:
    """The model's Phase 1 / Phase 2 head pools from its own head-score tables."""
    from ..heads import attention_modules

    n_layers = len(attention_modules(model))
    pools = {}
    for phase, path in (("phase1", coarse_path), ("phase2", refine_path)):
        pcfg = {"layers": DEFAULT_POOL_LAYERS[phase], **config["distill"]["pools"][phase]}
        table = read_parquet(path)
        if table["score"].notna().any():
            pools[phase] = select_pool(table, n_layers, pcfg["k"], pcfg["temperature"], tuple(pcfg["layers"]))
        else:
            log.warning("%s: no finite head score; %s losses are off for this model", path, phase)
    return pools


def pools_json(pools: dict[str, HeadPool]) -> str:
    return json.dumps({p: [[layer, head, float(w)] for (layer, head), w in zip(pool.heads, pool.weights.tolist())]
                       for p, pool in pools.items()})


def run_teacher_targets(config: dict, docs_path, prompts_path, cot_path, anchors_path, labels_path,
                        coarse_path, refine_path, out_path) -> None:
    """-> targets/{split}.parquet (one row per document) + targets/{split}.safetensors."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from ..models import load_model
    from .objective import teacher_targets

    dcfg, teacher = config["distill"], config["teacher"]
    model, tok = load_model(config, teacher, device=dcfg["train"]["device"], dtype=dcfg["teacher_dtype"])
    pools = head_pools(config, model, coarse_path, refine_path)
    examples = load_examples(config, teacher, tok, docs_path, prompts_path, cot_path, anchors_path, labels_path,
                             dcfg.get("max_docs"))
    tensors, rows = {}, []
    for ex in tqdm(examples, desc=f"teacher targets {teacher}", unit="doc"):
        t = teacher_targets(model, ex, pools, config["heads"]["tau"], dcfg["top_k"])
        tensors.update({f"{ex.doc_id}/{k}": v.contiguous() for k, v in t.items()})
        rows.append(dict(doc_id=ex.doc_id, n_tokens=len(ex.input_ids), n_cot=len(t["topk_values"]),
                         n_early=len(t.get("p1.mask", [])), n_refine=len(t.get("p2.mask", [])),
                         has_phase1="p1.mask" in t, has_phase2="p2.mask" in t))
    with atomic_path(tensors_path(out_path)) as tmp:
        save_file(tensors, str(tmp), metadata={"teacher": teacher, "pools": pools_json(pools),
                                               "top_k": str(dcfg["top_k"])})
    table = pd.DataFrame(rows, columns=["doc_id", "n_tokens", "n_cot", "n_early", "n_refine", "has_phase1",
                                        "has_phase2"])
    table["pools"] = pools_json(pools)
    write_parquet(table, out_path)
    log.info("teacher targets: %d documents, %.1f MB of tensors", len(table),
             tensors_path(out_path).stat().st_size / 2**20)


def load_targets(out_path) -> dict[str, dict[str, torch.Tensor]]:
    """targets/{split}.parquet -> {doc_id: {name: tensor}} from its safetensors file."""
    from safetensors.torch import load_file

    flat = load_file(str(tensors_path(out_path)))
    by_doc: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        doc_id, name = key.split("/", 1)
        by_doc.setdefault(doc_id, {})[name] = value
    return by_doc


def train_config(config: dict, method_settings: dict):
    """TrainConfig from `distill.train`, overridden by the method's own `train:` entries."""
    from .trainer import TrainConfig

    merged = {**config["distill"]["train"], **(method_settings.get("train") or {})}
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(merged) - known
    if unknown:
        raise ConfigError(f"distill.train: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    merged.setdefault("seed", config["seed"])
    return TrainConfig(**merged)


class OnlineTargets:
    """Teacher targets computed on demand by the teacher in memory (distill.targets: online)."""

    def __init__(self, config: dict, paths: dict):
        from ..models import load_model

        dcfg = config["distill"]
        self.model, self.tok = load_model(config, config["teacher"], device=dcfg["train"]["device"],
                                          dtype=dcfg["teacher_dtype"])
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.pools = head_pools(config, self.model, paths["teacher_coarse"], paths["teacher_refine"])
        self.tau, self.top_k = config["heads"]["tau"], dcfg["top_k"]
        self.examples: dict[str, Example] = {}

    def add(self, examples: list[Example]) -> None:
        self.examples.update({e.doc_id: e for e in examples})

    def __call__(self, doc_id: str) -> dict[str, torch.Tensor]:
        from .objective import teacher_targets

        return teacher_targets(self.model, self.examples[doc_id], self.pools, self.tau, self.top_k)


def run_distill(config: dict, student: str, method_name: str, paths: dict, model_dir) -> None:
    """Train `student` with `method_name` -> results/{dataset}/{student}/{method}/model/ (+ train_log.parquet).

    paths: train_targets, val_targets, student_coarse, student_refine, teacher_coarse,
    teacher_refine, and per split ("train", "val") docs/prompts/cot/anchors/labels.
    """
    from ..models import load_model
    from .objective import student_loss
    from .trainer import train, zero3_config

    dcfg = config["distill"]
    settings = config["methods"].get(method_name) or {}
    method = resolve_method(method_name, settings)
    tcfg = train_config(config, settings)
    started = time.perf_counter()
    model, tok = load_model(config, student, device="cpu", dtype=dcfg["student_dtype"])
    pools = head_pools(config, model, paths["student_coarse"], paths["student_refine"])
    examples = {split: load_examples(config, student, tok, *(paths[split][k] for k in
                                                              ("docs", "prompts", "cot", "anchors", "labels")),
                                     dcfg.get("max_docs"))
                for split in ("train", "val")}
    if dcfg["targets"] == "online":
        online = OnlineTargets(config, paths)
        teacher_examples = {split: load_examples(config, config["teacher"], online.tok,
                                                 *(paths[split][k] for k in ("docs", "prompts", "cot", "anchors",
                                                                             "labels")), dcfg.get("max_docs"))
                            for split in ("train", "val")}
        for split in teacher_examples:
            online.add(teacher_examples[split])
        get_targets = {split: online for split in ("train", "val")}
    else:
        loaded = {split: load_targets(paths[f"{split}_targets"]) for split in ("train", "val")}
        get_targets = {split: loaded[split].__getitem__ for split in ("train", "val")}
    batches = {split: [(ex, split) for ex in examples[split]] for split in examples}
    if not batches["train"]:
        raise ConfigError(f"distill {student}/{method_name}: no training example (all CoTs empty?)")
    weights = {**(dcfg.get("weights") or {}), **(settings.get("weights") or {})}

    def loss_fn(model, batch):
        ex, split = batch
        return student_loss(model, ex, get_targets[split](ex.doc_id), pools, method, config["heads"]["tau"],
                            dcfg["temperature"], weights)

    def train_batches(epoch: int):
        order = list(batches["train"])
        random.Random(f"{tcfg.seed}:{epoch}").shuffle(order)
        return order

    log.info("distill %s with %s (switches %s): %d train / %d val documents, pools %s, %d steps",
             student, method_name, method.switches or "all on", len(batches["train"]), len(batches["val"]),
             {p: len(pool.heads) for p, pool in pools.items()}, tcfg.max_steps)
    model_dir = Path(model_dir)
    scored = examples["train"] + examples["val"]  # val alone rarely has refinement positions on small data
    before = _mechanism(model, scored, pools, config)
    result = train(model, loss_fn, train_batches, tcfg, model_dir, val_batches=batches["val"] or None,
                   tokenizer=tok, log_path=model_dir.parent / "train_log.parquet", ckpt_dir=model_dir.parent / "ckpt",
                   deepspeed_config=zero3_config(tcfg) if dcfg["deepspeed"] else None, keep_checkpoint=False)
    train_log = result.log
    first = train_log[train_log["split"] == "train"].head(1)
    last = train_log[train_log["split"] == "train"].tail(1)
    log.info("distill %s/%s: %d steps in %.1f s; loss %.4f -> %.4f", student, method_name, result.steps,
             time.perf_counter() - started, float(first["loss"].iloc[0]), float(last["loss"].iloc[0]))
    after = _mechanism(model, scored, pools, config)
    change = pd.concat([before.assign(when="before"), after.assign(when="after")], ignore_index=True)
    write_parquet(change, model_dir.parent / "mechanism.parquet")
    means = change.groupby(["metric", "when"])["value"].mean().unstack()
    for metric in means.index:
        log.info("  %s on train+val (student's own pools): before %.4f, after %.4f", metric,
                 means.loc[metric, "before"], means.loc[metric, "after"])


def _mechanism(model, examples: list[Example], pools: dict[str, HeadPool], config: dict) -> pd.DataFrame:
    """Sharpness, AnchorAlign, LoopBack, Helpfulness of the model's pools on teacher-forced examples."""
    from ..evaluate.stages import mechanism_metrics

    was_training = model.training
    model.eval()
    try:
        return mechanism_metrics(model, examples, pools, config["heads"]["tau"])
    finally:
        model.train(was_training)


def with_distilled_model(config: dict, student: str, method: str, model_dir) -> tuple[dict, str]:
    """(a copy of config with a `local` model entry for the trained student, that entry's name)."""
    name = f"{student}__{method}"
    cfg = copy.deepcopy(config)
    cfg["models"][name] = {"source": "local", "path": str(Path(model_dir))}
    return cfg, name


def run_student_predict(config: dict, dataset: str, student: str, method: str, model_dir, prompts_path,
                        labels_path, out_path) -> None:
    """Greedy CoT + answer of a distilled student on the test prompts (same prompt, settings and
    parser as the teacher) -> pred/{split}.parquet."""
    from ..generate import generate_cot

    cfg, name = with_distilled_model(config, student, method, model_dir)
    prompts = read_parquet(prompts_path, "prompts")
    space = LabelSpace(read_parquet(labels_path, "labels"))
    pred = generate_cot(cfg, name, prompts, space, out_path, dataset=dataset, split="test")
    log.info("student %s/%s: %d predictions, %d with an answer block", student, method, len(pred),
             int(pred["has_answer_block"].sum()))
