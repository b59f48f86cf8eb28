"""config/rehearsal.yaml, the paper run rehearsed on CPU, may change only models, dataset files, sizes, devices and
engines: everything else (datasets, methods, grids, selection, prompt styles, LAS settings, tables, claims) is the
paper's. And benchmarks/rehearsal_rules.py's reading of the dry run and of the run's logs."""

import fnmatch

import pytest
import yaml

from mechdistill.config import layer_model_entries, validate_config
from tests.helpers import REPO, load_benchmark

# dotted key paths (fnmatch patterns, one segment per *) rehearsal.yaml may set
ALLOWED = [
    "models.*",                                                        # models: whole entries
    "datasets.*.params.root", "datasets.*.params.min_code_count",     # dataset files; a fixture's codes are rare
    "datasets.*.max_docs.*", "datasets.*.candidates.size",            # sizes
    *(f"generation.{key}" for key in ("device", "dtype", "tensor_parallel_size", "gpu_memory_utilization",
                                      "kv_cache_gib", "student_backend",     # devices, engines
                                      "max_model_len", "max_new_tokens", "force_answer_tokens", "shard_size",
                                      "batch_size")),                          # sizes
    "anchors.early_tokens", "clean_prompts.n_docs", "clean_prompts.n_labels", "clean_prompts.n_near_miss",
    *(f"{section}.{key}" for section in ("heads", "patching", "evaluate")
      for key in ("device", "dtype", "device_map", "max_memory", "max_memory.*", "offload_folder", "in_flight",
                  "max_docs", "max_tokens", "n_bootstrap")),
    *(f"patching.{key}" for key in ("bins", "n_random", "late_tokens", "batch_size")),
    *(f"distill.{key}" for key in ("teacher_dtype", "student_dtype", "teacher_device_map", "teacher_max_memory",
                                   "teacher_max_memory.*", "teacher_offload_folder", "teacher_in_flight",
                                   "max_tokens", "top_k", "launch.ranks", "pools.*.k", "select.val_docs",
                                   "mechanism_docs")),
    *(f"distill.train.{key}" for key in ("max_steps", "grad_accum_steps", "checkpoint_every", "eval_every",
                                         "device", "precision", "gradient_checkpointing")),
    *(f"evaluate.las.seq2seq.{key}" for key in ("model", "epochs", "batch_size", "max_source_length", "device")),
]


def leaf_keys(tree: dict, prefix: str = "") -> list[str]:
    """Dotted paths of a mapping's leaves; `models` entries count as one leaf each (a model is replaced whole)."""
    keys = []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not fnmatch.fnmatchcase(path, "models.*"):
            keys += leaf_keys(value, path + ".")
        else:
            keys.append(path)
    return keys


def outside_allow_list(tree: dict) -> list[str]:
    return [key for key in leaf_keys(tree) if not any(
        fnmatch.fnmatchcase(key, pattern) and key.count(".") == pattern.count(".") for pattern in ALLOWED)]


def load(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / name).read_text())


def test_rehearsal_sets_only_allowed_keys():
    assert outside_allow_list(load("rehearsal.yaml")) == []


@pytest.mark.parametrize("extra", [{"methods": {"morsd": {"params": {"n_samples": 2}}}},
                                   {"distill": {"select": {"criterion": "val_cot_loss"}}},
                                   {"clean_prompts": {"compare_styles": []}},
                                   {"evaluate": {"las": {"simulator": "logreg"}}},
                                   {"datasets": {"mimic4_full": {"adapter": "icd10cm_controlled"}}},
                                   {"students": ["llama31_8b"]}, {"prompts": {"exemplar": False}}])
def test_a_key_outside_the_allow_list_is_caught(extra):
    rehearsal = load("rehearsal.yaml")
    for section, value in extra.items():
        rehearsal[section] = {**rehearsal.get(section, {}), **value} if isinstance(value, dict) else value
    assert outside_allow_list(rehearsal) != []


def test_the_rehearsal_names_the_paper_models_and_keeps_its_families():
    paper, rehearsal = load("paper.yaml"), load("rehearsal.yaml")
    assert set(paper["models"]) <= set(rehearsal["models"])  # every paper model replaced by a tiny one
    arch = {name: rehearsal["models"][name].get("arch") for name in paper["models"]}
    assert arch == {"llama3_70b": "llama", "llama31_8b": "llama", "qwen3_14b": "qwen3", "qwen3_4b": "qwen3",
                    "gemma3_12b": "gemma3"}
    assert rehearsal["models"]["llama31_8b"]["tokenizer"] == paper["teacher"]  # token-level KL
    others = {rehearsal["models"][name]["tokenizer"] for name in ("qwen3_14b", "qwen3_4b", "gemma3_12b")}
    assert len(others) == 1 and others.isdisjoint({paper["teacher"], "byte"})  # the cross-tokenizer loss


def test_a_later_model_entry_with_a_source_replaces_the_earlier_one(tmp_path):
    """Snakemake merges --configfile files key by key: the paper's hub id stayed under the rehearsal's random model."""
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    first.write_text(yaml.safe_dump({"models": {"t": {"source": "hf", "id": "x/y", "dtype": "bfloat16"},
                                                "s": {"source": "hf", "id": "x/z"}}}))
    second.write_text(yaml.safe_dump({"models": {"t": {"source": "random", "arch": "llama"}, "s": {"dtype": "float32"}}}))
    merged = {"models": {"t": {"source": "random", "arch": "llama", "id": "x/y", "dtype": "bfloat16"},
                         "s": {"source": "hf", "id": "x/z", "dtype": "float32"}}}
    layer_model_entries(merged, [first, second])
    assert merged["models"] == {"t": {"source": "random", "arch": "llama"},
                                "s": {"source": "hf", "id": "x/z", "dtype": "float32"}}


def test_the_layered_config_is_valid():
    paper, rehearsal = load("paper.yaml"), load("rehearsal.yaml")
    merged = yaml.safe_load(yaml.safe_dump(paper))
    for section, value in rehearsal.items():  # as Snakemake merges, then the model entries replaced
        if isinstance(value, dict):
            stack = [(merged.setdefault(section, {}), value)]
            while stack:
                into, new = stack.pop()
                for key, item in new.items():
                    if isinstance(item, dict) and isinstance(into.get(key), dict):
                        stack.append((into[key], item))
                    else:
                        into[key] = item
        else:
            merged[section] = value
    layer_model_entries(merged, [REPO / "config/paper.yaml", REPO / "config/rehearsal.yaml"])
    validate_config(merged, "paper + rehearsal")
    assert merged["methods"] == validate_config(paper, "paper")["methods"]


def rules_script():
    return load_benchmark("rehearsal_rules")


def test_rule_sets_are_read_from_the_dry_run_and_the_logs():
    module = rules_script()
    dry = "Job stats:\njob         count\n--------  -------\nall           1\ndistill     112\ntotal       113\n\nReasons:\n x 3\n"
    assert module.job_stats(dry) == {"all": 1, "distill": 112}
    assert module.job_stats("Nothing to be done (all requested files are present and up to date).") == {}
    logs = ["Finished jobid: 5 (Rule: distill)\n3 of 9 steps\nFinished jobid: 0 (Rule: all)\n",
            "Finished jobid: 7 (Rule: distill)\n"]
    assert module.finished_jobs(logs) == {"distill": 2, "all": 1}


@pytest.mark.parametrize("finished, verdict", [(["distill", "distill", "all"], 0), (["distill", "all"], 1),
                                               (["distill", "distill"], 1)])
def test_every_planned_job_must_have_run(tmp_path, monkeypatch, capsys, finished, verdict):
    module = rules_script()
    plans = {"profiles/slurm": "Job stats:\njob  count\nall  1\ndistill  2\ntotal  3\n", "config/rehearsal.yaml": ""}
    monkeypatch.setattr(module, "dry_run", lambda args: next(v for k, v in plans.items() if k in args))
    (tmp_path / ".snakemake" / "log").mkdir(parents=True)
    (tmp_path / ".snakemake" / "log" / "run.snakemake.log").write_text(
        "".join(f"Finished jobid: {i} (Rule: {rule})\n" for i, rule in enumerate(finished)))
    assert module.main(tmp_path) == verdict
    assert ("NOT EQUAL" in capsys.readouterr().out) == bool(verdict)


def test_rule_wall_times_are_read_from_the_log_stamps():
    log = ("[Mon Dec  7 02:05:45 2026]\nlocalrule teacher_cot:\n    input: a\n    jobid: 5\n    reason: x\n"
           "Select jobs to execute...\n[Mon Dec  7 02:06:00 2026]\nrule anchors:\n    jobid: 7\n"
           "[Mon Dec  7 02:06:40 2026]\nFinished jobid: 5 (Rule: teacher_cot)\n"
           "[Mon Dec  7 02:08:00 2026]\nFinished jobid: 7 (Rule: anchors)\n")
    assert rules_script().rule_seconds(log) == {"teacher_cot": [55.0], "anchors": [120.0]}


def test_the_config_snapshot_keeps_the_paper_learning_rate_a_number(tmp_path):
    """The distill ranks load the JSON snapshot: json writes 2e-05 with no dot, which YAML 1.1 reads as a string,
    so every distill job of the paper config stopped with "'distill.train.lr' should be of type number"."""
    from mechdistill.config import config_snapshot, load_config

    paper = validate_config(load("paper.yaml"), "paper")
    assert paper["distill"]["train"]["lr"] == 2e-5
    snapshot = config_snapshot(paper, tmp_path)
    assert load_config(snapshot)["distill"]["train"]["lr"] == 2e-5
