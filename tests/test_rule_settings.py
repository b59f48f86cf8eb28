"""The rules' params come from the settings classes' declared keys (mechdistill.settings): editing any
key a stage declares plans its rule again; generation.backend auto is resolved once at start-up.

The DAG is built in this process through Snakemake's API (about 0.3 s per config on config/tiny.yaml),
so every declared key can be edited one at a time."""

from __future__ import annotations

import base64
import copy
import json
import os
from pathlib import Path

import pytest
import yaml
from snakemake.api import SnakemakeApi
from snakemake.settings.types import ConfigSettings, DAGSettings, OutputSettings, ResourceSettings

from mechdistill.anchors.settings import AnchorSettings, TrajectorySettings
from mechdistill.characterize.settings import HeadComparisonSettings, HeadFigureSettings, HeadSettings
from mechdistill.config import load_config, validate_config
from mechdistill.data.settings import DatasetSettings
from mechdistill.distill.settings import (
    BaselineDataSettings,
    CardSettings,
    DistillSettings,
    SelectSettings,
    StudentPredictSettings,
    TargetSettings,
)
from mechdistill.evaluate.settings import ClaimSettings, EvaluateSettings, LasSimulatorSettings, RunSettings
from mechdistill.patching.settings import PatchingSettings
from mechdistill.settings import Settings, lookup
from mechdistill.teacher import engines
from mechdistill.teacher.settings import CandidateSettings, CleanPromptSettings, GenerationSettings
from tests.helpers import REPO

TINY = REPO / "config/tiny.yaml"

# What each rule's stage builds; the rule's `settings` param must be exactly these classes' params.
RULE_SETTINGS: dict[str, tuple[type[Settings], ...]] = {
    "prepare_dataset": (DatasetSettings,), "build_prompts": (CandidateSettings,),
    "clean_prompts": (CleanPromptSettings,), "teacher_cot": (GenerationSettings,), "anchors": (AnchorSettings,),
    "trajectories": (TrajectorySettings,), "head_scores": (HeadSettings,), "style_head_scores": (HeadSettings,),
    "head_comparison": (HeadComparisonSettings,), "head_figures": (HeadFigureSettings,),
    "patching": (PatchingSettings,), "teacher_targets": (TargetSettings,),
    "baseline_teacher_data": (BaselineDataSettings,), "distill": (DistillSettings,),
    "select_distill": (SelectSettings, CardSettings), "model_card": (CardSettings,),
    "student_predict": (StudentPredictSettings,),
    "las_simulator": (LasSimulatorSettings,), "evaluate": (EvaluateSettings,), "tables": (RunSettings,), "figure9": (RunSettings,), "claims": (ClaimSettings,),
}
NO_SETTINGS = {"all", "figure1", "patching_figures", "table1", "table2", "table2_baselines", "table3", "table4"}  # read paths only

# Keys whose tiny value is absent (None) or not editable by `_edited`: a valid other value.
EDITS = {
    "heads.max_docs": 1, "heads.max_tokens": 64, "patching.max_tokens": 64, "distill.max_docs": 1,
    "distill.max_tokens": 64, "patching.early_tokens": 3, "generation.max_model_len": 256,
    "generation.enforce_eager": True, "generation.in_process": True, "generation.traces": "traces.jsonl",
    "generation.backend": "vllm", "generation.student_backend": "vllm", "generation.dtype": "bfloat16",
    "generation.device": "cuda", "heads.device": "cuda", "heads.dtype": "bfloat16", "patching.device": "cuda",
    "patching.dtype": "bfloat16", "evaluate.device": "cuda", "evaluate.dtype": "bfloat16",
    "distill.teacher_dtype": "bfloat16", "distill.train.device": "cuda", "heads.split": "train",
    "patching.split": "train", "trajectories.split": "val", "anchors.mode": "llm", "heads.device_map": "auto",
    "patching.device_map": "auto", "evaluate.device_map": "auto", "distill.teacher_device_map": "auto",
    "heads.max_memory": {"cpu": "8GiB"}, "patching.max_memory": {"cpu": "8GiB"},
    "evaluate.max_memory": {"cpu": "8GiB"}, "distill.teacher_max_memory": {"cpu": "8GiB"},
    "heads.offload_folder": "offload", "patching.offload_folder": "offload", "evaluate.offload_folder": "offload",
    "distill.teacher_offload_folder": "offload", "anchors.refine_patterns": ["rather than"],
    "patching.phase1_corruption": "all_heads", "embedder": "other-embedder", "teacher": "tiny_student",
    "students": ["tiny_llama"], "methods": {"vanilla": {}}, "distill.weights": {"alpha": 0.5}, "datasets.{dataset}.max_docs": {"train": 2},
    "datasets.{dataset}.adapter": None,  # the adapter's params are adapter-specific: edited with params below
    "patching.value_swaps": {"EF 35%": "EF 55%"}, "heads.coarse": {"keys": "all"},
    "heads.refine": {"ranking": "product"}, "clean_prompts.source_split": "val", "distill.select.criterion": "val_loss",
    "evaluate.propensity": {"tiny_icd": {"A": 0.6}}, "clean_prompts.style": "guided",
    "prompts.exemplar_style": "neutral",
}
SKIP = {"datasets.{dataset}.adapter", "datasets"}  # one dataset: its entry is edited through its other keys


def _edited(value):
    """Another valid value of the same shape: a number changed, a flag flipped, a mapping's first leaf edited."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 if value else 0.5
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return [_edited(value[0]), *value[1:]] if value else value
    if isinstance(value, dict):  # its first number or flag (strings are often enums)
        key = next((k for k, v in value.items() if _has_number(v)), None)
        if key is not None:
            return {**value, key: _edited(value[key])}
    raise AssertionError(f"no edit for {value!r}: add the key to EDITS")


def _has_number(value) -> bool:
    if isinstance(value, dict):
        return any(_has_number(v) for v in value.values())
    return isinstance(value, (bool, int, float))


def _set(config: dict, key: str, value) -> None:
    *parents, last = key.split(".")
    node = config
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def jobs(config: dict, workdir: Path) -> list:
    """Snakemake's jobs of `config` (every job: nothing exists in `workdir`), built in this process."""
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with SnakemakeApi(OutputSettings(quiet={"all"})) as api:
        workflow_api = api.workflow(resource_settings=ResourceSettings(cores=1),
                                    config_settings=ConfigSettings(configfiles=[path]),
                                    snakefile=REPO / "Snakefile", workdir=workdir)
        workflow_api.dag(DAGSettings())
        workflow = workflow_api._workflow
        workflow._prepare_dag(forceall=False, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        return list(workflow.dag.jobs)


def rule_params(config: dict, workdir: Path) -> dict[str, set[str]]:
    """rule -> the params of each of its jobs, as Snakemake records and compares them."""
    out: dict[str, set[str]] = {}
    for job in jobs(config, workdir):
        out.setdefault(job.rule.name, set()).add(json.dumps([str(p) for p in job.params], sort_keys=True))
    return out


@pytest.fixture(scope="module")
def tiny() -> dict:
    raw = yaml.safe_load(TINY.read_text())
    validate_config(copy.deepcopy(raw))
    return raw


def test_every_rule_records_its_stages_settings(tiny, tmp_path):
    config = load_config(TINY)
    engines.resolve_engines(config)
    seen = set()
    for job in jobs(tiny, tmp_path):
        rule = job.rule.name
        if rule in NO_SETTINGS:
            continue
        assert rule in RULE_SETTINGS, f"rule {rule}: which settings classes does its stage build? (RULE_SETTINGS)"
        wildcards = dict(job.wildcards.items())
        expected = "\n".join(cls.params(config, **wildcards) for cls in RULE_SETTINGS[rule])
        assert job.params.settings == expected, rule
        for cls in RULE_SETTINGS[rule]:
            cls.from_config(config, **wildcards)  # reads only declared keys (UndeclaredKey otherwise)
        seen.add(rule)
    assert seen == set(RULE_SETTINGS)


def test_editing_any_declared_key_reruns_the_rules_that_declare_it(tiny, tmp_path):
    """For every key some stage declares: edit it in config/tiny.yaml; the params of exactly the rules whose
    settings declare it change (each such rule is planned again by --rerun-triggers params)."""
    dataset = next(iter(tiny["datasets"]))
    base = rule_params(tiny, tmp_path)
    keys = {key for classes in RULE_SETTINGS.values() for cls in classes for key in cls.KEYS} - SKIP
    declared_by = {key: {rule for rule, classes in RULE_SETTINGS.items() for cls in classes if key in cls.KEYS}
                   for key in keys}
    for key in sorted(keys):
        if key == "methods.{method}":
            continue  # the methods are the {method} wildcard: edited below through one method's entry
        config = copy.deepcopy(tiny)
        filled = key.format(dataset=dataset)
        full = validate_config(copy.deepcopy(tiny))
        value = EDITS[key] if key in EDITS else _edited(lookup(full, filled))
        if key == "datasets.{dataset}.params":
            value = {**full["datasets"][dataset]["params"], "seed": full["datasets"][dataset]["params"]["seed"] + 1}
        if key == "datasets.{dataset}.candidates":
            value = {**full["datasets"][dataset]["candidates"], "size": 7}
        _set(config, filled, value)
        validate_config(copy.deepcopy(config), source=f"tiny.yaml with {filled} = {value!r}")
        changed = {rule for rule, params in rule_params(config, tmp_path).items() if params != base.get(rule)}
        missing = {rule for rule in declared_by[key] if rule in base} - changed
        assert not missing, f"editing {filled} does not rerun {sorted(missing)}"
    config = copy.deepcopy(tiny)
    config["methods"]["morsd"]["params"]["n_samples"] = 3
    changed = {rule for rule, params in rule_params(config, tmp_path).items() if params != base.get(rule)}
    assert "student_predict" in changed


def test_editing_the_teachers_model_entry_reruns_every_anchors_and_trajectories_job(tiny, tmp_path):
    """The teacher's tokenizer defines the early window of every model's CoT (text.first_tokens_span): editing
    the teacher's models entry changes the params of every anchors job and every trajectories job, the
    students' included (their CoT does not change with the teacher's entry)."""
    def params_by_output(config: dict) -> dict[tuple[str, str], str]:
        return {(job.rule.name, str(job.output[0])): json.dumps([str(p) for p in job.params])
                for job in jobs(config, tmp_path) if job.rule.name in ("anchors", "trajectories")}

    base = params_by_output(tiny)
    config = copy.deepcopy(tiny)
    config["models"][tiny["teacher"]]["seed"] += 1
    edited = params_by_output(config)
    assert {rule for rule, _ in base} == {"anchors", "trajectories"}
    assert any("/" in out.split("tiny_icd/", 1)[1].rsplit("/", 1)[0] for rule, out in base if rule == "trajectories")
    assert edited.keys() == base.keys() and all(edited[job] != base[job] for job in base)


def _touch_everything(workdir: Path, configfile: Path) -> None:
    """Record every job of `configfile` as done (Snakemake's --touch writes each output's metadata, params
    included, even of outputs that do not exist), then create the outputs, all with one mtime, so that a dry
    run plans only what an edit makes rerun."""
    from tests.test_workflow import snakemake

    snakemake(workdir, "--configfile", str(configfile), "--touch", "--cores", "1")
    for record in (workdir / ".snakemake/metadata").iterdir():
        path = workdir / base64.b64decode(record.name.replace("_", "/")).decode()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()
        os.utime(path, (1e9, 1e9))


@pytest.mark.slow
def test_editing_distill_max_tokens_reruns_teacher_targets(tmp_path):
    """run_teacher_targets skips documents longer than distill.max_tokens: editing it must rerun the rule
    (its params listed top_k, pools, teacher_dtype and max_docs only)."""
    from tests.test_workflow import job_counts, snakemake

    _touch_everything(tmp_path, TINY)
    assert "Nothing to be done" in snakemake(tmp_path, "-n", "--configfile", str(TINY), "--rerun-triggers", "params")
    config = yaml.safe_load(TINY.read_text())
    config["distill"]["max_tokens"] = 64
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(config))
    jobs_planned = job_counts(snakemake(tmp_path, "-n", "--configfile", str(edited), "--rerun-triggers", "params"))
    assert jobs_planned.get("teacher_targets") == 2


@pytest.mark.parametrize("vllm_runs", [True, False])
def test_backend_auto_is_resolved_once_for_rules_and_plan(tiny, tmp_path, monkeypatch, vllm_runs):
    """generation.backend auto: where vLLM runs, teacher_cot holds tensor_parallel_size GPUs in envs/vllm.yaml
    and the planner costs vllm; where it does not, no GPU and envs/cpu.yaml (the rules compared "auto" with
    "vllm", so an auto job got no GPU even where vLLM ran)."""
    from tests.test_plan import tiny_work

    monkeypatch.setattr(engines, "importable", lambda module: vllm_runs)
    monkeypatch.setattr(engines, "vllm_problem", lambda device, check_gpu=True: None if vllm_runs else "no vllm here")
    config = copy.deepcopy(tiny)
    config["generation"] = {**config["generation"], "backend": "auto", "tensor_parallel_size": 2, "device": "cuda"}
    teacher_cot = [j for j in jobs(config, tmp_path) if j.rule.name == "teacher_cot"]
    assert teacher_cot
    for job in teacher_cot:
        assert job.resources["gpu"] == (2 if vllm_runs else 0)
        assert Path(job.rule.conda_env).name == ("vllm.yaml" if vllm_runs else "cpu.yaml")
    predict = [j for j in jobs(config, tmp_path) if j.rule.name == "student_predict"]
    assert {Path(j.rule.conda_env).name for j in predict} == {"vllm.yaml" if vllm_runs else "train.yaml"}

    resolved = validate_config(copy.deepcopy(config))
    said = engines.resolve_engines(resolved)
    assert resolved["generation"]["backend"] == ("vllm" if vllm_runs else "transformers")
    assert resolved["generation"]["student_backend"] == resolved["generation"]["backend"]
    assert "generation.backend auto -> " in said
    resolved["plan"]["datasets"] = {"tiny_icd": {"n_docs": {"train": 2, "val": 1, "test": 3}, "prompt_tokens": 50,
                                                  "clean_prompt_tokens": {"neutral": 80, "guided_exemplar": 120}}}
    table = tiny_work(resolved)
    engine = set(table.loc[table["stage"] == "teacher_cot", "engine"])
    assert engine == ({"vllm"} if vllm_runs else {"generate"})
