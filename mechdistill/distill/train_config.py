"""The settings of one training run: `TrainConfig` (its field defaults are the optimiser's defaults, which
config/schema.yaml's `distill.train` leaves to it) and `train_config`, which builds one from the config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
REPORT_TARGETS = ("tensorboard", "wandb")  # where report_to streams the train log (distill.reporting)
REPORT_KEY = "distill.train.report_to"
# TrainConfig fields that do not change the weights (a checkpoint made under other values resumes);
# gradient_checkpointing recomputes the same forward in backward: the same gradients, less memory; report_to
# only streams the log
BOOKKEEPING_FIELDS = ("log_every", "checkpoint_every", "gradient_checkpointing", "report_to")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of one training run.

    Steps are optimizer steps; one optimizer step consumes `grad_accum_steps` micro-batches.
    `warmup_steps` wins over `warmup_ratio` (fraction of `max_steps`) when it is set.
    `eval_every`, `checkpoint_every`: 0 turns the periodic action off (evaluation still runs
    once at the end). `max_grad_norm`: None or 0 disables clipping (the norm is still logged).
    `micro_batch_size` is only reported to DeepSpeed (batching is done by `train_batches`).
    `gradient_checkpointing`: keep only each decoder layer's input in the forward and recompute the
    layer in backward (`trainer.enable_gradient_checkpointing`): activation memory of one layer
    instead of all, for about one more forward of compute.
    `report_to`: where rank 0 streams each log row as it is written (`distill.reporting`): "tensorboard",
    "wandb", both (a list), or "none" (the default); kept as a tuple of targets, () for none.
    """

    lr: float = 2e-5
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    warmup_steps: int | None = None
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    max_steps: int = 1000
    grad_accum_steps: int = 1
    micro_batch_size: int = 1
    max_grad_norm: float | None = 1.0
    seed: int = 0
    precision: str = "auto"
    deterministic: bool = False
    eval_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 10
    device: str = "auto"
    gradient_checkpointing: bool = False
    report_to: tuple[str, ...] | str = ()

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.report_to = report_targets(self.report_to)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.max_steps < 1 or self.grad_accum_steps < 1 or self.micro_batch_size < 1:
            raise ValueError("max_steps, grad_accum_steps and micro_batch_size must be >= 1")
        if not 0.0 <= self.warmup_ratio <= 1.0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("warmup_ratio and min_lr_ratio must lie in [0, 1]")
        if min(self.eval_every, self.checkpoint_every, self.log_every) < 0:
            raise ValueError("eval_every, checkpoint_every and log_every must be >= 0")

    @property
    def resolved_warmup_steps(self) -> int:
        """Warmup length in optimizer steps."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return round(self.warmup_ratio * self.max_steps)


def train_config(settings: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                 seed: int = 0) -> TrainConfig:
    """TrainConfig from `distill.train` (`settings`) with a method's own `train:` entries on top;
    `seed` unless either sets one."""
    merged = {**settings, **(overrides or {})}
    known = {f.name for f in fields(TrainConfig)}
    unknown = set(merged) - known
    if unknown:
        raise ConfigError(f"distill.train: unknown keys {sorted(unknown)}; allowed: {sorted(known)}")
    merged.setdefault("seed", seed)
    return TrainConfig(**merged)


def report_targets(value: str | Sequence[str] | None) -> tuple[str, ...]:
    """`report_to` as written (one name or a list; "none" or None: nothing) -> the targets, in order."""
    names = [value] if isinstance(value, str) else list(value or ())
    unknown = [name for name in names if name not in (*REPORT_TARGETS, "none")]
    if unknown:
        raise ConfigError(f"{REPORT_KEY}: unknown {unknown}; allowed: {', '.join(REPORT_TARGETS)}, none "
                          "(one of them or a list)")
    if "none" in names and len(set(names)) > 1:
        raise ConfigError(f"{REPORT_KEY}: {names} lists 'none' with a target; give the targets or 'none'")
    return tuple(dict.fromkeys(name for name in names if name != "none"))
