"""rules/distill.smk: teacher_targets, distill, student_predict."""

from __future__ import annotations

import logging
import os
import random
import time

import pandas as pd

from .. import paths
from ..distill.methods import resolve_method
from ..distill.objective import student_loss
from ..distill.pools import HeadPool, model_pools
from ..distill.signals import make_examples, mechanism_metrics
from ..distill.targets import OnlineTargets, load_targets, save_targets, target_tensors
from ..distill.trainer import train, train_config, zero3_config
from ..errors import ConfigError
from ..io import read_parquet, read_split, write_parquet
from ..labels import LabelSpace
from ..models import load_model, with_distilled_model
from ..teacher.generate import generate_cot

log = logging.getLogger(__name__)
PathLike = str | os.PathLike

def _pools(config: dict, model, dataset: str, model_name: str, coarse_path: PathLike | None = None,
           refine_path: PathLike | None = None) -> dict[str, HeadPool]:
    return model_pools(config["distill"]["pools"], model, coarse_path or paths.head_scores(dataset, model_name, "coarse"),
                       refine_path or paths.head_scores(dataset, model_name, "refine"))


def run_teacher_targets(config: dict, dataset: str, split: str, *, inputs: dict[str, PathLike] | None = None,
                        coarse_path: PathLike | None = None, refine_path: PathLike | None = None,
                        out_path: PathLike | None = None, tensors_path: PathLike | None = None) -> None:
    """The teacher's top-k logits and pooled phase signals on a split, teacher-forced on its own
    CoT -> targets/{split}.parquet (one row per document) + targets/{split}.safetensors.

    inputs: the split's files (default `paths.split_files`).
    """
    settings, teacher = config["distill"], config["teacher"]
    inputs = {**paths.split_files(dataset, teacher, split), **(inputs or {})}
    model, tokenizer = load_model(config, teacher, device=settings["train"]["device"], dtype=settings["teacher_dtype"])
    pools = _pools(config, model, dataset, teacher, coarse_path, refine_path)
    examples = make_examples(tokenizer, read_split(inputs, settings.get("max_docs")),
                             teacher)
    tensors, table = target_tensors(model, examples, pools, config["heads"]["tau"], settings["top_k"],
                                    desc=f"teacher targets {teacher}")
    tensors_path = tensors_path or paths.targets_tensors(dataset, teacher, split)
    save_targets(tensors, table, pools, teacher, settings["top_k"], out_path or paths.targets(dataset, teacher, split),
                 tensors_path)
    log.info("teacher targets: %d documents, %.1f MB of tensors", len(table), os.path.getsize(tensors_path) / 2**20)


def run_distill(config: dict, dataset: str, student: str, method_name: str, *,
                inputs: dict[str, dict[str, PathLike]] | None = None,
                train_targets_path: PathLike | None = None, val_targets_path: PathLike | None = None,
                student_coarse: PathLike | None = None, student_refine: PathLike | None = None,
                teacher_coarse: PathLike | None = None, teacher_refine: PathLike | None = None,
                model_dir: PathLike | None = None, log_path: PathLike | None = None,
                mechanism_path: PathLike | None = None, ckpt_dir: PathLike | None = None) -> None:
    """Train `student` with `method_name` on the teacher's train traces (validating on val) ->
    {student}/{method}/model/ (save_pretrained) + train_log.parquet + mechanism.parquet.

    inputs: per split ("train", "val"), the split's files (default `paths.split_files`). Resumes from
    ckpt_dir when a checkpoint is there.
    """
    settings, teacher, tau = config["distill"], config["teacher"], config["heads"]["tau"]
    inputs = {split: {**paths.split_files(dataset, teacher, split), **((inputs or {}).get(split) or {})}
              for split in ("train", "val")}
    method_settings = config["methods"].get(method_name) or {}
    method = resolve_method(method_name, method_settings)
    tcfg = train_config(settings["train"], method_settings.get("train"), config["seed"])
    started = time.perf_counter()
    model, tokenizer = load_model(config, student, device="cpu", dtype=settings["student_dtype"])
    pools = _pools(config, model, dataset, student, student_coarse, student_refine)
    splits = {split: read_split(inputs[split], settings.get("max_docs"))
              for split in ("train", "val")}
    examples = {split: make_examples(tokenizer, splits[split], student) for split in splits}
    if settings["targets"] == "online":
        teacher_model, teacher_tok = load_model(config, teacher, device=settings["train"]["device"],
                                                dtype=settings["teacher_dtype"])
        online = OnlineTargets(teacher_model, _pools(config, teacher_model, dataset, teacher, teacher_coarse,
                                                           teacher_refine), tau, settings["top_k"])
        for split in splits:
            online.add(make_examples(teacher_tok, splits[split], teacher))
        get_targets = {split: online for split in splits}
    else:
        loaded = {"train": load_targets(train_targets_path or paths.targets_tensors(dataset, teacher, "train")),
                  "val": load_targets(val_targets_path or paths.targets_tensors(dataset, teacher, "val"))}
        get_targets = {split: loaded[split].__getitem__ for split in splits}
    batches = {split: [(ex, split) for ex in examples[split]] for split in examples}
    if not batches["train"]:
        raise ConfigError(f"distill {student}/{method_name}: no training example (all CoTs empty?)")
    weights = {**(settings.get("weights") or {}), **(method_settings.get("weights") or {})}

    def loss_fn(model, batch):
        ex, split = batch
        return student_loss(model, ex, get_targets[split](ex.doc_id), pools, method, tau, settings["temperature"],
                            weights)

    def train_batches(epoch: int):
        order = list(batches["train"])
        random.Random(f"{tcfg.seed}:{epoch}").shuffle(order)
        return order

    log.info("distill %s with %s (switches %s): %d train / %d val documents, pools %s, %d steps",
             student, method_name, method.switches or "all on", len(batches["train"]), len(batches["val"]),
             {p: len(pool.heads) for p, pool in pools.items()}, tcfg.max_steps)
    scored = examples["train"] + examples["val"]  # val alone rarely has refinement positions on small data
    before = mechanism_metrics(model, scored, pools, tau)
    result = train(model, loss_fn, train_batches, tcfg, model_dir or paths.student_model_dir(dataset, student, method_name),
                   val_batches=batches["val"] or None, tokenizer=tokenizer,
                   log_path=log_path or paths.train_log(dataset, student, method_name),
                   ckpt_dir=ckpt_dir or paths.checkpoint_dir(dataset, student, method_name),
                   deepspeed_config=zero3_config(tcfg) if settings["deepspeed"] else None, keep_checkpoint=False)
    train_log = result.log[result.log["split"] == "train"]
    log.info("distill %s/%s: %d steps in %.1f s; loss %.4f -> %.4f", student, method_name, result.steps,
             time.perf_counter() - started, float(train_log["loss"].iloc[0]), float(train_log["loss"].iloc[-1]))
    after = mechanism_metrics(model, scored, pools, tau)
    change = pd.concat([before.assign(when="before"), after.assign(when="after")], ignore_index=True)
    write_parquet(change, mechanism_path or paths.mechanism(dataset, student, method_name))
    means = change.groupby(["metric", "when"])["value"].mean().unstack()
    for metric in means.index:
        log.info("  %s on train+val (student's own pools): before %.4f, after %.4f", metric,
                 means.loc[metric, "before"], means.loc[metric, "after"])


def run_student_predict(config: dict, dataset: str, student: str, method: str, *, model_dir: PathLike | None = None,
                        prompts_path: PathLike | None = None, labels_path: PathLike | None = None,
                        out_path: PathLike | None = None) -> None:
    """Greedy CoT + answer of a distilled student on the test prompts (same prompt, settings and
    parser as the teacher) -> {student}/{method}/pred/test.parquet."""
    cfg, name = with_distilled_model(config, student, method,
                                     model_dir or paths.student_model_dir(dataset, student, method))
    prompts = read_parquet(prompts_path or paths.prompts(dataset, "test"), "prompts")
    space = LabelSpace(read_parquet(labels_path or paths.labels(dataset), "labels"))
    pred = generate_cot(cfg, name, prompts, space, out_path or paths.student_pred(dataset, student, method, "test"),
                        dataset=dataset, split="test")
    log.info("student %s/%s: %d predictions, %d with an answer block", student, method, len(pred),
             int(pred["has_answer_block"].sum()))
