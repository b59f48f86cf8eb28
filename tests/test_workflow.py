"""Snakemake-level tests: dry runs of every shipped config, and the tiny DAG end to end."""

import json
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from tests.helpers import REPO

pytestmark = pytest.mark.slow


def snakemake(workdir, *args) -> str:
    cmd = [sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(workdir), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:")[-1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def test_dry_run_demo(tmp_path):
    jobs = job_counts(snakemake(tmp_path, "-n"))
    # 6 methods (vanilla, mech, the 4 baselines) x 1 student: distill (no grid: one point each), select_distill,
    # predict, evaluate, the model card and the student's trajectories each; the teacher's own evaluation (its row of
    # Tables 1-4);
    # the baselines' teacher data, one job per method for train and val: MoRSD's sampled CoTs, SemCoT's
    # condensations (the demo's UniCoTT chain cuts the greedy CoT: no teacher call, no job)
    # the clean-prompt set (neutral: characterization) adds its prompts, teacher CoT and anchors; the demo
    # compares no other prompt style (compare_styles: [], for time)
    assert jobs == {"prepare_dataset": 1, "build_prompts": 3, "clean_prompts": 1, "teacher_cot": 4, "anchors": 4,
                    "trajectories": 7, "figure1": 1, "head_scores": 2, "head_comparison": 1, "head_figures": 1, "patching": 2,
                    "patching_figures": 1, "teacher_targets": 2, "distill": 6, "select_distill": 6,
                    "student_predict": 6, "las_simulator": 1, "evaluate": 7, "tables": 1, "figure9": 1, "claims": 1,
                    "baseline_teacher_data": 2, "model_card": 6, "all": 1, "total": 68}


def test_dry_run_tiny_checks_the_claims(tmp_path):
    jobs = job_counts(snakemake(tmp_path, "-n", "--configfile", str(REPO / "config/tiny.yaml")))
    assert jobs["claims"] == 1 and jobs["patching"] == 2


def test_dry_run_paper_with_slurm_profile(tmp_path):
    out = snakemake(tmp_path, "-n", "--configfile", str(REPO / "config/paper.yaml"),
                    "--workflow-profile", str(REPO / "profiles/slurm"))
    jobs = job_counts(out)
    # 2 datasets x (3 task splits + the clean-prompt set in its 2 styles)
    assert jobs["prepare_dataset"] == 2 and jobs["teacher_cot"] == 10 and jobs["clean_prompts"] == 4
    assert "icd10_demo" not in out  # the demo config is not merged into the paper config
    # characterization (every model's head scores, the teacher's patching) reads the neutral clean-prompt set
    for rule in ("head_scores", "patching"):
        blocks = re.findall(rf"rule {rule}:\n    input: ([^\n]+)", out)
        assert blocks and all("cot/clean_neutral.parquet" in b and "cot/train.parquet" not in b
                              and "cot/test.parquet" not in b for b in blocks), rule
    # every method trains one point (equal tuning: no grid), so one distill job per (dataset, student, method);
    # who gets what as the paper shows it: vanilla and mech x 4 students, 8 ablations x the first student,
    # 4 baselines x the first two students = 16 pairs a dataset (not 4 x 14 = 56)
    pairs = jobs["select_distill"]
    assert pairs == 2 * (2 * 4 + 8 * 1 + 4 * 2) == jobs["distill"] == jobs["student_predict"]
    assert "results/mimic4_full/qwen3_4b/mech/" in out and "results/mimic4_full/qwen3_4b/cwt/" not in out
    assert "results/wikiseealso_320k/qwen3_14b/no_p2_ov/" not in out and "llama31_8b/no_p2_ov/" in out
    assert "semcot/grid/default/model/config.json" in out and "/grid/alpha=" not in out
    # MoRSD's samples, UniCoTT's trees and SemCoT's condensations: 2 datasets, one job for train and val
    assert jobs["baseline_teacher_data"] == 3 * 2 and "baseline_data/unicott/val.parquet" in out
    assert "mech/grid/default/model/config.json" in out
    # every distilled (dataset, student, method) and each dataset's teacher row is evaluated
    assert jobs["evaluate"] == pairs + 2
    assert jobs["model_card"] == pairs  # every published student gets its card with its metrics
    teacher = yaml.safe_load((REPO / "config/paper.yaml").read_text())["teacher"]
    assert re.search(rf"results/\w+/{teacher}/teacher/metrics.parquet", out)
    # each distill job starts its 8 ZeRO-3 ranks through srun, which read the config snapshot
    commands = re.findall(r"Shell command: (.*mechdistill distill .*)", out)
    assert len(commands) == jobs["distill"]
    assert all(c.startswith("srun --ntasks 8 python -m mechdistill distill ") for c in commands)
    snapshot = re.search(r"--config (\S+)", commands[0]).group(1)
    assert json.loads((tmp_path / snapshot).read_text())["teacher"] == teacher
    # one las_simulator job per dataset; every evaluate job reads that dataset's simulators and no
    # longer the teacher's train traces they are trained on (it trains none)
    datasets = list(yaml.safe_load((REPO / "config/paper.yaml").read_text())["datasets"])
    assert jobs["las_simulator"] == len(datasets)
    planned = re.findall(r"rule las_simulator:\n    input: ([^\n]+)\n    output: ([^\n]+)", out)
    assert sorted(o for _, o in planned) == sorted(f"results/{d}/las_simulator" for d in datasets)
    assert all(f"results/{d}/{teacher}/cot/train.parquet" in i for (i, o), d in zip(sorted(planned, key=lambda x: x[1]),
                                                                                  sorted(datasets)))
    inputs = re.findall(r"rule evaluate:\n    input: ([^\n]+)\n    output: results/(\w+)/", out)
    assert len(inputs) == jobs["evaluate"]
    assert all(f"results/{d}/las_simulator" in i.split(", ") and "cot/train.parquet" not in i for i, d in inputs)
    # the teacher's own evaluation holds the teacher's 8 GPUs, a student's one
    evaluate = re.findall(r"rule evaluate:.*?wildcards: [^\n]*method=(\w+)\n    resources: [^\n]*gpu=(\d+)", out, re.S)
    assert evaluate and all(int(gpu) == (8 if method == "teacher" else 1) for method, gpu in evaluate)


def test_dry_run_plans_a_distill_job_per_grid_point_and_one_selection(tmp_path):
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    cfg["methods"] = {"mech": {"grid": {"alpha": [0.5, 1.0]}}}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", "--configfile", str(path))
    jobs = job_counts(out)
    assert jobs["distill"] == 2 and jobs["select_distill"] == 1 and jobs["student_predict"] == 1  # 1 student, 1 dataset
    for point in ("alpha=0.5", "alpha=1.0"):  # a readable slug, then a hash of the values (methods.point_name)
        assert re.search(rf"results/tiny_icd/tiny_student/mech/grid/{point}--[0-9a-f]{{8}}/train_log.parquet", out)
    assert "results/tiny_icd/tiny_student/mech/selection.json" in out


@pytest.mark.parametrize("method, grid, message", [
    ("mech", {"pools.phase1.k": [4, 8]}, "unknown key 'pools.phase1.k' under 'methods.mech.grid'. Allowed keys here: "
                                         "alpha, beta, cot.ce, cot.kl, phase1.attn, phase1.interaction, phase1.write, "
                                         "phase2.interaction, phase2.ov, phase2.qk."),
    ("mech", {"alpha": [0.5, 1.0], "lr": [1e-4]}, "unknown key 'lr' under 'methods.mech.grid'"),
    ("vanilla", {"beta": [0.5, 1.0]}, "methods.vanilla.grid.beta: vanilla switches that term off"),  # at start-up
])
def test_bad_grid_stops_the_dry_run(tmp_path, method, grid, message):
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    cfg["methods"][method] = {"grid": grid}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "-n", "--configfile", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert message in proc.stdout + proc.stderr


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["generation"].update(backend="vlm"),
     "'generation.backend' is 'vlm'; allowed values: 'auto', 'transformers', 'vllm', 'file'"),
    (lambda c: c["models"]["tiny_student"].update(n_layers=5),  # found by reading the base's config, no model loaded
     "models.tiny_student.n_layers is 5, but its base tiny_llama has 2 layers: give 1 to 2."),
    (lambda c: c["methods"].update(mechh={}), "ConfigError"),
    (lambda c: c["methods"]["mech"].update(students=["tiny_studnet"]),
     "methods.mech.students: 'tiny_studnet' not in `students` (tiny_student)"),
    (lambda c: c["generation"].update(backend="file", traces="/tmp/x-{foo}.jsonl"),  # not a KeyError building the DAG
     "'generation.traces' is '/tmp/x-{foo}.jsonl': it uses the unknown placeholder {foo}; allowed: {dataset}, {split}"),
])
def test_bad_config_stops_at_start(tmp_path, mutate, message):
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    mutate(cfg)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "-n", "--configfile", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert message in out
    # one line of ours (the message may wrap), no Python frames and no Snakemake "ConfigError in file ..., line"
    assert out.count("mechdistill: error: ConfigError: ") == 1
    assert 'File "' not in out and "Traceback" not in out and "line " not in out.split("mechdistill: error:")[0]


def dry_run_with(tmp_path, mutate, *targets) -> subprocess.CompletedProcess:
    """`snakemake -n -p` of the tiny config changed by `mutate`, in tmp_path (returns the finished process)."""
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    mutate(cfg)
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           *targets, "-n", "-p", "--configfile", str(path)], capture_output=True, text=True)


HOSTILE_VALUES = ["it's $(touch PWNED)", "`touch PWNED`", "x; touch PWNED", '"; touch PWNED; echo "']


@pytest.mark.parametrize("method, key, message", [
    ("cwt", "n_chunks", "methods.cwt.grid.params.n_chunks is \"it's $(touch PWNED)\"; allowed: an integer >= 1."),
    ("morsd", "n_select", "methods.morsd.grid.params.n_select is \"it's $(touch PWNED)\"; allowed: an integer >= 1."),
])
def test_a_hostile_grid_value_of_a_typed_setting_stops_the_start(tmp_path, method, key, message):
    """Before, `methods.cwt.grid: {params.n_chunks: ["it's $(touch PWNED)"]}` passed start-up and the distill
    job's shell ran the command substitution (PWNED created), then failed."""
    proc = dry_run_with(tmp_path, lambda c: c["methods"][method].update(grid={f"params.{key}": HOSTILE_VALUES}))
    assert proc.returncode != 0 and message in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("PWNED*"))


def test_hostile_values_of_a_string_setting_never_reach_the_shell(tmp_path):
    """SemCoT's placeholder is a string: hostile values are allowed there, but each grid point's name is a safe
    token. Every planned distill command, run by bash with its program replaced by printf, creates no file and
    passes the point's safe name as one word."""
    from mechdistill.distill.methods import method_grid

    grid = {"params.placeholder": HOSTILE_VALUES}
    proc = dry_run_with(tmp_path, lambda c: c["methods"]["semcot"].update(grid=grid),
                        "results/tiny_icd/tiny_student/semcot/selection.json")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    commands = re.findall(r"Shell command: \S*\s*python -m mechdistill.distill.launch \d+ (python -m mechdistill distill .*)",
                          out)
    names = [p.name for p in method_grid("semcot", {"grid": grid})]
    assert len(commands) == len(names) == len(HOSTILE_VALUES)
    # the shell parses each command as Snakemake would run it; printf only shows the words
    shown = [subprocess.run(["bash", "-c", "printf '%s\\n' " + command.removeprefix("python ")], cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout.splitlines() for command in commands]
    assert not list(tmp_path.rglob("PWNED*"))
    for words in shown:
        assert words[:6] == ["-m", "mechdistill", "distill", "tiny_icd", "tiny_student", "semcot"]
        assert words[6] in names


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c["methods"]["morsd"]["params"].update(n_samples=-1),
     "methods.morsd.params.n_samples is -1; allowed: an integer >= 1."),
    (lambda c: c["methods"]["morsd"]["params"].update(n_samples="two"),
     "methods.morsd.params.n_samples is 'two'; allowed: an integer >= 1."),
    (lambda c: c["methods"]["cwt"]["params"].update(n_chunks=0), "methods.cwt.params.n_chunks is 0; allowed: an integer >= 1."),
    (lambda c: c["methods"]["semcot"]["params"].update(K="two"), "methods.semcot.params.K is 'two'; allowed: an integer >= 1."),
    (lambda c: c["patching"].update(bins=[2, 100]),  # 2 layers x 4 heads, read from the random model's config
     "patching.bins has 100, but the teacher tiny_llama has 8 attention heads in total"),
])
def test_a_bad_method_setting_or_patching_bin_stops_the_start_naming_the_key(tmp_path, mutate, message):
    """Before: n_samples -1 trained on the greedy traces only, n_chunks 0 was clamped to 1, bins [2, 100] on an
    8-head teacher was clamped to 8 (two bins, one head set); n_samples "two" stopped with a raw TypeError and
    K "two" failed inside the job."""
    proc = dry_run_with(tmp_path, mutate)
    assert proc.returncode != 0 and "changed.yaml: " + message in proc.stdout + proc.stderr


@pytest.mark.parametrize("mutate, targets_jobs", [
    (lambda c: c.update(students=[]), 0),
    (lambda c: c.update(methods={"unicott": {}, "cwt": {"params": {"n_chunks": 3, "skip_from_epoch": 0}}}), 0),
    (lambda c: c["distill"].update(targets="online"), 0),
    (lambda c: None, 2),
])
def test_teacher_targets_are_planned_only_for_a_method_that_reads_them(tmp_path, mutate, targets_jobs):
    """`students: []` planned two teacher_targets jobs that nothing read; baselines never read the targets,
    and distill.targets online computes them in the distill job."""
    proc = dry_run_with(tmp_path, mutate)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert job_counts(out).get("teacher_targets", 0) == targets_jobs
    distill_inputs = re.findall(r"rule distill:\n    input: ([^\n]+).*?wildcards: [^\n]*method=(\w+)", out, re.S)
    assert distill_inputs or not targets_jobs
    for inputs, method in distill_inputs:  # vanilla and mech read the targets, the baselines never
        assert ("targets/train.safetensors" in inputs) == (bool(targets_jobs) and method in ("vanilla", "mech")), method


@pytest.mark.parametrize("section, key, allowed", [
    ("weights", "phase1.atn", "alpha, beta, cot.ce, cot.kl, phase1.attn, phase1.interaction, phase1.write, "
                              "phase2.interaction, phase2.ov, phase2.qk"),
    ("train", "max_step", "adam_eps, betas, checkpoint_every, deterministic, device, eval_every, grad_accum_steps, "
                          "gradient_checkpointing, "
                          "log_every, lr, max_grad_norm, max_steps, micro_batch_size, min_lr_ratio, precision, "
                          "report_to, seed, warmup_ratio, warmup_steps, weight_decay"),
])
def test_misspelt_distill_key_stops_the_dry_run(tmp_path, section, key, allowed):
    """A typo in distill.weights / distill.train stops `snakemake -n`, naming the key path and the allowed
    keys (not hours later, after the teacher, head scores and targets)."""
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    cfg["distill"][section] = {**cfg["distill"].get(section, {}), key: 1}
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "-n", "--configfile", str(path)], capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"unknown key '{key}' under 'distill.{section}'. Allowed keys here: {allowed}." in proc.stdout + proc.stderr


def test_editing_raw_dataset_files_or_the_trace_file_reruns_their_rules(tmp_path):
    """Snakemake tracks only what a rule declares. Before, the raw dataset files and the trace file of
    generation.backend file were read behind its back: after editing one, "Nothing to be done"."""
    import gzip
    import shutil
    import time

    root = tmp_path / "wiki"
    shutil.copytree(REPO / "tests/fixtures/wikiseealso", root)
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    cfg["datasets"]["wiki"] = {"adapter": "wikiseealso", "params": {"root": str(root)},
                               "candidates": {"strategy": "retrieval", "size": 6, "n_near_miss": 2}}
    cfg["generation"].update(backend="file", traces=str(tmp_path / "traces-{dataset}-{split}.jsonl"))
    config = tmp_path / "file.yaml"
    config.write_text(yaml.safe_dump(cfg))
    args = ("--configfile", str(config), "--cores", "1")
    data, cot = "results/wiki/data/test.parquet", "results/tiny_icd/tiny_llama/cot/test.parquet"

    def planned(target: str) -> dict[str, int]:
        out = snakemake(tmp_path, target, "-n", *args)
        return {} if "Nothing to be done" in out else job_counts(out)

    # the raw files: declared (the .gz the adapter reads, filter_labels_test.txt), and an edit reruns
    out = snakemake(tmp_path, data, "-n", *args)
    declared = re.search(r"rule prepare_dataset:\n    input: ([^\n]+)", out).group(1).split(", ")
    assert declared == sorted(str(root / f) for f in ("filter_labels_test.txt", "lbl.json.gz", "trn.json.gz",
                                                        "tst.json.gz"))
    snakemake(tmp_path, data, *args)
    assert planned(data) == {}
    time.sleep(1)
    lines = gzip.decompress((root / "trn.json.gz").read_bytes()).decode().splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "title": first["title"] + " (edited)"})  # new bytes (Snakemake checks them)
    (root / "trn.json.gz").write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    assert planned(data)["prepare_dataset"] == 1

    # the trace file of the file backend
    snakemake(tmp_path, "results/tiny_icd/data/test.parquet", *args)
    docs = pd.read_parquet(tmp_path / "results/tiny_icd/data/test.parquet")
    traces = tmp_path / "traces-tiny_icd-test.jsonl"
    traces.write_text("".join(json.dumps({"doc_id": d, "cot": "Heart failure.", "answer": "I50.22"}) + "\n"
                              for d in docs["doc_id"]))
    snakemake(tmp_path, cot, *args)
    assert planned(cot) == {}
    time.sleep(1)
    traces.write_text(traces.read_text().replace("Heart failure.", "Kidney disease."))
    jobs = planned(cot)
    assert jobs["teacher_cot"] == 1 and "prepare_dataset" not in jobs


def test_a_job_stopped_by_a_bad_input_file_ends_with_its_one_line_error(tmp_path):
    """A MIMIC note with a Latin-1 byte stops prepare_dataset: the rule's log ends with the error as one line
    (file, row, note_id, fix), no traceback is printed anywhere, and the failed run repeats that line last."""
    import gzip
    import shutil

    root = tmp_path / "mimic4"
    shutil.copytree(REPO / "tests/fixtures/mimic4", root)
    notes_path = root / "note/discharge.csv.gz"
    notes = pd.read_csv(notes_path, dtype=str, keep_default_na=False)
    notes.loc[2, "text"] = "Seen at the MARK.\n" + notes.loc[2, "text"]
    notes_path.write_bytes(gzip.compress(notes.to_csv(index=False).encode().replace(b"MARK", b"caf\xe9")))
    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    cfg["datasets"] = {"mimic": {"adapter": "mimic4_icd10", "params": {"root": str(root), "min_code_count": 3}}}
    config = tmp_path / "mimic.yaml"
    config.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(REPO / "Snakefile"), "-d", str(tmp_path),
                           "results/mimic/data/test.parquet", "--cores", "1", "--configfile", str(config)],
                          capture_output=True, text=True, timeout=600)
    terminal = proc.stdout + proc.stderr
    line = (f"InputError: {notes_path}, row 3 (note_id {notes.loc[2, 'note_id']}): not UTF-8 text (byte 0xe9 in "
            "column 'text': b'Seen at the caf\\xe9.\\n")
    log = (tmp_path / "logs/prepare_dataset/mimic.log").read_text()
    assert proc.returncode != 0
    assert "Traceback" not in log and "Traceback" not in terminal
    assert f" ERROR mechdistill: {line}" in log.strip().splitlines()[-1]
    assert f"mechdistill: error: {line}" in terminal  # the job's stderr
    last = [t for t in terminal.splitlines() if "mechdistill" in t][-1]
    assert last.startswith(f"mechdistill: prepare_dataset (logs/prepare_dataset/mimic.log): {line}")


def check_baselines(results):
    """What each baseline of tiny.yaml trained on and predicted (the end-to-end run's artifacts)."""
    student, teacher = results / "tiny_student", results / "tiny_llama/baseline_data"
    for method in ("unicott", "morsd", "semcot", "cwt"):
        log = pd.read_parquet(student / method / "train_log.parquet")
        assert log.loc[log["split"] == "val", "val_cot_loss"].notna().all()
        items = pd.read_parquet(student / method / "training_items.parquet")
        assert {"train", "val"} <= set(items["split"]) and (items["n_supervised"] > 0).all()
        assert (items["n_supervised"] < items["n_tokens"]).all()  # the prompt is never a target
    # MoRSD: 2 sampled traces per document plus the greedy one (sample -1); the student keeps 1 by its RD
    samples = pd.read_parquet(teacher / "morsd/train.parquet")
    assert set(samples.groupby("doc_id").size()) == {3} and set(samples["sample"]) == {-1, 0, 1}
    chosen = pd.read_parquet(student / "morsd/training_items.parquet").query("split == 'train'")
    assert chosen["doc_id"].is_unique and len(chosen) == 3 and (chosen["rd"] > 0).all()
    # UniCoTT's chain: the greedy CoT cut into steps, so no teacher call and no teacher-data job
    nodes = pd.read_parquet(student / "unicott/training_items.parquet")
    assert not (teacher / "unicott").exists() and (nodes["structure"] == "chain").all() and (nodes["n_nodes"] >= 1).all()
    # SemCoT: a condensation per document; it answers from implicit states, with no CoT
    assert len(pd.read_parquet(teacher / "semcot/val.parquet")) == 2
    assert (pd.read_parquet(student / "semcot/pred/test.parquet")["cot"] == "").all()
    # CWT: every chunk of a document is an item; each epoch trains one chunk per document; labels cleaned up
    items = pd.read_parquet(student / "cwt/training_items.parquet")
    fixed = items[(items["split"] == "train") & items["epoch"].isna()]
    assert (fixed.groupby("doc_id")["chunk"].nunique() == fixed.groupby("doc_id")["n_chunks"].first()).all()
    epoch0 = items[items["epoch"] == 0]
    assert epoch0["doc_id"].is_unique and set(epoch0["doc_id"]) == set(fixed["doc_id"])
    assert not list((student / "cwt/grid").glob("*/ckpt*"))


def test_tiny_end_to_end_then_incremental(tmp_path):
    tiny = str(REPO / "config/tiny.yaml")
    # every tiny job is mostly the ~15 s import of torch and transformers, a single thread: one thread per
    # job lets two run side by side (the model rules ask for every core, which would run them in a row)
    snakemake(tmp_path, "--cores", "2", "--max-threads", "1", "--configfile", tiny)
    # the jobs were forks of the warm server (mechdistill.warm), none run cold for a differing environment
    server_log = next((tmp_path / ".snakemake/log").glob("mechdistill-warm-*.log")).read_text()
    assert int(re.search(r"served (\d+) requests", server_log).group(1)) >= 50 and "refused" not in server_log
    for split, n in [("train", 3), ("val", 2), ("test", 3)]:
        cot = pd.read_parquet(tmp_path / f"results/tiny_icd/tiny_llama/cot/{split}.parquet")
        assert len(cot) == n
        assert {"doc_id", "cot", "answer", "pred_labels", "n_tokens", "finish_reason"} <= set(cot.columns)
        assert cot["n_tokens"].between(1, 12 + 4).all()
        prompts = pd.read_parquet(tmp_path / f"results/tiny_icd/prompts/{split}.parquet")
        assert list(prompts["doc_id"]) == list(cot["doc_id"])
    assert (tmp_path / "logs/teacher_cot/tiny_icd.tiny_llama.test.log").read_text().count("teacher CoT") >= 1
    anchors = pd.read_parquet(tmp_path / "results/tiny_icd/tiny_llama/anchors/test.parquet")
    docs = pd.read_parquet(tmp_path / "results/tiny_icd/data/test.parquet")
    assert list(anchors["doc_id"]) == list(docs["doc_id"])
    assert all(len(a) == len(g) for a, g in zip(anchors["anchors"], docs["labels"]))  # one title per gold code
    # Random-model CoT mentions no labels: defined values with a reason, counted in the log, no crash.
    assert (anchors["reason"] != "").all()
    assert "reasons" in (tmp_path / "logs/anchors/tiny_icd.tiny_llama.test.log").read_text()
    summary = pd.read_parquet(tmp_path / "results/tiny_icd/tiny_llama/trajectories_summary.parquet")
    assert len(summary) == 3 and summary["focus"].between(-1, 1).all()
    curves = pd.read_parquet(tmp_path / "results/tiny_icd/tiny_llama/trajectories.parquet")
    assert set(curves["phase"]) == {"focus", "confusion"} and curves["t"].between(0, 1).all()
    assert (tmp_path / "results/figures/figure1_tiny_icd.png").stat().st_size > 10_000
    for model, n_layers in [("tiny_llama", 2), ("tiny_student", 1)]:  # every head of teacher and student
        coarse = pd.read_parquet(tmp_path / f"results/tiny_icd/{model}/heads/coarse.parquet")
        assert len(coarse) == n_layers * 4 and {"layer", "head", "score", "score_variant", "coarse_all_kurtosis", "alignment"} <= set(coarse.columns)
        assert coarse["score"].notna().all() and (coarse["n_queries"] > 0).all()
        refine = pd.read_parquet(tmp_path / f"results/tiny_icd/{model}/heads/refine.parquet")
        assert len(refine) == n_layers * 4  # NaN scores: random CoT has no refinement positions
    for n in (4, 5, 7, 8):
        assert (tmp_path / f"results/figures/figure{n}_tiny_icd.png").stat().st_size > 10_000

    # patching: Phase 1 pairs aligned and patched; Phase 2 has no ranked head (no refinement positions)
    pairs = pd.read_parquet(tmp_path / "results/tiny_icd/tiny_llama/patching/phase1_pairs.parquet")
    assert len(pairs) == 2 and pairs["aligned"].all()
    runs = pd.read_parquet(tmp_path / "results/tiny_icd/tiny_llama/patching/phase1_runs.parquet")
    assert len(runs) == 2 * (2 + 2 * 2 * (3 + 2))  # docs x (2 references + 2 directions x 2 bins x 5 sets)
    effects = pd.read_parquet(tmp_path / "results/tiny_icd/tiny_llama/patching/phase1.parquet")
    assert {"direction", "head_set", "k", "metric", "effect", "ci_low", "ci_high"} <= set(effects.columns)
    assert set(effects["k"]) == {2, 4} and set(effects["head_set"]) == {"top", "near_zero", "most_negative", "random"}
    assert pd.read_parquet(tmp_path / "results/tiny_icd/tiny_llama/patching/phase2.parquet").empty

    # distillation: targets, both methods trained (2 steps), saved, predicted and evaluated
    targets = pd.read_parquet(tmp_path / "results/tiny_icd/tiny_llama/targets/train.parquet")
    assert len(targets) == 3 and targets["has_phase1"].all() and (targets["n_cot"] > 0).all()
    for method in ("vanilla", "mech"):
        base = tmp_path / f"results/tiny_icd/tiny_student/{method}"
        log = pd.read_parquet(base / "train_log.parquet")
        assert list(log.loc[log["split"] == "train", "step"]) == [1, 2]
        assert (base / "model/config.json").exists() and not (base / "grid/default/ckpt").exists()
        assert json.loads((base / "selection.json").read_text())["point"] == "default"  # no grid: one point
        assert log.loc[log["split"] == "val", "step"].tolist() == [1, 2]  # eval_every: 1
        pred = pd.read_parquet(base / "pred/test.parquet")
        assert len(pred) == 3
        metrics = pd.read_parquet(base / "metrics.parquet")
        assert {"P@1", "macro_f1", "focus", "bleu4", "perplexity", "sharpness"} <= set(metrics["metric"])
    for method in ("unicott", "morsd", "semcot", "cwt"):  # the baselines: trained, predicted, evaluated, in Table 1
        base = tmp_path / f"results/tiny_icd/tiny_student/{method}"
        log = pd.read_parquet(base / "train_log.parquet")
        assert list(log.loc[log["split"] == "train", "step"]) == [1, 2] and (log["cot.kl"] == 0).all()
        assert len(pd.read_parquet(base / "pred/test.parquet")) == 3
        assert not pd.read_parquet(base / "training_items.parquet").empty
        assert {"P@1", "macro_f1", "sharpness"} <= set(pd.read_parquet(base / "metrics.parquet")["metric"])
    for method in ("morsd", "semcot"):  # their teacher data, cached per split
        for split in ("train", "val"):
            assert (tmp_path / f"results/tiny_icd/tiny_llama/baseline_data/{method}/{split}.parquet").exists()
    check_baselines(tmp_path / "results/tiny_icd")
    mech_log = pd.read_parquet(tmp_path / "results/tiny_icd/tiny_student/mech/train_log.parquet")
    attn = mech_log.loc[mech_log["split"] == "train", "phase1.attn"].to_numpy()
    # the 1-layer student IS the teacher's layer 0, and both Phase-1 pools sit in layer 0: identical
    # pooled rows at step 1, apart once the first update has changed the student
    assert attn[0] < 1e-6 < attn[1]
    vanilla_log = pd.read_parquet(tmp_path / "results/tiny_icd/tiny_student/vanilla/train_log.parquet")
    assert (vanilla_log["phase1.attn"] == 0).all()  # vanilla never computes the head signals
    table1 = (tmp_path / "results/tables/table1.md").read_text()
    assert "| tiny_icd | tiny_llama | teacher |" in table1
    for method in ("vanilla", "mech", "unicott", "morsd", "semcot", "cwt"):
        assert f"| tiny_icd | tiny_student | {method} |" in table1
    mech_row = next(line for line in table1.splitlines() if "| tiny_student | mech |" in line)
    assert re.search(r"\d\.\d{3} \([+-]\d\.\d{3}\*?\)", mech_row)  # "value (+gain)" against vanilla
    assert "Avg. gain (ours vs best baseline)" in table1 and "Selected on validation (val_cot_loss)" in table1
    assert (tmp_path / "results/figures/figure9.png").stat().st_size > 10_000
    claims = pd.read_parquet(tmp_path / "results/claims.parquet")
    assert sorted(set(claims["claim"])) == list(range(1, 10))
    assert "## Claim 9:" in (tmp_path / "results/claims.md").read_text()
    snakemake(tmp_path, "--cores", "1", "--configfile", tiny, "--report", str(tmp_path / "report.html"))
    report = (tmp_path / "report.html").read_text()
    assert "Figure 9: LAS" in report and "tiny_llama" in report  # captions rendered with the config

    assert "Nothing to be done" in snakemake(tmp_path, "--cores", "2", "--configfile", tiny)

    cfg = yaml.safe_load((REPO / "config/tiny.yaml").read_text())
    cfg["prompts"]["system"] = "A different system prompt."
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg))
    jobs = job_counts(snakemake(tmp_path, "-n", "--configfile", str(changed)))
    assert jobs.get("prepare_dataset", 0) == 0
    # the task prompts of 3 splits change; the clean-prompt sets (their text is fixed in
    # teacher/clean_prompts.py, the guided one too), and so every model's head scores, the style
    # comparison and the patching, do not
    assert jobs["build_prompts"] == 3 and "clean_prompts" not in jobs
    assert jobs["teacher_cot"] == 3 and jobs["anchors"] == 3 and "style_head_scores" not in jobs
    assert "head_scores" not in jobs and "patching" not in jobs
