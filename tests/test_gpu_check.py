"""benchmarks/gpu_check.py: its capture and train checks on tiny random models on the CPU, its error
metric, its SKIP and FAIL lines, and (marker `gpu`, skipped without CUDA) the whole script on a GPU."""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from mechdistill.characterize.capture import HeadCapture
from mechdistill.config import load_config
from mechdistill.distill.signals import has_phase, make_examples
from mechdistill.models import ModelCatalog, load_model, load_tokenizer
from tests.helpers import REPO, load_benchmark

gpu_check = load_benchmark("gpu_check")


@pytest.fixture(scope="module")
def tiny(model_cache):
    """config/tiny.yaml and two of its test documents with worked two-phase answers as CoT."""
    config = load_config(REPO / "config" / "tiny.yaml", {"cache_dir": str(model_cache)})
    split = gpu_check.demo_split(config, "tiny_icd", load_tokenizer(ModelCatalog.from_config(config), "tiny_llama"), n_docs=2)
    return config, split


def test_demo_documents_have_both_phases(tiny):
    config, split = tiny
    assert list(split.anchors["doc_id"]) == list(split.docs.index) and len(split.docs) == 2
    for doc_id, cot in split.cot["cot"].items():
        assert " rather than " in cot and "<answer>" not in cot  # the answer block stays in raw only
        assert split.cot.loc[doc_id, "raw"].startswith(cot + "\n<answer>")
    examples = make_examples(load_tokenizer(ModelCatalog.from_config(config), "tiny_llama"), split)
    assert [(has_phase(ex, "phase1"), has_phase(ex, "phase2")) for ex in examples] == [(True, True)] * 2


@pytest.mark.slow
def test_capture_and_train_pass_on_tiny_models_on_cpu(tiny):
    config, split = tiny
    capture = gpu_check.run_check("capture", lambda: gpu_check.check_capture(config, "tiny_llama", split, "cpu"))
    assert capture.line().startswith("check capture: PASS bf16 on cpu vs float32 on cpu, 2 layers")
    # the 1-layer student's only layer joins the Phase-2 band (default [0.33, 1.0): no layer), so both phases train
    wide = copy.deepcopy(config)
    wide["distill"]["pools"]["phase2"]["layers"] = [0.0, 1.0]
    train = gpu_check.run_check("train", lambda: gpu_check.check_train(wide, split, "cpu", steps=3))
    assert train.line().startswith("check train: PASS tiny_llama -> tiny_student (student pools: phase1 4 heads, "
                                   "phase2 4 heads), bf16 autocast on cpu, 3 mech steps on 2 documents (2 with "
                                   "phase1, 2 with phase2): loss ")
    assert train.line().endswith(" s)") and "nan" not in train.numbers and "phase2.qk 0 " not in train.numbers


def test_capture_fails_against_another_model(tiny):
    config, split = tiny
    model, tok = load_model(ModelCatalog.from_config(config), "tiny_llama", device="cpu", dtype="float32")
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.model.layers.parameters():
            p.add_(0.3 * torch.randn_like(p))
    ex = make_examples(tok, gpu_check.first_docs(split, 1))[0]
    assert gpu_check.compare_capture(model, copy.deepcopy(model), ex)[0] == "PASS"
    status, numbers = gpu_check.compare_capture(model, other, ex)
    assert status == "FAIL" and "rows err" in numbers


def test_capture_errors_are_the_worst_layer():
    g = torch.Generator().manual_seed(0)
    ref = {item: {layer: torch.rand(1, 2, 3, 4, generator=g) for layer in (0, 1)} for item in gpu_check.CAPTURED}
    other = {item: {layer: t.clone() for layer, t in d.items()} for item, d in ref.items()}
    other["rows"][1][0, 1, 2, 3] += 0.1
    captures = [HeadCapture(torch.zeros(1, 3, dtype=torch.long), None, 2, 2, rows=r["rows"], writes=r["writes"],
                            value_writes=r["value_writes"]) for r in (ref, other)]
    errors = gpu_check.capture_errors(*captures)
    x, y = ref["rows"][1].numpy().ravel(), other["rows"][1].numpy().ravel()
    assert errors["rows"][0] == pytest.approx(0.1 / np.abs(x).max(), rel=1e-5)
    assert errors["rows"][1] == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-5) and errors["rows"][1] < 1
    assert errors["writes"] == (0.0, pytest.approx(1.0)) and errors["value_writes"] == (0.0, pytest.approx(1.0))


def test_vllm_check_skips_without_cuda_or_vllm(tiny, monkeypatch):
    config, split = tiny
    assert gpu_check.check_vllm(config, "tiny_llama", split, "cpu", 8) == (
        "SKIP", "no CUDA (the vllm backend runs on GPUs)")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    status, reason = gpu_check.check_vllm(config, "tiny_llama", split, "cuda", 8)
    assert status == "SKIP" and reason.startswith("vllm not installed")


def test_a_crashing_check_is_a_fail_line(capsys):
    def broken():
        raise RuntimeError("CUDA error: out of memory\nmore detail")

    result = gpu_check.run_check("train", broken)
    assert result.status == "FAIL"
    assert capsys.readouterr().out.startswith("check train: FAIL RuntimeError: CUDA error: out of memory (")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_whole_script_on_a_gpu():
    """On a GPU, with the 1-rank ZeRO-3 check (on CPU, 2 real ranks: tests/stages/test_distill_ranks.py)."""
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--device", "cuda", "--deepspeed"],
                         capture_output=True, text=True, timeout=600, cwd=REPO)
    lines = run.stdout.splitlines()
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    assert any(line.startswith("check capture: PASS bf16 on cuda") for line in lines)
    assert any(line.startswith("check train: PASS") for line in lines)
    assert any(line.startswith("check train_zero3: PASS") for line in lines)
    vllm = next(line for line in lines if line.startswith("check vllm: "))
    assert vllm.startswith("check vllm: PASS") or (importlib.util.find_spec("vllm") is None and "SKIP" in vllm)
    assert lines[-1].startswith("gpu_check: ") and " 0 FAIL" in lines[-1]


def test_memory_check_skips_without_cuda_and_exits_0(capsys):
    assert gpu_check.main(["--device", "cpu", "--memory", "--only", "memory", "--memory-tokens", "512"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("check memory: SKIP no CUDA: the memory check measures torch.cuda.max_memory_allocated")
    assert out[-1].startswith("gpu_check: 0 PASS, 0 FAIL, 1 SKIP")


def test_memory_check_step_runs_on_a_tiny_model_with_checkpointing():
    """What the memory check runs on the GPU, on the CPU with a tiny random model: the synthetic paper-shaped
    document defines both phases, and the mech loss backpropagates through checkpointed layers."""
    from mechdistill.distill.methods import METHODS
    from mechdistill.distill.objective import student_loss, teacher_targets
    from mechdistill.distill.pools import select_pool
    from mechdistill.distill.signals import has_phase
    from mechdistill.distill.trainer import enable_gradient_checkpointing
    from tests.helpers import tiny_llama

    ex = gpu_check.paper_step_example(256, early_tokens=24, cot_tokens=128, vocab=97)
    assert len(ex.input_ids) == 256 and has_phase(ex, "phase1") and has_phase(ex, "phase2")
    assert all(0 <= p < 256 for p in ex.early_queries + ex.refine + ex.keys)
    model = tiny_llama(97, seed=0)
    table = pd.DataFrame({"layer": [0] * 4 + [1] * 4, "head": list(range(4)) * 2,
                          "score": torch.rand(8, generator=torch.Generator().manual_seed(0)).tolist()})
    pools = {"phase1": select_pool(table, 2, 3, 0.5, (0.0, 0.5)), "phase2": select_pool(table, 2, 3, 0.5, (0.5, 1.0))}
    targets = teacher_targets(model, ex, pools, 0.0, top_k=8)
    model.train()
    enable_gradient_checkpointing(model)
    out = student_loss(model, ex, targets, pools, METHODS["mech"], 0.0, 2.0)
    out["loss"].backward()
    assert float(out["phase2.qk"]) == 0 and float(out["cot.kl"]) == pytest.approx(0, abs=1e-6)  # its own targets
    assert model.model.layers[1].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_memory_check_reads_the_planners_distill_row_of_the_paper_student():
    config = gpu_check.load(REPO / "config" / "paper.yaml")
    total, per_sequence = gpu_check.planned_step_gb(config, config["students"][0], 4096)
    _, longer = gpu_check.planned_step_gb(config, config["students"][0], 8192)
    assert 0 < per_sequence < total and longer > per_sequence
    assert total - per_sequence > 16 * 8.0e9 / 1e9  # one GPU holds the 8B student's whole ZeRO state
