"""rules/distill.smk: teacher_targets, baseline_teacher_data, distill (one job per grid point),
select_distill, student_predict."""

from __future__ import annotations

import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from pathlib import Path

import pandas as pd

from .. import paths
from ..characterize.teacher_forcing import length_cap
from ..distill.launch import deepspeed_config, init_distributed, zero3_init
from ..distill.methods import check_methods, grid_point, method_grid, needs_teacher_data, resolve_method
from ..distill.pools import HeadPool, model_pools, pools_json
from ..distill.recipe import MethodPoint, TeacherDataContext
from ..distill.run import DistillResult, RunFiles, distill
from ..distill.selection import Criterion, generation_criterion, make_criterion
from ..distill.settings import (
    BaselineDataSettings,
    DistillSettings,
    StudentPredictSettings,
    TargetSettings,
)
from ..distill.signals import SplitExamples, make_examples
from ..distill.targets import (
    OnlineTargets,
    TeacherTargets,
    compute_target_shards,
    merge_target_shards,
)
from ..distill.train_config import train_config
from ..errors import ConfigError
from ..evaluate.xmc import macro_f1
from ..inflight import in_flight_workers
from ..io import SplitArtifacts, file_digest, read_json, read_parquet, read_split, write_json, write_parquet
from ..labels import LabelSpace
from ..models import ModelCatalog, load_model, pick_device, spec_key, with_distilled_model
from ..shards import Shards, content_key
from ..teacher.backends import STOP_AT_ANSWER, SYNCED_GPUS, make_backend, student_generation, text_generator
from ..teacher.engines import resolve_backend
from ..teacher.generate import answers_across_ranks, answers_in_memory, generate_cot
from ..teacher.prompts import render_prompt
from .model_free import run_select_distill

log = logging.getLogger(__name__)
PathLike = str | os.PathLike

def _pools(settings: TargetSettings, model, dataset: str, model_name: str, coarse_path: PathLike | None = None,
           refine_path: PathLike | None = None) -> dict[str, HeadPool]:
    return model_pools(settings.pools, model, coarse_path or paths.head_scores(dataset, model_name, "coarse"),
                       refine_path or paths.head_scores(dataset, model_name, "refine"))


def run_key(settings: DistillSettings, catalog: ModelCatalog, teacher: str, student: str, method_name: str,
            point: str | None, method_settings: dict, read_files: list[PathLike | None]) -> str:
    """What determines a distillation run besides its TrainConfig (the trainer keys that itself): the
    distill settings, the method at its grid point, the head settings, the seed, both models (their specs
    in `catalog`) and the bytes of every file it reads. A checkpoint made under another key is not
    resumed (`trainer.train`)."""
    files = sorted({str(f) for f in read_files if f is not None and Path(f).is_file()})
    return content_key({k: v for k, v in settings.distill.items() if k != "train"}, method_name, point,
                       method_settings, settings.heads, settings.seed, spec_key(catalog, student),
                       spec_key(catalog, teacher), {f: file_digest(f) for f in files})


def run_teacher_targets(config: dict, dataset: str, split: str, *, inputs: dict[str, PathLike] | None = None,
                        coarse_path: PathLike | None = None, refine_path: PathLike | None = None,
                        out_path: PathLike | None = None, tensors_path: PathLike | None = None) -> None:
    """The teacher's top-k logits and pooled phase signals on a split, teacher-forced on its own
    CoT -> targets/{split}.parquet (one row per document) + targets/{split}.safetensors.

    inputs: the split's files (default `paths.split_files`). Resumable: each shard of
    distill.teacher_shard_size documents is kept when done (`targets.compute_target_shards`), under a key
    of the teacher, the settings that change the targets, the pools and the bytes of the files read; a
    rerun after a kill computes only the unfinished shards. distill.teacher_in_flight documents run on
    the teacher at once. The shards are streamed into the two files at the end, then removed.
    """
    settings, teacher = TargetSettings.from_config(config), config["teacher"]
    inputs = {**paths.split_files(dataset, teacher, split), **(inputs or {})}
    coarse_path = coarse_path or paths.head_scores(dataset, teacher, "coarse")
    refine_path = refine_path or paths.head_scores(dataset, teacher, "refine")
    tensors_path = tensors_path or paths.targets_tensors(dataset, teacher, split)
    catalog = ModelCatalog.from_config(config)
    model, tokenizer = _load_teacher(catalog, teacher, settings)
    pools = _pools(settings, model, dataset, teacher, coarse_path, refine_path)
    examples = make_examples(tokenizer, read_split(inputs, settings.max_docs), teacher,
                             length_cap(settings.max_tokens, model))
    read = {**inputs, "coarse": coarse_path, "refine": refine_path}
    shards = Shards(tensors_path, "shards", content_key(
        spec_key(catalog, teacher), settings.shard_key(), pools_json(pools), [ex.doc_id for ex in examples],
        {name: file_digest(f) for name, f in sorted(read.items()) if Path(f).is_file()}))
    shard_paths = compute_target_shards(model, examples, pools, settings.signals.tau, settings.top_k, shards,
                                        settings.shard_size, in_flight_workers(model, settings.in_flight),
                                        settings.signals.coarse,
                                        desc=f"teacher targets {teacher}",
                                        on_shard=_kill_after_shards(os.environ.get(KILL_AFTER_SHARDS)))
    scales = merge_target_shards(shard_paths, pools, teacher, settings.top_k,
                                 out_path or paths.targets(dataset, teacher, split), tensors_path)
    shards.clear()
    log.info("teacher targets: %d documents, %.1f MB of tensors; interaction scales (RMS of the teacher's "
             "kappa*Align, QK*OV) %s", len(examples), os.path.getsize(tensors_path) / 2**20, scales)


KILL_AFTER_SHARDS = "MECHDISTILL_KILL_AFTER_SHARDS"  # fault injection: tests kill teacher_targets to check it resumes


def _kill_after_shards(count: str | None) -> Callable[[str], None] | None:
    """on_shard that SIGKILLs this process once it has written `count` shards, as a crash would."""
    if count is None:
        return None
    written: list[str] = []

    def on_shard(name: str) -> None:
        written.append(name)
        if len(written) == int(count):
            os.kill(os.getpid(), signal.SIGKILL)
    return on_shard


def _load_teacher(catalog: ModelCatalog, teacher: str, settings: TargetSettings):
    """The teacher (its spec in `catalog`) on distill.train.device, in distill.teacher_dtype, placed by
    distill.teacher_{device_map,max_memory,offload_folder}: (model, tokenizer)."""
    return load_model(catalog, teacher, device=settings.device, dtype=settings.teacher_dtype,
                      **settings.placement)


def run_distill(config: dict, dataset: str, student: str, method_name: str, point: str | None = None, *,
                inputs: dict[str, dict[str, PathLike]] | None = None,
                train_targets_path: PathLike | None = None, val_targets_path: PathLike | None = None,
                student_coarse: PathLike | None = None, student_refine: PathLike | None = None,
                teacher_coarse: PathLike | None = None, teacher_refine: PathLike | None = None,
                model_dir: PathLike | None = None, log_path: PathLike | None = None,
                mechanism_path: PathLike | None = None, ckpt_dir: PathLike | None = None,
                best_path: PathLike | None = None, items_path: PathLike | None = None) -> None:
    """Train `student` with grid point `point` of `method_name` (its recipe, `distill.run.distill`) on the
    teacher's train traces, validating on val every `eval_every` steps and at the end ->
    {student}/{method}/grid/{point}/: model/ (save_pretrained of the best evaluation's weights under
    distill.select.criterion) + train_log.parquet + mechanism.parquet (before training vs the saved
    weights) + best_step.json + training_items.parquet (what it trained and validated on).

    point None: every point of the method's grid, then `run_select_distill` (what Snakemake does for
    the method: its model at paths.student_model_dir); the output paths cannot be given then.
    inputs: per split ("train", "val"), the split's files (default `paths.split_files`; a baseline's
    teacher data under "baseline_data"). Resumes from ckpt_dir when a checkpoint is there.
    """
    heads = dict(student_coarse=student_coarse, student_refine=student_refine, teacher_coarse=teacher_coarse,
                 teacher_refine=teacher_refine)
    if point is None:
        return _run_grid(config, dataset, student, method_name, inputs, train_targets_path, val_targets_path, heads,
                         [model_dir, log_path, mechanism_path, ckpt_dir, best_path, items_path])
    settings, teacher = DistillSettings.from_config(config), config["teacher"]
    catalog, section = ModelCatalog.from_config(config), settings.distill
    check_methods(config["methods"], settings.criterion)
    entry = grid_point(method_name, config["methods"].get(method_name), point)
    method = resolve_method(method_name, entry.settings)
    recipe, inputs = method.load_recipe(), _split_inputs(dataset, teacher, method_name, entry.settings, inputs)
    targets_paths = {"train": train_targets_path or paths.targets_tensors(dataset, teacher, "train"),
                     "val": val_targets_path or paths.targets_tensors(dataset, teacher, "val")}
    tcfg = train_config(section["train"], entry.settings.get("train"), settings.seed)
    read = [f for split in inputs for f in inputs[split].values()] + _head_files(dataset, student, teacher, heads)
    key = run_key(settings, catalog, teacher, student, method_name, point, entry.settings,
                  read + (list(targets_paths.values()) if recipe.needs_targets else []))
    where = paths.grid_method(method_name, point)  # the point's folder, as a `method` argument of paths
    ds_config = deepspeed_config(section["deepspeed"], tcfg, section.get("zero_optimization"))
    rank, world = init_distributed(tcfg.device) if ds_config else (0, 1)
    with zero3_init(ds_config):  # ZeRO-3: each rank loads only its partition of the student
        model, tokenizer = load_model(catalog, student, device="cpu", dtype=section["student_dtype"])
    pools = _pools(settings.targets, model, dataset, student, student_coarse, student_refine)
    splits = {split: read_split(inputs[split], settings.targets.max_docs) for split in ("train", "val")}
    examples = {split: SplitExamples(tokenizer, splits[split], student, length_cap(settings.targets.max_tokens, model))
                for split in splits}  # each built when read: a rank holds those it trains on now
    targets = (_teacher_targets(catalog, teacher, settings, dataset, splits, targets_paths, teacher_coarse, teacher_refine)
               if recipe.needs_targets else None)
    point_settings = MethodPoint(method, point, entry.settings, {**(section.get("weights") or {}),
                                 **(entry.settings.get("weights") or {})}, section["temperature"], settings.signals.tau,
                                 settings.signals.coarse)
    criterion = _criterion(settings, splits["val"], tokenizer, recipe, method, entry.settings.get("params"), rank, world)
    _log_start(f"{student} with {method_name} at grid point {point}", recipe, point_settings, examples, pools, tcfg,
               criterion, world)
    out = RunFiles(*(Path(given or default(dataset, student, where)) for given, default in (
        (model_dir, paths.student_model_dir), (log_path, paths.train_log), (ckpt_dir, paths.checkpoint_dir),
        (best_path, paths.best_step))))
    teacher_data = {split: read_parquet(inputs[split]["baseline_data"]) if "baseline_data" in inputs[split] else None
                    for split in splits}
    started = time.perf_counter()
    result = distill(model, tokenizer, recipe, point_settings, splits, examples=examples, pools=pools, config=tcfg,
                     out=out, criterion=criterion, targets=targets, teacher_data=teacher_data,
                     mechanism_docs=section.get("mechanism_docs"), deepspeed_config=ds_config, rank=rank, world=world,
                     run_key=key, on_step=_kill_after_step(os.environ.get(KILL_AFTER_STEP)),
                     report_config={"run": {"dataset": dataset, "student": student, "teacher": teacher,
                                            "method": method_name, "point": point, "train": asdict(tcfg)},
                                    "config": config})
    _log_result(f"{student}/{method_name}/{point}", result, time.perf_counter() - started)
    if rank == 0:
        write_parquet(result.items, items_path or paths.training_items(dataset, student, where))
        write_parquet(result.mechanism, mechanism_path or paths.mechanism(dataset, student, where))
        # next to best_step.json, for the model card (paths.provenance)
        write_json(Path(best_path).with_name(Path(paths.provenance()).name) if best_path
                   else paths.provenance(dataset, student, where), _provenance())


def _provenance() -> dict[str, str]:
    """What is training now: this process's command line, and the commit of the mechdistill checkout it runs
    ("unknown" outside a git checkout; "+ uncommitted changes" when its tracked files differ)."""
    command = shlex.join(getattr(sys, "orig_argv", sys.argv))
    source = Path(__file__).resolve().parents[2]
    git = partial(subprocess.run, capture_output=True, text=True, cwd=source, check=False)
    try:
        head = git(["git", "rev-parse", "HEAD"])
        dirty = git(["git", "status", "--porcelain", "--untracked-files=no"]).stdout.strip()
    except OSError:  # no git
        return {"command": command, "commit": "unknown"}
    commit = head.stdout.strip() if head.returncode == 0 else "unknown"
    return {"command": command, "commit": commit + (" + uncommitted changes" if dirty and commit != "unknown" else "")}


def _run_grid(config: dict, dataset: str, student: str, method_name: str, inputs, train_targets_path,
              val_targets_path, heads: dict, outputs: list) -> None:
    """run_distill of every point of the method's grid, then its choice (`run_select_distill`)."""
    if any(p is not None for p in outputs):
        raise ValueError("run_distill: output paths belong to one grid point; give `point`")
    for each in method_grid(method_name, config["methods"].get(method_name)):
        run_distill(config, dataset, student, method_name, each.name, inputs=inputs,
                    train_targets_path=train_targets_path, val_targets_path=val_targets_path, **heads)
    run_select_distill(config, dataset, student, method_name)


def _split_inputs(dataset: str, teacher: str, method_name: str, method_settings: dict,
                  inputs: dict[str, dict[str, PathLike]] | None) -> dict[str, dict[str, PathLike]]:
    """Per split, the files a run reads: the split's (paths.split_files), the method's teacher data, overrides."""
    return {split: {**paths.split_files(dataset, teacher, split),
                    **_baseline_input(method_settings, dataset, teacher, method_name, split),
                    **((inputs or {}).get(split) or {})} for split in ("train", "val")}


def _head_files(dataset: str, student: str, teacher: str, heads: dict) -> list:
    return [heads[f"{who}_{kind}"] or paths.head_scores(dataset, model, kind)
            for who, model in (("student", student), ("teacher", teacher)) for kind in ("coarse", "refine")]


def _teacher_targets(catalog: ModelCatalog, teacher: str, distill_settings: DistillSettings, dataset: str,
                     splits: dict, targets_paths: dict, teacher_coarse, teacher_refine) -> TeacherTargets:
    """The teacher's targets of train and val: read from targets/{split}.safetensors, or computed online by the
    teacher in memory (distill.targets: online; with the settings teacher_targets reads)."""
    settings = distill_settings.targets
    if distill_settings.distill["targets"] != "online":
        return TeacherTargets.from_files(targets_paths)
    teacher_model, teacher_tok = _load_teacher(catalog, teacher, settings)
    online = OnlineTargets(teacher_model, _pools(settings, teacher_model, dataset, teacher, teacher_coarse, teacher_refine),
                           settings.signals.tau, settings.top_k, settings.signals.coarse)
    cap = length_cap(settings.max_tokens, teacher_model)
    return TeacherTargets.online(online, {split: SplitExamples(teacher_tok, splits[split], teacher, cap) for split in splits})


def _criterion(settings: DistillSettings, val: SplitArtifacts, tokenizer, recipe, method, params: dict | None,
               rank: int, world: int) -> Criterion:
    """distill.select.criterion; val_macro_f1: the student, as it is at the evaluation, answers the first
    distill.select.val_docs val prompts (all: null) greedily with the generation settings and parser of
    student_predict (a method with its own inference, SemCoT: its recipe's `predict`, as student_predict
    answers for it), scored by evaluate.xmc.macro_f1. Several (ZeRO-3) ranks share the documents, step
    every generation together and all compute the same value (`answers_across_ranks`)."""
    name = settings.criterion
    if name != "val_macro_f1":
        return make_criterion(name)
    doc_ids = list(val.anchors["doc_id"])[:settings.val_docs]
    prompts = val.prompts.loc[doc_ids].reset_index()
    gold = [list(val.docs.loc[doc_id, "labels"]) for doc_id in doc_ids]
    gen = settings.generation.mapping()
    gen = {**gen, "backend": resolve_backend(gen), SYNCED_GPUS: world > 1,
           STOP_AT_ANSWER: True}  # as student_generation: stop at </answer>
    if recipe.predict is not None:  # own inference (method.baseline.own_inference)
        point_params = method.baseline.params(params)
        def answer(model, shard: pd.DataFrame) -> list[list[str]]:
            return [list(labels) for labels in
                    recipe.predict(model, tokenizer, shard, val.space, gen, point_params)["pred_labels"]]
    else:
        def answer(model, shard: pd.DataFrame) -> list[list[str]]:
            return answers_in_memory(model, tokenizer, shard, val.space, gen)
    def score(gold: list[list[str]], answers: list[list[str]]) -> float:
        value = macro_f1(gold, answers)
        log.info("%s on rank %d of %d: %.6f over %d val documents, %d labels answered", name, rank, world, value,
                 len(answers), sum(map(len, answers)))
        return value

    return generation_criterion(name, lambda model: answers_across_ranks(partial(answer, model), prompts, rank, world),
                                gold, score)


def _log_start(run: str, recipe, point: MethodPoint, examples: dict, pools: dict, tcfg, criterion: Criterion,
               world: int) -> None:
    what = (f"switches {point.method.switches or 'all on'}" if recipe.spec is None
            else f"settings {recipe.params(point)}")
    log.info("distill %s (recipe %s, %s): %d train / %d val documents, pools %s, %d steps, best step by %s every %s "
             "steps, %d rank(s)", run, recipe.name, what, len(examples["train"]), len(examples["val"]),
             {p: len(pool.heads) for p, pool in pools.items()}, tcfg.max_steps, criterion.name if criterion else None,
             tcfg.eval_every or tcfg.max_steps, world)


def _log_result(name: str, result: DistillResult, seconds: float) -> None:
    train_log = result.train.log[result.train.log["split"] == "train"]
    best = result.train.best
    log.info("distill %s: %d steps in %.1f s; loss %.4f -> %.4f; saved step %s (%s)", name, result.train.steps, seconds,
             float(train_log["loss"].iloc[0]), float(train_log["loss"].iloc[-1]), best.step if best else result.train.steps,
             f"{best.criterion} {best.value:.4f}" if best else "no validation: the last step")
    means = result.mechanism.groupby(["metric", "when"])["value"].mean().unstack()
    for metric in means.index:
        log.info("  %s on train+val (student's own pools): before %.4f, after %.4f", metric,
                 means.loc[metric, "before"], means.loc[metric, "after"])


def _baseline_input(settings: dict, dataset: str, teacher: str, method_name: str, split: str) -> dict[str, str]:
    """{"baseline_data": its path} for a baseline whose settings ask the teacher for data; {} otherwise."""
    if not needs_teacher_data(method_name, settings):
        return {}
    return {"baseline_data": paths.baseline_data(dataset, teacher, method_name, split)}


def run_baseline_teacher_data(config: dict, dataset: str, method_name: str, *, splits: tuple[str, ...] = ("train", "val"),
                              inputs: dict[str, dict[str, PathLike]] | None = None,
                              out_paths: dict[str, PathLike] | None = None) -> None:
    """A baseline's extra teacher output (its recipe's `teacher_data`: sampled CoTs, structured
    explanations, condensed reasoning) for each of `splits`, generated by the teacher loaded once with
    generation.backend -> {teacher}/baseline_data/{method}/{split}.parquet. `inputs`: per split, paths
    over paths.split_files; `out_paths`: per split, the output file."""
    teacher, settings = config["teacher"], BaselineDataSettings.from_config(config)
    entry = config["methods"][method_name]
    if not needs_teacher_data(method_name, entry):
        raise ConfigError(f"methods.{method_name}: not a baseline whose settings ask the teacher for data")
    method = resolve_method(method_name, entry)
    gen = settings.generation
    recipe, params = method.load_recipe(), method.baseline.params((entry or {}).get("params"), gen.mapping())
    backend = make_backend(ModelCatalog.from_config(config), teacher, gen.mapping(), dataset, splits[0])
    for split in splits:
        split_data = read_split({**paths.split_files(dataset, teacher, split), **((inputs or {}).get(split) or {})},
                                settings.max_docs)
        ctx = TeacherDataContext(text_generator(backend, gen.batch_size, f"{method_name} teacher {split}"),
                                 lambda messages: render_prompt(backend.tok, messages), split_data, split, params,
                                 gen.seed)
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


def run_student_predict(config: dict, dataset: str, student: str, method: str, *, model_dir: PathLike | None = None,
                        prompts_path: PathLike | None = None, labels_path: PathLike | None = None,
                        selection_path: PathLike | None = None, out_path: PathLike | None = None) -> None:
    """Greedy CoT + answer of a distilled student on the test prompts (same prompt, settings and
    parser as the teacher; the engine of generation.student_backend) -> {student}/{method}/pred/test.parquet. A baseline with its own inference
    (SemCoT's implicit thought tokens) answers through its recipe's `predict`, with the settings of the
    grid point select_distill chose (selection.json)."""
    settings = StudentPredictSettings.from_config(config, method=method)
    gen = settings.generation.mapping()
    model_dir = model_dir or paths.student_model_dir(dataset, student, method)
    catalog, name = with_distilled_model(ModelCatalog.from_config(config), student, method, model_dir)
    prompts = read_parquet(prompts_path or paths.prompts(dataset, "test"), "prompts")
    space = LabelSpace(read_parquet(labels_path or paths.labels(dataset), "labels"))
    out_path = out_path or paths.student_pred(dataset, student, method, "test")
    resolved = resolve_method(method, settings.method)
    if resolved.baseline is not None and resolved.baseline.own_inference:
        recipe = resolved.load_recipe()
        point = read_json(selection_path or paths.selection(dataset, student, method))["point"]
        params = resolved.baseline.params(grid_point(method, settings.method, point).settings.get("params"))
        model, tokenizer = load_model(catalog, name, device=pick_device(settings.generation.device),
                                      dtype=settings.generation.dtype)
        pred = recipe.predict(model, tokenizer, prompts, space, gen, params)
        write_parquet(pred, out_path, "cot")
    else:
        pred = generate_cot(catalog, name, prompts, space, out_path, dataset=dataset, split="test",
                            gen=student_generation(gen))
    log.info("student %s/%s: %d predictions, %d with an answer block", student, method, len(pred),
             int(pred["has_answer_block"].sum()))
