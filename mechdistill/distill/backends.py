"""How optimizer steps are taken: on one device (`TorchBackend`: autocast, GradScaler for fp16, clipping,
AdamW + warmup/cosine schedule) or over GPUs through a DeepSpeed engine (`DeepSpeedBackend`, ZeRO-3 by
`zero3_config`). Both offer the trainer the same operations (backward, optimizer_step, checkpoint and
weight files, save_pretrained, barrier, reductions across ranks, keep_whole); `make_backend` picks one.

Files a backend writes into a checkpoint directory: MODEL_FILE (the weights; under DeepSpeed the engine's
own checkpoint, tag DEEPSPEED_TAG) and STATE_FILE (the trainer state it is handed, with the optimizer's);
a best step's weights: MODEL_FILE, or DEEPSPEED_WEIGHTS_FILE (the consolidated state dict).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import Tensor, nn

from .train_config import TrainConfig

MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
DEEPSPEED_TAG = "engine"
DEEPSPEED_WEIGHTS_FILE = "weights.pt"  # a best step's consolidated state dict under DeepSpeed


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


def make_backend(model: nn.Module, config: TrainConfig, deepspeed_config: dict[str, Any] | None) -> Backend:
    if deepspeed_config is not None:
        return DeepSpeedBackend(model, config, deepspeed_config)
    return TorchBackend(model, config)
