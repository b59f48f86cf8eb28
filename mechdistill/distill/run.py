"""One distillation run of any method: a `Recipe`'s items and loss, trained by `trainer.train`, with
the mechanism metrics of the student's pools measured before and after.

    result = distill(student, tokenizer, recipe, point, splits, examples=..., pools=..., config=tcfg,
                     out=RunFiles.next_to(model_dir), targets=TeacherTargets.from_files(...))
    result.items       # what it trained and validated on (training_items.parquet)
    result.mechanism   # Sharpness, AnchorAlign, LoopBack, Helpfulness per document, before and after

Works without Snakemake (a notebook can call it with a model in memory); the `distill` stage reads
the artifacts, builds the arguments and writes what it returns.

Items. A recipe builds its items per split from a `RecipeContext`. Those that score items with the
student (`Recipe.items_need_student`: MoRSD's rationale difficulty, CWT's chunk search) build them
once the trainer's backend is ready (ZeRO-3 forwards work only from then on), the others before
training. Every rank builds the same global order of an epoch and reads its shard (`launch.shard`).
Items scored with the student and relabelling are shared by the ranks: each scores every world-th
request and all gather the results (`baselines.causal_lm.across_ranks`), so every rank ends with the
items and labels one process would make. Relabelling (CWT's skippable chunks) happens once, at the
first epoch >= params["skip_from_epoch"], with the student as it is then; the labels are kept next to the
checkpoint (ckpt.relabel.parquet), so a resumed run reuses them, and dropped when a run starts afresh.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from torch import nn

from ..errors import ConfigError
from ..io import SplitArtifacts, read_parquet, write_parquet
from .launch import shard
from .objective import read_outside_forward
from .pools import HeadPool
from .recipe import Item, MethodPoint, Recipe, RecipeContext, items_frame
from .run_state import resumable
from .selection import Criterion
from .signals import Example, chain, gathered_mechanism_metrics
from .targets import TeacherTargets
from .train_config import TrainConfig
from .trainer import Padding, TrainResult, train

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunFiles:
    """Where a run writes: the best weights (save_pretrained), its train log, checkpoint and best-step record."""

    model_dir: Path
    log: Path
    ckpt_dir: Path
    best: Path


@dataclass
class DistillResult:
    train: TrainResult
    items: pd.DataFrame       # training_items.parquet: split, epoch, doc_id, n_tokens, n_supervised, the recipe's columns
    mechanism: pd.DataFrame   # mechanism.parquet: doc_id, metric, value, when (before | after)


class RecipeItems:
    """A recipe's items on one rank: built per split (`build`), the items of each epoch (with the
    relabelling of recipes that have one), the val batches, and what was trained on (`recorded`)."""

    def __init__(self, name: str, recipe: Recipe, contexts: Mapping[str, RecipeContext], ckpt_dir: Path,
                 resuming: bool, rank: int, world: int) -> None:
        self.name, self.recipe, self.contexts, self.rank, self.world = name, recipe, contexts, rank, world
        self.params = contexts["train"].params
        self.items: dict[str, list[Item]] = {}
        self.val: list = []  # filled by `build`; the trainer iterates it at each evaluation
        self.labels_path = ckpt_dir.with_name(f"{ckpt_dir.name}.relabel.parquet")
        self.labels: pd.DataFrame | None = None
        self.epochs: dict[int, list[Item]] = {}
        self.module: nn.Module | None = None
        if recipe.relabel is not None and not resuming:
            self.labels_path.unlink(missing_ok=True)  # a fresh run: labels of an earlier run are stale

    def build(self, module: nn.Module | None = None) -> None:
        """Every split's items (with the student `module` in the context while they are built)."""
        self.module = module
        for split, ctx in self.contexts.items():
            ctx.model = module
            self.items[split] = self.recipe.items(ctx)
            ctx.model = None
            counts = [item.summary() for item in self.items[split]]  # (an item may make its tokens only when read)
            log.info("%s: %d %s items (%d tokens, %d supervised)", self.recipe.name, len(self.items[split]), split,
                     sum(c["n_tokens"] for c in counts), sum(c["n_supervised"] for c in counts))
        if not self.items["train"]:
            raise ConfigError(f"{self.name}: no training item (all CoTs empty, no teacher targets, or no rationale "
                              "selected?)")
        self.val[:] = shard([(item, "val") for item in self.items["val"]], self.rank, self.world, pad=Padding)

    def epoch(self, epoch: int) -> list:
        """The (item, "train") batches of `epoch`, in the same global order on every rank."""
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

    def loss(self, model: nn.Module, batch: tuple[Item, str]) -> dict:
        item, _split = batch
        return self.recipe.loss(model, item, self.params)

    def recorded(self) -> pd.DataFrame:
        """training_items rows: the fixed items of train and val, then each epoch's items, if they change."""
        frames = [items_frame(self.items[split], split) for split in self.items]
        frames += [items_frame(items, "train", epoch) for epoch, items in sorted(self.epochs.items())]
        if self.labels is not None:
            self.labels_path.unlink(missing_ok=True)
        return pd.concat(frames, ignore_index=True)


def distill(model: nn.Module, tokenizer: Any, recipe: Recipe, point: MethodPoint,
            splits: Mapping[str, SplitArtifacts], *, examples: Mapping[str, Sequence[Example]],
            pools: Mapping[str, HeadPool], config: TrainConfig, out: RunFiles, criterion: Criterion | None,
            targets: TeacherTargets | None = None, teacher_data: Mapping[str, pd.DataFrame | None] | None = None,
            mechanism_docs: int | None = None, deepspeed_config: dict | None = None, rank: int = 0,
            world: int = 1, run_key: str = "", on_step: Callable[[dict], None] | None = None,
            report_config: Mapping[str, Any] | None = None) -> DistillResult:
    """Train `model` with `recipe` at grid point `point` on splits "train" and "val" (module docstring).

    examples: each split's teacher-forced examples for this student (`signals.SplitExamples`, each
    built when read, or `signals.make_examples`), which the mechanism metrics measure (the first
    `mechanism_docs` of train + val, each rank its shard of them) and a recipe may train on; pools: the student's head pools; targets: the teacher's, for a recipe that `needs_targets`.
    criterion: the best evaluation's rule (`selection.make_criterion`); deepspeed_config, rank, world:
    a ZeRO-3 run on `world` ranks (`launch`); run_key: what besides `config` determined the run (a
    checkpoint made under another key is not resumed); report_config: what config.report_to's curves
    show as the run's config (default: `config`), next to `out.model_dir`, named after the method and point."""
    if recipe.needs_targets and targets is None:
        raise ValueError(f"{recipe.name}: its items train on the teacher's targets; pass `targets`")
    params = recipe.params(point)
    contexts = {split: RecipeContext(tokenizer, splits[split], split, params, config.seed,
                                     (teacher_data or {}).get(split), examples=examples[split], pools=pools,
                                     targets=targets, rank=rank, world=world) for split in ("train", "val")}
    items = RecipeItems(point.method.name, recipe, contexts, out.ckpt_dir, resumable(out.ckpt_dir, config, run_key), rank, world)
    if not recipe.items_need_student:
        items.build()
    measured = chain(examples["train"], examples["val"])[:mechanism_docs]  # val alone rarely has refinement positions
    log.info("mechanism metrics before and after training on %d of the %d train+val documents", len(measured),
             len(examples["train"]) + len(examples["val"]))
    scored = measured.take(shard(range(len(measured)), rank, world))  # this rank's, each built when measured
    before: list[pd.DataFrame] = []  # the initial weights' metrics, measured once the backend is ready (ZeRO-3)

    def on_start(module: nn.Module) -> None:
        before.append(gathered_mechanism_metrics(module, scored, pools, point.tau, point.coarse))
        if recipe.items_need_student:
            items.build(module)
        if world > 1 and recipe.epoch_items is None:  # (an epoch of relabelled items waits for its epoch)
            log.info("rank %d of %d reads %s of the training items in epoch 0 and %s of val", rank, world,
                     [item.doc_id for item, _ in train_batches(0)],
                     [b[0].doc_id for b in items.val if not isinstance(b, Padding)])

    def train_batches(epoch: int) -> list:  # the same global order on every rank; each reads its shard
        order = list(items.epoch(epoch))
        random.Random(f"{config.seed}:{epoch}").shuffle(order)
        return shard(order, rank, world)

    has_val = bool(items.val) if not recipe.items_need_student else len(splits["val"].anchors) > 0
    result = train(model, items.loss, train_batches, config, out.model_dir, val_batches=items.val if has_val else None,
                   tokenizer=tokenizer, log_path=out.log, ckpt_dir=out.ckpt_dir, deepspeed_config=deepspeed_config,
                   criterion=criterion, whole_params=read_outside_forward(model, pools), on_start=on_start,
                   run_key=run_key, record_path=out.best, keep_checkpoint=False, on_step=on_step,
                   report_config=report_config, report_name=f"{point.method.name}/{point.point}")
    after = gathered_mechanism_metrics(model, scored, pools, point.tau, point.coarse)  # the saved weights
    mechanism = pd.concat([before[0].assign(when="before"), after.assign(when="after")], ignore_index=True)
    return DistillResult(result, items.recorded(), mechanism)

