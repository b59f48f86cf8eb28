"""benchmarks/config_mistakes.py: its classifier on canned snakemake outputs, its edits, its list of cases
and its report (no snakemake run: fast)."""

from __future__ import annotations

import copy
import json

import pytest
import yaml

from tests.helpers import REPO, load_benchmark

cm = load_benchmark("config_mistakes")

BANNER = """Assuming unrestricted shared filesystem usage.

SNAKEMAKE
=========
  Command: .../snakemake/__main__.py -s Snakefile -d /tmp/case001-x -n --configfile /tmp/case001-x/config.yaml
  Snakefile: /repo/Snakefile

Building DAG of jobs...
"""

# what snakemake printed for three of the cases on the code of 2026-12-07 (paths shortened)
CONFIG_ERROR = """ConfigError in file "/repo/Snakefile", line 29:
invalid config:
  /tmp/case001-x/config.yaml: unknown key 'sead' under '<top level>'. Allowed keys here: anchors, cache_dir, seed.
  File "/repo/Snakefile", line 29, in <module>
  File "/repo/mechdistill/config.py", line 83, in validate_config
"""
TYPE_ERROR = """mechdistill: generation.student_backend auto -> transformers (the teacher's backend)
TypeError in file "/repo/rules/distill.smk", line 29:
'>' not supported between instances of 'str' and 'int'
  File "/repo/rules/distill.smk", line 89, in <module>
  File "/repo/mechdistill/distill/catalog.py", line 43, in asks_teacher
"""
WRAPPED_KEY_ERROR = BANNER + """InputFunctionException in rule teacher_cot in file "/repo/rules/teacher.smk", line 6:
Error:
  KeyError: 'foo'
Wildcards:
  dataset=tiny_icd
Traceback:
  File "/repo/rules/common.smk", line 49, in trace_file (rule teacher_cot, line 6, /repo/rules/teacher.smk)
"""
WRAPPED_CONFIG_ERROR = BANNER + """InputFunctionException in rule teacher_cot in file "/repo/rules/teacher.smk", line 6:
Error:
  ConfigError: generation.traces '/tmp/x-{foo}.jsonl' has the unknown placeholder {foo}; allowed: {dataset}, {split}
Wildcards:
  dataset=tiny_icd
"""
MISSING_INPUT = BANNER + """MissingInputException in rule teacher_cot in file "/repo/rules/teacher.smk", line 6:
Missing input files for rule teacher_cot:
    output: results/tiny_icd/tiny_llama/cot/train.parquet
    affected files:
        /tmp/x-tiny_icd.jsonl
"""
PYTHON_TRACEBACK = """Traceback (most recent call last):
  File "/repo/mechdistill/teacher/engines.py", line 12, in check_engines
ValueError: generation.batch_size must be positive
"""
DRY_RUN_OK = BANNER + """Job stats:
job                  count
-----------------  -------
all                      1
teacher_cot              4
total                   62

This was a dry-run (flag -n). The order of jobs does not reflect the order of execution.
"""


@pytest.mark.parametrize("rc, output, key, expected", [
    (1, CONFIG_ERROR, "sead", cm.STOPPED_NAMES_KEY),            # unknown key 'sead' under '<top level>'
    (1, CONFIG_ERROR, "generation.sead", cm.STOPPED_NO_KEY),    # 'sead' quoted, but not under 'generation'
    (1, CONFIG_ERROR, "seed", cm.STOPPED_NO_KEY),               # seed is among the allowed keys, not quoted
    (1, TYPE_ERROR, "methods.morsd.params.n_samples", cm.RAW),  # a TypeError is not our message
    (1, WRAPPED_KEY_ERROR, "generation.traces", cm.RAW),        # InputFunctionException wrapping a KeyError
    (1, WRAPPED_CONFIG_ERROR, "generation.traces", cm.STOPPED_NAMES_KEY),  # ... wrapping our ConfigError
    (1, MISSING_INPUT, "generation.traces", cm.STOPPED_NO_KEY),  # snakemake's message, naming the file
    (1, PYTHON_TRACEBACK, "generation.batch_size", cm.RAW),      # a traceback, even though it names the key
    (0, DRY_RUN_OK, "patching.bins", cm.ACCEPTED_SHOULD_STOP),
])
def test_classify_startup(rc, output, key, expected):
    assert cm.classify(rc, output, key, legal=False) == expected


def test_classify_accepted_by_legality_and_by_the_consuming_job():
    assert cm.classify(0, DRY_RUN_OK, "students", legal=True) == cm.ACCEPTED_LEGAL
    assert cm.classify(0, DRY_RUN_OK, "patching.bins", legal=False, job={"rc": 0}) == cm.ACCEPTED_COERCED
    assert cm.classify(0, DRY_RUN_OK, "patching.bins", legal=False, job={"rc": 1}) == cm.ACCEPTED_FAILS_IN_JOB
    assert cm.classify(0, DRY_RUN_OK, "patching.bins", legal=False, job={"rc": None}) == cm.ACCEPTED_SHOULD_STOP


def test_a_sentinel_wins_over_every_other_class():
    for rc, output in [(0, DRY_RUN_OK), (1, CONFIG_ERROR), (1, TYPE_ERROR)]:
        assert cm.classify(rc, output, "sead", legal=True, sentinels=["PWNED"]) == cm.SHELL


def test_names_key_ignores_file_paths_and_longer_words():
    text = 'TypeError in file "/repo/mechdistill/teacher/engines.py": rule teacher_cot failed'
    assert not cm.names_key(text, "teacher")
    assert cm.names_key("ConfigError: 'teacher' names model 'x', which is not a key of 'models'", "teacher")
    assert cm.names_key("'patching.bins.0' should be of type integer", "patching.bins")
    assert not cm.names_key("'patching.binsize' is 3", "patching.bins")
    assert cm.names_key("unknown key 'phase1.atn' under 'distill.weights'", "distill.weights.phase1.atn")
    assert cm.names_key("methods.mech: `params` are the settings of a baseline", "methods.mech.params")
    assert not cm.names_key("methods.mech: unknown method 'mechh'", "methods.mech.base")
    assert cm.names_key("models.tiny_student refers to model 'tiny_lama'", "models.tiny_student.base",
                        names=("models.tiny_student refers to model 'tiny_lama'",))


def test_the_error_text_starts_at_the_headline_not_at_the_command_line():
    # the command line in the banner holds the config path; only what follows "Building DAG" is the error
    assert cm.error_text(WRAPPED_KEY_ERROR).startswith("InputFunctionException in rule teacher_cot")
    assert cm.excerpt(CONFIG_ERROR).startswith("ConfigError in file")
    assert "File \"" not in cm.excerpt(CONFIG_ERROR)


def test_edits_set_drop_and_rename_keys_with_dots():
    config = {"methods": {"cwt": {"params": {"n_chunks": 3}}}, "teacher": "t"}
    cm.set_("methods.cwt.grid[params.n_chunks]", [1, 2]).apply(config)
    assert config["methods"]["cwt"]["grid"] == {"params.n_chunks": [1, 2]}
    cm.drop("teacher").apply(config)
    cm.rename("methods.cwt", "CWT").apply(config)
    assert config == {"methods": {"CWT": {"params": {"n_chunks": 3}, "grid": {"params.n_chunks": [1, 2]}}}}
    assert cm.set_("distill.weights[phase1.atn]", 1).dotted() == "distill.weights.phase1.atn"
    assert cm.case("r", cm.rename("models.a", "b")).key_path() == "models.b"


def test_every_case_is_named_once_and_changes_the_tiny_config():
    base = yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())
    names = [c.name for c in cm.CASES]
    assert len(names) >= 42 and len(set(names)) == len(names)
    for c in cm.CASES:
        config = copy.deepcopy(base)
        for edit in c.edits:
            edit.apply(config)
        assert config != base, c.name
    # the cases are in the list
    described = {c.describe() for c in cm.CASES}
    for edit in ['methods.morsd.params.n_samples: -1', 'methods.morsd.params.n_samples: "two"',
                 'methods.cwt.params.n_chunks: 0', 'methods.semcot.params.K: "two"', 'patching.bins: [2, 100]',
                 'students: []', 'methods.cwt.grid: {"params.n_chunks": ["it\'s $(touch PWNED)"]}']:
        assert any(edit in d for d in described), edit


def test_main_prints_a_table_and_writes_json(tmp_path, capsys):
    cases = (cm.case("a", cm.set_("seed", "x")), cm.case("b", cm.set_("students", []), legal=True))

    def runner(index, c, base_config, workdir, base_run, job_timeout, keep):
        rc, output = (1, CONFIG_ERROR.replace("'sead'", "'seed'")) if c.name == "a" else (0, DRY_RUN_OK)
        return {"index": index, "name": c.name, "edit": c.describe(), "key": c.key_path(), "legal": c.legal,
                "note": c.note, "message": cm.excerpt(output) if rc else "", "sentinels": [],
                "outcome": cm.classify(rc, output, c.key_path(), c.legal)}

    out = tmp_path / "r.json"
    assert cm.main(["--out", str(out), "--workdir", str(tmp_path / "w"), "--strict"], cases=cases, runner=runner) == 0
    printed = capsys.readouterr().out
    assert "| 1 | a | seed: \"x\" | stopped, names key |" in printed and "- accepted, legal: 1" in printed
    assert [r["outcome"] for r in json.loads(out.read_text())["records"]] == [cm.STOPPED_NAMES_KEY, cm.ACCEPTED_LEGAL]
