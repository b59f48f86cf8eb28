"""rules/distill.smk: teacher_targets, distill (one job per grid point), select_distill, student_predict."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import pandas as pd
from transformers.integrations import HfDeepSpeedConfig

from .. import paths
from ..characterize.attention import attention_modules
from ..characterize.scores import CoarseVariant
from ..distill.launch import gather_to_all, init_distributed, shard
from ..distill.methods import check_methods, grid_point, method_grid, resolve_method
from ..distill.objective import student_loss
from ..distill.pools import HeadPool, model_pools
from ..distill.selection import copy_file, link_dir, make_criterion, select_point
from ..distill.signals import make_examples, mechanism_metrics
from ..distill.targets import (
    OnlineTargets,
    by_document,
    interaction_scales,
    load_interaction_scales,
    load_targets,
    save_targets,
    target_tensors,
)
from ..distill.trainer import Criterion, Padding, train, train_config, zero3_config
from ..errors import ConfigError
from ..evaluate.xmc import macro_f1
from ..io import SplitArtifacts, read_parquet, read_split, write_json, write_parquet
from ..labels import LabelSpace
from ..models import load_model, placement, with_distilled_model
from ..teacher.backends import TransformersBackend
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
    model, tokenizer = load_model(config, teacher, device=settings["train"]["device"], dtype=settings["teacher_dtype"],
                                  **placement(settings, "teacher_"))
    pools = _pools(config, model, dataset, teacher, coarse_path, refine_path)
    examples = make_examples(tokenizer, read_split(inputs, settings.get("max_docs")),
                             teacher)
    tensors, table = target_tensors(model, examples, pools, config["heads"]["tau"], settings["top_k"],
                                    desc=f"teacher targets {teacher}", coarse=CoarseVariant(**config["heads"]["coarse"]))
    scales = interaction_scales(by_document(tensors).values())
    tensors_path = tensors_path or paths.targets_tensors(dataset, teacher, split)
    save_targets(tensors, table, pools, teacher, settings["top_k"], out_path or paths.targets(dataset, teacher, split),
                 tensors_path, scales)
    log.info("teacher targets: %d documents, %.1f MB of tensors; interaction scales (RMS of the teacher's "
             "kappa*Align, QK*OV) %s", len(table), os.path.getsize(tensors_path) / 2**20, scales)


def run_distill(config: dict, dataset: str, student: str, method_name: str, point: str | None = None, *,
                inputs: dict[str, dict[str, PathLike]] | None = None,
                train_targets_path: PathLike | None = None, val_targets_path: PathLike | None = None,
                student_coarse: PathLike | None = None, student_refine: PathLike | None = None,
                teacher_coarse: PathLike | None = None, teacher_refine: PathLike | None = None,
                model_dir: PathLike | None = None, log_path: PathLike | None = None,
                mechanism_path: PathLike | None = None, ckpt_dir: PathLike | None = None,
                best_path: PathLike | None = None) -> None:
    """Train `student` with grid point `point` of `method_name` on the teacher's train traces,
    validating on val every `eval_every` steps and at the end -> {student}/{method}/grid/{point}/:
    model/ (save_pretrained of the best evaluation's weights under distill.select.criterion) +
    train_log.parquet + mechanism.parquet (before training vs the saved weights) + best_step.json.

    point None: every point of the method's grid, then `run_select_distill` (what Snakemake does for
    the method: its model at paths.student_model_dir); the output paths cannot be given then.
    inputs: per split ("train", "val"), the split's files (default `paths.split_files`). Resumes from
    ckpt_dir when a checkpoint is there.
    """
    if point is None:
        if any(p is not None for p in (model_dir, log_path, mechanism_path, ckpt_dir, best_path)):
            raise ValueError("run_distill: output paths belong to one grid point; give `point`")
        for each in method_grid(method_name, config["methods"].get(method_name)):
            run_distill(config, dataset, student, method_name, each.name, inputs=inputs,
                        train_targets_path=train_targets_path, val_targets_path=val_targets_path,
                        student_coarse=student_coarse, student_refine=student_refine,
                        teacher_coarse=teacher_coarse, teacher_refine=teacher_refine)
        run_select_distill(config, dataset, student, method_name)
        return
    settings, teacher, tau = config["distill"], config["teacher"], config["heads"]["tau"]
    coarse = CoarseVariant(**config["heads"]["coarse"])
    check_methods(config["methods"], settings["select"]["criterion"])
    inputs = {split: {**paths.split_files(dataset, teacher, split), **((inputs or {}).get(split) or {})}
              for split in ("train", "val")}
    method_settings = grid_point(method_name, config["methods"].get(method_name), point).settings
    method = resolve_method(method_name, method_settings)
    tcfg = train_config(settings["train"], method_settings.get("train"), config["seed"])
    where = paths.grid_method(method_name, point)  # the point's folder, as a `method` argument of paths
    started = time.perf_counter()
    ds_config = deepspeed_config(settings, tcfg)
    rank, world = init_distributed(tcfg.device) if ds_config else (0, 1)
    if world > 1 and settings["select"]["criterion"] == "val_macro_f1":
        raise ConfigError("distill.select.criterion val_macro_f1 generates with the student on every evaluation, "
                          f"which {world} ZeRO-3 ranks cannot share; use val_cot_loss, or one rank")
    with zero3_init(ds_config):  # ZeRO-3: each rank loads only its partition of the student
        model, tokenizer = load_model(config, student, device="cpu", dtype=settings["student_dtype"])
    pools = _pools(config, model, dataset, student, student_coarse, student_refine)
    splits = {split: read_split(inputs[split], settings.get("max_docs"))
              for split in ("train", "val")}
    examples = {split: make_examples(tokenizer, splits[split], student) for split in splits}
    if settings["targets"] == "online":
        teacher_model, teacher_tok = load_model(config, teacher, device=settings["train"]["device"],
                                                dtype=settings["teacher_dtype"], **placement(settings, "teacher_"))
        online = OnlineTargets(teacher_model, _pools(config, teacher_model, dataset, teacher, teacher_coarse,
                                                           teacher_refine), tau, settings["top_k"], coarse)
        for split in splits:
            online.add(make_examples(teacher_tok, splits[split], teacher))
        get_targets = {split: online for split in splits}
        scales = interaction_scales(online(doc_id) for doc_id in splits["train"].anchors["doc_id"]
                                    if doc_id in online.examples)
    else:
        train_path = train_targets_path or paths.targets_tensors(dataset, teacher, "train")
        loaded = {"train": load_targets(train_path),
                  "val": load_targets(val_targets_path or paths.targets_tensors(dataset, teacher, "val"))}
        get_targets = {split: loaded[split].__getitem__ for split in splits}
        scales = load_interaction_scales(train_path)  # the training targets' scale, for train and val alike
    batches = {split: [(ex, split) for ex in examples[split]] for split in examples}
    if not batches["train"]:
        raise ConfigError(f"distill {student}/{method_name}: no training example (all CoTs empty?)")
    val_shard = shard(batches["val"], rank, world, pad=Padding)  # every rank runs as many val forwards
    weights = {**(settings.get("weights") or {}), **(method_settings.get("weights") or {})}

    def loss_fn(model, batch):
        ex, split = batch
        return student_loss(model, ex, get_targets[split](ex.doc_id), pools, method, tau, settings["temperature"],
                            weights, coarse=coarse, scales=scales)

    def train_batches(epoch: int):  # the same global order on every rank; each reads its shard
        order = list(batches["train"])
        random.Random(f"{tcfg.seed}:{epoch}").shuffle(order)
        return shard(order, rank, world)

    if world > 1:
        log.info("rank %d of %d reads %s of the training documents in epoch 0 and %s of val", rank, world,
                 [ex.doc_id for ex, _ in train_batches(0)], [b[0].doc_id for b in val_shard if not isinstance(b, Padding)])

    criterion_name = settings["select"]["criterion"]
    criterion = (_macro_f1_criterion(config, dataset, student, where, splits["val"], tokenizer)
                 if criterion_name == "val_macro_f1" else make_criterion(criterion_name))
    log.info("distill %s with %s at grid point %s (switches %s, weights %s, interaction scales %s): %d train / "
             "%d val documents, pools %s, %d steps, best step by %s every %s steps, %d rank(s)", student, method_name,
             point, method.switches or "all on", weights, scales, len(batches["train"]), len(batches["val"]),
             {p: len(pool.heads) for p, pool in pools.items()}, tcfg.max_steps, criterion_name,
             tcfg.eval_every or tcfg.max_steps, world)
    scored = shard(examples["train"] + examples["val"], rank, world)  # val alone rarely has refinement positions
    before = []  # the initial weights' metrics, measured once the backend is ready (ZeRO-3 needs its hooks)
    result = train(model, loss_fn, train_batches, tcfg, model_dir or paths.student_model_dir(dataset, student, where),
                   val_batches=val_shard or None, tokenizer=tokenizer,
                   log_path=log_path or paths.train_log(dataset, student, where),
                   ckpt_dir=ckpt_dir or paths.checkpoint_dir(dataset, student, where),
                   deepspeed_config=ds_config, criterion=criterion, whole_params=read_outside_forward(model, pools),
                   on_start=lambda module: before.append(_mechanism(module, scored, pools, tau, coarse)),
                   record_path=best_path or paths.best_step(dataset, student, where), keep_checkpoint=False,
                   on_step=_kill_after_step(os.environ.get(KILL_AFTER_STEP)))
    train_log = result.log[result.log["split"] == "train"]
    log.info("distill %s/%s/%s: %d steps in %.1f s; loss %.4f -> %.4f; saved step %s (%s)", student, method_name,
             point, result.steps, time.perf_counter() - started, float(train_log["loss"].iloc[0]),
             float(train_log["loss"].iloc[-1]), result.best.step if result.best else result.steps,
             f"{criterion_name} {result.best.value:.4f}" if result.best else "no validation: the last step")
    after = _mechanism(model, scored, pools, tau, coarse)  # the saved weights (restored; DeepSpeed: the last)
    if rank != 0:
        return
    change = pd.concat([before[0].assign(when="before"), after.assign(when="after")], ignore_index=True)
    write_parquet(change, mechanism_path or paths.mechanism(dataset, student, where))
    means = change.groupby(["metric", "when"])["value"].mean().unstack()
    for metric in means.index:
        log.info("  %s on train+val (student's own pools): before %.4f, after %.4f", metric,
                 means.loc[metric, "before"], means.loc[metric, "after"])


KILL_AFTER_STEP = "MECHDISTILL_KILL_AFTER_STEP"  # fault injection: tests kill a run to check that it resumes


def _kill_after_step(step: str | None):
    """on_step that SIGKILLs this process after optimizer step `step` (and its checkpoint), as a crash would."""
    if not step:
        return None
    return lambda row: row["step"] == int(step) and os.kill(os.getpid(), signal.SIGKILL)


def deepspeed_config(settings: dict, tcfg) -> dict | None:
    """The run's DeepSpeed config (distill.deepspeed): `zero3_config` with distill.zero_optimization on top;
    None trains on one device without DeepSpeed."""
    if not settings["deepspeed"]:
        return None
    ds_config = zero3_config(tcfg)
    ds_config["zero_optimization"].update(settings.get("zero_optimization") or {})
    return ds_config


@contextlib.contextmanager
def zero3_init(ds_config: dict | None):
    """While open, transformers' from_pretrained creates models partitioned for ZeRO-3 (no-op without)."""
    if ds_config is None or ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers holds a weak reference to it)
    yield


def read_outside_forward(model, pools: dict[str, HeadPool]) -> list:
    """The parameters the losses read outside their module's forward: W_O of the pooled layers (head
    writes), lm_head (the anchor centroid) and the final norm (the margin gradient)."""
    modules = attention_modules(model)
    layers = sorted({layer for pool in pools.values() for layer in pool.layers})
    return ([p for layer in layers for p in modules[layer].o_proj.parameters()]
            + list(model.lm_head.parameters()) + list(model.model.norm.parameters()))


def _mechanism(model, examples, pools, tau, coarse) -> pd.DataFrame:
    """mechanism_metrics of this rank's examples, gathered from every rank (one row set per document)."""
    frames = gather_to_all(mechanism_metrics(model, examples, pools, tau, coarse))
    return pd.concat(frames, ignore_index=True).drop_duplicates(["doc_id", "metric"], ignore_index=True)


def _macro_f1_criterion(config: dict, dataset: str, student: str, where: str, val: SplitArtifacts,
                        tokenizer) -> Criterion:
    """val_macro_f1: the student, as it is at the evaluation, answers the val prompts greedily with
    student_predict's generation settings, code and parser (`generate_cot` with the in-memory model),
    scored by evaluate.xmc.macro_f1 against the gold labels. A full generation per evaluation: slow."""
    doc_ids = list(val.anchors["doc_id"])
    prompts = val.prompts.loc[doc_ids].reset_index()
    gold = [list(val.docs.loc[doc_id, "labels"]) for doc_id in doc_ids]
    cfg, name = with_distilled_model(config, student, where, paths.student_model_dir(dataset, student, where))
    tok = copy.deepcopy(tokenizer)  # the backend pads on the left; the saved tokenizer stays as it is

    def value(model, row) -> float:
        with tempfile.TemporaryDirectory(prefix="val-generation-") as tmp:
            pred = generate_cot(cfg, name, prompts, val.space, Path(tmp) / "val.parquet", dataset=dataset,
                                split="val", backend_factory=lambda: TransformersBackend.from_model(model, tok, cfg["generation"]))
        return macro_f1(gold, list(pred["pred_labels"]))

    return make_criterion("val_macro_f1", value)


def run_select_distill(config: dict, dataset: str, student: str, method_name: str, *,
                       model_dir: PathLike | None = None, log_path: PathLike | None = None,
                       mechanism_path: PathLike | None = None, selection_path: PathLike | None = None) -> dict:
    """Publish the grid point of `method_name` with the best validation value (distill.select.criterion,
    from each point's train log; ties: the first point) as the method's model/ (weights hard-linked),
    train_log.parquet and mechanism.parquet, and write the selection record (`paths.selection`; see
    `distill.selection.select_point`). Reads each point's files at paths.*(..., grid_method(method, point)).
    Returns the record."""
    points = method_grid(method_name, config["methods"].get(method_name))
    where = {point.name: paths.grid_method(method_name, point.name) for point in points}
    logs = {name: read_parquet(paths.train_log(dataset, student, folder)) for name, folder in where.items()}
    criterion = config["distill"]["select"]["criterion"]
    record = select_point(logs, {point.name: point.values for point in points}, criterion)
    chosen = where[record["point"]]
    link_dir(paths.student_model_dir(dataset, student, chosen),
             model_dir or paths.student_model_dir(dataset, student, method_name))
    for path, target in ((paths.train_log, log_path), (paths.mechanism, mechanism_path)):
        copy_file(path(dataset, student, chosen), target or path(dataset, student, method_name))
    record = {"dataset": dataset, "student": student, "method": method_name, **record}
    write_json(selection_path or paths.selection(dataset, student, method_name), record)
    log.info("select %s/%s: grid point %s, step %s, %s %s (of %d points: %s)", student, method_name, record["point"],
             record["step"], record["criterion"], record["value"], len(points),
             ", ".join(f"{c['point']}: {c['value']}" for c in record["candidates"]))
    return record


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
