"""mechdistill.plan: the work each stage does, its GPU / CPU time and peak memory; `mechdistill plan`."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from mechdistill import paths, plan
from mechdistill.cli import main
from mechdistill.config import load_config
from mechdistill.distill.train_config import TrainConfig
from mechdistill.errors import ConfigError
from mechdistill.patching.experiment import control_sets
from tests.helpers import REPO, tiny_llama

TINY = REPO / "config" / "tiny.yaml"
PAPER = REPO / "config" / "paper.yaml"
TINY_FACTS = plan.ModelFacts(params=1e6, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_size=32,
                             vocab_size=100)


def tiny_config(**plan_section) -> dict:
    """config/tiny.yaml with 100 new tokens (no budget forcing) and a plan section."""
    cfg = load_config(TINY)
    cfg["generation"].update(max_new_tokens=100, force_answer_tokens=0)
    cfg["methods"] = {"vanilla": {}, "mech": {}}  # the baselines' own work: test_baseline_teacher_generations
    cfg["plan"]["datasets"] = {"tiny_icd": {"n_docs": {"train": 2, "val": 1, "test": 3}, "prompt_tokens": 50,
                                            "clean_prompt_tokens": {"neutral": 80, "guided_exemplar": 120},
                                            **plan_section}}
    return cfg


def tiny_work(cfg: dict) -> pd.DataFrame:
    return plan.stage_workloads(cfg, plan.dataset_sizes(cfg), {"tiny_llama": TINY_FACTS, "tiny_student": TINY_FACTS})


def one(work: pd.DataFrame, stage: str, scope: str | None = None, model: str | None = None) -> pd.Series:
    rows = work[(work["stage"] == stage) & ((work["scope"] == scope) if scope else True)
                & ((work["model"] == model) if model else True)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


@pytest.mark.parametrize("n_heads, bins, n_random", [(8, [2, 4], 2), (30, [3, 8, 16, 40, 100], 3),
                                                     (5120, [3, 8, 16, 40, 100], 5), (3, [1, 2, 3, 8], 5)])
def test_head_set_count_is_what_patching_runs(n_heads, bins, n_random):
    ranked = [(0, h) for h in range(n_heads)]
    scores = [float(n_heads - h) for h in range(n_heads)]
    assert plan.head_set_count(n_heads, bins, n_random) == len(control_sets(ranked, scores, bins, n_random, seed=0))


def test_train_defaults_are_the_trainers():
    defaults = TrainConfig()
    assert {k: getattr(defaults, k) for k in plan.TRAIN_DEFAULTS} == plan.TRAIN_DEFAULTS


def test_token_counts_of_a_small_config():
    work = tiny_work(tiny_config())
    cot = one(work, "teacher_cot", "train")
    assert (cot.docs, cot.generated, cot.prefill) == (2, 2 * 100, 2 * 50)
    clean = one(work, "teacher_cot", "clean_neutral")  # clean_prompts.n_docs 2 of the 2 training documents
    assert (clean.generated, clean.prefill) == (2 * 100, 2 * 80)
    assert one(work, "teacher_cot", "clean_guided_exemplar").prefill == 2 * 120
    heads = one(work, "head_scores", model="tiny_student")
    assert (heads.forced, heads.capture) == (2 * (80 + 100), True)
    assert one(work, "style_head_scores").forced == 2 * (120 + 100)
    # patching: 8 heads, bins 2 and 4, each with top, near_zero, most_negative and 2 random sets: 10 sets,
    # in ceil(10 / 4) = 3 batched runs per direction; 2 documents; phase 1 generates early_tokens = 4
    p1 = one(work, "patching", "phase1")
    assert p1.patched_runs == 2 * 2 * 10
    assert p1.decode_steps == 2 * (2 + 2 * 3) * 4
    assert p1.decode_rows == 2 * (2 + 2 * 10) * 4
    assert p1.prefill == 2 * 2 * 80
    assert one(work, "patching", "phase2").decode_steps == 2 * (2 + 2 * 3) * 4  # late_tokens = 4 too
    assert one(work, "teacher_targets", "val").forced == 1 * 150
    # distill: 2 methods of one point, 2 steps of 1 document, evaluated after each step on 1 val document,
    # mechanism metrics before and after on the 2 + 1 train and val documents
    distill = one(work, "distill", model="tiny_student")
    assert distill.jobs == 2
    assert distill.training == 2 * 2 * 150
    assert distill.forced == 2 * (2 * 1 + 2 * 3) * 150
    assert one(work, "student_predict").generated == 2 * 3 * 100
    assert one(work, "evaluate", model="tiny_student").forced == 2 * 2 * 3 * 150
    assert one(work, "evaluate", model="tiny_llama").forced == 2 * 3 * 150


def test_baseline_teacher_generations():
    cfg = tiny_config()
    cfg["methods"] = {"vanilla": {}, "unicott": {"params": {"structure": "tree", "node_max_tokens": 10}},
                      "chain": {"base": "unicott"}, "morsd": {"params": {"n_samples": 3, "max_new_tokens": 20}},
                      "semcot": {"params": {"condense": "heuristic"}}, "cwt": {}}
    work = tiny_work(cfg)
    rows = work[work["stage"] == "baseline_teacher_data"].set_index("scope")
    assert sorted(rows.index) == ["morsd", "unicott"]  # the chain, heuristic condensing and CWT ask no teacher
    # 2 train + 1 val documents; a tree is 7 calls of 10 tokens; MoRSD 3 samples of 20 + the generation's
    # force_answer_tokens (0 in tiny_config) forced answer tokens
    assert rows.loc["unicott", "generated"] == 3 * 7 * 10 and rows.loc["unicott", "prefill"] == 3 * 7 * 150
    assert rows.loc["morsd", "generated"] == 3 * 3 * (20 + 0) and (rows["model"] == "tiny_llama").all()
    cfg["generation"]["force_answer_tokens"] = 16  # MoRSD's samples get the greedy traces' answer budget
    rows = tiny_work(cfg).query("stage == 'baseline_teacher_data'").set_index("scope")
    assert rows.loc["morsd", "generated"] == 3 * 3 * (20 + 16)
    assert one(work, "distill", model="tiny_student").jobs == 6
    # the baselines read no teacher targets: with them alone (or no student) the plan prices no teacher_targets job
    cfg["methods"] = {name: cfg["methods"][name] for name in ("unicott", "morsd", "cwt")}
    assert "teacher_targets" not in set(tiny_work(cfg)["stage"])
    assert "teacher_targets" not in set(tiny_work({**tiny_config(), "students": []})["stage"])


def test_max_docs_and_a_measured_cot_length():
    cfg = tiny_config(cot_tokens=40)
    cfg["datasets"]["tiny_icd"]["max_docs"] = {"test": 1}
    work = tiny_work(cfg)
    assert one(work, "teacher_cot", "test").generated == 1 * 40
    assert one(work, "teacher_cot", "train").generated == 2 * 40


def test_the_synthetic_adapter_gives_the_document_counts():
    cfg = tiny_config()
    del cfg["plan"]["datasets"]["tiny_icd"]["n_docs"]
    assert plan.dataset_sizes(cfg)["tiny_icd"].n_docs == {"train": 3, "val": 2, "test": 3}  # tiny.yaml's params


def test_missing_sizes_name_the_key():
    cfg = tiny_config()
    del cfg["plan"]["datasets"]["tiny_icd"]["prompt_tokens"]
    with pytest.raises(ConfigError, match="plan.datasets.tiny_icd"):
        plan.dataset_sizes(cfg)
    cfg = tiny_config()
    del cfg["plan"]["datasets"]["tiny_icd"]["clean_prompt_tokens"]["guided_exemplar"]
    with pytest.raises(ConfigError, match="no 'guided_exemplar'"):
        tiny_work(cfg)


GPU = {"hardware": {"name": "test GPU", "memory_gb": 80, "hbm_gb_per_s": 1000, "peak_tflops": {"bfloat16": 100},
                    "source": "hw"},
       "generation": [{"model": "big", "params_b": 70, "gpus": 8, "output_tokens_per_s": 1000, "source": "a"},
                      {"model": "small", "params_b": 8, "gpus": 8, "output_tokens_per_s": 4000, "source": "a"},
                      {"model": "big", "params_b": 70, "gpus": 1, "output_tokens_per_s": 10, "source": "a"}],
       "mfu": [{"model": "m", "params": 1e9, "seq_len": 100, "gpus": 8, "mfu": 0.5, "source": "b"},
               {"model": "m", "params": 1e9, "seq_len": 10000, "gpus": 8, "mfu": 0.25, "source": "b"}],
       "sources": {}}


def work_row(**work) -> pd.Series:
    base = dict.fromkeys(plan.COLUMNS, 0) | {"capture": False, "gpus": 1, "batch": 1, "precision": "bfloat16",
                                             "in_flight": 1, "train_passes": 3}
    return pd.Series(base | work)


def test_gpu_hours_are_tokens_over_the_cited_throughput_times_gpus():
    seconds, source, _ = plan.gpu_seconds(work_row(generated=1e6, gpus=8, engine="vllm"), plan.ModelFacts(70.6e9), GPU)
    assert seconds / 3600 == pytest.approx(1e6 / 1000 / 3600 * 8)
    assert "big x8 1,000 tok/s" in source
    seconds, _, _ = plan.gpu_seconds(work_row(generated=1e6, gpus=8, engine="vllm"), plan.ModelFacts(7e9), GPU)
    assert seconds == pytest.approx(1e6 / 4000 * 8)  # the nearest size at the same GPU count


def test_forward_and_training_time_from_flops_at_the_nearest_mfu():
    facts = plan.ModelFacts(1e9)  # no attention term: 2 N FLOPs per token forward
    seconds, source, how = plan.gpu_seconds(work_row(forced=1000, seq_len=100, engine="forward"), facts, GPU)
    assert seconds == pytest.approx(1000 * 2e9 / (0.5 * 100e12))
    assert "MFU 50%" in source and "at cited MFU" in how
    seconds, _, _ = plan.gpu_seconds(work_row(training=1000, seq_len=8000, engine="train", gpus=8), facts, GPU)
    assert seconds == pytest.approx(1000 * 3 * 2e9 / (0.25 * 100e12))  # 8,000 is nearer 10,000 than 100
    spread, _, how = plan.gpu_seconds(work_row(forced=1000, seq_len=100, engine="forward", gpus=8), facts, GPU)
    assert spread == pytest.approx(8 * 1000 * 2e9 / (0.5 * 100e12))  # a device_map holds 8 GPUs, runs one
    assert "8 GPUs held" in how


def test_patching_decoding_is_bandwidth_bound():
    facts = plan.ModelFacts(1e9, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8)
    row = work_row(decode_steps=10, decode_rows=40, context=500, engine="patch")
    seconds, _, how = plan.gpu_seconds(row, facts, GPU)
    kv_per_token = 2 * 2 * 2 * 8 * 2
    assert seconds == pytest.approx((10 * 1e9 * 2 + 40 * kv_per_token * 500) / 1000e9)
    assert "roofline" in how


def test_vllm_memory_is_what_it_reserves():
    cfg = load_config(PAPER)
    facts = plan.ModelFacts(8e9, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_size=4096,
                            vocab_size=128000)
    assert plan.peak_memory_gb(work_row(engine="vllm", gpus=8, seq_len=1000), facts, cfg, GPU) == pytest.approx(
        cfg["generation"]["gpu_memory_utilization"] * 80)
    huge = dataclasses.replace(facts, params=400e9)
    assert plan.peak_memory_gb(work_row(engine="vllm", gpus=8, seq_len=1000), huge, cfg, GPU) > 80



def test_vllm_memory_without_max_model_len_reserves_the_models_context():
    """generation.max_model_len unset (the demo config): vLLM takes the model's context, and so does the plan."""
    cfg = load_config(PAPER)
    del cfg["generation"]["max_model_len"]
    facts = plan.ModelFacts(400e9, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, hidden_size=4096,
                            vocab_size=128000, context=131072)
    need = (400e9 * 2 + facts.kv_bytes_per_token(2) * 131072) / 8 / 1e9  # bf16: 2 bytes
    assert plan.peak_memory_gb(work_row(engine="vllm", gpus=8, seq_len=1000), facts, cfg, GPU) == pytest.approx(need)


def test_cli_plans_the_demo_config(capsys):
    assert main(["plan", "--configfile", str(PAPER.parent / "config.yaml")]) == 0
    assert "| total" in capsys.readouterr().out

# A small model whose every term is computed by hand below: 2 layers, 4 heads (2 KV) of 8, h 32, MLP 64, V 100.
SMALL = plan.ModelFacts(params=1e6, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_size=32, vocab_size=100,
                        intermediate_size=64)


def test_training_memory_terms_by_hand():
    case = plan.MemoryCase("train", seq=10, b=2, gpus=2, n_cot=4, whole_params=500)
    terms = plan.memory_terms(case, SMALL)
    # per token and layer: norms 2 x (4 + 2 x 2) x 32 = 512, attention 5 x 32 x 2 = 320, MLP 4 x 64 x 2 = 512
    held = {"weights": 1e6, "gradients": 1e6, "optimizer": 6e6,              # 2, 2 and 12 bytes / 2 ranks
            "zero3_gathered": (2 * (1e6 - 3200) / 2 + 5e7) * 2,               # two layers' params + the prefetch bucket
            "zero3_reduce_buckets": 2e9, "zero3_whole_params": 1000,
            "activations_norms": 2 * 5120, "activations_attention": 2 * 3200, "activations_mlp": 2 * 5120,
            "final_norm": 8 * 10 * 32}
    # the larger phase: one layer's gradients (13,440) against the logits 2,000 + the loss's 4 x 100 x 10
    assert terms == pytest.approx(held | {"activations_backward_layer": 13440})
    long_cot = plan.memory_terms(dataclasses.replace(case, n_cot=40), SMALL)
    assert long_cot == pytest.approx(held | {"logits": 2000, "loss_cot_logits": 40 * 100 * 10})
    ckpt = plan.memory_terms(dataclasses.replace(case, checkpointing=True), SMALL)
    assert ckpt["activations_checkpoints"] == 2 * 10 * 32 * 2 and ckpt["activations_recomputed_layer"] == 2 * 13440
    assert "activations_norms" not in ckpt
    eager = plan.memory_terms(dataclasses.replace(case, flash=False), SMALL)
    assert eager["activations_scores"] == 2 * 10 * 4 * 10 * (4 + 2)  # layers x s x H s x (float32 + bf16 copy)
    single = plan.memory_terms(dataclasses.replace(case, zero3=False, b=4), SMALL)
    # one float32 process: its peak is the optimizer step (weights, gradients, AdamW's m and v, sqrt(v))
    assert single == {"weights": 4e6, "optimizer": 8e6, "gradients": 4e6, "optimizer_step_temporary": 4e6}


def test_forward_and_patching_memory_terms_by_hand():
    forward = plan.memory_terms(plan.MemoryCase("forward", seq=10, b=2, gpus=2, in_flight=3), SMALL)
    # one layer without gradients: (3 h + H d + 2 H_kv d + 2 H d + 3 I) b + 4 h per token, + residual in and out
    per_doc = ((96 + 32 + 32 + 64 + 192) * 2 + 128) * 10 + 2 * 10 * 32 * 2 + 10 * 100 * 2
    assert sum(forward.values()) == pytest.approx(1e6 + 3 * per_doc)
    patch = plan.memory_terms(plan.MemoryCase("patch", seq=10, b=2, gpus=2, batch=5, new_tokens=4), SMALL)
    kv_token = 2 * 2 * 2 * 8 * 2  # K and V, layers, KV heads, head_dim, bytes
    assert patch["kv_caches"] == pytest.approx((5 + 3) * kv_token * 14 / 2)
    assert sum(patch.values()) == pytest.approx(1e6 + 7168 + 2000 + 9600)


def test_captures_are_capture_nbytes():
    case = plan.MemoryCase("forward", seq=100, b=2, capture=("rows", "writes"), n_query=3, captured_layers=2)
    terms = plan.memory_terms(case, SMALL)
    assert terms["captures"] == 2 * 4 * 3 * 100 * 4 + 2 * 3 * 4 * 32 * 2  # float32 rows + bf16 writes
    assert terms["capture_row_logits"] == 4 * 3 * 100 * 4


def test_in_flight_divides_the_gpu_hours_of_a_device_map():
    facts = plan.ModelFacts(1e9)
    one, _, _ = plan.gpu_seconds(work_row(forced=1000, seq_len=100, engine="forward", gpus=8), facts, GPU)
    four, _, how = plan.gpu_seconds(work_row(forced=1000, seq_len=100, engine="forward", gpus=8, in_flight=4), facts, GPU)
    many, _, _ = plan.gpu_seconds(work_row(forced=1000, seq_len=100, engine="forward", gpus=8, in_flight=20), facts, GPU)
    assert four == pytest.approx(one / 4) and many == pytest.approx(one / 8)
    assert "4 busy" in how


def test_the_paper_config_fits_every_gpu_and_node():
    cfg = load_config(PAPER)
    table = plan.plan_table(cfg)
    assert (table["peak_gb"] <= 0.9 * 80).all(), table.loc[table["peak_gb"] > 72, ["stage", "model", "peak_gb"]]
    assert (table["host_gb"] <= table["host_limit_gb"]).all()
    assert table["fits"].all()
    assert cfg["distill"]["train"]["gradient_checkpointing"]


def test_host_limit_is_the_rules_mem_mb():
    profile = plan.profile_resources()
    assert plan.rule_memory_bytes(profile, "distill") == profile["set-resources"]["distill"]["mem_mb"] * 1e6
    assert plan.rule_memory_bytes(profile, "student_predict") == profile["default-resources"]["mem_mb"] * 1e6


def test_model_facts_from_a_saved_checkpoint(tmp_path):
    model = tiny_llama(97, 0)
    model.save_pretrained(tmp_path)
    facts = plan.facts_from_files(tmp_path / "config.json")
    assert facts.params == sum(p.numel() for p in model.parameters())
    assert (facts.n_layers, facts.n_heads, facts.n_kv_heads, facts.head_dim, facts.vocab_size) == (2, 4, 2, 8, 97)


def test_model_facts_from_the_config():
    facts = plan.model_facts(load_config(PAPER), "qwen3_14b")
    assert facts.params == pytest.approx(14.8e9)
    assert facts.kv_bytes_per_token(2) == 2 * 40 * 8 * 128 * 2


def test_cli_plans_the_paper_config(capsys):
    assert main(["plan", "--configfile", str(PAPER)]) == 0
    out = capsys.readouterr().out
    stages = ["teacher_cot", "head_scores", "style_head_scores", "patching", "teacher_targets", "baseline_teacher_data", "distill",
              "student_predict", "evaluate", "las_simulator", "evaluate (LAS simulator)", "total"]
    printed = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")][1:]
    assert printed == stages
    total = next(line for line in out.splitlines() if line.startswith("| total"))
    assert float(total.split("|")[7].replace(",", "")) > 0  # GPU hours
    assert "lambda-vllm" in out and "mosaicml" in out


def test_cli_detail_has_a_row_per_stage_dataset_and_model(capsys):
    assert main(["plan", "--config", str(PAPER), "--detail"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| distill |")]
    cfg = load_config(PAPER)
    assert len(rows) == len(cfg["datasets"]) * len(cfg["students"])
    # one grid point per method (no grids: config/paper.yaml, equal tuning), for the methods each student gets
    points = {s: sum(t == s for t, _ in paths.distilled_pairs(cfg)) for s in cfg["students"]}
    assert sorted(points.values()) == [2, 2, 6, 14]
    assert all(any(f"| {s} |" in r and f"| {n:,} |" in r for r in rows) for s, n in points.items())


def test_checkpointing_recomputes_the_forward():
    facts = plan.ModelFacts(1e9)
    plain, _, _ = plan.gpu_seconds(work_row(training=1000, seq_len=8000, engine="train", gpus=8, train_passes=3), facts, GPU)
    ckpt, _, how = plan.gpu_seconds(work_row(training=1000, seq_len=8000, engine="train", gpus=8, train_passes=4), facts, GPU)
    assert ckpt == pytest.approx(plain * 4 / 3) and "4 x train" in how
    row = plan.stage_workloads(load_config(PAPER), plan.dataset_sizes(load_config(PAPER))).query("stage == 'distill'")
    assert (row["train_passes"] == 4).all()  # config/paper.yaml checkpoints
