"""Live training curves (`distill.train.report_to`): every row of the train log, streamed from rank 0 to
TensorBoard and/or Weights & Biases as the trainer appends it, with the run's config.

train_log.parquet stays the record; these are views of the same rows. Each row becomes one scalar per
number in it but its step, tagged by its split: train/loss, train/<term>, train/lr, train/grad_norm,
train/epoch, train/elapsed_s; val/loss, val/<term>, val/<criterion> (e.g. val/val_macro_f1), at the
row's optimizer step. Scalars are written in double precision, so they equal the Parquet values.

    <report_dir>/tensorboard/   event files (torch.utils.tensorboard; works offline):
                                `tensorboard --logdir results/`
    <report_dir>/wandb/         a W&B run: offline unless WANDB_MODE or WANDB_API_KEY says otherwise
                                (`wandb sync <report_dir>/wandb/offline-run-*` uploads one later)

A resumed run streams the rows it restored from its checkpoint again; its TensorBoard writer marks a
restart at step 1 (a SessionLog START; the first process marks its start at step 0), so TensorBoard hides
what earlier processes wrote and the curves show each step once, as the Parquet log does. A fresh run
deletes the curves of an earlier one in the same folder.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from numbers import Real
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError
from .train_config import REPORT_KEY, report_targets

NOT_SCALARS = ("split", "step")
INSTALL = {"tensorboard": "pip install tensorboard  (or: pip install -e '.[tensorboard]')",
           "wandb": "pip install wandb"}


class Reporter(Protocol):
    def log_row(self, row: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


def row_scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """A train-log row's scalars: "<split>/<column>" -> value, for every number in it but its step."""
    return {f"{row['split']}/{name}": float(value) for name, value in row.items()
            if name not in NOT_SCALARS and isinstance(value, Real) and not isinstance(value, bool)}


def _module(target: str, module: str) -> Any:
    """Import `module` for report target `target`; not installed: a ConfigError naming the key and the fix."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ConfigError(f"{REPORT_KEY} asks for {target}, which is not installed here ({error}). Fix: "
                          f"{INSTALL[target]}, or leave {target} out of {REPORT_KEY}") from error


class TensorBoardReporter:
    """Event files in `log_dir` (torch.utils.tensorboard.SummaryWriter; needs the `tensorboard` package)."""

    def __init__(self, log_dir: Path, run_config: Mapping[str, Any], resumed: bool) -> None:
        _module("tensorboard", "tensorboard")
        writer_class = _module("tensorboard", "torch.utils.tensorboard").SummaryWriter
        if not resumed:
            shutil.rmtree(log_dir, ignore_errors=True)  # an earlier run's curves are not this run's
        # a session START at step 0, a restart at step 1: TensorBoard then hides what earlier processes wrote
        self.writer = writer_class(str(log_dir), purge_step=1 if resumed else 0)
        self.writer.add_text("config", "```\n" + json.dumps(run_config, indent=2, sort_keys=True, default=str)
                             + "\n```", global_step=0)

    def log_row(self, row: Mapping[str, Any]) -> None:
        for tag, value in row_scalars(row).items():
            self.writer.add_scalar(tag, value, global_step=int(row["step"]), new_style=True, double_precision=True)

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """A W&B run in `log_dir`: offline unless the user configured W&B (WANDB_MODE, WANDB_API_KEY)."""

    def __init__(self, log_dir: Path, run_config: Mapping[str, Any], name: str) -> None:
        wandb = _module("wandb", "wandb")
        configured = os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY")
        log_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(dir=str(log_dir), name=name or None, config=dict(run_config),
                              mode=None if configured else "offline")

    def log_row(self, row: Mapping[str, Any]) -> None:
        self.run.log(row_scalars(row), step=int(row["step"]))

    def close(self) -> None:
        self.run.finish()


@dataclass
class Reporters:
    """The run's reporters (none: nothing is streamed)."""

    reporters: list[Reporter] = field(default_factory=list)

    def log_row(self, row: Mapping[str, Any]) -> None:
        for reporter in self.reporters:
            reporter.log_row(row)

    def close(self) -> None:
        for reporter in self.reporters:
            reporter.close()
        self.reporters = []


def open_reporters(targets: Sequence[str], report_dir: Path, run_config: Mapping[str, Any], *, name: str = "",
                   resumed: bool = False, is_main: bool = True) -> Reporters:
    """The reporters of `targets` (TrainConfig.report_to) writing under `report_dir`; none on a rank but 0."""
    if not is_main:
        return Reporters()
    opened: list[Reporter] = []
    for target in report_targets(targets):
        opened.append(TensorBoardReporter(report_dir / "tensorboard", run_config, resumed) if target == "tensorboard"
                      else WandbReporter(report_dir / "wandb", run_config, name))
    return Reporters(opened)
