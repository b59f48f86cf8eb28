"""Config loading and validation against `config/schema.yaml`.

`load_config(path)` returns a plain dict with defaults filled in, or raises ConfigError with a
message that names the offending key, what was found and what is allowed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import string
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema.yaml"


def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(validator_class):
    """Extend a jsonschema validator so that it fills `default` values into objects."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if isinstance(sub, dict) and "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_class, {"properties": set_defaults,
                                                          "placeholders": _check_placeholders})


def template_fields(template: str) -> list[str]:
    """The {name} fields of a str.format template ({{ and }} are literal braces); ValueError if malformed."""
    return [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]


def _check_placeholders(validator, allowed: list[str], instance: Any, schema: dict):
    """The schema's `placeholders` keyword: a path template may use only these {names} (filled per job)."""
    if not isinstance(instance, str):
        return
    names = ", ".join(f"{{{name}}}" for name in allowed)
    try:
        unknown = [field for field in template_fields(instance) if field not in allowed]
    except ValueError as exc:
        yield jsonschema.ValidationError(f"is not a valid path template ({exc}); it may use {names}, "
                                         "and {{ and }} for literal braces")
        return
    if unknown:
        yield jsonschema.ValidationError(f"uses the unknown placeholder {', '.join(f'{{{f}}}' for f in unknown)}; "
                                         f"allowed: {names} (write {{{{ and }}}} for literal braces)")


_Validator = _with_defaults(jsonschema.Draft202012Validator)


def _allowed_keys(schema: dict, error: jsonschema.ValidationError) -> list[str]:
    props = dict(error.schema.get("properties", {}))
    return sorted(props)


def _describe(error: jsonschema.ValidationError, source: str) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        allowed = _allowed_keys(error.schema, error)
        unexpected = sorted(set(error.instance) - set(allowed)) if allowed else []
        keys = ", ".join(repr(k) for k in unexpected) or error.message
        hint = f" Allowed keys here: {', '.join(allowed)}." if allowed else ""
        return f"{source}: unknown key {keys} under '{where}'.{hint}"
    if error.validator == "enum":
        return (f"{source}: '{where}' is {error.instance!r}; allowed values: "
                f"{', '.join(repr(v) for v in error.validator_value)}.")
    if error.validator == "required":
        return f"{source}: '{where}' {error.message}."
    if error.validator == "type":
        return (f"{source}: '{where}' should be of type {error.validator_value}, "
                f"got {type(error.instance).__name__} {error.instance!r}.")
    if error.validator == "placeholders":
        return f"{source}: '{where}' is {error.instance!r}: it {error.message}."
    return f"{source}: '{where}': {error.message}."


def _deepest(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """if/then and allOf wrap the useful error; report the most specific one."""
    while error.context:
        error = max(error.context, key=lambda e: len(e.absolute_path))
    return error


def validate_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate (and fill defaults into) `config` in place; return it."""
    errors = sorted(_Validator(load_schema()).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        msgs = [_describe(_deepest(e), source) for e in errors]
        raise ConfigError("invalid config:\n  " + "\n  ".join(dict.fromkeys(msgs)))
    _check_references(config, source)
    return config


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")  # a name becomes a folder and a wildcard value


def _check_names(config: dict, source: str) -> None:
    """Dataset, model and method names are folder names in results/ and Snakemake wildcard values."""
    for section in ("datasets", "models", "methods"):
        for name in config.get(section) or {}:
            if not NAME_PATTERN.fullmatch(str(name)):
                raise ConfigError(f"{source}: {section}.{name}: a name becomes a folder of results/ and a "
                                  "wildcard value; use letters, digits, '_', '-' and '.' (no '/' or spaces), "
                                  "starting with a letter or digit.")


def _check_datasets(config: dict, source: str) -> None:
    """What the schema cannot say about a dataset entry: a (min, max) range the right way round."""
    for name, entry in config["datasets"].items():
        low_high = (entry.get("params") or {}).get("codes_per_doc")
        if low_high is not None and low_high[0] > low_high[1]:
            raise ConfigError(f"{source}: datasets.{name}.params.codes_per_doc is {low_high}: give [min, max] "
                              f"with min <= max, e.g. {sorted(low_high)}.")


def _check_references(config: dict, source: str) -> None:
    _check_names(config, source)
    _check_datasets(config, source)
    models = config["models"]
    names = ", ".join(sorted(models))
    for role, name in [("teacher", config["teacher"])] + [("students", s) for s in config["students"]]:
        if name not in models:
            raise ConfigError(f"{source}: '{role}' names model {name!r}, which is not a key of "
                              f"'models' (defined: {names}).")
    for name, spec in models.items():
        ref = spec.get("base") if spec["source"] == "layer_subset" else None
        if spec["source"] == "random" and spec.get("tokenizer", "byte") != "byte":
            ref = spec["tokenizer"]
        if ref is not None and ref not in models:
            raise ConfigError(f"{source}: models.{name} refers to model {ref!r}, which is not "
                              f"defined (defined: {names}).")
        if spec["source"] == "layer_subset" and ("n_layers" in spec) == ("layers" in spec):
            raise ConfigError(f"{source}: models.{name} needs exactly one of 'n_layers' or 'layers'.")
    if "teacher" in config.get("methods", {}):
        raise ConfigError(f"{source}: methods.teacher: 'teacher' is reserved for the teacher's own evaluation "
                          "(results/<dataset>/<teacher>/teacher/); give the method another name.")
    llm_model = config["anchors"]["llm"].get("model")
    if llm_model is not None and llm_model not in models:
        raise ConfigError(f"{source}: anchors.llm.model names model {llm_model!r}, which is not "
                          f"defined (defined: {names}).")
    distill = config["distill"]
    if distill["launch"]["ranks"] > 1 and not distill["deepspeed"]:
        raise ConfigError(f"{source}: distill.launch.ranks is {distill['launch']['ranks']}, but ranks train "
                          "together only through DeepSpeed: set distill.deepspeed: true (or ranks: 1).")
    gen = config["generation"]
    if gen["backend"] == "file" and "traces" not in gen:
        raise ConfigError(f"{source}: generation.backend is 'file' but generation.traces is not set; "
                          "give the path of your Parquet/JSONL traces (may use {dataset} and {split}).")


def load_config(path: str | Path, overrides: dict | None = None) -> dict[str, Any]:
    """Read a YAML config, apply `overrides` (a shallow dict merge), validate, fill defaults."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist.")
    try:  # a snapshot is JSON: YAML 1.1 reads JSON's 2e-05 (no dot) as a string
        config = (json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())) or {}
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {exc}") from exc
    if overrides:
        config.update(overrides)
    return validate_config(config, source=str(path))


def config_snapshot(config: dict[str, Any], directory: str | Path = ".snakemake/mechdistill") -> str:
    """Write the validated `config` as JSON named by its content hash (once; atomically) and return
    the path: shell rules whose processes load the config themselves (the ranks of `distill`) read it
    with `load_config`. The same config gives the same path, so the command changes only with it."""
    blob = json.dumps(config, sort_keys=True, indent=1, default=str)
    path = Path(directory, f"config-{hashlib.sha1(blob.encode()).hexdigest()[:12]}.json")
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        with os.fdopen(fd, "w") as fh:
            fh.write(blob)
        os.replace(tmp, path)
    return str(path)


def layer_model_entries(config: dict[str, Any], config_files: list[str | Path]) -> dict[str, Any]:
    """`config` (in place) with each `models` entry taken whole from the last of `config_files` that gives it a
    `source`. Snakemake merges several --configfile files key by key, so a later file that turns the paper's
    {source: hf, id: ...} into {source: random, arch: ...} would keep the stale `id` (a key random does not take);
    a later entry without `source` still only updates the earlier one. Returns `config`."""
    entries: dict[str, dict] = {}
    for path in config_files:
        models = (yaml.safe_load(Path(path).read_text()) or {}).get("models") or {}
        for name, spec in models.items():
            if isinstance(spec, dict):
                earlier = {} if "source" in spec else entries.get(name, {})
                entries[name] = {**earlier, **copy.deepcopy(spec)}
    for name, spec in entries.items():
        if name in config.get("models", {}):
            config["models"][name] = spec
    return config
