"""Per-rule logging: library logs and progress bars go to the rule's log file; the entry of every workflow job."""

from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from .errors import MechdistillError

log = logging.getLogger("mechdistill")


def one_line(exc: MechdistillError) -> str:
    """A user's mistake as one line: its kind and message (file, row, key, fix); a message of several lines (the
    schema's list of invalid keys) has them joined with "; "."""
    first, *rest = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    return f"{type(exc).__name__}: {first}" + (" " + "; ".join(rest) if rest else "")


@contextlib.contextmanager
def rule_logging(log_path: str | None) -> Iterator[None]:
    """Send logging and stderr (tqdm bars) to `log_path` (no path: log records to stderr). An exception ends the
    log: a ConfigError or InputError (a user's mistake) as one line (`one_line`), any other with its traceback."""
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    if not log_path:
        handler = logging.StreamHandler()
        handler.setFormatter(fmt)
        root.addHandler(handler)
        try:
            yield
        finally:  # a later rule_logging in this process (a test) must not write to this stderr
            root.removeHandler(handler)
        return
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as fh:
        handler = logging.StreamHandler(fh)
        handler.setFormatter(fmt)
        root.addHandler(handler)
        old_err = sys.stderr
        sys.stderr = fh
        try:
            yield
        except MechdistillError as exc:
            log.error(one_line(exc))
            raise
        except Exception:
            log.exception("stage failed")
            raise
        finally:
            sys.stderr = old_err
            root.removeHandler(handler)


@contextlib.contextmanager
def job_logging(log_path: str | None) -> Iterator[None]:
    """The entry of every workflow job (workflow_scripts/*.py): `rule_logging` to the rule's log, and a ConfigError
    or InputError ends the job with exit status 1 and its message as one line (file, row, key, fix), last in the log
    and on stderr, with no traceback (what a user must fix, not a bug). Any other exception keeps its traceback."""
    try:
        with rule_logging(log_path):
            yield
    except MechdistillError as exc:
        print(f"mechdistill: error: {one_line(exc)}", file=sys.stderr)
        raise SystemExit(1) from None


# A job's log ends with this line when `job_logging` stopped it on a user's mistake (Snakemake's own log names the log
# of each failed job: "Error in rule <name>:" ... "    log: <path> (check log file(s) for error details)").
USER_ERROR_LINE = re.compile(r" ERROR mechdistill: (\w+Error: .*)$")
FAILED_RULE = re.compile(r"^Error in rule (\S+):$")
FAILED_LOG = re.compile(r"^\s+log: (.*?)(?: \(check log file\(s\) for error details\))?$")


def failed_job_errors(snakemake_logs: list[str]) -> list[str]:
    """The one-line errors of the jobs that failed on a user's mistake in the runs logged in `snakemake_logs`
    (Snakemake's own logs, as its `onerror` hook gets them), e.g. "teacher_cot (logs/teacher_cot/x.log): InputError:
    traces.jsonl, row 2: ... Fix: ...", so they are what a failed run prints last (a job on a cluster node writes
    its stderr where the terminal does not show it). Jobs that failed on a bug are left out: Snakemake names their
    logs, which end with the traceback."""
    errors, rule = [], None
    for snakemake_log in snakemake_logs:
        for line in Path(snakemake_log).read_text(errors="replace").splitlines():
            started, logged = FAILED_RULE.match(line), FAILED_LOG.match(line)
            if started:
                rule = started.group(1)
            elif logged and rule is not None:
                for path in logged.group(1).split(", "):
                    last = _last_line(Path(path))
                    found = USER_ERROR_LINE.search(last)
                    if found:
                        errors.append(f"{rule} ({path}): {found.group(1)}")
                rule = None
            elif not line.startswith(" "):  # the failed job's block ended without naming a log
                rule = None
    return list(dict.fromkeys(errors))


def _last_line(path: Path) -> str:
    """The last non-empty line of the text file `path` ("" if it is missing or empty)."""
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return lines[-1] if lines else ""
