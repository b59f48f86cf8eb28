import copy

import pytest
import yaml
from conftest import REPO

from mechdistill.config import load_config, validate_config
from mechdistill.errors import ConfigError


def base() -> dict:
    return yaml.safe_load((REPO / "config" / "tiny.yaml").read_text())


@pytest.mark.parametrize("name", ["config.yaml", "tiny.yaml", "paper.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(REPO / "config" / name)
    assert cfg["teacher"] in cfg["models"]


def test_defaults_are_filled():
    cfg = validate_config(base())
    assert cfg["generation"]["temperature"] == 0.0  # greedy by default
    assert cfg["generation"]["max_new_tokens"] == 12  # given value kept
    assert cfg["prompts"]["exemplar"] is True
    assert cfg["models"]["tiny_llama"]["trust_remote_code"] is False


@pytest.mark.parametrize("mutate, expected", [
    (lambda c: c.update(datasetz={}), ["unknown key 'datasetz'", "Allowed keys here:", "datasets"]),
    (lambda c: c["generation"].update(backend="vlm"), ["'generation.backend' is 'vlm'", "'vllm'", "'file'"]),
    (lambda c: c["generation"].update(max_new_tokens="many"), ["'generation.max_new_tokens'", "integer"]),
    (lambda c: c["datasets"]["tiny_icd"]["params"].update(n_doc=3),
     ["unknown key 'n_doc'", "datasets.tiny_icd.params", "n_docs"]),
    (lambda c: c["datasets"]["tiny_icd"].update(adapter="mimic"), ["'datasets.tiny_icd.adapter'", "'mimic4_icd10'"]),
    (lambda c: c["models"]["tiny_llama"].update(arch="gpt9"), ["models.tiny_llama.arch", "'llama'", "'qwen2'"]),
    (lambda c: c.update(teacher="nobody"), ["'teacher' names model 'nobody'", "tiny_llama"]),
    (lambda c: c["models"]["tiny_student"].update(base="ghost"), ["refers to model 'ghost'"]),
    (lambda c: c["models"]["tiny_student"].update(layers=[0]), ["exactly one of 'n_layers' or 'layers'"]),
    (lambda c: c["generation"].update(backend="file"), ["generation.traces is not set"]),
    (lambda c: c.pop("teacher"), ["'teacher' is a required property"]),
])
def test_schema_errors_name_key_and_allowed_values(mutate, expected):
    cfg = copy.deepcopy(base())
    mutate(cfg)
    with pytest.raises(ConfigError) as err:
        validate_config(cfg, source="tiny.yaml")
    for text in expected:
        assert text in str(err.value)
    assert "tiny.yaml" in str(err.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("datasets: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
