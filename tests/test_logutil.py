"""The entry of every workflow job (`job_logging`): a user's mistake ends the job as one line, a bug keeps its
traceback; and the failed jobs' lines that a failed run repeats last (`failed_job_errors`)."""

import subprocess
import sys

import pytest

from mechdistill.logutil import failed_job_errors
from tests.helpers import REPO

JOB = """
import logging, sys
from mechdistill.errors import ConfigError, InputError
from mechdistill.logutil import job_logging
if __name__ == "__main__":
    with job_logging(sys.argv[1]):
        logging.getLogger("mechdistill.stage").info("working")
        raise {error}
"""


def run_job(tmp_path, error: str) -> tuple[subprocess.CompletedProcess, str]:
    """A workflow script whose work raises `error`, run as Snakemake runs it (its own Python process)."""
    script, log = tmp_path / "job.py", tmp_path / "logs" / "job.log"
    script.write_text(JOB.format(error=error))
    proc = subprocess.run([sys.executable, str(script), str(log)], capture_output=True, text=True, cwd=REPO)
    return proc, log.read_text()


@pytest.mark.parametrize("error, line", [
    ('InputError("not a JSON object.", file="traces.jsonl", row=2, fix="write one JSON object per line.")',
     "InputError: traces.jsonl, row 2: not a JSON object. Fix: write one JSON object per line."),
    ('ConfigError("invalid config:\\n  a.yaml: \'x\' is 1\\n  a.yaml: \'y\' is 2")',
     "ConfigError: invalid config: a.yaml: 'x' is 1; a.yaml: 'y' is 2"),
])
def test_a_users_mistake_ends_the_job_as_one_line_without_traceback(tmp_path, error, line):
    proc, log = run_job(tmp_path, error)
    assert proc.returncode == 1
    assert proc.stderr == f"mechdistill: error: {line}\n" and proc.stdout == ""
    assert "Traceback" not in log
    assert log.splitlines()[-1].endswith(f" ERROR mechdistill: {line}") and " INFO mechdistill.stage: working" in log


def test_any_other_exception_keeps_its_traceback(tmp_path):
    proc, log = run_job(tmp_path, 'ValueError("a bug")')
    assert proc.returncode == 1
    assert "Traceback (most recent call last)" in proc.stderr and proc.stderr.strip().endswith("ValueError: a bug")
    assert "ERROR mechdistill: stage failed\nTraceback (most recent call last)" in log
    assert log.strip().endswith("ValueError: a bug") and "mechdistill: error:" not in proc.stderr


def test_failed_job_errors_repeats_the_users_mistakes_of_the_failed_jobs(tmp_path, monkeypatch):
    """Snakemake's log names each failed job's log; those that end with a user's mistake are repeated."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs/a.log").write_text("2026-12-07 01:00:00,000 INFO x: working\n"
                                         "2026-12-07 01:00:01,000 ERROR mechdistill: InputError: f.csv, row 3: bad. "
                                         "Fix: mend it.\n")
    (tmp_path / "logs/b.log").write_text("Traceback (most recent call last):\nValueError: a bug\n")
    (tmp_path / "run.snakemake.log").write_text(
        "localrule a:\n    log: logs/other.log\n    jobid: 1\n"
        "Error in rule a:\n    message: None\n    jobid: 1\n"
        "    log: logs/a.log (check log file(s) for error details)\n"
        "Error in rule b:\n    jobid: 2\n    log: logs/b.log (check log file(s) for error details)\n"
        "Error in rule c:\n    jobid: 3\nrule d:\n    log: logs/a.log\n"
        "Exiting because a job execution failed. Look above for error messages\n")
    assert failed_job_errors([str(tmp_path / "run.snakemake.log")]) == [
        "a (logs/a.log): InputError: f.csv, row 3: bad. Fix: mend it."]
