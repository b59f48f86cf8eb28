"""The warm job server (mechdistill.warm): jobs forked from a server behave as cold processes do."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mechdistill import warm
from mechdistill.distill.launch import warm_request

REPO = Path(__file__).resolve().parents[1]


def started(tmp_path, preload, **env_updates) -> tuple[subprocess.Popen, dict]:
    """A server importing `preload`, and the environment its clients share with it (as the Snakefile's jobs do:
    the server starts in the environment they inherit)."""
    path = str(tmp_path / "warm.sock")
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_updates}
    for key in (warm.JOB_ENV, warm.SWITCH_ENV):
        env.pop(key, None)
    proc = warm.start_server(path, str(tmp_path / "server.log"), preload=preload, env=env)
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    return proc, {**env, warm.SOCKET_ENV: path}


@pytest.fixture
def server(tmp_path):
    """A server importing only `json` (fast) and a module that is not installed (skipped, as an optional
    dependency would be); yields its clients' environment."""
    proc, env = started(tmp_path, ("json", "not_an_installed_module"))
    yield env, tmp_path
    warm.stop_server(proc, env[warm.SOCKET_ENV])
    assert proc.returncode is not None


def client(env, tmp_path, script: str, *args, wait=True) -> subprocess.Popen | subprocess.CompletedProcess:
    path = tmp_path / "job.py"
    path.write_text(script)
    cmd = [sys.executable, "-m", "mechdistill.warm", "run", str(path), *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)


JOB = """
import os, sys
print("out", sys.argv[1:], os.getcwd() == os.environ["EXPECT_CWD"], os.environ.get("MECHDISTILL_WARM_JOB"))
print("err", os.getpid(), file=sys.stderr)
if __name__ == "__main__":
    sys.exit(int(sys.argv[1]))
"""


def test_a_served_job_gets_the_clients_argv_cwd_stdio_env_and_its_exit_status(server):
    env, tmp_path = server
    env["EXPECT_CWD"] = str(tmp_path)
    proc = client(env, tmp_path, JOB, "3", "x y")
    assert proc.returncode == 3
    assert proc.stdout == "out ['3', 'x y'] True 1\n"  # served: MECHDISTILL_WARM_JOB is set in the job
    assert "not preloaded: not_an_installed_module" in (tmp_path / "server.log").read_text()
    assert proc.stderr.startswith("err ")


def test_without_a_server_the_job_runs_cold(tmp_path):
    env = {**os.environ, warm.SOCKET_ENV: str(tmp_path / "absent.sock"), "PYTHONPATH": str(REPO),
           "EXPECT_CWD": str(tmp_path)}
    env.pop(warm.JOB_ENV, None)
    proc = client(env, tmp_path, JOB, "0")
    assert proc.returncode == 0
    assert proc.stdout == "out ['0'] True None\n"  # ran, but not as a served job


def test_a_job_whose_import_time_environment_differs_runs_cold(server):
    env, tmp_path = server
    env.update(EXPECT_CWD=str(tmp_path), HF_HUB_OFFLINE="0" if env.get("HF_HUB_OFFLINE") == "1" else "1")
    proc = client(env, tmp_path, JOB, "0")
    assert proc.stdout == "out ['0'] True None\n"
    assert "refused" in (tmp_path / "server.log").read_text()


def test_per_job_thread_count_reaches_torch_in_a_served_job(tmp_path):
    proc, env = started(tmp_path, ("torch",))
    try:
        env["OMP_NUM_THREADS"] = "1"  # per job (Snakemake sets it to the job's threads): not compared
        out = client(env, tmp_path, "import os, torch; print(torch.get_num_threads(), os.environ.get('MECHDISTILL_WARM_JOB'))")
        assert out.stdout.split() == ["1", "1"], out.stderr
    finally:
        warm.stop_server(proc, env[warm.SOCKET_ENV])


def test_ranks_get_torchruns_variables_and_one_failing_rank_stops_the_others(server, monkeypatch):
    env, tmp_path = server
    (tmp_path / "rankjob.py").write_text(
        "import os, sys, time\n"
        "rank = int(os.environ['RANK'])\n"
        "open(f'rank{rank}', 'w').write(' '.join(os.environ[k] for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR')))\n"
        "if rank == 1 and sys.argv[1] == 'fail': sys.exit(7)\n"
        "time.sleep(0 if sys.argv[1] == 'ok' else 60)\n")
    request = warm_request(2, ["python", "-m", "rankjob", "ok"])
    assert request == warm.Request(target="rankjob", argv=["ok"], module=True, ranks=2)
    monkeypatch.chdir(tmp_path)  # `python -m rankjob` finds it in the working directory
    assert warm.run(request, env) == 0
    assert sorted(p.read_text() for p in tmp_path.glob("rank?")) == ["0 0 2 127.0.0.1", "1 1 2 127.0.0.1"]
    started = time.monotonic()
    assert warm.run(warm.Request(target="rankjob", argv=["fail"], module=True, ranks=2), env) == 7
    assert time.monotonic() - started < 20  # rank 0's 60 s sleep was stopped when rank 1 failed
    assert warm_request(2, ["bash", "-c", "true"]) is None  # not python -m: started cold by torchrun


@pytest.mark.parametrize("how", ["SIGTERM to the client", "SIGKILL to the client"])
def test_stopping_the_client_stops_the_job(server, how):
    env, tmp_path = server
    script = "import os, time\nopen('job.pid', 'w').write(str(os.getpid()))\ntime.sleep(120)\n"
    proc = client(env, tmp_path, script, wait=False)
    pid_file = tmp_path / "job.pid"
    deadline = time.monotonic() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else "no job"
        time.sleep(0.05)
    job_pid = int(pid_file.read_text())
    assert job_pid != proc.pid  # the job is the server's fork, not the client
    proc.send_signal(signal.SIGTERM if how.startswith("SIGTERM") else signal.SIGKILL)
    code = proc.wait(timeout=30)
    assert code == (128 + signal.SIGTERM if how.startswith("SIGTERM") else -signal.SIGKILL)
    deadline = time.monotonic() + 15
    while _alive(job_pid):
        assert time.monotonic() < deadline, "the job outlived its client"
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_the_server_exits_with_its_parent(tmp_path):
    """A Snakemake killed without its onerror (kill -9) leaves no server behind."""
    path = tmp_path / "warm.sock"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from mechdistill import warm; "
        "p = warm.start_server(sys.argv[2], sys.argv[3], preload=()); print(p.pid, flush=True); time.sleep(120)"),
        str(REPO), str(path), str(tmp_path / "server.log")], stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    server_pid = int(parent.stdout.readline())
    deadline = time.monotonic() + 30
    while not path.exists():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 15
    while _alive(server_pid):
        assert time.monotonic() < deadline, "the server outlived its parent"
        time.sleep(0.1)
    assert "exiting" in (tmp_path / "server.log").read_text()
    assert not path.exists()


def test_import_time_environment_leaves_per_job_variables_out():
    env = {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PATH": "/bin", "PYTHONPATH": "/x", "RANK": "0"}
    assert warm.import_time_env(env) == {"HF_HUB_OFFLINE": "1", "PYTHONPATH": "/x"}
