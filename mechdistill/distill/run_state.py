"""The state of one training run and its files: where it stands (`Progress`: optimizer steps, data
position), its log rows, the best evaluation so far (`BestStep`) and its weights, checkpoints (written
atomically, resumed exactly, RNG states included), and the checkpoint key that decides whether a
checkpoint may be resumed (`checkpoint_key`, `stale_checkpoint`, `resumable`).

Files (written atomically: temp file/dir, then rename):

    ckpt_dir/   model.safetensors   model weights (safetensors.torch.save_model: handles tied weights)
                trainer_state.pt    optimizer, scheduler, GradScaler, RNG states, data position,
                                    step counters, the best step so far; tensors and primitive
                                    containers only, loaded with torch.load(weights_only=True)
                train_log.parquet   the log rows up to this checkpoint
    ckpt_dir.best/step-NNNNNNNN/    the best evaluation's weights (model.safetensors; under DeepSpeed
                                    the consolidated state dict, weights.pt), kept for the best step
                                    of the last checkpoint and the best step since
    log_path    train_log.parquet   one row per optimizer step (split="train") and per evaluation
                                    (split="val"): step, lr, grad_norm, elapsed_s, loss terms, criterion
    out_dir/    model.save_pretrained (+ tokenizer.save_pretrained) of the best step's weights; loads
                with transformers.AutoModelForCausalLM.from_pretrained(out_dir)
    record_path best_step.json      the choice: criterion, maximize, step, value, last_step,
                                    evaluated_steps
    report_dir/ tensorboard/, wandb/  the log rows as they are appended (TrainConfig.report_to; `reporting`)
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from ..io import make_empty_dir, publish_dir, temp_dir_for, write_json, write_parquet
from .backends import STATE_FILE, Backend
from .reporting import Reporters
from .selection import Criterion
from .train_config import BOOKKEEPING_FIELDS, TrainConfig

logger = logging.getLogger(__name__)

Batch = Any
LossFn = Callable[[nn.Module, Batch], Mapping[str, Tensor | float]]

LOG_FILE = "train_log.parquet"
RECORD_FILE = "best_step.json"
KEY_FILE = "run_key.json"  # what determined the checkpoint: a resume under another one starts fresh
LOG_COLUMNS = ["split", "step", "epoch", "lr", "grad_norm", "elapsed_s"]


@dataclass(frozen=True)
class BestStep:
    """The best evaluation so far: its step and criterion value."""

    criterion: str
    maximize: bool
    step: int
    value: float


@dataclass
class Progress:
    """Where training stands: optimizer steps done and the position in the data."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    elapsed_s: float = 0.0


@dataclass
class Run:
    """Everything a run carries from step to step and into its checkpoint: what it trains with (backend,
    loss_fn, val_batches, criterion), where it stands (progress, log rows, best step) and its files."""

    backend: Backend
    loss_fn: LossFn
    config: TrainConfig
    ckpt_dir: Path
    log_path: Path
    val_batches: Iterable[Batch] | None
    criterion: Criterion | None = None
    progress: Progress = field(default_factory=Progress)
    rows: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    elapsed_before: float = 0.0
    best: BestStep | None = None
    checkpoint_best: int | None = None  # the best step the last checkpoint recorded
    key: dict[str, Any] = field(default_factory=dict)  # checkpoint_key: written beside every checkpoint
    reporters: Reporters = field(default_factory=Reporters)  # where each new row is streamed (report_to)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def append(self, row: dict[str, Any]) -> None:
        """Add a row to the log (written at the next checkpoint) and stream it (rank 0's reporters)."""
        self.rows.append(row)
        self.reporters.log_row(row)


    # -- the best step

    @property
    def best_dir(self) -> Path:
        return self.ckpt_dir.with_name(f"{self.ckpt_dir.name}.best")

    def best_weights(self, step: int) -> Path:
        return self.best_dir / f"step-{step:08d}"

    def update_best(self, value: float) -> None:
        """Make the current step the best if `value` beats the best so far, and save its weights."""
        if not self.criterion.better(value, self.best.value if self.best else None):
            return
        self.best = BestStep(self.criterion.name, self.criterion.maximize, self.progress.step, value)
        target = self.best_weights(self.progress.step)
        tmp = temp_dir_for(target)
        if self.backend.is_main:
            make_empty_dir(tmp)
        self.backend.barrier()
        self.backend.save_weights(tmp)
        self.backend.barrier()
        if self.backend.is_main:
            publish_dir(tmp, target)
            self.prune_best()
        self.backend.barrier()

    def prune_best(self) -> None:
        """Delete the saved weights of every step but the current best and the last checkpoint's
        best (a resumed run needs those); at most two copies of the weights stay."""
        keep = {self.best_weights(s).name for s in (self.best and self.best.step, self.checkpoint_best) if s}
        if self.best_dir.exists():
            for path in self.best_dir.iterdir():
                if path.name not in keep:
                    shutil.rmtree(path, ignore_errors=True)

    def best_record(self) -> dict[str, Any]:
        """The choice, for best_step.json: without evaluations, the last step with no criterion."""
        best, evaluated = self.best, [row["step"] for row in self.rows if row["split"] == "val"]
        value = None if best is None or math.isnan(best.value) else best.value
        return {"criterion": best and best.criterion, "maximize": best and best.maximize,
                "step": best.step if best else self.progress.step, "value": value,
                "last_step": self.progress.step, "evaluated_steps": evaluated}

    # -- files

    def log_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows)
        for column in LOG_COLUMNS:
            if column not in frame.columns:
                frame[column] = pd.Series(dtype="float64")
        terms = [c for c in frame.columns if c not in LOG_COLUMNS]
        terms.sort(key=lambda name: (name != "loss", name))
        return frame[LOG_COLUMNS + terms]

    def write_log(self) -> None:
        if self.backend.is_main:
            write_parquet(self.log_frame(), self.log_path)

    def save_checkpoint(self) -> None:
        """Write model, optimizer, RNG, data position and log into a temp dir, then publish it."""
        tmp = temp_dir_for(self.ckpt_dir)
        if self.backend.is_main:
            make_empty_dir(tmp)
        self.backend.barrier()
        state = {"format": 2, "progress": asdict(self.progress), "rng": capture_rng_states(),
                 "config": _primitive_config(self.config), "best": self.best and asdict(self.best)}
        self.backend.save_checkpoint(tmp, state)
        if self.backend.is_main:
            self.log_frame().to_parquet(tmp / LOG_FILE, index=False)
            write_json(tmp / KEY_FILE, self.key)
        self.backend.barrier()
        self.checkpoint_best = self.best and self.best.step
        if self.backend.is_main:
            publish_dir(tmp, self.ckpt_dir)
            self.prune_best()
        self.backend.barrier()
        logger.info("checkpoint at step %d -> %s", self.progress.step, self.ckpt_dir)

    def load_checkpoint(self) -> None:
        """Restore weights, optimizer, scheduler, scaler, RNG, data position and log rows."""
        state = self.backend.load_checkpoint(self.ckpt_dir)
        self.progress = Progress(**state["progress"])
        self.elapsed_before = self.progress.elapsed_s
        self.started = time.perf_counter()
        restore_rng_states(state["rng"])
        self.best = BestStep(**state["best"]) if state.get("best") else None
        self.checkpoint_best = self.best and self.best.step
        if self.best is not None and self.best.criterion != getattr(self.criterion, "name", None):
            raise ValueError(f"the checkpoint in {self.ckpt_dir} chose its best step by {self.best.criterion!r}, "
                             f"this run by {getattr(self.criterion, 'name', None)!r}; delete {self.ckpt_dir} to "
                             "train from scratch")
        if self.best is not None and not self.best_weights(self.best.step).exists():
            raise FileNotFoundError(f"the checkpoint in {self.ckpt_dir} names best step {self.best.step}, but "
                                    f"{self.best_weights(self.best.step)} is missing; delete {self.ckpt_dir} to "
                                    "train from scratch")
        log = pd.read_parquet(self.ckpt_dir / LOG_FILE)
        log = log[log["step"] <= self.progress.step]
        self.rows = [{k: v for k, v in row.items() if not _is_missing(v)} for row in log.to_dict("records")]
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", self.ckpt_dir,
                    self.progress.step, self.progress.epoch, self.progress.batch_index)


# ----------------------------------------------------------------------------- RNG states


def capture_rng_states() -> dict[str, Any]:
    """Python, numpy, torch CPU and CUDA RNG states as tensors and primitives (weights_only-safe)."""
    py_version, py_state, py_gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    return {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
        "numpy": {"keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_states`."""
    py = states["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = states["numpy"]
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["gauss"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def _primitive_config(config: TrainConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def checkpoint_key(config: TrainConfig, run_key: str = "") -> dict[str, Any]:
    """What a checkpoint must have been made under to be resumed: every TrainConfig field but the
    bookkeeping ones, and `run_key` (the caller's hash of its loss, data and models)."""
    primitive = _primitive_config(config)
    return {"train": {k: v for k, v in primitive.items() if k not in BOOKKEEPING_FIELDS}, "run": run_key}


def stale_checkpoint(ckpt_dir: Path, key: Mapping[str, Any]) -> str | None:
    """Why the checkpoint in `ckpt_dir` cannot be resumed under `key` (None: it can)."""
    path = ckpt_dir / KEY_FILE
    if not path.exists():
        return f"it records no configuration ({KEY_FILE} is missing: written by an older mechdistill)"
    saved = json.loads(path.read_text())
    train_saved, train_now = saved.get("train", {}), key["train"]
    changed = sorted(k for k in set(train_saved) | set(train_now) if train_saved.get(k) != train_now.get(k))
    if changed:
        return "TrainConfig changed: " + ", ".join(f"{k} {train_saved.get(k)!r} -> {train_now.get(k)!r}" for k in changed)
    if saved.get("run") != key["run"]:
        return "the run's other settings or inputs changed (loss weights, method, heads, models or input files)"
    return None


def resumable(ckpt_dir: Path, config: TrainConfig, run_key: str = "") -> bool:
    """Whether `train` will resume from `ckpt_dir` (a checkpoint made under this config and key)."""
    return (ckpt_dir / STATE_FILE).exists() and stale_checkpoint(ckpt_dir, checkpoint_key(config, run_key)) is None


def _is_missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)
