"""rules/distill.smk: teacher_targets, baseline_teacher_data, distill (one job per grid point),
select_distill, student_predict."""

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
from ..characterize.teacher_forcing import length_cap
from ..distill.backends import zero3_config
from ..distill.baselines.recipe import Item, RecipeContext, TeacherDataContext, items_frame
from ..distill.launch import gather_to_all, init_distributed, shard
from ..distill.methods import check_methods, grid_point, method_grid, needs_teacher_data, resolve_method
from ..distill.objective import student_loss
from ..distill.pools import HeadPool, model_pools
from ..distill.run_state import resumable
from ..distill.selection import make_criterion
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
from ..distill.train_config import train_config
from ..distill.trainer import Criterion, Padding, train
from ..errors import ConfigError
from ..evaluate.xmc import macro_f1
from ..io import SplitArtifacts, file_digest, read_json, read_parquet, read_split, write_parquet
from ..labels import LabelSpace
from ..models import load_model, pick_device, placement, spec_key, with_distilled_model
from ..shards import content_key
from ..teacher.backends import TransformersBackend, make_backend, student_generation, text_generator
from ..teacher.generate import generate_cot
from ..teacher.prompts import render_prompt
from .model_free import run_select_distill

log = logging.getLogger(__name__)
PathLike = str | os.PathLike

def _pools(config: dict, model, dataset: str, model_name: str, coarse_path: PathLike | None = None,
           refine_path: PathLike | None = None) -> dict[str, HeadPool]:
    return model_pools(config["distill"]["pools"], model, coarse_path or paths.head_scores(dataset, model_name, "coarse"),
                       refine_path or paths.head_scores(dataset, model_name, "refine"))


def run_key(config: dict, student: str, method_name: str, point: str | None, method_settings: dict,
            read_files: list[PathLike | None]) -> str:
    """What determines a distillation run besides its TrainConfig (the trainer keys that itself): the
    distill settings, the method at its grid point, the head settings, both models and the bytes of
    every file it reads. A checkpoint made under another key is not resumed (`trainer.train`)."""
    files = sorted({str(f) for f in read_files if f is not None and Path(f).is_file()})
    return content_key({k: v for k, v in config["distill"].items() if k != "train"}, method_name, point,
                       method_settings, config["heads"], config["seed"], spec_key(config, student),
                       spec_key(config, config["teacher"]), {f: file_digest(f) for f in files})


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
    examples = make_examples(tokenizer, read_split(inputs, settings.get("max_docs")), teacher,
                             length_cap(settings.get("max_tokens"), model))
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
                best_path: PathLike | None = None, items_path: PathLike | None = None) -> None:
    """Train `student` with grid point `point` of `method_name` on the teacher's train traces,
    validating on val every `eval_every` steps and at the end -> {student}/{method}/grid/{point}/:
    model/ (save_pretrained of the best evaluation's weights under distill.select.criterion) +
    train_log.parquet + mechanism.parquet (before training vs the saved weights) + best_step.json +
    training_items.parquet (what it trained and validated on). A baseline (a method with a recipe)
    trains on its recipe's items and loss, with its teacher data read from `paths.baseline_data`.

    point None: every point of the method's grid, then `run_select_distill` (what Snakemake does for
    the method: its model at paths.student_model_dir); the output paths cannot be given then.
    inputs: per split ("train", "val"), the split's files (default `paths.split_files`; a baseline's
    teacher data under "baseline_data"). Resumes from ckpt_dir when a checkpoint is there.
    """
    if point is None:
        if any(p is not None for p in (model_dir, log_path, mechanism_path, ckpt_dir, best_path, items_path)):
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
    method_settings = grid_point(method_name, config["methods"].get(method_name), point).settings
    method = resolve_method(method_name, method_settings)
    inputs = {split: {**paths.split_files(dataset, teacher, split), **_baseline_input(method_settings, dataset, teacher,
                                                                                      method_name, split),
                      **((inputs or {}).get(split) or {})} for split in ("train", "val")}
    tcfg = train_config(settings["train"], method_settings.get("train"), config["seed"])
    read_files = [f for split in inputs for f in inputs[split].values()] + [
        student_coarse or paths.head_scores(dataset, student, "coarse"),
        student_refine or paths.head_scores(dataset, student, "refine"),
        teacher_coarse or paths.head_scores(dataset, teacher, "coarse"),
        teacher_refine or paths.head_scores(dataset, teacher, "refine"),
        train_targets_path or paths.targets_tensors(dataset, teacher, "train"),
        val_targets_path or paths.targets_tensors(dataset, teacher, "val")]
    key = run_key(config, student, method_name, point, method_settings, read_files)
    where = paths.grid_method(method_name, point)  # the point's folder, as a `method` argument of paths
    ckpt = Path(ckpt_dir or paths.checkpoint_dir(dataset, student, where))
    started = time.perf_counter()
    ds_config = deepspeed_config(settings, tcfg)
    rank, world = init_distributed(tcfg.device) if ds_config else (0, 1)
    if method.baseline is not None and method.baseline.own_inference and settings["select"]["criterion"] == "val_macro_f1":
        raise ConfigError(f"methods.{method_name}: {method.baseline.name} answers through its own inference, which "
                          "distill.select.criterion val_macro_f1 does not run; use val_cot_loss")
    if world > 1 and settings["select"]["criterion"] == "val_macro_f1":
        raise ConfigError("distill.select.criterion val_macro_f1 generates with the student on every evaluation, "
                          f"which {world} ZeRO-3 ranks cannot share; use val_cot_loss, or one rank")
    with zero3_init(ds_config):  # ZeRO-3: each rank loads only its partition of the student
        model, tokenizer = load_model(config, student, device="cpu", dtype=settings["student_dtype"])
    pools = _pools(config, model, dataset, student, student_coarse, student_refine)
    splits = {split: read_split(inputs[split], settings.get("max_docs"))
              for split in ("train", "val")}
    examples = {split: make_examples(tokenizer, splits[split], student, length_cap(settings.get("max_tokens"), model))
                for split in splits}
    recipe = method.baseline.recipe() if method.baseline is not None else None
    if recipe is None:
        loss_fn, batches = _mechanistic_objective(config, dataset, settings, method, method_settings, splits, examples,
                                                  teacher_coarse, teacher_refine, train_targets_path, val_targets_path,
                                                  pools, coarse)
        recorded = lambda: [_example_rows(examples[split], split) for split in examples]  # noqa: E731
        if not batches["train"]:
            raise ConfigError(f"distill {student}/{method_name}: no training example (all CoTs empty?)")
        val_batches = shard(batches["val"], rank, world, pad=Padding) or None  # every rank runs as many val forwards
        train_items = lambda epoch: batches["train"]  # noqa: E731
        prepare = None
    else:
        baseline = _Baseline(recipe, recipe.params(method_settings.get("params")), tokenizer, splits, tcfg.seed,
                             {split: inputs[split].get("baseline_data") for split in splits},
                             ckpt, resumable(ckpt, tcfg, key), rank, world)
        loss_fn, train_items, val_batches, prepare = baseline.loss, baseline.epoch, baseline.val, baseline.prepare
        recorded = baseline.recorded

    def train_batches(epoch: int):  # the same global order on every rank; each reads its shard
        order = list(train_items(epoch))
        random.Random(f"{tcfg.seed}:{epoch}").shuffle(order)
        return shard(order, rank, world)

    if world > 1 and recipe is None:
        log.info("rank %d of %d reads %s of the training documents in epoch 0 and %s of val", rank, world,
                 [ex.doc_id for ex, _ in train_batches(0)], [b[0].doc_id for b in val_batches or []
                                                             if not isinstance(b, Padding)])

    criterion_name = settings["select"]["criterion"]
    criterion = (_macro_f1_criterion(config, dataset, student, where, splits["val"], tokenizer)
                 if criterion_name == "val_macro_f1" else make_criterion(criterion_name))
    log.info("distill %s with %s at grid point %s (%s): %d train / %d val documents, pools %s, %d steps, best step "
             "by %s every %s steps, %d rank(s)", student, method_name, point,
             f"switches {method.switches or 'all on'}" if recipe is None
             else f"baseline {recipe.name}, settings {baseline.params}", len(examples["train"]), len(examples["val"]),
             {p: len(pool.heads) for p, pool in pools.items()}, tcfg.max_steps, criterion_name,
             tcfg.eval_every or tcfg.max_steps, world)
    measured = (examples["train"] + examples["val"])[:settings.get("mechanism_docs")]  # val alone rarely has refinement positions
    log.info("mechanism metrics before and after training on %d of the %d train+val documents", len(measured),
             len(examples["train"]) + len(examples["val"]))
    scored = shard(measured, rank, world)
    before = []  # the initial weights' metrics, measured once the backend is ready (ZeRO-3 needs its hooks)

    def on_start(module) -> None:
        before.append(_mechanism(module, scored, pools, tau, coarse))
        if prepare is not None:
            prepare(module)  # a baseline's items: some score their data with the student (MoRSD)

    result = train(model, loss_fn, train_batches, tcfg, model_dir or paths.student_model_dir(dataset, student, where),
                   val_batches=val_batches, tokenizer=tokenizer,
                   log_path=log_path or paths.train_log(dataset, student, where),
                   ckpt_dir=ckpt,
                   deepspeed_config=ds_config, criterion=criterion, whole_params=read_outside_forward(model, pools),
                   on_start=on_start, run_key=key,
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
    write_parquet(pd.concat(recorded(), ignore_index=True),
                  items_path or paths.training_items(dataset, student, where))
    change = pd.concat([before[0].assign(when="before"), after.assign(when="after")], ignore_index=True)
    write_parquet(change, mechanism_path or paths.mechanism(dataset, student, where))
    means = change.groupby(["metric", "when"])["value"].mean().unstack()
    for metric in means.index:
        log.info("  %s on train+val (student's own pools): before %.4f, after %.4f", metric,
                 means.loc[metric, "before"], means.loc[metric, "after"])


def _mechanistic_objective(config: dict, dataset: str, settings: dict, method, method_settings: dict, splits: dict,
                           examples: dict, teacher_coarse, teacher_refine, train_targets_path, val_targets_path,
                           pools: dict[str, HeadPool], coarse: CoarseVariant):
    """loss_fn and the (example, split) batches of vanilla, mech and its ablations: `student_loss` against
    the teacher's targets (precomputed, or computed online with the teacher in memory)."""
    teacher, tau = config["teacher"], config["heads"]["tau"]
    if settings["targets"] == "online":
        teacher_model, teacher_tok = load_model(config, teacher, device=settings["train"]["device"],
                                                dtype=settings["teacher_dtype"], **placement(settings, "teacher_"))
        online = OnlineTargets(teacher_model, _pools(config, teacher_model, dataset, teacher, teacher_coarse,
                                                     teacher_refine), tau, settings["top_k"], coarse)
        for split in splits:
            online.add(make_examples(teacher_tok, splits[split], teacher,
                                     length_cap(settings.get("max_tokens"), teacher_model)))
        get_targets = {split: online for split in splits}
        has_targets = {split: set(online.examples) for split in splits}
        scales = interaction_scales(online(doc_id) for doc_id in splits["train"].anchors["doc_id"]
                                    if doc_id in online.examples)
    else:
        train_path = train_targets_path or paths.targets_tensors(dataset, teacher, "train")
        loaded = {"train": load_targets(train_path),
                  "val": load_targets(val_targets_path or paths.targets_tensors(dataset, teacher, "val"))}
        get_targets = {split: loaded[split].__getitem__ for split in splits}
        has_targets = {split: set(loaded[split]) for split in splits}
        scales = load_interaction_scales(train_path)  # the training targets' scale, for train and val alike
    weights = {**(settings.get("weights") or {}), **(method_settings.get("weights") or {})}
    log.info("loss weights %s, interaction scales %s", weights, scales)

    def loss_fn(model, batch):
        ex, split = batch
        return student_loss(model, ex, get_targets[split](ex.doc_id), pools, method, tau, settings["temperature"],
                            weights, coarse=coarse, scales=scales)

    for split in examples:  # the teacher skipped them (longer than its max_tokens): no target to learn from
        untargeted = [ex.doc_id for ex in examples[split] if ex.doc_id not in has_targets[split]]
        if untargeted:
            log.warning("%s: %d documents have no teacher targets (skipped by the teacher's length cap?) and are "
                        "not trained on: %s", split, len(untargeted), untargeted[:10])
    return loss_fn, {split: [(ex, split) for ex in examples[split] if ex.doc_id in has_targets[split]]
                     for split in examples}


def _example_rows(examples: list, split: str) -> pd.DataFrame:
    """training_items rows of teacher-forced examples: the whole sequence, the CoT + answer supervised."""
    return pd.DataFrame([{"split": split, "epoch": None, "doc_id": ex.doc_id, "n_tokens": len(ex.input_ids),
                          "n_supervised": len(ex.cot_positions)} for ex in examples])


def _baseline_input(settings: dict, dataset: str, teacher: str, method_name: str, split: str) -> dict[str, str]:
    """{"baseline_data": its path} for a baseline whose settings ask the teacher for data; {} otherwise."""
    if not needs_teacher_data(method_name, settings):
        return {}
    return {"baseline_data": paths.baseline_data(dataset, teacher, method_name, split)}


class _Baseline:
    """A baseline's training on one rank: its items (built once the backend is ready, `prepare`), the
    items of each epoch (with the relabelling of recipes that have one), its loss, and what it trained on.

    Relabelling (CWT's skippable chunks) happens once, at the first epoch >= params["skip_from_epoch"],
    with the student as it is then, on every rank over every item (ZeRO-3 ranks run the same forwards);
    the labels are kept next to the checkpoint (ckpt.relabel.parquet), so a resumed run reuses them, and
    dropped when a run starts afresh."""

    def __init__(self, recipe, params: dict, tokenizer, splits: dict, seed: int, data_paths: dict,
                 ckpt_dir: Path, resuming: bool, rank: int, world: int) -> None:
        self.recipe, self.params, self.rank, self.world = recipe, params, rank, world
        teacher_data = {split: read_parquet(path) if path else None for split, path in data_paths.items()}
        self.contexts = {split: RecipeContext(tokenizer, splits[split], split, params, seed, teacher_data[split])
                         for split in splits}
        self.items: dict[str, list[Item]] = {}
        self.val = _Deferred() if len(splits["val"].anchors) else None
        self.labels_path = ckpt_dir.with_name(f"{ckpt_dir.name}.relabel.parquet")
        self.labels: pd.DataFrame | None = None
        self.epochs: dict[int, list[Item]] = {}
        self.module = None
        if recipe.relabel is not None and not resuming:
            self.labels_path.unlink(missing_ok=True)  # a fresh run: labels of an earlier run are stale

    def prepare(self, module) -> None:
        self.module = module
        for split, ctx in self.contexts.items():
            ctx.model = module
            self.items[split] = self.recipe.items(ctx)
            ctx.model = None
            log.info("%s: %d %s items (%d tokens, %d supervised)", self.recipe.name, len(self.items[split]), split,
                     sum(i.input_ids.numel() for i in self.items[split]),
                     sum(int(i.supervised.sum()) for i in self.items[split]))
        if not self.items["train"]:
            raise ConfigError(f"{self.recipe.name}: no training item (all CoTs empty, or no rationale selected?)")
        if self.val is not None:
            self.val.items = shard([(item, "val") for item in self.items["val"]], self.rank, self.world,
                                   pad=Padding)

    def epoch(self, epoch: int) -> list:
        if self.recipe.epoch_items is None:
            return [(item, "train") for item in self.items["train"]]
        if self.recipe.relabel is not None and epoch >= self.params["skip_from_epoch"] and self.labels is None:
            self.labels = self._relabel()
        items = self.recipe.epoch_items(self.contexts["train"], self.items["train"], epoch, self.labels)
        self.epochs[epoch] = items
        return [(item, "train") for item in items]

    def _relabel(self) -> pd.DataFrame:
        if self.labels_path.exists():
            log.info("%s: relabelling read back from %s", self.recipe.name, self.labels_path)
            return read_parquet(self.labels_path)
        was_training = self.module.training
        labels = self.recipe.relabel(self.contexts["train"], self.items["train"], self.module)
        self.module.train(was_training)
        if self.rank == 0:
            write_parquet(labels, self.labels_path)
        log.info("%s: relabelled %d rows with the student as it is now -> %s", self.recipe.name, len(labels),
                 self.labels_path)
        return labels

    def loss(self, model, batch):
        item, _split = batch
        return self.recipe.loss(model, item, self.params)

    def recorded(self) -> list[pd.DataFrame]:
        """training_items rows: the fixed items of train and val, then each epoch's items, if they change."""
        frames = [items_frame(self.items[split], split) for split in self.items]
        frames += [items_frame(items, "train", epoch) for epoch, items in sorted(self.epochs.items())]
        if self.labels is not None:
            self.labels_path.unlink(missing_ok=True)
        return frames


class _Deferred:
    """The val batches of a baseline, filled in once the backend is ready (`_Baseline.prepare`)."""

    def __init__(self) -> None:
        self.items: list = []

    def __iter__(self):
        return iter(self.items)


def run_baseline_teacher_data(config: dict, dataset: str, method_name: str, *, splits: tuple[str, ...] = ("train", "val"),
                              inputs: dict[str, dict[str, PathLike]] | None = None,
                              out_paths: dict[str, PathLike] | None = None) -> None:
    """A baseline's extra teacher output (its recipe's `teacher_data`: sampled CoTs, structured
    explanations, condensed reasoning) for each of `splits`, generated by the teacher loaded once with
    generation.backend -> {teacher}/baseline_data/{method}/{split}.parquet. `inputs`: per split, paths
    over paths.split_files; `out_paths`: per split, the output file."""
    teacher = config["teacher"]
    settings = config["methods"][method_name]
    if not needs_teacher_data(method_name, settings):
        raise ConfigError(f"methods.{method_name}: not a baseline whose settings ask the teacher for data")
    baseline = resolve_method(method_name, settings).baseline
    recipe, params = baseline.recipe(), baseline.params((settings or {}).get("params"))
    gen = config["generation"]
    backend = make_backend(config, teacher, gen, dataset, splits[0])
    for split in splits:
        split_data = read_split({**paths.split_files(dataset, teacher, split), **((inputs or {}).get(split) or {})},
                                config["distill"].get("max_docs"))
        ctx = TeacherDataContext(text_generator(backend, gen.get("batch_size", 8), f"{method_name} teacher {split}"),
                                 lambda messages: render_prompt(backend.tok, messages), split_data, split, params,
                                 config["seed"])
        frame = recipe.teacher_data(ctx)
        write_parquet(frame, (out_paths or {}).get(split) or paths.baseline_data(dataset, teacher, method_name, split))
        log.info("%s teacher data for %s: %d rows for %d documents", method_name, split, len(frame),
                 frame["doc_id"].nunique() if len(frame) else 0)
    if hasattr(backend, "close"):  # vLLM's engine process
        backend.close()


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


def run_student_predict(config: dict, dataset: str, student: str, method: str, *, model_dir: PathLike | None = None,
                        prompts_path: PathLike | None = None, labels_path: PathLike | None = None,
                        selection_path: PathLike | None = None, out_path: PathLike | None = None) -> None:
    """Greedy CoT + answer of a distilled student on the test prompts (same prompt, settings and
    parser as the teacher; the engine of generation.student_backend) -> {student}/{method}/pred/test.parquet. A baseline with its own inference
    (SemCoT's implicit thought tokens) answers through its recipe's `predict`, with the settings of the
    grid point select_distill chose (selection.json)."""
    model_dir = model_dir or paths.student_model_dir(dataset, student, method)
    cfg, name = with_distilled_model(config, student, method, model_dir)
    cfg["generation"] = student_generation(config["generation"])
    prompts = read_parquet(prompts_path or paths.prompts(dataset, "test"), "prompts")
    space = LabelSpace(read_parquet(labels_path or paths.labels(dataset), "labels"))
    out_path = out_path or paths.student_pred(dataset, student, method, "test")
    baseline = resolve_method(method, config["methods"].get(method)).baseline
    if baseline is not None and baseline.own_inference:
        recipe = baseline.recipe()
        point = read_json(selection_path or paths.selection(dataset, student, method))["point"]
        params = recipe.params(grid_point(method, config["methods"].get(method), point).settings.get("params"))
        model, tokenizer = load_model(cfg, name, device=pick_device(config["generation"].get("device", "auto")),
                                      dtype=config["generation"].get("dtype"))
        pred = recipe.predict(model, tokenizer, prompts, space, config["generation"], params)
        write_parquet(pred, out_path, "cot")
    else:
        pred = generate_cot(cfg, name, prompts, space, out_path, dataset=dataset, split="test")
    log.info("student %s/%s: %d predictions, %d with an answer block", student, method, len(pred),
             int(pred["has_answer_block"].sum()))
