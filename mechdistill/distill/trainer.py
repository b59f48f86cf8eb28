"""A small, generic distillation trainer: AdamW, cosine schedule, accumulation, exact resume.

The trainer knows nothing about the losses. It calls

    loss_fn(model, batch) -> {"loss": total, "<term>": value, ...}

and backpropagates `loss` (divided by the number of accumulation micro-batches); every other
entry is only logged. A frozen teacher used inside `loss_fn` gets no gradient: only the
trainable parameters of `model` (requires_grad=True) go to the optimizer.

Data comes from a factory `train_batches(epoch) -> Iterable[batch]` that must yield the same
batches, in the same order, every time it is called with the same epoch (seed its own shuffling
with `seed + epoch`, never with the global RNG). The trainer cycles epochs until `max_steps`
optimizer steps; a checkpoint stores (epoch, batch index) and a resumed run skips the batches
already consumed, so an interrupted run ends with the same weights as an uninterrupted one
(bit for bit on CPU).

Best step. Every evaluation on `val_batches` (every `eval_every` steps and at the end) computes
a `Criterion` (default: the mean validation loss), logged in the val row under its name; the
weights of the best evaluation (strictly better; ties keep the earliest step) are saved as they
appear, and those are the weights written to `out_dir`, not the last ones. Without val_batches
(or with criterion=None) the last weights are written.


Files: `run_state` (checkpoints, the best step's weights, the log, best_step.json); how a step is
taken, on one device or under DeepSpeed: `backends`; the settings: `train_config.TrainConfig`.
Live curves: with `config.report_to`, rank 0 streams every log row as it is appended (and, on resume, the
rows restored) to TensorBoard and/or W&B next to `out_dir` (`reporting`); the Parquet log stays the record.

`train` resumes automatically when `ckpt_dir` holds a checkpoint, with the best step so far (its
weights stay in ckpt_dir.best until a later checkpoint records a better one).

Activation checkpointing (`config.gradient_checkpointing`): `enable_gradient_checkpointing`, before
the backend wraps the model.

Multi-GPU: pass `deepspeed_config` (e.g. `zero3_config(config)`) and start one process per rank
(torchrun, srun: `distill.launch`); the model is wrapped with `deepspeed.initialize`. For ZeRO-3 the
model must be created after `transformers.integrations.HfDeepSpeedConfig(ds_config)` so that its
weights are partitioned at load time, and each rank's `train_batches` must yield its own shard of
every global batch (`launch.shard`); val batches wrapped in `Padding` run but do not count, so every
rank can run the same number of forwards. Parameters a loss reads outside their module's forward go
in `whole_params` (kept whole on every rank). A new best gathers the 16-bit weights onto rank 0 (a
collective, as the final save is) and rank 0 writes them; the criterion runs on every rank with the
unwrapped module (a criterion that generates must let every rank take part). The engine keeps the
last step's weights in memory; out_dir gets the best step's.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..io import make_empty_dir, publish_dir, recover_dir, temp_dir_for, write_json
from .backends import STATE_FILE, make_backend
from .reporting import open_reporters
from .run_state import (
    LOG_FILE,
    RECORD_FILE,
    Batch,
    BestStep,
    LossFn,
    Progress,
    Run,
    checkpoint_key,
    stale_checkpoint,
)
from .selection import VAL_LOSS, Criterion
from .train_config import TrainConfig

logger = logging.getLogger(__name__)

TrainBatches = Callable[[int], Iterable[Batch]]


@dataclass
class TrainResult:
    """What `train` did: steps done (in total, over resumes), whether it stopped early, the log,
    and the best evaluation, whose weights are in out_dir (None: no evaluation, the last weights)."""

    steps: int
    stopped_early: bool
    log: pd.DataFrame
    out_dir: Path | None
    best: BestStep | None = None


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and CUDA); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


# ----------------------------------------------------------------------------- data


_END = object()  # marks an exhausted iterator


class BatchStream:
    """Endless stream of micro-batches over epochs of `train_batches(epoch)`.

    `epoch` and `index` (micro-batches of `epoch` already consumed) say where the next batch
    comes from; a stream created at (epoch, index) skips the first `index` batches of `epoch`.
    """

    def __init__(self, train_batches: TrainBatches, epoch: int = 0, index: int = 0) -> None:
        self.train_batches = train_batches
        self.epoch = epoch
        self.index = index
        self._batches: Iterator[Batch] = islice(iter(train_batches(epoch)), index, None)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        batch = next(self._batches, _END)
        if batch is _END:
            self.epoch, self.index = self.epoch + 1, 0
            self._batches = iter(self.train_batches(self.epoch))
            batch = next(self._batches, _END)
            if batch is _END:
                raise ValueError(f"train_batches({self.epoch}) yielded no batches.")
        self.index += 1
        return batch


@dataclass(frozen=True)
class Padding:
    """A val batch that only keeps ranks in step: its forward runs (ZeRO-3 ranks must run the same
    number of forwards, since each gathers parameters with the others) but it is not counted."""

    batch: Batch


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Move the tensors of a (nested) dict/list/tuple batch to `device`; other values unchanged."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {key: to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(value, device) for value in batch)
    return batch


def _check_reiterable(val_batches: Iterable[Batch] | None) -> None:
    if val_batches is not None and iter(val_batches) is val_batches:
        raise TypeError("val_batches is a one-shot iterator; pass a re-iterable (a list, a DataLoader).")


# ----------------------------------------------------------------------------- activation checkpointing


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Turn on activation (gradient) checkpointing of a transformers model, the non-reentrant kind.

    Each decoder layer keeps only its inputs during the forward and is run again in backward when its
    gradients are needed. Non-reentrant (`use_reentrant=False`) because:
    - the capture hooks of the mech losses (`characterize.capture`) run inside the layers: their records
      are taken once, in the forward (the recompute runs inside backward and records nothing), and what
      they save for backward bypasses the checkpoint, so the recompute matches the forward with or
      without them;
    - under ZeRO-3 the recompute gathers each layer's partitioned weights through the same module hooks
      as the forward (call this before `deepspeed.initialize`, as `train` does).
    The KV cache is turned off (a checkpointed forward cannot return one). Checkpointing acts in training
    mode only; evaluation under no_grad runs as before.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


# ----------------------------------------------------------------------------- loss output


def checked_loss_terms(output: Any, needs_grad: bool = True) -> dict[str, Tensor]:
    """Validate `loss_fn`'s output: a mapping with a scalar 'loss' tensor (that requires grad)."""
    if not isinstance(output, Mapping):
        raise TypeError(f"loss_fn must return a dict of tensors, got {type(output).__name__}.")
    if "loss" not in output:
        raise ValueError(
            "loss_fn must return a dict with key 'loss' (the total to backpropagate); "
            f"got keys {sorted(output)}."
        )
    loss = output["loss"]
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn's 'loss' must be a scalar tensor, got {loss!r:.80}.")
    if needs_grad and not loss.requires_grad:
        raise ValueError("loss_fn's 'loss' does not require grad: it depends on no trainable parameter.")
    return {name: torch.as_tensor(value) for name, value in output.items()}


# ----------------------------------------------------------------------------- the loop


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _progress_text(row: Mapping[str, Any]) -> dict[str, str]:
    return {"loss": f"{row['loss']:.4f}", "lr": f"{row['lr']:.2e}"}


def train(
    model: nn.Module,
    loss_fn: LossFn,
    train_batches: TrainBatches,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    val_batches: Iterable[Batch] | None = None,
    tokenizer: Any | None = None,
    log_path: str | os.PathLike | None = None,
    ckpt_dir: str | os.PathLike | None = None,
    deepspeed_config: dict[str, Any] | None = None,
    criterion: Criterion | None = VAL_LOSS,
    record_path: str | os.PathLike | None = None,
    stop_after: int | None = None,
    on_step: Callable[[dict[str, Any]], None] | None = None,
    keep_checkpoint: bool = True,
    whole_params: Iterable[nn.Parameter] = (),
    on_start: Callable[[nn.Module], None] | None = None,
    run_key: str = "",
    report_dir: str | os.PathLike | None = None,
    report_config: Mapping[str, Any] | None = None,
    report_name: str = "",
) -> TrainResult:
    """Train `model` for `config.max_steps` optimizer steps on `loss_fn`; resume from `ckpt_dir`.

    Seeds python, numpy and torch with `config.seed` (a resumed run then restores the RNG states
    of its checkpoint) and moves `model` to `config.device`.

    out_dir: where `save_pretrained` writes the weights of the best evaluation (atomically, at the
        end); the last weights without val_batches or criterion.
    log_path, ckpt_dir, record_path: default to `train_log.parquet`, `ckpt/` and `best_step.json`
        next to `out_dir` (best weights in `ckpt_dir` + ".best").
    val_batches: a re-iterable of batches; validated every `eval_every` steps and at the end.
    criterion: what makes an evaluation the best (module docstring); None keeps the last weights.
    stop_after: stop gracefully after this optimizer step (a checkpoint is saved, the final model
        is not); calling `train` again continues. Useful under a wall-clock limit.
    on_step: called with each train log row after the step's evaluation and checkpoint; an
        exception raised there aborts training as a kill would.
    keep_checkpoint: False deletes `ckpt_dir` and the best weights once the final model is written.
    whole_params: parameters `loss_fn` reads outside their module's forward; kept whole on every rank
        under ZeRO-3 (`backends.DeepSpeedBackend.keep_whole`), ignored on one device.
    on_start: called with the model (unwrapped, on its device, its initial weights, before a checkpoint is
        loaded) once the backend is ready: under ZeRO-3 forwards work only from then on.
    run_key: a hash of what determines the run besides `config` (loss, data, models). A checkpoint
        made under another key or TrainConfig (but for BOOKKEEPING_FIELDS) is deleted, with a warning
        that says what changed, and training starts fresh.
    report_dir, report_config, report_name: where `config.report_to`'s reporters write (default: next to
        `out_dir`), the config they show (default: `config`) and the run's name (`distill.reporting`).
    """
    out_dir = Path(out_dir)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else out_dir.parent / "ckpt"
    log_path = Path(log_path) if log_path is not None else out_dir.parent / LOG_FILE
    record_path = Path(record_path) if record_path is not None else out_dir.parent / RECORD_FILE
    _check_reiterable(val_batches)
    seed_everything(config.seed, config.deterministic)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    run = Run(make_backend(model, config, deepspeed_config), loss_fn, config, ckpt_dir, log_path,
               val_batches, criterion if val_batches is not None else None, key=checkpoint_key(config, run_key))
    run.backend.keep_whole(whole_params)
    if on_start is not None:
        on_start(run.backend.module)
    _resume_or_start(run, ckpt_dir)
    run.reporters = open_reporters(config.report_to, Path(report_dir) if report_dir is not None else out_dir.parent,
                                   report_config if report_config is not None else asdict(config), name=report_name,
                                   resumed=run.progress.step > 0, is_main=run.backend.is_main)
    try:
        for row in run.rows:  # a resumed run's rows so far (its reporters purge what an earlier process sent)
            run.reporters.log_row(row)
        stream = BatchStream(train_batches, run.progress.epoch, run.progress.batch_index)
        run.backend.model.train()
        if _train_loop(run, stream, stop_after, on_step):
            return TrainResult(run.progress.step, True, run.log_frame(), None, run.best)
        _finish(run, out_dir, record_path, tokenizer, keep_checkpoint)
    finally:
        run.reporters.close()
    return TrainResult(run.progress.step, False, run.log_frame(), out_dir, run.best)


def _resume_or_start(run: Run, ckpt_dir: Path) -> None:
    """Every rank resumes from `ckpt_dir` when its checkpoint was made under `run.key`; a stale one is deleted
    (with a warning that says what changed) and training starts fresh."""
    if run.backend.is_main:
        recover_dir(ckpt_dir)
    run.backend.barrier()
    stale = stale_checkpoint(ckpt_dir, run.key) if (ckpt_dir / STATE_FILE).exists() else None
    run.backend.barrier()  # every rank has read the key before rank 0 deletes a stale checkpoint
    if stale is not None and run.backend.is_main:
        logger.warning("not resuming from %s: %s; training from scratch", ckpt_dir, stale)
        shutil.rmtree(ckpt_dir)
    run.backend.barrier()
    if (ckpt_dir / STATE_FILE).exists():
        run.load_checkpoint()
    if run.backend.is_main:
        run.prune_best()  # a fresh run drops stale weights; a resumed one those after its checkpoint
    run.backend.barrier()

def _train_step(run: Run, stream: BatchStream) -> dict[str, float]:
    """One optimizer step over `grad_accum_steps` micro-batches; append and return its log row."""
    lr = run.backend.current_lr()
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    for _ in range(run.config.grad_accum_steps):
        batch = to_device(next(stream), run.backend.device)
        with run.backend.autocast():
            terms = checked_loss_terms(run.loss_fn(run.backend.model, batch))
        run.backend.backward(terms["loss"])
        for name, value in terms.items():
            sums[name] = sums.get(name, 0.0) + value.detach().float()
            counts[name] = counts.get(name, 0) + 1
    grad_norm = run.backend.optimizer_step()
    means = run.backend.mean_across_ranks({n: (sums[n] / counts[n]).item() for n in sums})
    run.progress = Progress(run.progress.step + 1, stream.epoch, stream.index, run.elapsed())
    row = {"split": "train", "step": run.progress.step, "epoch": stream.epoch, "lr": lr,
           "grad_norm": grad_norm, "elapsed_s": run.progress.elapsed_s, **means}
    run.append(row)
    return row


@torch.no_grad()
def _evaluate(run: Run) -> dict[str, Any]:
    """Mean of every loss term over the validation batches; append and return the val row."""
    model = run.backend.model
    model.eval()
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for batch in run.val_batches:
        padding = isinstance(batch, Padding)
        with run.backend.autocast():
            output = run.loss_fn(model, to_device(batch.batch if padding else batch, run.backend.device))
        if padding:
            continue
        for name, value in checked_loss_terms(output, needs_grad=False).items():
            sums[name] = sums.get(name, 0.0) + float(value)
            counts[name] = counts.get(name, 0) + 1
    # every rank evaluates its shard: sums and counts over all ranks (shards may differ in size)
    totals = run.backend.sum_across_ranks({**{f"sum/{n}": v for n, v in sums.items()},
                                            **{f"count/{n}": float(c) for n, c in counts.items()}})
    if not totals:
        raise ValueError("val_batches yielded no batches.")
    means = {n.split("/", 1)[1]: v / totals[f"count/{n.split('/', 1)[1]}"] for n, v in totals.items()
             if n.startswith("sum/")}
    row = {"split": "val", "step": run.progress.step, "epoch": run.progress.epoch, **means}
    if run.criterion is not None:  # in eval mode and autocast, like the loss
        with run.backend.autocast():
            value = float(run.criterion.value(run.backend.module, row))
        row[run.criterion.name] = run.backend.mean_across_ranks({"value": value})["value"]
    model.train()
    row["elapsed_s"] = run.elapsed()
    run.append(row)
    if run.criterion is not None:
        run.update_best(row[run.criterion.name])
    return row


def _train_loop(run: Run, stream: BatchStream, stop_after: int | None,
                on_step: Callable[[dict[str, Any]], None] | None) -> bool:
    """Optimizer steps until max_steps (False) or until `stop_after` (True, after a checkpoint)."""
    config = run.config
    bar = tqdm(total=config.max_steps, initial=run.progress.step, desc="train", unit="step",
               dynamic_ncols=True, disable=not run.backend.is_main)
    with bar:
        while run.progress.step < config.max_steps:
            row = _train_step(run, stream)
            step = run.progress.step
            bar.update(1)
            if _due(step, config.log_every) or step == 1:
                bar.set_postfix(_progress_text(row))
                logger.info("step %d/%d loss %.4f lr %.3e grad_norm %.3f", step, config.max_steps,
                            row["loss"], row["lr"], row["grad_norm"])
            if run.val_batches is not None and _due(step, config.eval_every):
                _log_evaluation(run, _evaluate(run))
            stop_now = stop_after is not None and step >= stop_after and step < config.max_steps
            if _due(step, config.checkpoint_every) or stop_now:
                run.write_log()
                run.save_checkpoint()
            if on_step is not None:
                on_step(row)
            if stop_now:
                logger.info("stopping after step %d as asked; run again to continue", step)
                return True
    return False


def _log_evaluation(run: Run, row: Mapping[str, Any]) -> None:
    name = run.criterion.name if run.criterion is not None else "loss"
    logger.info("step %d val loss %.4f, %s %.4f (best: step %s)", row["step"], row["loss"], name, row[name],
                run.best.step if run.best else "-")


def _finish(run: Run, out_dir: Path, record_path: Path, tokenizer: Any | None, keep_checkpoint: bool) -> None:
    """Final evaluation (unless just done), log, the best step's model in `out_dir` (atomically),
    then its record."""
    last = run.rows[-1] if run.rows else {}
    if run.val_batches is not None and not (last.get("split") == "val" and last.get("step") == run.progress.step):
        _log_evaluation(run, _evaluate(run))
    run.write_log()
    best = run.best
    weights = run.best_weights(best.step) if best is not None and best.step != run.progress.step else None
    tmp = temp_dir_for(out_dir)
    if run.backend.is_main:
        make_empty_dir(tmp)
    run.backend.barrier()
    run.backend.save_pretrained(tmp, tokenizer, weights)
    run.backend.barrier()
    if run.backend.is_main:
        publish_dir(tmp, out_dir)
        write_json(record_path, run.best_record())
        if not keep_checkpoint:
            shutil.rmtree(run.ckpt_dir, ignore_errors=True)
            shutil.rmtree(run.best_dir, ignore_errors=True)
    run.backend.barrier()
    logger.info("saved the model of step %d (%s) to %s", best.step if best else run.progress.step,
                f"best {best.criterion} {best.value:.4f}" if best else "the last step", out_dir)
