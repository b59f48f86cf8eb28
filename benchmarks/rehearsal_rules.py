"""After a rehearsal (`snakemake --cores all --configfile config/paper.yaml config/rehearsal.yaml`): did it execute
every rule the paper run plans? Compares the rules, with their job counts, of the paper config's dry run under the
SLURM profile with the rules whose jobs finished in the rehearsal's Snakemake logs (.snakemake/log/), and checks
that the rehearsal's own dry run has nothing left to do. Exit 0 when the rule sets are equal, every rule ran at
least as many jobs as the paper plans, and nothing is left.

    python benchmarks/rehearsal_rules.py            # in the folder the rehearsal ran in
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path

PAPER = ["--configfile", "config/paper.yaml", "--workflow-profile", "profiles/slurm"]
REHEARSAL = ["--configfile", "config/paper.yaml", "config/rehearsal.yaml"]
FINISHED = re.compile(r"^Finished jobid: \d+ \(Rule: (\w+)\)", re.M)
STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$", re.M)


def job_stats(dry_run_output: str) -> dict[str, int]:
    """Rule -> jobs from the "Job stats:" table of `snakemake -n` (the total row dropped); {} when nothing is
    to be done."""
    if "Job stats:" not in dry_run_output:
        return {}
    table = dry_run_output.split("Job stats:")[-1].split("Reasons:")[0]
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}
    counts.pop("total", None)
    return counts


def finished_jobs(log_texts: list[str]) -> Counter:
    """Rule -> jobs that finished, summed over Snakemake log files (a resumed run has several)."""
    return Counter(rule for text in log_texts for rule in FINISHED.findall(text))


def rule_seconds(log_text: str) -> dict[str, list[float]]:
    """Rule -> wall seconds of each job that finished, from a Snakemake log's time stamps: a job starts at the
    stamp above its "rule NAME:" block (with its "jobid: N") and ends at the stamp above "Finished jobid: N"."""
    started: dict[str, tuple[str, datetime]] = {}
    seconds: dict[str, list[float]] = {}
    stamps = list(STAMP.finditer(log_text))
    for stamp, following in zip(stamps, stamps[1:] + [None]):
        at = datetime.strptime(" ".join(stamp.group(1).split()), "%a %b %d %H:%M:%S %Y")
        block = log_text[stamp.end(): following.start() if following else len(log_text)]
        for rule, jobid in re.findall(r"^(?:local)?rule (\w+):\n(?:    .*\n)*?    jobid: (\d+)", block, re.M):
            started[jobid] = (rule, at)
        for jobid, rule in re.findall(r"^Finished jobid: (\d+) \(Rule: (\w+)\)", block, re.M):
            if jobid in started:
                seconds.setdefault(rule, []).append((at - started.pop(jobid)[1]).total_seconds())
    return seconds


def dry_run(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-n", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"snakemake -n {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def main(workdir: Path = Path(".")) -> int:
    planned = job_stats(dry_run(PAPER))
    executed = finished_jobs([p.read_text() for p in sorted((workdir / ".snakemake" / "log").glob("*.log"))])
    left = job_stats(dry_run(REHEARSAL))
    seconds: dict[str, list[float]] = {}
    for path in sorted((workdir / ".snakemake" / "log").glob("*.log")):
        for rule, values in rule_seconds(path.read_text()).items():
            seconds.setdefault(rule, []).extend(values)
    print(f"{'rule':24} {'paper plans':>12} {'rehearsal ran':>14} {'mean s/job':>11} {'total s':>8}")
    for rule in sorted(set(planned) | set(executed)):
        took = seconds.get(rule, [])
        mean = f"{sum(took) / len(took):.0f}" if took else "-"
        print(f"{rule:24} {planned.get(rule, 0):>12} {executed.get(rule, 0):>14} {mean:>11} {sum(took):>8.0f}")
    print(f"{'total':24} {sum(planned.values()):>12} {sum(executed.values()):>14}")
    missing, extra = sorted(set(planned) - set(executed)), sorted(set(executed) - set(planned))
    fewer = {rule: f"{executed[rule]} of {n}" for rule, n in planned.items() if 0 < executed[rule] < n}
    if missing or extra or fewer or left:
        print(f"NOT EQUAL: planned but not run {missing}; run but not planned {extra}; fewer jobs ran than "
              f"planned {fewer}; left to do in the rehearsal {left}")
        return 1
    print(f"equal: the rehearsal ran every one of the paper's {len(planned)} rules, at least as many jobs of each "
          f"as the paper plans ({sum(planned.values())}); nothing is left to do")
    return 0


if __name__ == "__main__":
    sys.exit(main())
