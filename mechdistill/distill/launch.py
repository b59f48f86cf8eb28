"""Starting the ranks of one distillation run, and which documents each rank reads.

One run trains one student on N processes (ranks) with DeepSpeed ZeRO-3. The `distill` rule starts
them with a standard launcher, given by its `mpi` and `tasks` resources (`local_launcher`):

    {resources.mpi} {resources.tasks} python -m mechdistill distill ...
    local (the rule's own)  torchrun --standalone --no-python --nproc_per_node N python -m mechdistill distill ...
    profiles/slurm          srun --ntasks N python -m mechdistill distill ...   (nodes from the allocation)

Each rank then calls `init_distributed`, which reads the rendezvous from torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or, under srun, maps SLURM's onto them
(`rendezvous_env`: SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, the first host of the node list).

Data: every rank builds the same global order of documents for an epoch and takes its shard
(`shard`, the semantics of torch's DistributedSampler without drop_last): the order is padded by
wrapping to a multiple of the world size, rank r takes items r, r + N, r + 2N, ... So the i-th
micro-batch of every rank together is the i-th global micro-batch of N documents, and N ranks with
`grad_accum_steps` g see the same global batch as one process with g * N.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

from ..warm import Request, run

T = TypeVar("T")


def shard(items: Sequence[T], rank: int, world_size: int, pad: Callable[[T], Any] | None = None) -> list:
    """Rank `rank`'s share of `items`: padded by wrapping to a multiple of `world_size`, then every
    world_size-th item from `rank`. All ranks get the same count; the shards are disjoint except for
    the padding, which repeats items from the start, passed through `pad` when given (e.g.
    `trainer.Padding`, for a val set whose repeats must not count)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if not items:
        return []
    total = -(-len(items) // world_size) * world_size
    repeats = [items[i % len(items)] for i in range(len(items), total)]
    padded = [*items, *(map(pad, repeats) if pad else repeats)]
    return padded[rank::world_size]


def gather_to_all(value: T) -> list[T]:
    """`value` of every rank, in rank order (a list of one without a process group)."""
    import torch  # not at the top: the Snakefile imports this module to build the `distill` command

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def first_host(nodelist: str) -> str:
    """The first host name of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07" (what
    `scontrol show hostnames` would print first)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise ValueError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def rendezvous_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The torch.distributed variables for this process: those torchrun/deepspeed set, as they are;
    under srun (SLURM_PROCID set) mapped from SLURM's; a single process without either gets world size 1.
    MASTER_PORT under SLURM: 20000 + job id mod 20000 (the same on every node of the job)."""
    if "RANK" in environ and "WORLD_SIZE" in environ:
        env = {k: environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
               if k in environ}
        env.setdefault("LOCAL_RANK", "0")
        return env
    if "SLURM_PROCID" in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST") or "localhost"
        return {"RANK": environ["SLURM_PROCID"], "WORLD_SIZE": environ.get("SLURM_NTASKS", "1"),
                "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
                "MASTER_ADDR": environ.get("MASTER_ADDR") or first_host(nodelist),
                "MASTER_PORT": environ.get("MASTER_PORT") or str(20000 + int(environ.get("SLURM_JOB_ID", "0")) % 20000)}
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": environ.get("MASTER_PORT", "29500")}


def init_distributed(device: str) -> tuple[int, int]:
    """Join (or, alone, form) the process group of this run -> (rank, world size).

    device: "cuda..." uses NCCL and pins the rank to GPU LOCAL_RANK; anything else gloo, with
    DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu). Call before the student is loaded."""
    import torch  # not at the top: the Snakefile imports this module to build the `distill` command

    # DeepSpeed calls torch.distributed's old collective names on every gather: one warning is enough
    warnings.filterwarnings("once", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
    os.environ.update(rendezvous_env(os.environ))
    on_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if not on_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed  # after DS_ACCELERATOR is set: DeepSpeed picks its accelerator on import

    if on_cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:  # gloo does the CPU collectives; skip DeepSpeed's shared-memory kernel (a JIT build of minutes)
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_cuda else "gloo", auto_mpi_discovery=False)
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def local_launcher(device: str = "auto") -> str:
    """The `distill` rule's launcher on this machine (its `mpi` resource), `python -m
    mechdistill.distill.launch`: it starts `tasks` copies of the command that follows (`{mpi} {tasks} python -m
    mechdistill distill ...`), several through torchrun, one as the command itself (torchrun would add ~4 s
    of start-up to every job). A SLURM profile replaces it with "srun --ntasks". device "cpu" adds
    DS_ACCELERATOR=cpu for DeepSpeed."""
    env = "DS_ACCELERATOR=cpu " if device == "cpu" else ""
    return f"{env}python -m mechdistill.distill.launch"


def launch_command(tasks: int, command: Sequence[str], free_port: Callable[[], int]) -> tuple[list[str], dict]:
    """What `local_launcher` runs for `tasks` copies of `command` -> (argv, environment updates): torchrun for
    several; the command alone for one (`rendezvous_env` makes it rank 0 of 1) on a free port: two
    single-rank jobs side by side would otherwise both take torch's default 29500."""
    if tasks < 1 or not command:
        raise ValueError(f"usage: python -m mechdistill.distill.launch TASKS COMMAND...; got {tasks} {list(command)}")
    if tasks > 1:
        return ["torchrun", "--standalone", "--no-python", "--nproc_per_node", str(tasks), *command], {}
    return list(command), {"MASTER_PORT": str(free_port())}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def warm_request(tasks: int, command: Sequence[str]) -> Request | None:
    """The warm server's request for `tasks` ranks of `command` when it is `python -m MODULE ARGS...`
    (mechdistill.warm forks the ranks with torchrun's variables), else None (started cold)."""
    if len(command) >= 3 and os.path.basename(command[0]).startswith("python") and command[1] == "-m":
        return Request(target=command[2], argv=command[3:], module=True, ranks=tasks)
    return None


if __name__ == "__main__":
    argv, env = launch_command(int(sys.argv[1]), sys.argv[2:], _free_port)
    os.environ.update(env)
    request, code = warm_request(int(sys.argv[1]), sys.argv[2:]), None
    if request is not None:  # served ranks meet on a free port, as one rank does
        code = run(request, {**os.environ, "MASTER_PORT": os.environ.get("MASTER_PORT") or str(_free_port())})
    if code is not None:
        sys.exit(code)
    os.execvp(argv[0], argv)


def deepspeed_config(enabled: bool, train_config: Any, zero_optimization: Mapping[str, Any] | None = None
                     ) -> dict | None:
    """A run's DeepSpeed config (distill.deepspeed): `backends.zero3_config` of its TrainConfig with
    distill.zero_optimization on top; None (not enabled) trains on one device without DeepSpeed."""
    if not enabled:
        return None
    from .backends import zero3_config  # torch: not at the top, the Snakefile imports this module

    ds_config = zero3_config(train_config)
    ds_config["zero_optimization"].update(zero_optimization or {})
    return ds_config


@contextlib.contextmanager
def zero3_init(ds_config: dict | None) -> Iterator[None]:
    """While open, transformers' from_pretrained creates models partitioned for ZeRO-3 (no-op without)."""
    if ds_config is None or ds_config["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig  # torch: not at the top (see deepspeed_config)

    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 (transformers holds a weak reference to it)
    yield
