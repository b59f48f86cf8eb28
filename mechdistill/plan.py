"""The cost model of a config: the work of every stage, and its GPU-hours, CPU-hours and peak memory.

`mechdistill plan --configfile config/paper.yaml` prints `plan_table` (docs/plan.md).
Nothing here runs a model: work is counted from the config and the dataset sizes with the code's own
rules, then divided by throughputs that are either cited (GPU) or measured here (CPU).

Work (`stage_workloads`), one row per stage, dataset and model (`jobs` Snakemake jobs alike), in tokens:

    generated     tokens generated (teacher CoT, the baselines' teacher data, student predictions, val macro-F1
                  generation)
    prefill       prompt tokens read before generating
    forced        teacher-forced tokens, one forward per document without gradient (`capture`: per-head capture)
    training      tokens through forward and backward (distillation: max_steps x grad_accum_steps documents,
                  one document per micro-batch, as distill.trainer batches; the LAS simulator)
    decode_steps  patching's greedy decoding: batched forward calls; decode_rows: their rows, all calls together
    patched_runs  patched generations: documents x 2 directions x head sets (patching/runs.py)

GPU time (`gpu_seconds`) on the hardware of benchmarks/gpu_throughput_sources.yaml, with
F(s) = 2 N + 4 L H d s FLOPs per token (N parameters, L layers, H heads of width d, s the sequence), the
count of the cited MFU table:

    generated          / the cited vLLM output tokens/s of the nearest model size at the job's GPU count, x GPUs
    prefill, forced    x F(s) / (MFU x peak FLOP/s of the dtype)
    training           x 3 F(s) / (MFU x peak); x 4 with activation checkpointing (the forward recomputed)
    decode             HBM bytes each call reads (weights, and every row's KV cache) / HBM bandwidth:
                       a roofline lower bound; patching decodes a few rows at a time, bandwidth-bound
    MFU: the cited training MFU nearest in |log params| + |log seq| (no forward-only figure is published)
    A job whose model a device_map spreads over `plan.gpus_per_job` GPUs (forward, patching) runs a document's
    layers one GPU at a time: with k documents in flight (the stage's in_flight) at most min(k, GPUs) are busy,
    so its GPU-hours are its compute time x GPUs held / min(k, GPUs) (an assumption: no GPU measured it).

CPU time (`cpu_seconds`): the same tokens at the throughputs measured on SmolLM2-135M by
benchmarks/throughput_cpu.py (benchmarks/results/throughput_cpu.json: decoding, forward with and without
capture, training), scaled by F(s) of the model over F of the measured run. For scale only.

Peak memory per GPU (`peak_memory_gb`) and host memory per node (`host_memory_gb`): sums of named terms
(`gpu_memory_terms` -> `memory_terms`, `host_memory_terms`) at each stage's length cap (its max_tokens, else
the model's context), with ZeRO-3's partitions and working set, activations with and without checkpointing,
the logits and the loss's copies, head captures, KV caches and in-flight documents. docs/scale.md, "The
memory model", gives every term with its source; benchmarks/memory_check.py checks them against the peak RSS
of the real stage code on CPU. A row fits when its peak is within HEADROOM of the GPU and its host memory
within its rule's mem_mb (profiles/slurm/config.yaml).

Dataset sizes and prompt lengths come from the config's `plan` section (`dataset_sizes`); a model's
parameters and shape from `plan.models`, else from its config.json and safetensors headers on this machine
(`model_facts`). Anchors, trajectories and LAS embeddings run on CPU and are left out.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from huggingface_hub import try_to_load_from_cache

from . import paths
from .distill.methods import method_grid, methods_reading_targets, needs_teacher_data, resolve_method
from .errors import ConfigError

GPU_SOURCES = "benchmarks/gpu_throughput_sources.yaml"
CPU_THROUGHPUT = "benchmarks/results/throughput_cpu.json"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.9             # a job fits when its peak is within 90% of the GPU's memory
TRAIN_DEFAULTS = {"max_steps": 1000, "grad_accum_steps": 1, "eval_every": 0}  # distill.train_config.TrainConfig's
LAS_VIEWS = 3               # evaluate.las: one simulator per view (x, x+r, r)
WorkRow = Any  # one row of stage_workloads (a namedtuple of itertuples, or a Series): its columns as attributes
COLUMNS = ["stage", "dataset", "scope", "model", "params", "jobs", "docs", "seq_len", "generated", "prefill",
           "forced", "capture", "training", "patched_runs", "decode_steps", "decode_rows", "context", "batch",
           "engine", "gpus", "precision", "in_flight", "train_passes"]


@dataclass(frozen=True)
class DatasetSize:
    """A dataset as the plan sees it: documents per split (before max_docs) and mean token lengths."""

    n_docs: dict[str, int]
    prompt_tokens: float
    cot_tokens: float
    clean_prompt_tokens: dict[str, float] = field(default_factory=dict)

    def clean_tokens(self, dataset: str, split: str) -> float:
        style = split.removeprefix(f"{paths.CLEAN}_")
        if style not in self.clean_prompt_tokens:
            raise ConfigError(f"plan.datasets.{dataset}.clean_prompt_tokens has no {style!r}: the mean length of "
                              f"its {split} prompts (benchmarks/throughput_cpu.py measures the demo's).")
        return self.clean_prompt_tokens[style]


@dataclass(frozen=True)
class ModelFacts:
    """What the cost model needs of a model: parameters, shape and where they were read."""

    params: float
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    hidden_size: int = 0
    vocab_size: int = 0
    intermediate_size: int = 0     # the MLP's width (0: 4 h, a GPT MLP)
    norms_per_layer: int = 2       # RMSNorms per decoder layer (Gemma 3: 4)
    qk_norm: bool = False          # per-head q/k RMSNorms (Qwen3, Gemma 3)
    context: int = 0               # max_position_embeddings
    source: str = ""

    @property
    def mlp_size(self) -> int:
        return self.intermediate_size or 4 * self.hidden_size

    def flops_per_token(self, seq: float) -> float:
        """Forward FLOPs of one token at sequence length `seq`: 2 N + 4 L H d s (MosaicML's MFU count)."""
        return 2 * self.params + 4 * self.n_layers * self.n_heads * self.head_dim * seq

    def kv_bytes_per_token(self, nbytes: int) -> float:
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * nbytes


# ----------------------------------------------------------------------------- inputs

def dataset_sizes(config: dict) -> dict[str, DatasetSize]:
    """Per dataset: `plan.datasets.<name>` of the config; n_docs defaults to the synthetic adapter's
    params.n_docs, cot_tokens to the generation cap max_new_tokens + force_answer_tokens."""
    cap = config["generation"]["max_new_tokens"] + config["generation"]["force_answer_tokens"]
    sizes = {}
    for name, entry in config["datasets"].items():
        given = config["plan"]["datasets"].get(name, {})
        n_docs = given.get("n_docs") or entry.get("params", {}).get("n_docs")
        if not n_docs or "prompt_tokens" not in given:
            raise ConfigError(f"plan.datasets.{name}: give n_docs (documents per split) and prompt_tokens (mean "
                              "tokens of a rendered task prompt) for the cost model (config/schema.yaml, plan).")
        sizes[name] = DatasetSize({s: int(n_docs.get(s, 0)) for s in paths.SPLITS}, float(given["prompt_tokens"]),
                                  float(given.get("cot_tokens", cap)), dict(given.get("clean_prompt_tokens", {})))
    return sizes


def safetensors_params(directory: Path) -> int:
    """Parameters stored in a directory's safetensors files, counted from their headers alone."""
    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(math.prod(t["shape"]) for key, t in header.items() if key != "__metadata__")
    return total


def facts_from_files(config_json: Path) -> ModelFacts:
    """ModelFacts from a model directory: its config.json (the text model's, for a multimodal one) and
    the parameter count of its safetensors headers."""
    cfg = json.loads(config_json.read_text())
    text = cfg.get("text_config", cfg)
    n_heads = text.get("num_attention_heads", text.get("num_heads", 0))
    hidden = text.get("hidden_size", text.get("d_model", 0))
    return ModelFacts(params=safetensors_params(config_json.parent),
                      n_layers=text.get("num_hidden_layers", text.get("num_layers", 0)), n_heads=n_heads,
                      n_kv_heads=text.get("num_key_value_heads") or n_heads,
                      head_dim=text.get("head_dim") or (hidden // n_heads if n_heads else 0), hidden_size=hidden,
                      vocab_size=text.get("vocab_size", 0), intermediate_size=text.get("intermediate_size", 0),
                      norms_per_layer=4 if text.get("model_type", "").startswith(("gemma2", "gemma3")) else 2,
                      qk_norm=text.get("model_type", "").startswith(("qwen3", "gemma3")),
                      context=text.get("max_position_embeddings", 0), source=str(config_json.parent))


def model_facts(config: dict, name: str) -> ModelFacts:
    """`plan.models.<name>` when given; else the model's config.json and weights on this machine (the HF
    cache for a hub id, the directory of a local or derived model, materialised once like every stage)."""
    given = config["plan"]["models"].get(name)
    if given:
        rest = {k: v for k, v in given.items() if k != "params_b"}
        return ModelFacts(params=given["params_b"] * 1e9, source="config plan.models", **rest)
    spec = config["models"].get(name, {"source": "hf", "id": name})
    if spec["source"] == "hf":
        found = try_to_load_from_cache(spec["id"], "config.json", revision=spec.get("revision"))
        if not isinstance(found, str):
            raise ConfigError(f"model {name!r} ({spec['id']}) is not in the local HF cache: give plan.models.{name} "
                              "(params_b and its shape) for the cost model.")
        return facts_from_files(Path(found))
    # models imports torch (seconds): only a model without plan.models facts needs its directory
    from .models import ModelCatalog, resolve_model_path

    return facts_from_files(Path(resolve_model_path(ModelCatalog.from_config(config), name)) / "config.json")


def planned_models(config: dict) -> list[str]:
    """Every model the plan prices: the teacher, the students and a seq2seq LAS simulator."""
    las = config["evaluate"]["las"]
    simulator = [las["seq2seq"]["model"]] if las["simulator"] == "seq2seq" else []
    return list(dict.fromkeys([config["teacher"], *config["students"], *simulator]))


def load_gpu_sources(path: str | Path = GPU_SOURCES) -> dict:
    return yaml.safe_load(Path(path).read_text())


def load_cpu_throughput(path: str | Path = CPU_THROUGHPUT) -> dict:
    return json.loads(Path(path).read_text())


# ----------------------------------------------------------------------------- counting work

def head_set_count(n_heads: int, bins: list[int], n_random: int) -> int:
    """Head sets one patching direction runs over `n_heads` ranked heads: per cumulative bin k (capped at
    the head count, duplicates once) the top, near_zero and most_negative sets and min(n_random, C(n, k))
    random ones (patching.head_sets.control_head_sets; tests/test_plan.py checks the two agree)."""
    sizes = sorted({min(int(b), n_heads) for b in bins if b > 0} - {0})
    return sum(3 + min(n_random, math.comb(n_heads, k)) for k in sizes)


def evaluations(train: dict) -> int:
    """Validation passes of one training run: every eval_every steps and at the end (distill.trainer)."""
    steps, every = train["max_steps"], train["eval_every"]
    return steps // every + (steps % every > 0) if every > 0 else 1


def resolve_dtype(setting: str | None, spec: dict) -> str:
    """A stage's dtype as load_model picks it on a GPU: the setting, else the model entry's, else bfloat16."""
    for value in (setting, spec.get("dtype")):
        if value and value != "auto":
            return value
    return "bfloat16"


def used_docs(config: dict, dataset: str, size: DatasetSize) -> dict[str, int]:
    """Documents per split after the dataset's max_docs (the seeded sample of prepare_dataset)."""
    cap = config["datasets"][dataset].get("max_docs") or {}
    return {s: min(n, cap.get(s, n)) for s, n in size.n_docs.items()}


def stage_workloads(config: dict, sizes: Mapping[str, DatasetSize],
                    models: Mapping[str, ModelFacts] | None = None) -> pd.DataFrame:
    """The work of every stage of `config` on datasets of `sizes` (module docstring), one row per stage,
    dataset and model, token counts summed over the row's `jobs`."""
    models = models or {name: model_facts(config, name) for name in planned_models(config)}
    rows = [row for dataset, size in sizes.items() for row in _dataset_work(config, dataset, size, models)]
    return pd.DataFrame(rows, columns=COLUMNS)


def _dataset_work(config: dict, dataset: str, size: DatasetSize, models: Mapping[str, ModelFacts]) -> list[dict]:
    gen, heads, patching, distill = config["generation"], config["heads"], config["patching"], config["distill"]
    teacher, students, specs = config["teacher"], list(config["students"]), config["models"]
    n, cot, prompt = used_docs(config, dataset, size), size.cot_tokens, size.prompt_tokens
    source = config["clean_prompts"]["source_split"]
    n_clean = min(config["clean_prompts"].get("n_docs") or n[source], n[source])

    def docs_of(split: str) -> int:
        return n[split] if split in n else n_clean

    def prompt_of(split: str) -> float:
        return prompt if split in n else size.clean_tokens(dataset, split)

    def row(stage: str, scope: str, model: str, **work) -> dict:
        base = dict.fromkeys(COLUMNS, 0) | {"capture": False, "jobs": 1, "gpus": 1, "batch": 1, "in_flight": 1,
                                                  "train_passes": 3}
        return base | {"stage": stage, "dataset": dataset, "scope": scope, "model": model,
                       "params": models[model].params} | work

    vllm = gen["backend"] == "vllm"
    generation = dict(engine="vllm" if vllm else "generate", gpus=gen["tensor_parallel_size"] if vllm else 1,
                      batch=1 if vllm else gen["batch_size"])
    rows = []
    if gen["backend"] != "file":
        for split in [*paths.SPLITS, *paths.clean_splits(config)]:
            d = docs_of(split)
            rows.append(row("teacher_cot", split, teacher, docs=d, seq_len=prompt_of(split) + cot, generated=d * cot,
                            prefill=d * prompt_of(split), precision=resolve_dtype(gen["dtype"], specs[teacher]),
                            **generation))

    def spread(device_map) -> int:
        """GPUs a job holds: a device_map spreads the model over the job's GPUs, else one."""
        return config["plan"]["gpus_per_job"] if device_map else 1

    def forced(stage: str, scope: str, model: str, docs: int, seq: float, dtype: str | None, device_map=None,
               jobs: int = 1, passes: int = 1, in_flight: int | None = 1) -> dict:
        return row(stage, scope, model, jobs=jobs, docs=docs, seq_len=seq, forced=jobs * passes * docs * seq,
                   capture=True, engine="forward", gpus=spread(device_map),
                   precision=resolve_dtype(dtype, specs.get(model, {})), in_flight=in_flight or 1)

    char = paths.characterization_split(config, heads["split"])  # every model; compared styles: the teacher
    for stage, split, model in [*(("head_scores", char, m) for m in [teacher, *students]),
                                *(("style_head_scores", s, teacher) for s in paths.compared_splits(config))]:
        rows.append(forced(stage, split, model, min(heads.get("max_docs") or docs_of(split), docs_of(split)),
                           prompt_of(split) + cot, heads["dtype"], heads.get("device_map"), in_flight=heads.get("in_flight")))

    rows += _patching_work(config, dataset, row, docs_of, prompt_of, models[teacher], spread(patching.get("device_map")))

    train_docs = {s: min(n[s], distill.get("max_docs") or n[s]) for s in ("train", "val")}
    seq = prompt + cot
    pairs = paths.distilled_pairs(config)
    if set(methods_reading_targets(config["methods"], distill["targets"])) & {m for _, m in pairs}:  # as planned
        for split, d in train_docs.items():
            rows.append(forced("teacher_targets", split, teacher, d, seq, distill["teacher_dtype"],
                               distill.get("teacher_device_map"), in_flight=distill.get("teacher_in_flight")))
    if gen["backend"] != "file":
        rows += _baseline_teacher_work(config, row, sum(train_docs.values()), seq, generation)
    train = TRAIN_DEFAULTS | distill["train"]
    n_evals = evaluations(train)
    steps_docs = train["max_steps"] * train["grad_accum_steps"]
    per_job_forced = (n_evals * train_docs["val"] + 2 * (train_docs["train"] + train_docs["val"])) * seq
    f1_generation = distill["select"]["criterion"] == "val_macro_f1"
    f1_docs = min(train_docs["val"], distill["select"].get("val_docs") or train_docs["val"])  # val_macro_f1 answers these
    for student in students:
        points = sum(len(method_grid(m, config["methods"][m])) for s, m in pairs if s == student)
        rows.append(row("distill", "grid points", student, jobs=points, docs=train_docs["train"], seq_len=seq,
                        training=points * steps_docs * seq, forced=points * per_job_forced, capture=True,
                        generated=points * n_evals * f1_docs * cot * f1_generation,
                        prefill=points * n_evals * f1_docs * prompt * f1_generation, engine="train",
                        gpus=spread(distill["deepspeed"]),
                        train_passes=4 if distill["train"].get("gradient_checkpointing") else 3,
                        precision=resolve_dtype(distill["student_dtype"], specs[student])))
        if distill["targets"] == "online":
            rows.append(forced("distill (online targets)", "train+val", teacher, sum(train_docs.values()), seq,
                               distill["teacher_dtype"], distill.get("teacher_device_map"), jobs=points,
                               in_flight=distill.get("teacher_in_flight")))

    return rows + _evaluate_work(config, row, forced, generation, n, seq, cot, prompt)


def _baseline_teacher_work(config: dict, row, docs: int, seq: float, generation: dict) -> list[dict]:
    """The baselines' extra teacher generations over the `docs` train + val documents (prefill: at most
    prompt + CoT, `seq`)."""
    rows, teacher = [], config["teacher"]
    for method, settings in config["methods"].items():
        if needs_teacher_data(method, settings):
            baseline = resolve_method(method, settings).baseline
            calls, tokens = baseline.teacher_calls(baseline.params((settings or {}).get("params"), config["generation"]))
            rows.append(row("baseline_teacher_data", method, teacher, docs=docs, seq_len=seq + tokens,
                            generated=docs * calls * tokens, prefill=docs * calls * seq,
                            precision=resolve_dtype(config["generation"]["dtype"], config["models"][teacher]),
                            **generation))
    return rows


def _evaluate_work(config: dict, row, forced, generation: dict, n: Mapping[str, int], seq: float, cot: float,
                   prompt: float) -> list[dict]:
    """Test-set work: each student's generations per method, perplexity + mechanism metrics (students and
    teacher), and the LAS simulator when it is a trained seq2seq model."""
    teacher, students, specs = config["teacher"], list(config["students"]), config["models"]
    pairs, n_test, rows = paths.distilled_pairs(config), n["test"], []
    n_methods = {student: sum(s == student for s, _ in pairs) for student in students}
    for student in students:
        rows.append(row("student_predict", "test", student, jobs=n_methods[student], docs=n_test, seq_len=seq,
                        generated=n_methods[student] * n_test * cot, prefill=n_methods[student] * n_test * prompt,
                        precision=resolve_dtype(config["generation"]["dtype"], specs[student]),
                        **(generation | {"gpus": 1})))  # a student generates on one GPU (student_generation)
    for model, jobs in [*((s, n_methods[s]) for s in students), (teacher, 1)]:  # perplexity + mechanism metrics
        # the rule gives a student's row one GPU and the teacher's row the teacher's GPUs
        device_map = config["evaluate"].get("device_map") if model == teacher else None
        rows.append(forced("evaluate", "test", model, n_test, seq, config["evaluate"]["dtype"], device_map,
                           jobs=jobs, passes=2, in_flight=config["evaluate"].get("in_flight") if device_map else 1))
    las = config["evaluate"]["las"]
    if las["simulator"] == "seq2seq":
        # trained once per dataset (rule las_simulator), then read by every evaluate job
        s2s, jobs = las["seq2seq"], len(pairs) + 1
        views = LAS_VIEWS * s2s["max_source_length"]
        shape = dict(seq_len=s2s["max_source_length"], engine="train", batch=s2s["batch_size"], precision="float32")
        rows.append(row("las_simulator", "train", s2s["model"], jobs=1, docs=n["train"],
                        training=views * s2s["epochs"] * n["train"], **shape))
        rows.append(row("evaluate (LAS simulator)", "test", s2s["model"], jobs=jobs, docs=n_test,
                        forced=jobs * views * n_test, **shape))
    return rows


def _patching_work(config: dict, dataset: str, row, docs_of, prompt_of, teacher: ModelFacts,
                   gpus: int) -> list[dict]:
    """Per phase: 2 prefills and 2 reference runs per document, then per direction ceil(sets / batch)
    batched runs, each `steps` greedy decoding calls (patching/runs.py)."""
    settings = config["patching"]
    split = paths.characterization_split(config, settings["split"])
    docs = min(settings.get("max_docs") or docs_of(split), docs_of(split))
    early = settings.get("early_tokens") or config["anchors"]["early_tokens"]
    n_sets = head_set_count(teacher.n_layers * teacher.n_heads, settings["bins"], settings["n_random"])
    batches = math.ceil(n_sets / settings["batch_size"])
    rows = []
    for phase, steps, prefix in (("phase1", early, prompt_of(split)),
                                 ("phase2", settings["late_tokens"], prompt_of(split) + early)):
        rows.append(row("patching", phase, config["teacher"], docs=docs, seq_len=prefix, prefill=docs * 2 * prefix,
                        patched_runs=docs * 2 * n_sets, decode_steps=docs * (2 + 2 * batches) * steps,
                        decode_rows=docs * (2 + 2 * n_sets) * steps, context=prefix + steps / 2,
                        batch=min(settings["batch_size"], n_sets), engine="patch", gpus=gpus,
                        in_flight=settings.get("in_flight") or 1,
                        precision=resolve_dtype(settings["dtype"], config["models"][config["teacher"]])))
    return rows


# ----------------------------------------------------------------------------- time and memory

def nearest(rows: list[dict], **target: float) -> dict:
    """The row nearest to `target` in the sum of |log(row[key] / value)| over its keys."""
    return min(rows, key=lambda r: sum(abs(math.log(r[k] / v)) for k, v in target.items()))


def gpu_seconds(work: WorkRow, facts: ModelFacts, gpu: dict) -> tuple[float, str, str]:
    """GPU-seconds of one workload row (all its GPUs together), the source of each rate used, and how
    each part was derived from it."""
    hw, seconds, used, how = gpu["hardware"], 0.0, [], []
    if work.generated:
        same_gpus = [r for r in gpu["generation"] if r["gpus"] == work.gpus] or gpu["generation"]
        rate = nearest(same_gpus, params_b=facts.params / 1e9)
        seconds += work.generated / rate["output_tokens_per_s"] * rate["gpus"]
        used.append(f"{rate['source']} {rate['model']} x{rate['gpus']} {rate['output_tokens_per_s']:,.0f} tok/s")
        how.append("generated / cited tok/s x GPUs")
    # training: forward + backward = 3 forwards; activation checkpointing recomputes the forward: 4 (train_passes)
    flops = (work.prefill + work.forced + work.train_passes * work.training) * facts.flops_per_token(work.seq_len)
    if flops:
        mfu = nearest(gpu["mfu"], params=facts.params, seq_len=work.seq_len)
        seconds += flops / (mfu["mfu"] * hw["peak_tflops"][work.precision] * 1e12)
        used.append(f"{mfu['source']} {mfu['model']}@{mfu['seq_len']} MFU {mfu['mfu']:.0%}")
        parts = " + ".join(n for n, v in (("prefill", work.prefill), ("forward", work.forced), (f"{work.train_passes} x train", work.training))
                           if v)
        how.append(f"{parts}: F(s) FLOPs at cited MFU x {work.precision} peak")
    if work.decode_steps:
        nbytes = DTYPE_BYTES[work.precision]
        read = work.decode_steps * facts.params * nbytes + work.decode_rows * facts.kv_bytes_per_token(nbytes) * work.context
        seconds += read / (hw["hbm_gb_per_s"] * 1e9)
        used.append(f"{hw['source']} HBM {hw['hbm_gb_per_s']:,} GB/s")
        how.append("decode: HBM bytes / bandwidth (roofline lower bound)")
    if work.engine in ("forward", "patch") and work.gpus > 1:
        # a device_map runs a document's layers one GPU at a time: with k documents in flight (in_flight) at
        # most min(k, GPUs) are busy at once, all held. An assumption: no GPU has measured the overlap.
        busy = min(work.in_flight, work.gpus)
        seconds *= work.gpus / busy
        how.append(f"x {work.gpus} GPUs held / {busy} busy (device_map, in_flight)")
    return seconds, "; ".join(used), "; ".join(how)


def cpu_seconds(work: WorkRow, facts: ModelFacts, cpu: dict) -> float:
    """Seconds on the measured CPU: each kind of token at its measured rate (decoding for generated tokens
    and patched rows, forward for prefill and forced tokens, with or without capture, train), scaled by
    F(s) of the model over F of the measured run."""
    ref, rate, settings = ModelFacts(**cpu["arch"]), cpu["tokens_per_s"], cpu["settings"]
    decode_ref = ref.flops_per_token(settings["decode"]["prompt_tokens"] + settings["decode"]["new_tokens"] / 2)
    scale = facts.flops_per_token(work.seq_len) / ref.flops_per_token(settings["forward"]["seq_len"])
    forced_rate = rate["forward_capture"] if work.capture else rate["forward"]
    return ((work.generated * facts.flops_per_token(work.seq_len)
             + work.decode_rows * facts.flops_per_token(work.context)) / decode_ref / rate["decode"]
            + work.prefill * scale / rate["forward"] + work.forced * scale / forced_rate
            + work.training * scale / rate["train"])


# ----------------------------------------------------------------------------- memory

def layer_activation_bytes(facts: ModelFacts, seq: float, b: int, flash: bool) -> dict[str, float]:
    """Bytes one decoder layer keeps for its backward pass, for one document of `seq` tokens (docs/scale.md,
    "The memory model"; counted tensor by tensor on transformers' Llama/Qwen3/Gemma 3 layers, as
    Korthikanti et al. 2022, Sec. 4.1, count a GPT layer):

        norms       (4 + 2 b) h per RMSNorm: its float32 input (the RMSNorm upcasts), the normalised value in
                    the model dtype and the scaled output the next linear reads; Gemma 3 has 4 per layer
        qk_norm     (4 + 2 b) (H + H_kv) d: Qwen3's and Gemma 3's per-head q/k norms
        attention   5 H d b: q, k and v repeated to H heads (SDPA's inputs), its output and the contiguous copy
                    o_proj reads
        mlp         4 I b: gate, up, act(gate) and their product (what down_proj reads)
        scores      H s 4 (+ H s b below float32) per token when the kernel materialises the s x s
                    probabilities (eager / SDPA's math kernel; Korthikanti's 5 a s / h term); 0 for flash
    """
    h, hd, kv_hd = facts.hidden_size, facts.n_heads * facts.head_dim, facts.n_kv_heads * facts.head_dim
    norm = (4 + 2 * b) if b < 4 else 12  # float32: the input, the normalised value and the output, 4 bytes each
    terms = {"norms": facts.norms_per_layer * norm * h,
             "qk_norm": norm * (hd + kv_hd) if facts.qk_norm else 0,
             "attention": 5 * hd * b,
             "mlp": 4 * facts.mlp_size * b,
             "scores": 0 if flash else facts.n_heads * seq * (4 + (b if b < 4 else 0))}
    return {k: v * seq for k, v in terms.items()}


def forward_working_bytes(facts: ModelFacts, seq: float, b: int, flash: bool) -> float:
    """Transient bytes of one decoder layer's forward without gradients (one document): the residual stream
    in and out, the float32 RMSNorm copy, q/k/v and the repeated k/v, the MLP's gate, up and product, and the
    s x s scores and probabilities of a non-flash kernel."""
    h, hd = facts.hidden_size, facts.n_heads * facts.head_dim
    kv_hd = facts.n_kv_heads * facts.head_dim
    per_token = (3 * h + hd + 2 * kv_hd + 2 * hd + 3 * facts.mlp_size) * b + 4 * h
    scores = 0 if flash else 2 * facts.n_heads * seq * seq * 4
    return per_token * seq + scores


def capture_bytes(facts: ModelFacts, seq: float, b: int, what: tuple[str, ...], n_query: int, n_key: int,
                  layers: int, grad: bool) -> dict[str, float]:
    """A head capture (`characterize.capture.capture_nbytes`: float32 rows, the rest in the model dtype) over
    `layers` layers; with gradients also the float32 key copy each captured layer's row recomputation keeps
    for backward (`attention.AttentionCall.rows`: q.float() @ key.float())."""
    from .characterize.capture import capture_nbytes  # torch: imported only when memory is asked for

    held = capture_nbytes(layers, facts.n_heads, facts.head_dim, facts.hidden_size, int(seq), n_query, n_key,
                          bytes_per=b, rows_bytes_per=4, what=what)
    out = {"captures": float(held["total_held"]), "capture_row_logits": float(held["transient_rows_fp32"])}
    if grad and "rows" in what:
        out["capture_keys_fp32"] = layers * seq * facts.n_kv_heads * facts.head_dim * 4.0
    return out


@dataclass(frozen=True)
class MemoryCase:
    """What the memory of one job depends on besides its model (`memory_terms`)."""

    engine: str                    # train | forward | patch | generate | vllm
    seq: float                     # tokens of the longest document (the stage's max_tokens)
    b: int                         # bytes per value of the model dtype
    gpus: int = 1                  # ZeRO-3 ranks (train) or GPUs a device_map spreads the model over
    n_cot: float = 0               # supervised / scored CoT positions (logits kept for the loss or the top-k)
    capture: tuple[str, ...] = ()  # what the head capture records (() = none)
    n_query: int = 0               # captured query positions
    n_key: int = 0                 # captured key positions
    captured_layers: int = 0
    in_flight: int = 1             # documents on the model at once
    checkpointing: bool = False
    flash: bool = True             # an attention kernel that never holds s x s (flash / memory-efficient)
    zero3: bool = True             # train: DeepSpeed ZeRO-3 (else one process, plain AdamW)
    whole_params: float = 0        # train under ZeRO-3: parameters kept whole on every rank (keep_whole)
    batch: int = 1                 # patch: head sets per batched run; generate: rows
    new_tokens: float = 0          # patch / generate: tokens decoded after the prompt
    logits: str = "all"            # forward: "all" (HF computes s x V) or "cot" (and the top-k of the CoT positions)
    logits_held: int = 1           # forward: [s, V] logits alive at once (head scores: 0, they keep one row)


def memory_terms(case: MemoryCase, facts: ModelFacts, zero: Mapping[str, float] | None = None) -> dict[str, float]:
    """Peak bytes of one job on one GPU (or one CPU process), as named terms that sum to the peak
    (docs/scale.md, "The memory model"; benchmarks/memory_check.py checks them against measured runs)."""
    c, f, b = case, facts, case.b
    n = f.params
    logits = c.seq * f.vocab_size * b  # [s, V] in the model dtype: transformers does not upcast them
    if c.engine == "train":
        return train_memory_terms(c, f, zero)
    if c.engine == "forward":  # no gradients; a device map divides what sits on the layers' GPUs
        per_doc = {"activations_layer": forward_working_bytes(f, c.seq, b, c.flash) + 2 * c.seq * f.hidden_size * b}
        if c.capture:
            cap = capture_bytes(f, c.seq, b, c.capture, c.n_query, c.n_key, c.captured_layers, grad=False)
            per_doc["captures"] = cap["captures"] / c.gpus
            per_doc["capture_row_logits"] = cap["capture_row_logits"]
        per_doc["logits"] = c.logits_held * logits  # on the last GPU
        if c.logits == "cot":
            per_doc["topk_cot_logits"] = c.n_cot * f.vocab_size * (b + 4)  # logits[cot] and its float32 copy
        return {"weights": n * b / c.gpus, **{k: c.in_flight * v for k, v in per_doc.items()}}
    kv = f.kv_bytes_per_token(b)
    if c.engine == "patch":  # 2 prefilled inputs' caches, a deep copy and `batch` repeats of it per patched run
        per_doc = {"kv_caches": (c.batch + 3) * kv * (c.seq + c.new_tokens) / c.gpus,
                   "prefill_logits": logits,
                   "activations_layer": forward_working_bytes(f, c.seq, b, c.flash)}
        return {"weights": n * b / c.gpus, **{k: c.in_flight * v for k, v in per_doc.items()}}
    if c.engine == "generate":
        return {"weights": n * b, "kv_cache": c.batch * kv * (c.seq + c.new_tokens),
                "last_logits": c.batch * f.vocab_size * 4}
    raise ValueError(f"memory_terms: unknown engine {c.engine!r}")


def train_memory_terms(c: MemoryCase, f: ModelFacts, zero: Mapping[str, float] | None = None) -> dict[str, float]:
    """One training step's peak (`memory_terms`): what every phase holds (model states, stored activations,
    captures), plus the largest of its phases: the end of the forward (the logits and the loss's copies), the
    backward of the last layer (one layer's gradients, or under checkpointing a recomputed layer and its
    gradients) and, in one process, the optimizer step (every gradient and AdamW's temporary)."""
    b, n = c.b, f.params
    layer = layer_activation_bytes(f, c.seq, b, c.flash)
    one_layer = sum(layer.values())
    if c.zero3:  # partitions allocated for the whole run (the gradient partition included)
        zero = {**ZERO3_DEFAULTS, **(zero or {})}
        layer_params = (n - f.vocab_size * f.hidden_size) / max(f.n_layers, 1)
        held = {"weights": b * n / c.gpus, "gradients": b * n / c.gpus, "optimizer": 12 * n / c.gpus,
                "zero3_gathered": (2 * layer_params + zero["stage3_prefetch_bucket_size"]) * b,
                "zero3_reduce_buckets": 2 * zero["reduce_bucket_size"] * b,
                "zero3_whole_params": c.whole_params * b}
    else:  # one process, float32 AdamW: gradients exist from the backward until the step
        held = {"weights": 4 * n, "optimizer": 8 * n}
    if c.checkpointing:  # each layer's input kept, a layer recomputed in backward
        held["activations_checkpoints"] = f.n_layers * c.seq * f.hidden_size * b
        backward = {"activations_recomputed_layer": 2 * one_layer}
    else:
        held.update({f"activations_{k}": f.n_layers * v for k, v in layer.items() if v})
        backward = {"activations_backward_layer": one_layer}
    if not c.zero3:
        backward["gradients_unembedding"] = 4 * f.vocab_size * f.hidden_size  # lm_head's: the first computed
    held["final_norm"] = (4 + 2 * b if b < 4 else 12) * c.seq * f.hidden_size
    if c.capture:
        held.update(capture_bytes(f, c.seq, b, c.capture, c.n_query, c.n_key, c.captured_layers, grad=True))
    # the loss (`objective.student_loss`): the [s, V] logits, the CoT positions' copy, its float32 copy (below
    # float32) and log_softmax's output; its backward's float32 gradients replace the first two
    forward_end = {"logits": c.seq * f.vocab_size * b,
                   "loss_cot_logits": c.n_cot * f.vocab_size * (b + (4 if b < 4 else 0) + 4)}
    phases = [forward_end, backward]
    if not c.zero3:  # the step: every gradient, AdamW's moments and its sqrt(v) temporary, no activation
        phases.append({"gradients": 4 * n, "optimizer_step_temporary": 4 * n})
        step = {"weights": 4 * n, "optimizer": 8 * n, **phases[-1]}
        if sum(step.values()) > sum(held.values()) + max(sum(p.values()) for p in phases[:2]):
            return step
    per_document = {k for k in (*held, "logits", "loss_cot_logits", "activations_recomputed_layer",
                                "activations_backward_layer") if k.startswith(("activations", "final", "capture", "logits", "loss"))}
    out = {**held, **max(phases[:2], key=lambda p: sum(p.values()))}
    return {k: v * c.batch if k in per_document else v for k, v in out.items()}  # `batch` documents a micro-batch


ZERO3_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_prefetch_bucket_size": 5e7}  # distill.backends.zero3_config's


PROFILE = "profiles/slurm/config.yaml"
STAGE_RULES = {"evaluate (LAS simulator)": "evaluate"}  # a stage row -> the Snakemake rule that runs it
CHARS_PER_TOKEN = 4         # English prose, Llama 3 / GPT tokenizers: ~4 characters a token (an assumption)
TEXT_COPIES = 3             # a split's texts as the stages hold them: documents, rendered prompts, CoTs
SHARD_FILE_BYTES = 5e9      # transformers' default max_shard_size: one safetensors file read at a time
CUDA_HOST_BYTES = 3e9       # host RSS of a CUDA context with cuBLAS/cuDNN loaded (an assumption, not measured)
IMPORT_HOST_BYTES = 1.0e9   # python + torch + transformers imported (benchmarks/memory_check.py prints it)
VLLM_SWAP_BYTES = 4 * 2**30  # vLLM's default swap_space per GPU worker (4 GiB)
REFINE_QUERIES = 64         # refinement positions of one document the capture keeps (an assumption)
MENTION_KEYS = 128          # shortlist + near-miss mention tokens (keys) of one document (an assumption)


def stage_max_tokens(config: dict, stage: str) -> int | None:
    """The length cap a stage puts on its teacher-forced documents (None: the model's context)."""
    key = {"head_scores": "heads", "style_head_scores": "heads", "patching": "patching"}.get(stage, "distill")
    return config[key].get("max_tokens")


def pooled_layer_count(config: dict, n_layers: int) -> int:
    """Layers in the union of the distillation pools' layer ranges (fractions of depth, distill.pools)."""
    layers: set[int] = set()
    for pool in config["distill"]["pools"].values():
        lo, hi = pool["layers"]
        layers |= {i for i in range(n_layers) if lo <= i / max(n_layers - 1, 1) <= hi}
    return len(layers)


def memory_case(work: WorkRow, facts: ModelFacts, config: dict) -> MemoryCase:
    """The MemoryCase of one plan row: its stage's cap, dtype, GPUs, in-flight documents and captures."""
    cot = config["generation"]["max_new_tokens"] + config["generation"]["force_answer_tokens"] + 1
    seq = stage_max_tokens(config, work.stage) or facts.context or work.seq_len
    base = dict(seq=seq, b=DTYPE_BYTES[work.precision], gpus=work.gpus, n_cot=cot, in_flight=work.in_flight)
    early = config["anchors"]["early_tokens"]
    mech = dict(capture=("rows", "writes", "qk", "value_writes"), n_query=early + REFINE_QUERIES,
                n_key=MENTION_KEYS, captured_layers=pooled_layer_count(config, facts.n_layers))
    if work.stage.startswith("las_simulator") or work.stage.startswith("evaluate (LAS"):
        # T5: float32, eager attention, `batch` sources of max_source_length (the encoder's layers stand for
        # the model: the decoder reads a short target)
        return MemoryCase(work.engine, seq=work.seq_len, b=4, batch=work.batch, flash=False, zero3=False)
    if work.engine == "train":
        pooled = pooled_layer_count(config, facts.n_layers)
        whole = pooled * facts.n_heads * facts.head_dim * facts.hidden_size + facts.vocab_size * facts.hidden_size
        train = config["distill"]["train"]
        return MemoryCase("train", **base, **mech, checkpointing=bool(train.get("gradient_checkpointing")),
                          zero3=bool(config["distill"]["deepspeed"]), whole_params=whole + facts.hidden_size)
    if work.engine == "forward":
        logits = "cot" if work.stage == "teacher_targets" else "all"
        # head scores capture every layer; teacher targets and the mechanism metrics the pooled ones
        # (head scores capture the early queries and the refinement positions in two forwards, one after the other,
        # each with logits_to_keep=1: `head_scores.score_document` reads no logit, so no [s, V] is formed)
        what = dict(mech, captured_layers=facts.n_layers, n_query=max(early, REFINE_QUERIES), logits_held=0) \
            if "head_scores" in work.stage else mech
        return MemoryCase("forward", **base, **what, logits=logits)
    if work.engine == "patch":
        settings = config["patching"]
        return MemoryCase("patch", **base, batch=work.batch,
                          new_tokens=max(settings.get("early_tokens") or early, settings["late_tokens"]))
    return MemoryCase(work.engine, **base, batch=work.batch, new_tokens=cot)


def gpu_memory_terms(work: WorkRow, facts: ModelFacts, config: dict, gpu: dict) -> dict[str, float]:
    """Peak bytes per GPU of one plan row as named terms (`memory_terms`; vLLM: what it reserves)."""
    if work.engine == "vllm":
        b = DTYPE_BYTES[work.precision]
        reserved = config["generation"]["gpu_memory_utilization"] * gpu["hardware"]["memory_gb"] * 1e9
        context = config["generation"].get("max_model_len") or facts.context or work.seq_len  # unset: the model's
        need = (facts.params * b + facts.kv_bytes_per_token(b) * context) / work.gpus
        return {"vllm_reserved": max(reserved, need)}
    if work.engine == "train" and not facts.n_layers:  # a model known by its size alone: 16 bytes a parameter
        return {"model_states": 16 * facts.params}
    return memory_terms(memory_case(work, facts, config), facts)


def profile_resources(path: str | Path = PROFILE) -> dict:
    return yaml.safe_load(Path(path).read_text())


def rule_memory_bytes(profile: dict, stage: str) -> float:
    """The host memory a stage's rule requests (mem_mb of the profile's set-resources, else its default)."""
    rule = STAGE_RULES.get(stage, stage)
    mem_mb = profile.get("set-resources", {}).get(rule, {}).get("mem_mb", profile["default-resources"]["mem_mb"])
    return mem_mb * 1e6


def host_memory_terms(work: WorkRow, facts: ModelFacts, config: dict) -> dict[str, float]:
    """Peak host bytes of one plan row's job on one node, as named terms (docs/scale.md, "The memory model"):
    each process of the node holds the interpreter and libraries, a CUDA context and the split's texts; then
    what the engine adds (the module constants above state the assumptions)."""
    b = DTYPE_BYTES[work.precision]
    texts = (work.docs or 0) * work.seq_len * CHARS_PER_TOKEN * TEXT_COPIES
    process = {"interpreter_and_libraries": IMPORT_HOST_BYTES, "cuda_context": CUDA_HOST_BYTES, "split_texts": texts}
    if work.engine == "train":
        ranks = work.gpus  # one rank per GPU of the node (profiles/slurm: tasks 8, nodes 1)
        one_doc = work.seq_len * (8 + 16 + 4) + config["generation"]["max_new_tokens"] * 12 * config["distill"]["top_k"]
        terms = {k: ranks * v for k, v in process.items()}
        terms["weights_file_read"] = ranks * min(SHARD_FILE_BYTES, facts.params * b)  # from_pretrained under zero.Init
        terms["example_and_targets_in_flight"] = ranks * one_doc  # lazy per document (safe_open / memory-map)
        terms["rank0_consolidated_weights"] = facts.params * b  # the best step's 16-bit weights, saved by rank 0
        return terms
    if work.engine == "vllm":
        workers = work.gpus
        return {"interpreter_and_libraries": (workers + 1) * IMPORT_HOST_BYTES,
                "cuda_context": workers * CUDA_HOST_BYTES, "split_texts": texts,
                "vllm_swap_space": workers * VLLM_SWAP_BYTES}
    terms = dict(process, weights_file_read=min(SHARD_FILE_BYTES, facts.params * b))
    if work.stage == "teacher_targets":  # one shard of documents' targets before it is written
        shard = config["generation"].get("shard_size", 512)
        per_doc = (config["generation"]["max_new_tokens"] * 12 * config["distill"]["top_k"]
                   + config["anchors"]["early_tokens"] * work.seq_len * 4 + work.seq_len * 24)
        terms["targets_shard_buffer"] = shard * per_doc
    return terms


def peak_memory_gb(work: WorkRow, facts: ModelFacts, config: dict, gpu: dict) -> float:
    """Peak memory of one job on one GPU, in GB (1e9 bytes): the sum of `gpu_memory_terms`."""
    return sum(gpu_memory_terms(work, facts, config, gpu).values()) / 1e9


def host_memory_gb(work: WorkRow, facts: ModelFacts, config: dict) -> float:
    """Peak host memory of one job on one node, in GB: the sum of `host_memory_terms`."""
    return sum(host_memory_terms(work, facts, config).values()) / 1e9


def plan_table(config: dict, sizes: Mapping[str, DatasetSize] | None = None,
               models: Mapping[str, ModelFacts] | None = None, gpu: dict | None = None,
               cpu: dict | None = None, profile: dict | None = None) -> pd.DataFrame:
    """`stage_workloads` with gpu_hours (gpu_source: the cited rows used; derivation: how), cpu_hours,
    peak_gb (per GPU), host_gb (per node), host_limit_gb (the rule's mem_mb in `profile`, default PROFILE) and
    fits (peak_gb within HEADROOM of the GPU's memory and host_gb within host_limit_gb) per row. Defaults: the config's plan section, the model facts, GPU_SOURCES, CPU_THROUGHPUT."""
    models = models or {name: model_facts(config, name) for name in planned_models(config)}
    gpu = gpu or load_gpu_sources()
    cpu = cpu or load_cpu_throughput()
    work = stage_workloads(config, sizes or dataset_sizes(config), models)
    timed = [gpu_seconds(w, models[w.model], gpu) for w in work.itertuples()]
    work["gpu_hours"] = [seconds / 3600 for seconds, _, _ in timed]
    work["gpu_source"] = [source for _, source, _ in timed]
    work["derivation"] = [how for _, _, how in timed]
    work["cpu_hours"] = [cpu_seconds(w, models[w.model], cpu) / 3600 for w in work.itertuples()]
    work["peak_gb"] = [peak_memory_gb(w, models[w.model], config, gpu) for w in work.itertuples()]
    work["host_gb"] = [host_memory_gb(w, models[w.model], config) for w in work.itertuples()]
    profile = profile or profile_resources()
    work["host_limit_gb"] = [rule_memory_bytes(profile, stage) / 1e9 for stage in work["stage"]]
    work["fits"] = ((work["peak_gb"] <= HEADROOM * gpu["hardware"]["memory_gb"])
                    & (work["host_gb"] <= work["host_limit_gb"]))
    return work


def stage_summary(table: pd.DataFrame) -> pd.DataFrame:
    """`plan_table` summed per stage (peak memory: the largest job's; fits: every job's), with a total row."""
    sums = ["jobs", "generated", "forced", "training", "patched_runs", "gpu_hours", "cpu_hours"]
    grouped = table.groupby("stage", sort=False)
    out = grouped[sums].sum()
    out["peak_gb"] = grouped["peak_gb"].max()
    out["host_gb"] = grouped["host_gb"].max()
    out["host_limit_gb"] = grouped["host_limit_gb"].min()
    out["fits"] = grouped["fits"].all()
    for column in ("gpu_source", "derivation"):  # each cited row / derivation once
        out[column] = grouped[column].agg(lambda s: "; ".join(dict.fromkeys(x for v in s for x in v.split("; ") if x)))
    out = out.reset_index()
    total = {"stage": "total", **out[sums].sum().to_dict(), "peak_gb": out["peak_gb"].max(),
             "host_gb": out["host_gb"].max(), "host_limit_gb": math.nan,  # each stage has its own limit
             "fits": bool(out["fits"].all()), "gpu_source": "", "derivation": ""}
    return pd.concat([out, pd.DataFrame([total])], ignore_index=True)


def _count(x: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.0f}" if x else "-"


def _hours(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2g}"


def render_markdown(table: pd.DataFrame, gpu: dict) -> str:
    """A plan table (`plan_table` or `stage_summary`) as Markdown, with the sources it cites."""
    scope = ["dataset", "scope", "model"] if "scope" in table else []
    head = ["stage", *scope, "jobs", "generated", "forced", "training", "patched runs", "GPU h", "CPU h",
            "peak GB/GPU", "host GB/node", "GPU source", "derivation"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.itertuples():
        limit = HEADROOM * gpu["hardware"]["memory_gb"]
        over_gpu = f" (> {limit:.0f})" if r.peak_gb > limit else ""
        over_host = f" (> {r.host_limit_gb:,.0f})" if r.host_gb > r.host_limit_gb else ""  # NaN: the total row
        cells = [r.stage, *[str(getattr(r, c)) for c in scope], f"{int(r.jobs):,}", _count(r.generated), _count(r.forced),
                 _count(r.training), _count(r.patched_runs), _hours(r.gpu_hours), _hours(r.cpu_hours),
                 f"{r.peak_gb:,.0f}{over_gpu}", f"{r.host_gb:,.0f}{over_host}", r.gpu_source, r.derivation]
        lines.append("| " + " | ".join(cells) + " |")
    hw = gpu["hardware"]
    notes = [f"GPU: {hw['name']} ({hw['memory_gb']} GB, peak TFLOPS {hw['peak_tflops']}, HBM {hw['hbm_gb_per_s']} GB/s). "
             "GPU h: all of a job's GPUs; CPU h: this repository's measured CPU (benchmarks/results/throughput_cpu.json); "
             "tokens summed over jobs. Sources:"]
    notes += [f"- {key}: {s['title']}, {s['url']}" for key, s in gpu["sources"].items()]
    return "\n".join(lines + [""] + notes)
