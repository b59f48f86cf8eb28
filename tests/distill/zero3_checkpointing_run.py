"""One rank of tests/distill/test_checkpointing.py's ZeRO-3 run (started by torchrun, 2 ranks, gloo on the CPU):
the mech loss (capture hooks on) of a tiny student against a tiny teacher's targets, trained through DeepSpeed
ZeRO-3 (every parameter partitioned) without and then with activation checkpointing; rank 0 writes
{"plain": {term: [per step]}, "checkpointing": ...} to the path given, with the runs of layer 0."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from mechdistill.distill.backends import zero3_config
from mechdistill.distill.launch import init_distributed
from mechdistill.distill.methods import METHODS
from mechdistill.distill.objective import read_outside_forward, student_loss, teacher_targets
from mechdistill.distill.train_config import TrainConfig
from mechdistill.distill.trainer import train
from mechdistill.models import byte_tokenizer
from tests.distill.test_objective import TAU, TEMPERATURE, example, pools
from tests.helpers import tiny_llama

STEPS = 3


def main(out: Path) -> None:
    rank, _ = init_distributed("cpu")
    tok = byte_tokenizer()
    ex = example(tok)
    targets = teacher_targets(tiny_llama(len(tok), seed=0), ex, pools(0), TAU, top_k=8)
    student_pools = pools(1)

    def loss_fn(model, _batch):
        return student_loss(model, ex, targets, student_pools, METHODS["mech"], TAU, TEMPERATURE)

    losses = {}
    for name, flag in (("plain", False), ("checkpointing", True)):
        config = TrainConfig(lr=1e-2, max_steps=STEPS, warmup_steps=1, device="cpu", precision="fp32", seed=0,
                             gradient_checkpointing=flag)
        ds_config = zero3_config(config)
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # every parameter partitioned
        student = tiny_llama(len(tok), seed=2)
        runs = []  # forwards of layer 0: one per step, and its recompute with checkpointing
        student.model.layers[0].register_forward_pre_hook(lambda _module, _args, runs=runs: runs.append(1))
        result = train(student, loss_fn, lambda epoch: [{}], config, out.parent / name / "model",
                       deepspeed_config=ds_config, whole_params=read_outside_forward(student, student_pools),
                       criterion=None)
        log = result.log[result.log["split"] == "train"]
        losses[name] = {column: log[column].tolist() for column in ("loss", "phase1.attn", "phase2.qk", "grad_norm")}
        losses[name]["layer_runs"] = len(runs)
    if rank == 0:
        out.write_text(json.dumps(losses))
    torch.distributed.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
