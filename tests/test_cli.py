"""`python -m mechdistill <stage>`: a stage by hand, at the paths Snakemake uses."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest
import yaml

from mechdistill import paths
from mechdistill.cli import main
from tests.helpers import REPO

TINY = str(REPO / "config" / "tiny.yaml")


def test_help_does_not_load_the_models():
    """--help and validate-config stay instant: the stages (torch, transformers) load only to run one."""
    code = (f"import sys; from mechdistill.cli import main; main(['validate-config', '--config', {TINY!r}]); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
    assert "prepare-dataset" in subprocess.run([sys.executable, "-m", "mechdistill", "--help"], capture_output=True,
                                               text=True, check=True).stdout


def test_validate_config_prints_it_with_defaults(capsys):
    assert main(["validate-config", "--config", TINY]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["distill"]["pools"]["phase1"]["layers"] == [0.0, 0.5]  # a schema default


@pytest.mark.parametrize("change, named", [
    ({"methods": {"cwt": {"params": {"n_chunks": 0}}}}, "methods.cwt.params.n_chunks is 0; allowed: an integer >= 1."),
    ({"patching": {"bins": [2, 100]}}, "patching.bins has 100, but the teacher tiny_llama has 8 attention heads"),
])
def test_validate_config_runs_the_start_up_checks_of_method_settings_and_bins(tmp_path, capsys, change, named):
    config = yaml.safe_load(open(TINY))
    for section, value in change.items():
        config[section] = {**config[section], **value} if section == "patching" else value
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(config))
    assert main(["validate-config", "--config", str(tmp_path / "bad.yaml")]) == 2
    assert f"{tmp_path / 'bad.yaml'}: {named}" in capsys.readouterr().err


def test_unknown_dataset_names_the_defined_ones(capsys):
    assert main(["prepare-dataset", "nope", "--config", TINY]) == 2
    err = capsys.readouterr().err
    assert "dataset 'nope' is not a key of 'datasets'" in err and "(defined: tiny_icd)" in err


@pytest.mark.parametrize("student, method, named", [("tiny_llama", "mech", "'tiny_llama' is not in 'students'"),
                                                     ("tiny_student", "nope", "'nope' is not in 'methods'")])
def test_distill_names_the_students_and_methods_it_knows(capsys, student, method, named):
    assert main(["distill", "tiny_icd", student, method, "--config", TINY]) == 2
    err = capsys.readouterr().err
    assert named in err and "(there: " in err


@pytest.mark.parametrize("error", ["InputError", "ValueError"])
def test_a_distill_job_logs_a_users_mistake_as_one_line(tmp_path, monkeypatch, capsys, error):
    """The `distill` rule's entry (`mechdistill distill ... --log-file`): an InputError inside the run ends the
    log with one line and exits 2, with no traceback; a bug (ValueError) keeps its traceback."""
    import types

    from mechdistill.errors import InputError

    def run_distill(*args):
        if error == "InputError":
            raise InputError("bad row.", file="t.parquet", row=4, fix="mend it.")
        raise ValueError("a bug")

    monkeypatch.setitem(sys.modules, "mechdistill.stages.distill", types.SimpleNamespace(run_distill=run_distill))
    log = tmp_path / "distill.log"
    args = ["distill", "tiny_icd", "tiny_student", "vanilla", "--config", TINY, "--log-file", str(log)]
    if error == "ValueError":
        with pytest.raises(ValueError):
            main(args)
        assert "Traceback (most recent call last)" in log.read_text()
        return
    assert main(args) == 2
    assert "Traceback" not in log.read_text()
    assert log.read_text().strip().endswith(" ERROR mechdistill: InputError: t.parquet, row 4: bad row. Fix: mend it.")
    assert capsys.readouterr().err == "mechdistill: error: t.parquet, row 4: bad row. Fix: mend it.\n"


def test_prepare_dataset_by_hand_writes_where_snakemake_would(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["prepare-dataset", "tiny_icd", "--config", TINY]) == 0
    assert len(pd.read_parquet(paths.data("tiny_icd", "train"))) == 3
    assert (tmp_path / paths.labels("tiny_icd")).exists()
