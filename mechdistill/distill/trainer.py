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

`train` resumes automatically when `ckpt_dir` holds a checkpoint, with the best step so far (its
weights stay in ckpt_dir.best until a later checkpoint records a better one).

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

import contextlib
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn
from tqdm import tqdm

from ..errors import ConfigError
from ..io import make_empty_dir, publish_dir, recover_dir, temp_dir_for, write_json, write_parquet
from .selection import VAL_LOSS, Criterion

logger = logging.getLogger(__name__)

Batch = Any
LossFn = Callable[[nn.Module, Batch], Mapping[str, Tensor | float]]
TrainBatches = Callable[[int], Iterable[Batch]]

PRECISIONS = ("fp32", "bf16", "fp16", "auto")
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
LOG_FILE = "train_log.parquet"
DEEPSPEED_TAG = "engine"
DEEPSPEED_WEIGHTS_FILE = "weights.pt"  # a best step's consolidated state dict under DeepSpeed
RECORD_FILE = "best_step.json"
KEY_FILE = "run_key.json"  # what determined the checkpoint: a resume under another one starts fresh
BOOKKEEPING_FIELDS = ("log_every", "checkpoint_every")  # TrainConfig fields that do not change the weights
LOG_COLUMNS = ["split", "step", "epoch", "lr", "grad_norm", "elapsed_s"]


# ----------------------------------------------------------------------------- configuration


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of one training run.

    Steps are optimizer steps; one optimizer step consumes `grad_accum_steps` micro-batches.
    `warmup_steps` wins over `warmup_ratio` (fraction of `max_steps`) when it is set.
    `eval_every`, `checkpoint_every`: 0 turns the periodic action off (evaluation still runs
    once at the end). `max_grad_norm`: None or 0 disables clipping (the norm is still logged).
    `micro_batch_size` is only reported to DeepSpeed (batching is done by `train_batches`).
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

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
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


@dataclass(frozen=True)
class BestStep:
    """The best evaluation so far: its step and criterion value."""

    criterion: str
    maximize: bool
    step: int
    value: float


@dataclass
class TrainResult:
    """What `train` did: steps done (in total, over resumes), whether it stopped early, the log,
    and the best evaluation, whose weights are in out_dir (None: no evaluation, the last weights)."""

    steps: int
    stopped_early: bool
    log: pd.DataFrame
    out_dir: Path | None
    best: BestStep | None = None


# ----------------------------------------------------------------------------- schedule, precision


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr for the update that follows `step` completed updates.

    With W = warmup_steps, r = min_lr_ratio:

        step <  W:  (step + 1) / W                       linear warmup; update W uses the peak lr
        step >= W:  r + (1 - r) * (1 + cos(pi * p)) / 2,  p = min(1, (step - W) / max(1, max_steps - W))

    The factor reaches r (0 by default) at step = max_steps, i.e. right after the last update,
    which uses a small positive lr.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; anything else is passed to torch.device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(precision: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether to use a GradScaler) for `precision` on `device`.

    auto: bf16 autocast on CUDA when supported, else fp16 autocast + GradScaler; fp32 on CPU.
    fp16 needs CUDA; bf16 on CUDA needs hardware support (bf16 autocast also works on CPU).
    """
    on_cuda = device.type == "cuda"
    bf16_ok = on_cuda and torch.cuda.is_bf16_supported()
    if precision == "auto":
        precision = ("bf16" if bf16_ok else "fp16") if on_cuda else "fp32"
    if precision == "fp32":
        return None, False
    if precision == "fp16":
        if not on_cuda:
            raise ValueError("precision 'fp16' needs a CUDA device; use 'fp32' or 'auto' on CPU.")
        return torch.float16, True
    if on_cuda and not bf16_ok:
        raise ValueError("this GPU does not support bf16; use precision 'fp16' or 'auto'.")
    return torch.bfloat16, False


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (CPU and CUDA); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)


# ----------------------------------------------------------------------------- DeepSpeed config


def zero3_config(config: TrainConfig) -> dict[str, Any]:
    """A standard DeepSpeed ZeRO-3 config for `config`: no offload, the precision `resolve_precision`
    gives on the config's device (auto: bf16 on a GPU that has it, fp16 on one that has not, fp32 on CPU).

    Optimizer and scheduler are not in it: the trainer passes its own AdamW and cosine schedule.
    """
    dtype, _ = resolve_precision(config.precision, resolve_device(config.device))
    return {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
        "gradient_clipping": float(config.max_grad_norm or 0.0),
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "zero_optimization": {
            "stage": 3,
            "offload_optimizer": {"device": "none"},
            "offload_param": {"device": "none"},
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 500_000_000,
            "stage3_prefetch_bucket_size": 50_000_000,
            "stage3_param_persistence_threshold": 1_000_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _import_deepspeed() -> Any:
    try:
        import deepspeed  # optional and heavy: only multi-GPU training needs it
    except ImportError as err:
        raise ImportError(
            "deepspeed_config was given but DeepSpeed is not installed. Install the training "
            "extra (`pip install 'mechdistill[train]'`, or use envs/train.yaml) on the GPU "
            "machine, or pass deepspeed_config=None to train on a single device."
        ) from err
    return deepspeed


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


# ----------------------------------------------------------------------------- atomic directories


# ----------------------------------------------------------------------------- optimisation backends


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that get optimised: those with requires_grad."""
    return [param for param in model.parameters() if param.requires_grad]


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; matrices get weight decay, vectors (biases, norms) do not."""
    params = trainable_parameters(model)
    if not params:
        raise ValueError("the model has no parameter with requires_grad=True.")
    # ZeRO-3 partitioned parameters keep their real shape in ds_shape.
    is_matrix = [len(getattr(p, "ds_shape", p.shape)) >= 2 for p in params]
    groups = [
        {"params": [p for p, m in zip(params, is_matrix) if m], "weight_decay": config.weight_decay},
        {"params": [p for p, m in zip(params, is_matrix) if not m], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas,
                             eps=config.adam_eps)


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup + cosine decay (`lr_factor`) as a LambdaLR stepped once per optimizer step."""
    warmup, max_steps, min_ratio = config.resolved_warmup_steps, config.max_steps, config.min_lr_ratio
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, max_steps, min_ratio))


class TorchBackend:
    """Single-device training: autocast, GradScaler (fp16), clipping, AdamW + LambdaLR."""

    def __init__(self, model: nn.Module, config: TrainConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.model = self.module = model.to(self.device)
        self.autocast_dtype, use_scaler = resolve_precision(config.precision, self.device)
        self.optimizer = build_optimizer(model, config)
        self.scheduler = build_scheduler(self.optimizer, config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        self.is_main = True

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=self.autocast_dtype,
                              enabled=self.autocast_dtype is not None)

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def backward(self, loss: Tensor) -> None:
        self.scaler.scale(loss / self.config.grad_accum_steps).backward()

    def optimizer_step(self) -> float:
        """Unscale, clip, step optimizer and schedule, zero grads; return the pre-clip grad norm."""
        self.scaler.unscale_(self.optimizer)
        max_norm = self.config.max_grad_norm or math.inf
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def save_checkpoint(self, directory: Path, trainer_state: dict[str, Any]) -> None:
        save_model(self.model, str(directory / MODEL_FILE))
        torch.save({**trainer_state, "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()},
                   directory / STATE_FILE)

    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        load_model(self.model, directory / MODEL_FILE, device=str(self.device))
        state = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        return state

    def save_weights(self, directory: Path) -> None:
        """The current weights, for a best step (`save_pretrained(weights=directory)` reads them)."""
        save_model(self.model, str(directory / MODEL_FILE))

    def save_pretrained(self, directory: Path, tokenizer: Any | None, weights: Path | None = None) -> None:
        """save_pretrained of the current weights, or of those `save_weights` wrote to `weights`
        (loaded into the model first: it then holds what was written)."""
        if weights is not None:
            load_model(self.model, weights / MODEL_FILE, device=str(self.device))
        self.model.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    def barrier(self) -> None:
        """Nothing to wait for on one device."""

    def mean_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def sum_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        return values

    def keep_whole(self, params: Iterable[nn.Parameter]) -> None:
        """Nothing is partitioned on one device."""


class DeepSpeedBackend:
    """Multi-GPU training through a DeepSpeed engine (ZeRO-3 by `zero3_config`).

    DeepSpeed does the accumulation (it divides the loss by its gradient_accumulation_steps and
    steps optimizer and scheduler at the boundary), clipping and mixed precision itself.
    """

    def __init__(self, model: nn.Module, config: TrainConfig, ds_config: dict[str, Any]) -> None:
        deepspeed = _import_deepspeed()
        ds_accum = ds_config.get("gradient_accumulation_steps", config.grad_accum_steps)
        if ds_accum != config.grad_accum_steps:
            raise ValueError(f"deepspeed_config gradient_accumulation_steps={ds_accum} differs from "
                             f"TrainConfig.grad_accum_steps={config.grad_accum_steps}.")
        optimizer = build_optimizer(model, config)
        scheduler = build_scheduler(optimizer, config)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler,
            config={**ds_config, "gradient_accumulation_steps": config.grad_accum_steps})
        self.model = self.engine
        self.module = self.engine.module
        self.device = self.engine.device
        self.zero_stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        self.is_main = torch.distributed.get_rank() == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def backward(self, loss: Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()  # a real optimizer step only at the accumulation boundary

    def optimizer_step(self) -> float:
        grad_norm = self.engine.get_global_grad_norm()
        return math.nan if grad_norm is None else float(grad_norm)

    def save_checkpoint(self, directory: Path, trainer_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        if self.is_main:
            torch.save(trainer_state, directory / STATE_FILE)

    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        self.engine.load_checkpoint(str(directory), tag=DEEPSPEED_TAG)
        return torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)

    def _state_dict(self) -> dict[str, Tensor]:
        if self.zero_stage == 3:  # gather the partitioned weights onto rank 0 (collective)
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.engine.module.state_dict()

    def save_weights(self, directory: Path) -> None:
        """The current weights, consolidated on rank 0, for a best step (every rank calls this)."""
        state_dict = self._state_dict()
        if self.is_main:
            torch.save({name: tensor.detach().cpu() for name, tensor in state_dict.items()},
                       directory / DEEPSPEED_WEIGHTS_FILE)

    def save_pretrained(self, directory: Path, tokenizer: Any | None, weights: Path | None = None) -> None:
        """save_pretrained on rank 0 of the current weights, or of those `save_weights` wrote to
        `weights` (the engine keeps its current weights)."""
        if weights is None:
            state_dict = self._state_dict()
        elif self.is_main:
            state_dict = torch.load(weights / DEEPSPEED_WEIGHTS_FILE, map_location="cpu", weights_only=True)
        if self.is_main:
            self.engine.module.save_pretrained(directory, state_dict=state_dict)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)

    def barrier(self) -> None:
        torch.distributed.barrier()

    def sum_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        """Sums over ranks of every value; the union of the ranks' names (a name a rank lacks counts 0)."""
        names: list[list[str]] = [[] for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather_object(names, sorted(values))
        union = sorted(set().union(*names))
        packed = torch.tensor([values.get(n, 0.0) for n in union], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(packed)
        return dict(zip(union, packed.tolist()))

    def mean_across_ranks(self, values: dict[str, float]) -> dict[str, float]:
        world = torch.distributed.get_world_size()
        return {n: v / world for n, v in self.sum_across_ranks(values).items()}

    def keep_whole(self, params: Iterable[nn.Parameter]) -> None:
        """Keep `params` whole on every rank under ZeRO-3, as DeepSpeed keeps its small "persistent"
        parameters: gathered once, re-gathered after each optimizer step, never released after a
        module's forward. Losses that read a weight outside its module's forward (head writes
        z^h W_O^h, the anchor centroid from lm_head) then read real values, and no rank issues a
        data-dependent gather that the others would not match. Their optimizer state stays partitioned."""
        if self.zero_stage != 3:
            return
        fresh = [p for p in params if not getattr(p, "ds_persist", True)]
        if not fresh:
            return
        for param in fresh:
            param.ds_persist = True
        fresh[0].all_gather(param_list=fresh)
        self.engine.optimizer.persistent_parameters.extend(fresh)


Backend = TorchBackend | DeepSpeedBackend


# ----------------------------------------------------------------------------- the run


@dataclass
class Progress:
    """Where training stands: optimizer steps done and the position in the data."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0
    elapsed_s: float = 0.0


@dataclass
class _Run:
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

    # -- steps

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def train_step(self, stream: BatchStream) -> dict[str, float]:
        """One optimizer step over `grad_accum_steps` micro-batches; append and return its log row."""
        lr = self.backend.current_lr()
        sums: dict[str, Tensor] = {}
        counts: dict[str, int] = {}
        for _ in range(self.config.grad_accum_steps):
            batch = to_device(next(stream), self.backend.device)
            with self.backend.autocast():
                terms = checked_loss_terms(self.loss_fn(self.backend.model, batch))
            self.backend.backward(terms["loss"])
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
                counts[name] = counts.get(name, 0) + 1
        grad_norm = self.backend.optimizer_step()
        means = self.backend.mean_across_ranks({n: (sums[n] / counts[n]).item() for n in sums})
        self.progress = Progress(self.progress.step + 1, stream.epoch, stream.index, self.elapsed())
        row = {"split": "train", "step": self.progress.step, "epoch": stream.epoch, "lr": lr,
               "grad_norm": grad_norm, "elapsed_s": self.progress.elapsed_s, **means}
        self.rows.append(row)
        return row

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Mean of every loss term over the validation batches; append and return the val row."""
        model = self.backend.model
        model.eval()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for batch in self.val_batches:
            padding = isinstance(batch, Padding)
            with self.backend.autocast():
                output = self.loss_fn(model, to_device(batch.batch if padding else batch, self.backend.device))
            if padding:
                continue
            for name, value in checked_loss_terms(output, needs_grad=False).items():
                sums[name] = sums.get(name, 0.0) + float(value)
                counts[name] = counts.get(name, 0) + 1
        # every rank evaluates its shard: sums and counts over all ranks (shards may differ in size)
        totals = self.backend.sum_across_ranks({**{f"sum/{n}": v for n, v in sums.items()},
                                                **{f"count/{n}": float(c) for n, c in counts.items()}})
        if not totals:
            raise ValueError("val_batches yielded no batches.")
        means = {n.split("/", 1)[1]: v / totals[f"count/{n.split('/', 1)[1]}"] for n, v in totals.items()
                 if n.startswith("sum/")}
        row = {"split": "val", "step": self.progress.step, "epoch": self.progress.epoch, **means}
        if self.criterion is not None:  # in eval mode and autocast, like the loss
            with self.backend.autocast():
                value = float(self.criterion.value(self.backend.module, row))
            row[self.criterion.name] = self.backend.mean_across_ranks({"value": value})["value"]
        model.train()
        row["elapsed_s"] = self.elapsed()
        self.rows.append(row)
        if self.criterion is not None:
            self.update_best(row[self.criterion.name])
        return row

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


def _due(step: int, every: int) -> bool:
    return every > 0 and step % every == 0


def _make_backend(model: nn.Module, config: TrainConfig, deepspeed_config: dict[str, Any] | None) -> Backend:
    if deepspeed_config is not None:
        return DeepSpeedBackend(model, config, deepspeed_config)
    return TorchBackend(model, config)


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
        under ZeRO-3 (`DeepSpeedBackend.keep_whole`), ignored on one device.
    on_start: called with the model (unwrapped, on its device, its initial weights, before a checkpoint is
        loaded) once the backend is ready: under ZeRO-3 forwards work only from then on.
    run_key: a hash of what determines the run besides `config` (loss, data, models). A checkpoint
        made under another key or TrainConfig (but for BOOKKEEPING_FIELDS) is deleted, with a warning
        that says what changed, and training starts fresh.
    """
    out_dir = Path(out_dir)
    ckpt_dir = Path(ckpt_dir) if ckpt_dir is not None else out_dir.parent / "ckpt"
    log_path = Path(log_path) if log_path is not None else out_dir.parent / LOG_FILE
    record_path = Path(record_path) if record_path is not None else out_dir.parent / RECORD_FILE
    _check_reiterable(val_batches)
    seed_everything(config.seed, config.deterministic)
    run = _Run(_make_backend(model, config, deepspeed_config), loss_fn, config, ckpt_dir, log_path,
               val_batches, criterion if val_batches is not None else None, key=checkpoint_key(config, run_key))
    run.backend.keep_whole(whole_params)
    if on_start is not None:
        on_start(run.backend.module)
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
    stream = BatchStream(train_batches, run.progress.epoch, run.progress.batch_index)
    run.backend.model.train()
    stopped_early = _train_loop(run, stream, stop_after, on_step)
    if stopped_early:
        return TrainResult(run.progress.step, True, run.log_frame(), None, run.best)
    _finish(run, out_dir, record_path, tokenizer, keep_checkpoint)
    return TrainResult(run.progress.step, False, run.log_frame(), out_dir, run.best)


def _train_loop(run: _Run, stream: BatchStream, stop_after: int | None,
                on_step: Callable[[dict[str, Any]], None] | None) -> bool:
    """Optimizer steps until max_steps (False) or until `stop_after` (True, after a checkpoint)."""
    config = run.config
    bar = tqdm(total=config.max_steps, initial=run.progress.step, desc="train", unit="step",
               dynamic_ncols=True, disable=not run.backend.is_main)
    with bar:
        while run.progress.step < config.max_steps:
            row = run.train_step(stream)
            step = run.progress.step
            bar.update(1)
            if _due(step, config.log_every) or step == 1:
                bar.set_postfix(_progress_text(row))
                logger.info("step %d/%d loss %.4f lr %.3e grad_norm %.3f", step, config.max_steps,
                            row["loss"], row["lr"], row["grad_norm"])
            if run.val_batches is not None and _due(step, config.eval_every):
                _log_evaluation(run, run.evaluate())
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


def _log_evaluation(run: _Run, row: Mapping[str, Any]) -> None:
    name = run.criterion.name if run.criterion is not None else "loss"
    logger.info("step %d val loss %.4f, %s %.4f (best: step %s)", row["step"], row["loss"], name, row[name],
                run.best.step if run.best else "-")


def _finish(run: _Run, out_dir: Path, record_path: Path, tokenizer: Any | None, keep_checkpoint: bool) -> None:
    """Final evaluation (unless just done), log, the best step's model in `out_dir` (atomically),
    then its record."""
    last = run.rows[-1] if run.rows else {}
    if run.val_batches is not None and not (last.get("split") == "val" and last.get("step") == run.progress.step):
        _log_evaluation(run, run.evaluate())
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
