"""Apply a list of config mistakes to config/tiny.yaml and classify what the workflow does with each.

    python benchmarks/config_mistakes.py [--out config_mistakes.json] [--jobs 2] [--only NAME,NAME]
                                         [--run-jobs] [--job-timeout 240] [--keep] [--strict]

Each case (CASES below: data, extend it) is a named edit of the tiny config: a value set at a dotted key
path, a key removed or renamed. For each, `snakemake -n` runs in a fresh temporary folder (`-d`) with the
edited config, and its exit status and output are classified (`classify`):

    stopped, names key            start-up stopped with our message (ConfigError / InputError or a plain
                                  message), naming the key path
    stopped, message without key  start-up stopped with a message that does not name the key
    raw traceback at start-up     a Python traceback, or an exception class other than ours
                                  (TypeError, KeyError, InputFunctionException wrapping a KeyError, ...)
    accepted, legal               start-up passed, and the value is legal (a control case)
    accepted, should stop         start-up passed a value it should refuse (--run-jobs tells which of
                                  the next two it is)
    accepted, silent coercion     ... and the job that reads it ran to the end with it (--run-jobs)
    accepted, fails in job        ... and that job failed (--run-jobs; the record says whether its
                                  message names the key)
    shell executed                a sentinel file (PWNED*) appeared in the temporary folder: a config
                                  value ran as a shell command (wins over every other class)

--run-jobs: a case that passes start-up runs the one target that consumes its value (`Case.target`)
with `--cores 1` and a timeout, in a copy of a finished run of the unedited tiny config (built once,
under the work folder, or given with --base), so only the jobs whose inputs or settings changed run.
The sentinels are harmless `touch PWNED...` inside the case's own temporary folder.

Prints a markdown table and the count per class; --out writes every record as JSON. At most 2 cases
run at once (--jobs). --strict: exit status 1 when any case is neither "stopped, names key" nor
"accepted, legal".
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
BASE_CONFIG = REPO / "config" / "tiny.yaml"
SENTINEL = "PWNED"

STOPPED_NAMES_KEY = "stopped, names key"
STOPPED_NO_KEY = "stopped, message without key"
RAW = "raw traceback at start-up"
ACCEPTED_LEGAL = "accepted, legal"
ACCEPTED_SHOULD_STOP = "accepted, should stop"
ACCEPTED_COERCED = "accepted, silent coercion"
ACCEPTED_FAILS_IN_JOB = "accepted, fails in job"
SHELL = "shell executed"
CLASSES = (STOPPED_NAMES_KEY, STOPPED_NO_KEY, RAW, ACCEPTED_LEGAL, ACCEPTED_SHOULD_STOP, ACCEPTED_COERCED,
           ACCEPTED_FAILS_IN_JOB, SHELL)
GOOD_CLASSES = (STOPPED_NAMES_KEY, ACCEPTED_LEGAL)

OUR_ERRORS = ("ConfigError", "InputError")
# Snakemake's own user-facing stops: a message (a missing file, a bad workflow), not a Python traceback
SNAKEMAKE_MESSAGES = ("MissingInputException", "WorkflowError")
# Snakemake's wrappers around an exception raised in an input function or a rule: the inner class decides
SNAKEMAKE_WRAPPERS = ("InputFunctionException", "RuleException")


# ----------------------------------------------------------------------------- the cases (data)

@dataclass(frozen=True)
class Edit:
    """One change to the config: `op` "set" (value at `path`), "drop" (remove the key at `path`) or "rename"
    (the key at `path` becomes `value`). A path is dotted; a key that itself holds dots is written in
    brackets: "methods.cwt.grid[params.n_chunks]"."""

    op: str
    path: str
    value: Any = None

    def keys(self) -> list[str]:
        return [a or b for a, b in re.findall(r"\[([^\]]+)\]|([^.\[\]]+)", self.path)]

    def dotted(self) -> str:
        """The path as error messages write it: keys joined by dots."""
        return ".".join(self.keys())

    def describe(self) -> str:
        if self.op == "drop":
            return f"remove {self.dotted()}"
        if self.op == "rename":
            return f"rename {self.dotted()} -> {self.value}"
        return f"{self.dotted()}: {json.dumps(self.value)}"

    def apply(self, config: dict) -> None:
        *parents, leaf = self.keys()
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        if self.op == "set":
            node[leaf] = copy.deepcopy(self.value)
        elif self.op == "drop":
            del node[leaf]
        elif self.op == "rename":
            node[self.value] = node.pop(leaf)
        else:
            raise ValueError(f"unknown edit op {self.op!r}")


def set_(path: str, value: Any) -> Edit:
    return Edit("set", path, value)


def drop(path: str) -> Edit:
    return Edit("drop", path)


def rename(path: str, new_key: str) -> Edit:
    return Edit("rename", path, new_key)


@dataclass(frozen=True)
class Case:
    """A config mistake (or a legal control, `legal=True`). `key`: the key path a good error names (dotted;
    default: the first edit's path, a rename's new key). `names`: further texts that count as naming it.
    `target`: the file whose job reads the value (--run-jobs)."""

    name: str
    edits: tuple[Edit, ...]
    legal: bool = False
    key: str | None = None
    names: tuple[str, ...] = ()
    target: str | None = None
    note: str = ""

    def key_path(self) -> str:
        if self.key is not None:
            return self.key
        first = self.edits[0]
        if first.op == "rename":
            return ".".join([*first.keys()[:-1], first.value])
        return first.dotted()

    def describe(self) -> str:
        return "; ".join(e.describe() for e in self.edits)


def case(name: str, *edits: Edit, **kw: Any) -> Case:
    return Case(name, edits, **kw)


D, TEACHER, STUDENT = "tiny_icd", "tiny_llama", "tiny_student"
DATA = f"results/{D}/data/train.parquet"
COT = f"results/{D}/{TEACHER}/cot/train.parquet"
PATCHING = f"results/{D}/{TEACHER}/patching/phase1.parquet"
TARGETS = f"results/{D}/{TEACHER}/targets/train.parquet"


# what the consuming jobs read, built once by --run-jobs (without --base) from the unedited config
BASE_TARGETS = (*(f"results/{D}/{TEACHER}/targets/{split}.parquet" for split in ("train", "val")),
                *(f"results/{D}/{TEACHER}/baseline_data/{m}/train.parquet" for m in ("morsd", "semcot")),
                *(f"results/{D}/{model}/heads/{kind}.parquet" for model in (TEACHER, STUDENT) for kind in ("coarse", "refine")),
                PATCHING)


def selection(method: str) -> str:
    return f"results/{D}/{STUDENT}/{method}/selection.json"


def shell_probe(name: str, value: str) -> Case:
    """A cwt grid value that runs `touch PWNED...` if it reaches a shell unquoted. (With a grid point named by
    repr(), only a value holding a quote escapes: repr puts it in double quotes, where $( ) and backticks run.)"""
    return case(name, set_("methods.cwt.grid", {"params.n_chunks": [value]}), key="methods.cwt.grid.params.n_chunks",
                target=selection("cwt"), note="a string for an integer setting, holding a shell command")


CASES: tuple[Case, ...] = (
    # unknown or misspelt keys, at every level
    case("top_level_typo", set_("sead", 0)),
    case("dataset_key_typo", rename(f"datasets.{D}.adapter", "adpter")),
    case("dataset_params_typo", rename(f"datasets.{D}.params.n_docs", "n_doc")),
    case("candidates_typo", set_(f"datasets.{D}.candidates.sise", 6)),
    case("model_key_typo", set_(f"models.{TEACHER}.tokeniser", "byte")),
    case("generation_typo", set_("generation.max_new_token", 12)),
    case("anchors_typo", set_("anchors.early_token", 4)),
    case("clean_prompts_typo", set_("clean_prompts.n_label", 8)),
    case("patching_typo", set_("patching.n_randum", 2)),
    case("distill_train_typo", set_("distill.train.max_step", 2)),
    case("distill_weights_typo", set_("distill.weights[phase1.atn]", 1.0)),
    case("pool_typo", set_("distill.pools.phase1.kk", 4)),
    case("method_name_typo", set_("methods.mechh", {})),
    case("method_entry_typo", set_("methods.mech.wieghts", {"alpha": 1.0})),
    case("baseline_param_typo", set_("methods.morsd.params.n_sample", 2)),
    case("grid_key_typo", set_("methods.mech.grid", {"alpah": [0.5, 1.0]}), key="methods.mech.grid.alpah"),
    # wrong types
    case("seed_string", set_("seed", "zero")),
    case("max_new_tokens_string", set_("generation.max_new_tokens", "12")),
    case("batch_size_float", set_("generation.batch_size", 2.5)),
    case("lr_string", set_("distill.train.lr", "1e-3"), note="PyYAML reads an unquoted 1e-3 as a string"),
    case("exemplar_string", set_("prompts.exemplar", "yes")),
    case("bins_scalar", set_("patching.bins", 4)),
    case("bins_string_item", set_("patching.bins", ["two", 4])),
    case("students_string", set_("students", STUDENT)),
    case("teacher_list", set_("teacher", [TEACHER])),
    case("n_docs_scalar", set_(f"datasets.{D}.params.n_docs", 3)),
    case("generation_null", set_("generation", None)),
    # out of range
    case("max_new_tokens_zero", set_("generation.max_new_tokens", 0)),
    case("batch_size_negative", set_("generation.batch_size", -1)),
    case("n_bootstrap_zero", set_("patching.n_bootstrap", 0)),
    case("max_steps_zero", set_("distill.train.max_steps", 0)),
    case("top_k_zero", set_("distill.top_k", 0)),
    case("lr_negative", set_("distill.train.lr", -1.0e-3)),
    case("alpha_negative", set_("distill.weights.alpha", -1.0)),
    case("early_tokens_zero", set_("anchors.early_tokens", 0)),
    case("codes_per_doc_reversed", set_(f"datasets.{D}.params.codes_per_doc", [3, 2])),
    case("student_deeper_than_base", set_(f"models.{STUDENT}.n_layers", 5)),
    case("pool_band_without_layers", set_("distill.pools.phase2.layers", [0.9, 0.95])),
    case("bins_beyond_heads", set_("patching.bins", [2, 100]), target=PATCHING,
         note="the tiny teacher has 8 heads"),
    # unknown names
    case("teacher_unknown", set_("teacher", "tiny_lama")),
    case("student_unknown", set_("students", ["tiny_studnet"])),
    case("adapter_unknown", set_(f"datasets.{D}.adapter", "icd10")),
    case("arch_unknown", set_(f"models.{TEACHER}.arch", "gpt5")),
    case("source_unknown", set_(f"models.{TEACHER}.source", "huggingface")),
    case("subset_base_unknown", set_(f"models.{STUDENT}.base", "tiny_lama"),
         names=(f"models.{STUDENT} refers to model 'tiny_lama'",)),
    case("backend_unknown", set_("generation.backend", "vlm")),
    case("method_base_unknown", set_("methods.mech.base", "mechh")),
    case("method_kind_unknown", set_("methods.mech.kind", "best")),
    case("criterion_unknown", set_("distill.select.criterion", "val_f1")),
    case("cwt_chunking_unknown", set_("methods.cwt.params.chunking", "random"), target=selection("cwt")),
    case("unicott_structure_unknown", set_("methods.unicott.params.structure", "forest"), target=selection("unicott")),
    case("semcot_condense_unknown", set_("methods.semcot.params.condense", "gpt4"), target=selection("semcot")),
    # model sources and ids
    case("hf_without_id", set_(f"models.{TEACHER}", {"source": "hf"}), key=f"models.{TEACHER}.id",
         names=(f"'models.{TEACHER}' 'id' is a required property",)),
    case("hf_id_not_cached", set_(f"models.{TEACHER}", {"source": "hf", "id": "no-such-org/no-such-model"}),
         key=f"models.{TEACHER}.id", target=COT, note="offline, not in the HF cache"),
    case("local_path_missing", set_(f"models.{TEACHER}", {"source": "local", "path": "/nonexistent/model"}),
         key=f"models.{TEACHER}.path", target=COT),
    case("gguf_package_missing", set_(f"models.{TEACHER}",
                                      {"source": "gguf_package", "package": "no_such_pkg", "file": "x.gguf"}),
         key=f"models.{TEACHER}.package", target=COT),
    # path templates
    case("traces_unknown_placeholder", set_("generation.backend", "file"), set_("generation.traces", "/tmp/x-{foo}.jsonl"),
         key="generation.traces"),
    case("backend_file_without_traces", set_("generation.backend", "file"), key="generation.traces"),
    # method settings and grids
    case("morsd_n_samples_negative", set_("methods.morsd.params.n_samples", -1), target=selection("morsd"),
         note="trains on the greedy traces only"),
    case("morsd_n_samples_string", set_("methods.morsd.params.n_samples", "two"), target=selection("morsd")),
    case("morsd_min_f1_above_one", set_("methods.morsd.params.min_f1", 2.0), target=selection("morsd")),
    case("morsd_rd_keep_unknown", set_("methods.morsd.params.rd_keep", "middle"), target=selection("morsd")),
    case("cwt_n_chunks_zero", set_("methods.cwt.params.n_chunks", 0), target=selection("cwt"),
         note="clamped to 1"),
    case("semcot_K_string", set_("methods.semcot.params.K", "two"), target=selection("semcot")),
    case("cwt_grid_n_chunks_string", set_("methods.cwt.grid", {"params.n_chunks": ["two"]}),
         key="methods.cwt.grid.params.n_chunks", target=selection("cwt")),
    shell_probe("cwt_grid_shell_dollar", f"it's $(touch {SENTINEL})"),
    shell_probe("cwt_grid_shell_backticks", f"it's `touch {SENTINEL}_BT`"),
    shell_probe("cwt_grid_shell_semicolon", f"1; touch {SENTINEL}_SC"),
    case("grid_alpha_negative", set_("methods.mech.grid", {"alpha": [-1.0]}), key="methods.mech.grid.alpha"),
    case("grid_alpha_empty", set_("methods.mech.grid", {"alpha": []}), key="methods.mech.grid.alpha"),
    case("grid_alpha_scalar", set_("methods.mech.grid", {"alpha": 0.5}), key="methods.mech.grid.alpha"),
    case("grid_teacher_data_key", set_("methods.semcot.grid", {"params.condense": ["teacher", "heuristic"]}),
         key="methods.semcot.grid.params.condense"),
    case("mech_train_budget_key", set_("methods.mech.train", {"lr": 1.0e-4}), key="methods.mech.train.lr"),
    case("params_on_mech", set_("methods.mech.params", {"K": 2}), key="methods.mech.params"),
    case("train_device_unknown", set_("distill.train.device", "gpu"), target=selection("vanilla")),
    # empty lists and sections, removals, renames
    case("students_empty", set_("students", []), legal=True, note="legal: nothing to distill"),
    case("methods_empty", set_("methods", {}), legal=True, note="legal: nothing to distill"),
    case("compare_styles_empty", set_("clean_prompts.compare_styles", []), legal=True, note="legal: the demo's value"),
    case("datasets_empty", set_("datasets", {})),
    case("bins_empty", set_("patching.bins", []), target=PATCHING),
    case("ks_empty", set_("evaluate.ks", [])),
    case("teacher_removed", drop("teacher")),
    case("arch_removed", drop(f"models.{TEACHER}.arch")),
    case("adapter_removed", drop(f"datasets.{D}.adapter")),
    case("method_renamed_uppercase", rename("methods.cwt", "CWT")),
    case("student_model_renamed", rename(f"models.{STUDENT}", "student"), key="students",
         names=("'students' names model 'tiny_student'",)),
)


# ----------------------------------------------------------------------------- classifying an outcome

HEADLINE = re.compile(r"^(\w+(?:Error|Exception|Exit|Warning)) in (?:file|rule)\b.*$", re.M)
INNER = re.compile(r"^\s*(\w+(?:Error|Exception)):", re.M)
BANNER_END = re.compile(r"^Building DAG of jobs\.\.\.$", re.M)


def error_text(output: str) -> str:
    """The part of a failed start-up's output that is the error: from snakemake's "<Class> in file/rule"
    headline on, else what follows "Building DAG of jobs...", else the whole output."""
    headline = HEADLINE.search(output)
    if headline:
        return output[headline.start():]
    banner = BANNER_END.search(output)
    return output[banner.end():] if banner else output


def names_key(text: str, key: str, names: tuple[str, ...] = ()) -> bool:
    """Whether `text` names the dotted `key`: the whole path (not as part of a file path or a longer
    word; a top-level key quoted or as "key:", not as a word of a list of allowed keys), or its last key(s)
    quoted with the parent path ("unknown key 'x' under 'a.b'", "a.b: `x` ..."), or one of `names`."""
    if any(n in text for n in names):
        return True
    whole = (rf"(?<![\w/.-]){re.escape(key)}(?![\w/-])" if "." in key
             else rf"['\"]{re.escape(key)}['\"]|(?<![\w/.-]){re.escape(key)}:")
    if re.search(whole, text):
        return True
    parts = key.split(".")
    for i in range(len(parts)):  # a key may hold dots itself: distill.weights + 'phase1.atn'
        parent, leaf = ".".join(parts[:i]), ".".join(parts[i:])
        if re.search(rf"['\"`]{re.escape(leaf)}['\"`]", text) and (
                not parent or re.search(rf"(?<![\w/.-]){re.escape(parent)}(?![\w/-])", text)):
            return True
    return False


def is_raw(text: str) -> bool:
    """A Python traceback or an exception class other than ours (inside snakemake's wrappers: the inner one)."""
    if "Traceback (most recent call last)" in text:
        return True
    headline = HEADLINE.search(text)
    classes = [headline.group(1)] if headline else []
    if not classes or classes[0] in SNAKEMAKE_WRAPPERS:
        classes = [m.group(1) for m in INNER.finditer(text)]
    return any(c not in OUR_ERRORS + SNAKEMAKE_MESSAGES for c in classes)


def classify(rc: int, output: str, key: str, legal: bool, sentinels: list[str] = (),
             names: tuple[str, ...] = (), job: dict | None = None) -> str:
    """The class (CLASSES) of one start-up: `rc` and `output` of `snakemake -n`, the case's key path and
    whether accepting it is correct; `sentinels` found in its folder; `job` the consuming job's record
    ({"rc": ...}) when --run-jobs ran it."""
    if sentinels:
        return SHELL
    if rc != 0:
        text = error_text(output)
        if is_raw(text):
            return RAW
        return STOPPED_NAMES_KEY if names_key(text, key, names) else STOPPED_NO_KEY
    if legal:
        return ACCEPTED_LEGAL
    if job is None or job.get("rc") is None:
        return ACCEPTED_SHOULD_STOP
    return ACCEPTED_COERCED if job["rc"] == 0 else ACCEPTED_FAILS_IN_JOB


def excerpt(output: str, limit: int = 300) -> str:
    """The error's first lines on one line (for the table)."""
    text = error_text(output).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("File \"")]
    return " / ".join(lines)[:limit]


def find_sentinels(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(f"{SENTINEL}*"))


# ----------------------------------------------------------------------------- running

def snakemake(folder: Path, config: Path, *args: str, timeout: float) -> tuple[int | None, str, float]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(folder),
           "--configfile", str(config), *args]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=folder)
        return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return None, out + f"\n[timed out after {timeout:.0f} s]", time.monotonic() - start


def run_case(index: int, c: Case, base_config: dict, workdir: Path, base_run: Path | None,
             job_timeout: float, keep: bool) -> dict:
    folder = Path(tempfile.mkdtemp(prefix=f"case{index:03d}-", dir=workdir))  # no case name: it could name a key
    config = copy.deepcopy(base_config)
    for edit in c.edits:
        edit.apply(config)
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    rc, output, seconds = snakemake(folder, config_path, "-n", timeout=300)
    output = output.replace(str(folder), "<case>")  # the temporary folder: stable, shorter messages
    record: dict[str, Any] = {"index": index, "name": c.name, "edit": c.describe(), "key": c.key_path(),
                              "legal": c.legal, "note": c.note, "startup_rc": rc,
                              "startup_seconds": round(seconds, 1), "message": excerpt(output) if rc else "",
                              "error": error_text(output)[:4000] if rc else ""}  # to audit the class
    job = None
    if rc == 0 and base_run is not None and c.target and not c.legal:
        for part in ("results", ".snakemake", ".cache"):
            if (base_run / part).exists():
                shutil.copytree(base_run / part, folder / part, symlinks=True, dirs_exist_ok=True)
        job_rc, job_output, job_seconds = snakemake(folder, config_path, "--cores", "1", c.target,
                                                    timeout=job_timeout)
        job_output = job_output.replace(str(folder), "<case>")
        job = {"target": c.target, "rc": job_rc, "seconds": round(job_seconds, 1),
               "names_key": names_key(job_output, c.key_path(), c.names),
               "message": job_error(job_output) if job_rc != 0 else ""}
        record["job"] = job
    record["sentinels"] = find_sentinels(folder)
    record["outcome"] = classify(rc if rc is not None else 1, output, c.key_path(), c.legal, record["sentinels"],
                                 c.names, job)
    if not keep:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        record["folder"] = str(folder)
    return record


def job_error(output: str, limit: int = 300) -> str:
    """The first error lines of a failed job's output (the failing rule's log is printed after them)."""
    lines = [ln.strip() for ln in output.splitlines()]
    hits = [i for i, ln in enumerate(lines) if re.search(r"Error|Exception|timed out", ln)]
    start = hits[0] if hits else max(0, len(lines) - 4)
    return " / ".join(ln for ln in lines[start:start + 4] if ln)[:limit]


def build_base(workdir: Path, base_config: dict, targets: list[str], timeout: float) -> Path:
    """A run of the unedited tiny config up to `targets` (BASE_TARGETS: the consuming jobs' inputs), copied
    into each case that runs a job; there only the jobs whose settings or inputs the edit changed run."""
    folder = workdir / "base"
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / "config.yaml"
    config_path.write_text(yaml.safe_dump(base_config, sort_keys=False))
    rc, output, seconds = snakemake(folder, config_path, "--cores", "1", *targets, timeout=timeout)
    if rc != 0:
        raise SystemExit(f"the base run of config/tiny.yaml failed (rc {rc}, {seconds:.0f} s):\n{output[-3000:]}")
    print(f"base run of config/tiny.yaml up to {len(targets)} targets: {seconds:.0f} s", file=sys.stderr)
    return folder


# ----------------------------------------------------------------------------- report

def table(records: list[dict]) -> str:
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    rows = ["| # | case | edit | outcome | message / job |", "|---|---|---|---|---|"]
    for r in records:
        detail = r["message"]
        if "job" in r:
            j = r["job"]
            detail = (f"job {j['target']}: rc {j['rc']} in {j['seconds']} s"
                      + (f", names key: {j['names_key']}; {j['message']}" if j["rc"] != 0 else ""))
        if r["sentinels"]:
            detail = f"sentinels: {', '.join(r['sentinels'])}; {detail}"
        if r["note"]:
            detail = f"({r['note']}) {detail}"
        rows.append(f"| {r['index']} | {cell(r['name'])} | {cell(r['edit'])} | {r['outcome']} | {cell(detail[:240])} |")
    return "\n".join(rows)


def summary(records: list[dict]) -> str:
    counts = Counter(r["outcome"] for r in records)
    lines = [f"{len(records)} cases:"] + [f"- {cls}: {counts[cls]}" for cls in CLASSES if counts[cls]]
    return "\n".join(lines)


def select(cases: tuple[Case, ...], only: str | None) -> list[tuple[int, Case]]:
    indexed = list(enumerate(cases, 1))
    if not only:
        return indexed
    wanted = set(only.split(","))
    unknown = wanted - {c.name for c in cases}
    if unknown:
        raise SystemExit(f"--only: unknown case(s) {', '.join(sorted(unknown))}")
    return [(i, c) for i, c in indexed if c.name in wanted]


def main(argv: list[str] | None = None, cases: tuple[Case, ...] = CASES,
         runner: Callable[..., dict] = run_case) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the records as JSON here")
    ap.add_argument("--jobs", type=int, default=2, choices=[1, 2], help="cases run at once (at most 2)")
    ap.add_argument("--only", help="comma-separated case names")
    ap.add_argument("--run-jobs", action="store_true", help="run the consuming job of a case that passes start-up")
    ap.add_argument("--job-timeout", type=float, default=240, help="seconds per consuming job (--run-jobs)")
    ap.add_argument("--base", type=Path, help="a finished run of config/tiny.yaml to copy (--run-jobs; default: built)")
    ap.add_argument("--workdir", type=Path, help="where the temporary folders go (default: a new temporary folder)")
    ap.add_argument("--keep", action="store_true", help="keep each case's folder")
    ap.add_argument("--strict", action="store_true", help="exit 1 unless every case is stopped naming its key or legal")
    args = ap.parse_args(argv)

    names = [c.name for c in cases]
    if len(set(names)) != len(names):
        raise SystemExit(f"duplicate case names: {sorted(n for n, k in Counter(names).items() if k > 1)}")
    chosen = select(cases, args.only)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="config-mistakes-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base_config = yaml.safe_load(BASE_CONFIG.read_text())
    start = time.monotonic()
    base_run = args.base
    if args.run_jobs and base_run is None:
        base_run = build_base(workdir, base_config, list(BASE_TARGETS), timeout=3600)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        records = list(pool.map(lambda ic: runner(ic[0], ic[1], base_config, workdir, base_run if args.run_jobs else None,
                                                  args.job_timeout, args.keep), chosen))
    wall = time.monotonic() - start
    print(table(records))
    print()
    print(summary(records))
    print(f"wall time: {wall:.0f} s ({args.jobs} at once{', consuming jobs run' if args.run_jobs else ''})")
    if args.out:
        Path(args.out).write_text(json.dumps({"wall_seconds": round(wall, 1), "run_jobs": args.run_jobs,
                                              "records": records}, indent=1))
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    bad = [r for r in records if r["outcome"] not in GOOD_CLASSES]
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
