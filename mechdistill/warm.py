"""Warm job starts: one server imports torch, transformers and DeepSpeed once; each local job is a fork of it.

A job of this workflow is a fresh Python process, and on a CPU most of a small job is start-up: importing torch,
transformers (which pulls scikit-learn and scipy) and DeepSpeed takes 6-8 s, where the work on a tiny model takes
one or two. The paper's DAG has ~750 jobs, so a rehearsal of it on a laptop would spend over an hour importing.

When Snakemake runs jobs on this machine (not through a cluster executor, not a dry run) and has enough of them
to run, the Snakefile starts `serve` in the background (`start_server`). The server imports `PRELOAD` and then
only waits on a Unix socket, so it never starts a thread pool that a fork would break. Each job then reaches it
through a small client instead of importing:

    python -m mechdistill.warm run SCRIPT                        Snakemake's `script:` jobs (serve_snakemake_scripts)
    python -m mechdistill.distill.launch N python -m mechdistill ...     the ranks of `distill` (run(ranks=N))

The client sends its argv, working directory, environment and its stdin/stdout/stderr (SCM_RIGHTS) to the
server. The server forks a supervisor for the request, and the supervisor forks the job (N jobs with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT set, like torchrun, for N ranks). Each job is a process of its
own, in a session of its own, writing to the client's files. Its exit status becomes the client's.

What stays as in a cold start:
- Isolation: every job is a fresh fork of the same server; nothing one job does reaches another.
- Kills: a signal to the client (Snakemake stopping a job, Ctrl-C) is sent to the job's process group. A client
  that dies (kill -9) closes its socket, and the supervisor kills the job. One rank failing stops the others.
- Threads: torch's thread count is set from the job's OMP_NUM_THREADS, the value Snakemake gives each job
  (a cold process reads it at import).
- Environment: variables read at import time (HF_*, TRANSFORMERS_*, TORCH*, CUDA_*, DS_*, VLLM_*, PYTHON*, ...)
  must equal the server's. A job whose environment differs is not served, and runs cold.

Whenever the server is missing, not ready yet, or refuses, the client returns None and the job runs as a cold
process, as without it. MECHDISTILL_WARM=0 turns it off. The server exits when Snakemake does.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import runpy
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

SOCKET_ENV = "MECHDISTILL_WARM_SOCKET"  # set by the Snakefile for its jobs: where the server listens
JOB_ENV = "MECHDISTILL_WARM_JOB"  # set inside a served job (and so in what it spawns): never served again
SWITCH_ENV = "MECHDISTILL_WARM"  # "0": never start or use a server

# Imported by the server before it listens: what the jobs of this workflow import.
PRELOAD = (
    "numpy", "pandas", "pyarrow.parquet", "torch", "transformers", "deepspeed", "snakemake.script",
    "transformers.models.llama.modeling_llama", "transformers.models.qwen3.modeling_qwen3",
    "transformers.models.gemma3.modeling_gemma3", "transformers.models.t5.modeling_t5",
    "mechdistill.cli", "mechdistill.stages.data", "mechdistill.stages.teacher", "mechdistill.stages.anchors",
    "mechdistill.stages.characterize", "mechdistill.stages.patching", "mechdistill.stages.distill",
    "mechdistill.stages.evaluate", "mechdistill.stages.claims", "mechdistill.stages.model_free",
)
# Read by libraries when they are imported, so a served job must see the server's values.
IMPORT_TIME_PREFIXES = (
    "HF_", "HUGGINGFACE", "TRANSFORMERS_", "TOKENIZERS_", "TORCH", "PYTORCH", "CUDA_", "NCCL_", "DS_", "VLLM_",
    "PYTHON", "LD_", "KMP_", "MKL_", "OMP_", "XDG_", "HOME", "TMPDIR", "MPL",
)
PER_JOB = {  # import-time-looking variables Snakemake sets per job; the job applies them itself (_fork_job, _run_job)
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "TMPDIR",
}
KILL_GRACE_S = 5.0


@dataclass(frozen=True)
class Request:
    """One job: run `target` (a script path, or a module when `module`) with `argv` as sys.argv[1:]."""

    target: str
    argv: Sequence[str]
    module: bool = False
    ranks: int = 1

    def payload(self, cwd: str, environ: Mapping[str, str]) -> bytes:
        return json.dumps({"target": self.target, "argv": list(self.argv), "module": self.module,
                           "ranks": self.ranks, "cwd": cwd, "env": dict(environ)}).encode()


# --------------------------------------------------------------------------------------------- the client


def run_script_or_exec(script: str, argv: Sequence[str]) -> None:
    """`python -m mechdistill.warm run SCRIPT ARGS`: SCRIPT in a fork of the warm server, exiting with its status;
    where no server takes it, replace this process with `python SCRIPT ARGS` (a cold start)."""
    code = run(Request(target=os.path.abspath(script), argv=argv))
    if code is not None:
        sys.exit(code)
    os.execv(sys.executable, [sys.executable, script, *argv])


def serve_snakemake_scripts() -> None:
    """Make Snakemake's `script:` jobs start as `python -m mechdistill.warm run SCRIPT` (so in a fork of the warm
    server when one is up) instead of `python SCRIPT`. Not for jobs in a conda env, container or env module,
    nor for --edit-notebook; a Snakemake without the expected hooks keeps its own way (cold starts)."""
    # not at the top: the job clients import this module, and should import only the standard library
    from snakemake.script import PythonScript

    cold = PythonScript.execute_script
    if getattr(cold, "mechdistill_warm", False) or not hasattr(PythonScript, "_execute_cmd"):
        return

    def execute_script(self, fname, edit=False):
        if edit or any(getattr(self, name, None) is not None for name in ("conda_env", "container_img", "env_modules")):
            return cold(self, fname, edit)
        self._execute_cmd("{py_exec:q} -m mechdistill.warm run {fname:q}", py_exec=sys.executable, fname=fname,
                          is_python_script=True)

    execute_script.mechdistill_warm = True
    PythonScript.execute_script = execute_script


def run(request: Request, environ: Mapping[str, str] | None = None) -> int | None:
    """`request` run by the warm server -> its exit status (128 + N for a signal N, as a shell reports it),
    or None when no server takes it (then run it cold). Signals to this process go to the job."""
    environ = dict(os.environ if environ is None else environ)
    path = environ.get(SOCKET_ENV)
    if not path or environ.get(JOB_ENV) or environ.get(SWITCH_ENV) == "0":
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        _send(conn, request.payload(os.getcwd(), environ), fds=[0, 1, 2])
        reply = _receive(conn)
    except OSError:
        conn.close()
        return None
    if "refused" in reply:
        conn.close()
        return None
    forwarded = {sig: signal.signal(sig, lambda signum, frame: _send(conn, json.dumps({"signal": signum}).encode()))
                 for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        while True:
            with contextlib.suppress(InterruptedError):
                message = _receive(conn)
                if "exit" in message:
                    return int(message["exit"])
    except OSError:
        return 1  # the server went away mid-job
    finally:
        for sig, handler in forwarded.items():
            signal.signal(sig, handler)
        conn.close()


def _send(conn: socket.socket, data: bytes, fds: Iterable[int] = ()) -> None:
    message = struct.pack("!I", len(data)) + data
    fds = list(fds)
    sent = socket.send_fds(conn, [message], fds) if fds else conn.send(message)
    if sent < len(message):
        conn.sendall(message[sent:])


def _receive(conn: socket.socket, with_fds: bool = False) -> dict | tuple[dict, list[int]]:
    """One length-prefixed JSON message (and the file descriptors sent with it)."""
    head, fds, _, _ = socket.recv_fds(conn, 4, 3) if with_fds else (conn.recv(4), [], 0, None)
    if len(head) < 4:
        head += _exactly(conn, 4 - len(head))
    message = json.loads(_exactly(conn, struct.unpack("!I", head)[0]))
    return (message, fds) if with_fds else message


def _exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the other side closed the socket")
        data += chunk
    return data


# --------------------------------------------------------------------------------------------- the server


def start_server(socket_path: str, log_path: str, preload: Sequence[str] = PRELOAD,
                 env: Mapping[str, str] | None = None) -> subprocess.Popen:
    """Start `serve` in the background for this process's jobs, in environment `env` (default: this process's,
    which the jobs inherit); it exits when this process does. The socket appears once everything is imported;
    jobs started before then run cold."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "mechdistill.warm", "serve", "--socket", socket_path, "--parent", str(os.getpid()),
             "--preload", ",".join(preload)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=None if env is None else dict(env))


MIN_JOBS = 3  # fewer jobs than this do not repay the server's imports (~8 s of one core)


_WORKFLOW_SERVER: list[tuple[subprocess.Popen, str]] = []  # the server start_for_workflow started, if any


def start_for_workflow(jobs_to_run: int, local: bool, log_dir: str) -> None:
    """The Snakefile's onstart: start a server for this run's jobs when they run here (`local`) and are at least
    MIN_JOBS, and point the jobs at it (SOCKET_ENV). `stop_for_workflow` stops it."""
    if not local or jobs_to_run < MIN_JOBS or os.environ.get(SWITCH_ENV) == "0" or not hasattr(os, "pidfd_open"):
        return
    path = os.path.join(tempfile.gettempdir(), f"mechdistill-warm-{os.getpid()}.sock")
    serve_snakemake_scripts()
    _WORKFLOW_SERVER.append((start_server(path, os.path.join(log_dir, f"mechdistill-warm-{os.getpid()}.log")), path))
    os.environ[SOCKET_ENV] = path


def stop_for_workflow() -> None:
    """The Snakefile's onsuccess and onerror: stop the server of start_for_workflow."""
    while _WORKFLOW_SERVER:
        stop_server(*_WORKFLOW_SERVER.pop())
    os.environ.pop(SOCKET_ENV, None)


def stop_server(server: subprocess.Popen | None, socket_path: str) -> None:
    """Stop a server `start_server` started (its running jobs finish, their clients still wait on them)."""
    if server is not None and server.poll() is None:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(socket_path)


def import_time_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables of `environ` that libraries read when imported (IMPORT_TIME_PREFIXES, less PER_JOB)."""
    return {k: v for k, v in environ.items() if k.startswith(IMPORT_TIME_PREFIXES) and k not in PER_JOB}


def serve(socket_path: str, parent_pid: int, preload: Sequence[str] = PRELOAD) -> None:
    """Import `preload`, then fork a supervisor per connection on `socket_path` until `parent_pid` exits or
    SIGTERM. Never returns in a supervisor or a job (they leave through os._exit)."""
    started = time.perf_counter()
    environ_at_start = dict(os.environ)
    for name in preload:
        try:
            importlib.import_module(name)
        except ImportError as err:  # an optional dependency (DeepSpeed, a model family): its jobs import it cold
            print(f"warm server: not preloaded: {name} ({err})", flush=True)
    baseline = import_time_env(environ_at_start)
    if "deepspeed" in sys.modules and "DS_ACCELERATOR" not in baseline:  # it chose one at import: say which
        baseline["DS_ACCELERATOR"] = sys.modules["deepspeed"].accelerator.get_accelerator().device_name()
    # what the imports put into the environment (KMP_*, TORCHINDUCTOR_CACHE_DIR, ...): a cold job's imports would too
    added = {k: v for k, v in os.environ.items() if environ_at_start.get(k) != v}
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    partial_path = f"{socket_path}.{os.getpid()}"
    listener.bind(partial_path)
    listener.listen(64)
    os.replace(partial_path, socket_path)  # ready: clients find the socket only now
    bound = os.stat(socket_path).st_ino
    print(f"warm server {os.getpid()}: imported {len(preload)} modules in {time.perf_counter() - started:.1f} s, "
          f"listening on {socket_path}", flush=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
    served = 0
    try:
        while os.getppid() == parent_pid:
            _reap()
            if not select.select([listener], [], [], 1.0)[0]:
                continue
            conn, _ = listener.accept()
            served += 1
            if os.fork() == 0:
                listener.close()
                _supervise(conn, baseline, added)  # never returns
            conn.close()
    finally:
        print(f"warm server {os.getpid()}: served {served} requests, exiting", flush=True)
        with contextlib.suppress(FileNotFoundError):
            if os.stat(socket_path).st_ino == bound:  # not a newer server's
                os.unlink(socket_path)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _supervise(conn: socket.socket, baseline: Mapping[str, str], added: Mapping[str, str]) -> None:
    """A supervisor: read one request, fork its job(s), relay signals, report the exit status; then exit."""
    code = 1
    try:
        request, fds = _receive(conn, with_fds=True)
        differing = _differing(baseline, import_time_env(request["env"]))
        if differing:
            print(f"refused {request['target']}: environment differs from the server's: {differing}", flush=True)
            _send(conn, json.dumps({"refused": f"environment differs from the server's: {differing}"}).encode())
            os._exit(0)
        _send(conn, b"{}")
        request["env"].update(added)
        pids = [_fork_job(request, fds, rank) for rank in range(request["ranks"])]
        for fd in fds:
            os.close(fd)
        code = _wait_jobs(conn, pids)
        _send(conn, json.dumps({"exit": code}).encode())
    except BaseException:  # noqa: BLE001 (a supervisor must never return into the server's loop)
        traceback.print_exc()
    os._exit(0)


def _differing(server: Mapping[str, str], job: Mapping[str, str]) -> list[str]:
    """The import-time variables a job sees otherwise than the server did; DS_ACCELERATOR only where the job
    names one (the server's is the accelerator DeepSpeed chose at import)."""
    keys = set(server) | set(job)
    if "DS_ACCELERATOR" not in job:
        keys.discard("DS_ACCELERATOR")
    return sorted(k for k in keys if server.get(k) != job.get(k))


def _rank_env(request: Mapping, rank: int) -> dict[str, str]:
    """torchrun's variables for `rank` of a multi-rank request ({} for one process), on the client's MASTER_PORT
    (the distill launcher gives it a free one)."""
    if request["ranks"] == 1:
        return {}
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(request["ranks"]),
            "LOCAL_WORLD_SIZE": str(request["ranks"]), "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": request["env"].get("MASTER_PORT", "29500")}


def _fork_job(request: dict, fds: Sequence[int], rank: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    os.setsid()  # its own process group: a kill reaches what it starts too
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    for target_fd, fd in enumerate(fds):
        os.dup2(fd, target_fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the job's own stdio, for as long as it lives)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**request["env"], **_rank_env(request, rank), JOB_ENV: "1"})
    tempfile.tempdir = None  # found again from this job's TMPDIR
    os._exit(_run_job(request))


def _run_job(request: Mapping) -> int:
    """Run the job's Python in this (forked) process -> its exit status."""
    if "torch" in sys.modules and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    sys.argv = [request["target"], *request["argv"]]
    sys.path[0] = os.getcwd() if request["module"] else os.path.dirname(request["target"])  # as `python` sets it
    try:
        if request["module"]:
            runpy.run_module(request["target"], run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(request["target"], run_name="__main__")
        code = 0
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, int | None):
            print(stop.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 (printed as a cold process would, then the status)
        traceback.print_exc()
        code = 1
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def _wait_jobs(conn: socket.socket, pids: list[int]) -> int:
    """Wait for the jobs, forwarding the client's signals -> the first failing status (128 + N for signal N),
    else 0. A failing job, or the client going away, stops the others."""
    pidfds = {os.pidfd_open(pid): pid for pid in pids}
    code, running, kill_deadline, client = 0, set(pids), None, [conn]
    while running:
        for fd in select.select([*client, *pidfds], [], [], 0.5)[0]:
            if fd is conn:
                try:
                    sig = _receive(conn).get("signal", signal.SIGTERM)
                except (OSError, ValueError):  # the client is gone: stop the job
                    sig, client = signal.SIGTERM, []
                _signal_groups(running, sig)
                kill_deadline = kill_deadline or time.monotonic() + KILL_GRACE_S
            elif pidfds[fd] in running:
                exit_code = os.waitstatus_to_exitcode(os.waitpid(pidfds[fd], 0)[1])
                running.discard(pidfds[fd])
                if exit_code and not code:
                    code = 128 - exit_code if exit_code < 0 else exit_code
                    _signal_groups(running, signal.SIGTERM)
                    kill_deadline = time.monotonic() + KILL_GRACE_S
        if kill_deadline and time.monotonic() > kill_deadline:
            _signal_groups(running, signal.SIGKILL)
    for fd in pidfds:
        os.close(fd)
    return code


def _signal_groups(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mechdistill.warm",
        description="The warm job server the Snakefile starts for local runs (see the module's docstring): it "
                    "imports torch, transformers and DeepSpeed once and forks each job from there. "
                    "MECHDISTILL_WARM=0 turns it off.")
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run a Python script in a fork of the server, or cold without one")
    run_parser.add_argument("script", help="the script (Snakemake's job script)")
    run_parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    serve_parser = sub.add_parser("serve", help="import, then serve jobs on a Unix socket until --parent exits")
    serve_parser.add_argument("--socket", required=True, help="path of the Unix socket to listen on")
    serve_parser.add_argument("--parent", type=int, required=True, help="exit when this process id is gone")
    serve_parser.add_argument("--preload", default=",".join(PRELOAD), help="comma-separated modules to import")
    args = parser.parse_args(argv)
    if args.command == "run":
        run_script_or_exec(args.script, args.args)
    else:
        serve(args.socket, args.parent, [name for name in args.preload.split(",") if name])


if __name__ == "__main__":
    main()
