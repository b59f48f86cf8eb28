"""The generic distillation trainer on a tiny random-init LLaMA (CPU, a few seconds)."""

from __future__ import annotations

import importlib.machinery
import json
import math
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import transformers

from mechdistill.distill.backends import lr_factor, resolve_precision, zero3_config
from mechdistill.distill.selection import Criterion
from mechdistill.distill.train_config import TrainConfig
from mechdistill.distill.trainer import BatchStream, train
from mechdistill.io import recover_dir

VOCAB = 64
SEQ_LEN = 12


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices: one thread is faster and steadier than several on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0, tied: bool = False) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config)


def token_data(n_seqs: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n_seqs, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def shuffled_batches(data: torch.Tensor, batch_size: int, seed: int = 0):
    """A train_batches factory: the same data, reshuffled deterministically per epoch."""

    def train_batches(epoch: int):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed + epoch))
        for start in range(0, len(data), batch_size):
            yield {"input_ids": data[order[start:start + batch_size]]}

    return train_batches


def ce_terms(model, batch) -> dict[str, torch.Tensor]:
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    z_loss = logits.pow(2).mean()
    return {"loss": ce + 1e-3 * z_loss, "ce": ce, "z_loss": z_loss}


def noisy_ce_terms(model, batch) -> dict[str, torch.Tensor]:
    """CE with dropout on the logits: uses the global torch RNG, so resume must restore it."""
    ids = batch["input_ids"]
    logits = F.dropout(model(input_ids=ids).logits, p=0.1, training=model.training)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    return {"loss": ce, "ce": ce}


def config(**overrides) -> TrainConfig:
    defaults = dict(lr=1e-2, max_steps=4, warmup_steps=1, device="cpu", precision="auto",
                    log_every=1, seed=0)
    return TrainConfig(**{**defaults, **overrides})


def test_lr_factor_follows_the_documented_formula():
    assert lr_factor(0, 2, 10) == pytest.approx(0.5)
    assert lr_factor(1, 2, 10) == pytest.approx(1.0)
    assert lr_factor(2, 2, 10) == pytest.approx(1.0)
    assert lr_factor(6, 2, 10) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(4, 2, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))  # p = 2/8
    assert lr_factor(10, 2, 10) == pytest.approx(0.0)
    assert lr_factor(10, 2, 10, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_factor(6, 2, 10, min_lr_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(0, 0, 10) == pytest.approx(1.0)
    assert TrainConfig(max_steps=100, warmup_ratio=0.1).resolved_warmup_steps == 10


def test_loss_decreases_and_logged_lr_matches_the_schedule(tmp_path):
    cfg = config(max_steps=20, warmup_steps=3, lr=1e-2)
    result = train(tiny_llama(), ce_terms, shuffled_batches(token_data(4), 2), cfg, tmp_path / "model")
    log = result.log[result.log["split"] == "train"]
    assert list(log["step"]) == list(range(1, 21))
    expected_lr = [cfg.lr * lr_factor(s - 1, 3, 20) for s in log["step"]]
    assert log["lr"].tolist() == pytest.approx(expected_lr)
    assert log["loss"].iloc[-3:].mean() < 0.8 * log["loss"].iloc[:3].mean()
    assert (log["grad_norm"] > 0).all()


def test_resume_after_a_kill_is_bit_for_bit(tmp_path):
    data, val = token_data(6, seed=1), [{"input_ids": token_data(2, seed=2)}]
    cfg = config(grad_accum_steps=2, checkpoint_every=2, eval_every=2)
    batches = shuffled_batches(data, 2)  # 3 micro-batches per epoch: steps cross epochs

    full_model = tiny_llama()
    full = train(full_model, noisy_ce_terms, batches, cfg, tmp_path / "full" / "model", val_batches=val)

    def kill_at_step_3(row):
        if row["step"] == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train(tiny_llama(), noisy_ce_terms, batches, cfg, tmp_path / "killed" / "model",
              val_batches=val, on_step=kill_at_step_3)
    assert not (tmp_path / "killed" / "model").exists()
    resumed_model = tiny_llama(seed=123)  # a fresh process would build it anew; weights come from ckpt
    resumed = train(resumed_model, noisy_ce_terms, batches, cfg, tmp_path / "killed" / "model",
                    val_batches=val)

    for (name, a), (_, b) in zip(full_model.state_dict().items(), resumed_model.state_dict().items()):
        assert torch.equal(a, b), name
    columns = ["split", "step", "epoch", "lr", "grad_norm", "loss", "ce"]
    pd.testing.assert_frame_equal(full.log[columns], resumed.log[columns])
    on_disk = pd.read_parquet(tmp_path / "killed" / "train_log.parquet")
    pd.testing.assert_frame_equal(on_disk[columns], full.log[columns])


def test_graceful_stop_then_resume_gives_the_same_weights_and_a_clean_log(tmp_path):
    batches, cfg = shuffled_batches(token_data(4), 2), config(checkpoint_every=0)
    reference = tiny_llama()
    train(reference, noisy_ce_terms, batches, cfg, tmp_path / "ref" / "model")

    first = train(tiny_llama(), noisy_ce_terms, batches, cfg, tmp_path / "run" / "model", stop_after=2)
    assert first.stopped_early and first.steps == 2 and first.out_dir is None
    assert pd.read_parquet(tmp_path / "run" / "train_log.parquet")["step"].tolist() == [1, 2]
    model = tiny_llama()
    second = train(model, noisy_ce_terms, batches, cfg, tmp_path / "run" / "model")

    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters()))
    log = pd.read_parquet(tmp_path / "run" / "train_log.parquet")
    assert {"split", "step", "epoch", "lr", "grad_norm", "elapsed_s", "loss", "ce"} <= set(log.columns)
    assert log["step"].tolist() == [1, 2, 3, 4] and log["step"].is_unique
    assert second.log["step"].tolist() == [1, 2, 3, 4]


@pytest.mark.parametrize("change, fresh, message", [
    ({"cfg": {"lr": 5e-3}}, True, "TrainConfig changed: lr 0.01 -> 0.005"),
    ({"run_key": "weights beta 2"}, True, "the run's other settings or inputs changed"),
    ({"cfg": {"log_every": 2}}, False, "resumed from"),  # bookkeeping: the same weights either way
])
def test_a_checkpoint_resumes_only_under_what_made_it(tmp_path, caplog, change, fresh, message):
    """A run stopped at step 2 and rerun with another lr (or another loss, data or model: run_key)
    trains from scratch, as a clean run with the new settings would; a bookkeeping change resumes."""
    batches = shuffled_batches(token_data(4), 2)
    first_cfg, then_cfg = config(checkpoint_every=0), config(checkpoint_every=0, **change.get("cfg", {}))
    then_key = change.get("run_key", "weights beta 1")
    train(tiny_llama(), noisy_ce_terms, batches, first_cfg, tmp_path / "run" / "model", stop_after=2,
          run_key="weights beta 1")
    reference = tiny_llama()
    train(reference, noisy_ce_terms, batches, then_cfg, tmp_path / "ref" / "model", run_key=then_key)

    model = tiny_llama(seed=123 if not fresh else 0)  # resumed: the weights come from the checkpoint
    with caplog.at_level("INFO", logger="mechdistill.distill"):  # trainer and run_state
        result = train(model, noisy_ce_terms, batches, then_cfg, tmp_path / "run" / "model", run_key=then_key)
    assert message in caplog.text
    assert ("training from scratch" in caplog.text) == fresh
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters()))
    assert result.log[result.log["split"] == "train"]["step"].tolist() == [1, 2, 3, 4]


def test_resume_with_tied_embeddings(tmp_path):
    batches, cfg = shuffled_batches(token_data(4), 2), config(max_steps=2)
    reference = tiny_llama(tied=True)
    train(reference, ce_terms, batches, cfg, tmp_path / "ref" / "model")
    train(tiny_llama(tied=True), ce_terms, batches, cfg, tmp_path / "run" / "model", stop_after=1)
    model = tiny_llama(tied=True)
    train(model, ce_terms, batches, cfg, tmp_path / "run" / "model")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert all(torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters()))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert torch.equal(reloaded.lm_head.weight, model.lm_head.weight)


def test_two_micro_batches_of_one_equal_one_batch_of_two(tmp_path):
    data = token_data(2)
    cfg = dict(max_steps=1, warmup_steps=0, max_grad_norm=None, weight_decay=0.1)
    whole, split = tiny_llama(), tiny_llama()
    before = [p.detach().clone() for p in whole.parameters()]
    train(whole, ce_terms, lambda epoch: [{"input_ids": data}], config(**cfg), tmp_path / "a" / "model")
    train(split, ce_terms, lambda epoch: [{"input_ids": data[:1]}, {"input_ids": data[1:]}],
          config(grad_accum_steps=2, **cfg), tmp_path / "b" / "model")
    for start, a, b in zip(before, whole.parameters(), split.parameters()):
        assert not torch.equal(a, start)
        # Adam's first update is lr * g / (|g| + eps): where |g| is tiny, float32 summation order (one batch
        # against two micro-batches) moves it by up to ~1e-4 lr (1.3e-4 lr seen on this CPU); a wrong
        # accumulation (one micro-batch lost, or a sum where a mean belongs) flips signs: differences ~ lr.
        torch.testing.assert_close(a - start, b - start, atol=1e-3 * cfg.get("lr", 1e-2), rtol=0)


def test_saved_model_reloads_with_from_pretrained(tmp_path):
    model = tiny_llama()
    train(model, ce_terms, shuffled_batches(token_data(4), 2), config(max_steps=2), tmp_path / "model")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    ids = token_data(2, seed=5)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)
    assert not (tmp_path / ".model.tmp").exists()


def test_frozen_teacher_inside_loss_fn_gets_no_gradient(tmp_path):
    teacher = tiny_llama(seed=7).requires_grad_(False)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}

    def distill_terms(model, batch):
        ids = batch["input_ids"]
        student_logp = model(input_ids=ids).logits.log_softmax(-1)
        teacher_logp = teacher(input_ids=ids).logits.log_softmax(-1)
        kl = F.kl_div(student_logp, teacher_logp, log_target=True, reduction="batchmean")
        return {"loss": kl, "kl": kl}

    student = tiny_llama()
    student.model.embed_tokens.requires_grad_(False)  # a frozen part of the student, too
    embed_before = student.model.embed_tokens.weight.clone()
    result = train(student, distill_terms, shuffled_batches(token_data(4), 2), config(max_steps=3),
                   tmp_path / "model")
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in teacher.state_dict().items())
    assert torch.equal(student.model.embed_tokens.weight, embed_before)
    assert student.model.embed_tokens.weight.grad is None
    assert "kl" in result.log.columns


def test_loss_fn_without_loss_key_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="key 'loss'"):
        train(tiny_llama(), lambda model, batch: {"ce": ce_terms(model, batch)["ce"]},
              shuffled_batches(token_data(2), 2), config(), tmp_path / "model")


def test_batch_stream_skips_consumed_batches_and_cycles_epochs():
    factory = lambda epoch: [(epoch, i) for i in range(3)]  # noqa: E731
    assert [next(BatchStream(factory, 0, 2)) for _ in range(1)] == [(0, 2)]
    stream = BatchStream(factory, 1, 3)  # a checkpoint taken right at the end of epoch 1
    assert [next(stream) for _ in range(4)] == [(2, 0), (2, 1), (2, 2), (3, 0)]
    assert (stream.epoch, stream.index) == (3, 1)
    with pytest.raises(ValueError, match="no batches"):
        next(BatchStream(lambda epoch: [], 0, 0))


def test_precision_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == (None, False)
    assert resolve_precision("fp32", cpu) == (None, False)
    assert resolve_precision("bf16", cpu) == (torch.bfloat16, False)
    with pytest.raises(ValueError, match="CUDA"):
        resolve_precision("fp16", cpu)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="int8")


def test_recover_dir_restores_a_checkpoint_renamed_aside(tmp_path):
    (tmp_path / "ckpt.old").mkdir()
    (tmp_path / "ckpt.old" / "x").write_text("1")
    recover_dir(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "x").read_text() == "1" and not (tmp_path / "ckpt.old").exists()


def test_zero3_config_has_the_standard_keys():
    ds = zero3_config(TrainConfig(grad_accum_steps=4, micro_batch_size=2, max_grad_norm=0.5, precision="bf16"))
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "none"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_deepspeed_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # import fails even where it is installed
    cfg = config()
    with pytest.raises(ImportError, match="DeepSpeed is not installed"):
        train(tiny_llama(), ce_terms, shuffled_batches(token_data(2), 2), cfg, tmp_path / "model",
              deepspeed_config=zero3_config(cfg))


# ----------------------------------------------------------------------------- the best evaluation's weights


def scripted(values: dict[int, float], maximize: bool = False) -> Criterion:
    """A criterion whose value at each evaluated step is given (independent of the model)."""
    return Criterion("scripted", lambda model, row: values[row["step"]], maximize)


def snapshot_each_step(model, snapshots: dict[int, dict[str, torch.Tensor]]):
    """on_step: the weights after each step (what that step's evaluation saw)."""
    return lambda row: snapshots.__setitem__(row["step"], {k: v.clone() for k, v in model.state_dict().items()})


def saved_weights(out_dir) -> dict[str, torch.Tensor]:
    return transformers.AutoModelForCausalLM.from_pretrained(out_dir).state_dict()


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("values, maximize, best", [
    ({2: 3.0, 4: 1.0, 6: 2.0, 8: 5.0}, False, 4),           # the lowest value, not the last step
    ({2: 3.0, 4: 1.0, 6: 2.0, 8: 5.0}, True, 8),
    ({2: 2.0, 4: 1.0, 6: 1.0, 8: 1.0}, False, 4),           # ties keep the earliest step
    ({2: math.nan, 4: 2.0, 6: math.nan, 8: 3.0}, False, 4),  # NaN never wins
])
def test_the_written_model_is_the_best_evaluation(tmp_path, values, maximize, best):
    model, snapshots = tiny_llama(), {}
    cfg = config(max_steps=8, eval_every=2, checkpoint_every=3)
    result = train(model, ce_terms, shuffled_batches(token_data(4), 2), cfg, tmp_path / "model",
                   val_batches=[{"input_ids": token_data(2, seed=2)}], criterion=scripted(values, maximize),
                   on_step=snapshot_each_step(model, snapshots), keep_checkpoint=False)

    assert result.best.step == best
    assert best == 8 or not torch.equal(snapshots[best]["lm_head.weight"], snapshots[8]["lm_head.weight"])
    assert_same_weights(saved_weights(tmp_path / "model"), snapshots[best])
    assert_same_weights(model.state_dict(), snapshots[best])  # the model object ends with them too
    log = pd.read_parquet(tmp_path / "train_log.parquet")
    val = log[log["split"] == "val"]
    assert val["step"].tolist() == [2, 4, 6, 8]
    assert val["scripted"].tolist() == pytest.approx([values[s] for s in (2, 4, 6, 8)], nan_ok=True)
    record = json.loads((tmp_path / "best_step.json").read_text())
    assert record == {"criterion": "scripted", "maximize": maximize, "step": best, "value": values[best],
                      "last_step": 8, "evaluated_steps": [2, 4, 6, 8]}
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ckpt.best").exists()


def test_without_validation_the_last_weights_are_written(tmp_path):
    model, snapshots = tiny_llama(), {}
    train(model, ce_terms, shuffled_batches(token_data(4), 2), config(max_steps=3, eval_every=1), tmp_path / "model",
          on_step=snapshot_each_step(model, snapshots))
    assert_same_weights(saved_weights(tmp_path / "model"), snapshots[3])
    record = json.loads((tmp_path / "best_step.json").read_text())
    assert record == {"criterion": None, "maximize": None, "step": 3, "value": None, "last_step": 3,
                      "evaluated_steps": []}


def _uninterrupted_run(tmp_path, cfg, values: dict) -> tuple[list, list, dict]:
    """The reference run of the kill/resume tests, under tmp_path/full: (val batches, train batches, the
    weights after every step)."""
    data, val = token_data(6, seed=1), [{"input_ids": token_data(2, seed=2)}]
    batches = shuffled_batches(data, 2)
    full_model, snapshots = tiny_llama(), {}
    train(full_model, noisy_ce_terms, batches, cfg, tmp_path / "full" / "model", val_batches=val,
          criterion=scripted(values), on_step=snapshot_each_step(full_model, snapshots))
    return val, batches, snapshots


@pytest.mark.parametrize("values, kills, best, kept_after_kill", [
    # best at step 2, checkpointed at step 4; killed at 6: the resumed run must keep step 2's weights
    ({2: 1.0, 4: 3.0, 6: 2.0, 8: 4.0}, [6], 2, ["step-00000002"]),
    # best at 4 (checkpointed), a better one at 6 before the kill at 7: resumed from step 4, the run
    # finds step 6 again; the files kept are those of the checkpoint's best and the newest best
    ({2: 3.0, 4: 2.0, 6: 1.0, 8: 5.0}, [7], 6, ["step-00000004", "step-00000006"]),
    # killed twice before the next checkpoint: the second resume still needs the checkpoint's best (2)
    ({2: 2.0, 4: 3.0, 6: 1.0, 8: 4.0}, [5, 7], 6, ["step-00000002", "step-00000006"]),
])
def test_resume_after_a_kill_keeps_the_best_so_far(tmp_path, values, kills, best, kept_after_kill):
    cfg = config(max_steps=8, eval_every=2, checkpoint_every=4)
    val, batches, snapshots = _uninterrupted_run(tmp_path, cfg, values)

    def kill_at(step: int):
        def kill(row):
            if row["step"] == step:
                raise KeyboardInterrupt("simulated kill")
        return kill

    run = tmp_path / "killed"
    for step in kills:
        with pytest.raises(KeyboardInterrupt):
            train(tiny_llama(), noisy_ce_terms, batches, cfg, run / "model", val_batches=val,
                  criterion=scripted(values), on_step=kill_at(step))
    assert sorted(p.name for p in (run / "ckpt.best").iterdir()) == kept_after_kill
    resumed = tiny_llama(seed=123)
    result = train(resumed, noisy_ce_terms, batches, cfg, run / "model", val_batches=val, criterion=scripted(values))

    assert result.best.step == best
    assert_same_weights(saved_weights(run / "model"), snapshots[best])
    log = pd.read_parquet(run / "train_log.parquet")
    assert log.loc[log["split"] == "val", "step"].tolist() == [2, 4, 6, 8]
    assert json.loads((run / "best_step.json").read_text())["step"] == best
    assert [p.name for p in (run / "ckpt.best").iterdir()] == [f"step-{best:08d}"]  # keep_checkpoint=True


def test_criterion_better_is_strict_and_never_prefers_nan():
    low, high = scripted({}), scripted({}, maximize=True)
    assert low.better(5.0, None) and low.better(math.nan, None)  # the first evaluation stands
    assert low.better(1.0, 2.0) and not low.better(2.0, 2.0) and not low.better(3.0, 2.0)
    assert high.better(3.0, 2.0) and not high.better(2.0, 2.0)
    assert low.better(1.0, math.nan) and not low.better(math.nan, 1.0) and not low.better(math.nan, math.nan)


# ----------------------------------------------------------------------------- the DeepSpeed path, faked

# A stand-in engine with the calls the trainer makes checks the DeepSpeed backend's own logic (best weights
# consolidated on rank 0 into weights.pt, resume, the final save from them) in one process, in a second;
# the real engine, 2 ZeRO-3 ranks, is exercised by tests/stages/test_distill_ranks.py.


class FakeZero3Engine:
    """The slice of deepspeed.DeepSpeedEngine the trainer uses: forward, backward + step with
    accumulation, grad norm, engine checkpoints, the consolidated 16-bit state dict."""

    def __init__(self, model, optimizer, lr_scheduler, config):
        self.module, self.optimizer, self.scheduler = model, optimizer, lr_scheduler
        self.accum, self.micro_steps, self.grad_norm = config["gradient_accumulation_steps"], 0, None
        self.clip = config["gradient_clipping"] or math.inf
        self.device = torch.device("cpu")

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def train(self):
        self.module.train()

    def eval(self):
        self.module.eval()

    def backward(self, loss):
        (loss / self.accum).backward()

    def step(self):
        self.micro_steps += 1
        if self.micro_steps % self.accum == 0:
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)

    def get_global_grad_norm(self):
        return self.grad_norm

    def save_checkpoint(self, directory, tag):
        (Path(directory) / tag).mkdir(parents=True)
        torch.save({"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict()}, Path(directory) / tag / "state.pt")

    def load_checkpoint(self, directory, tag):
        state = torch.load(Path(directory) / tag / "state.pt", weights_only=True)
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def _zero3_consolidated_16bit_state_dict(self):
        return {name: tensor.detach().clone() for name, tensor in self.module.state_dict().items()}


@pytest.fixture()
def fake_deepspeed(tmp_path, monkeypatch):
    """A one-process gloo group and the stand-in engine as `deepspeed.initialize`."""
    def initialize(model, optimizer, lr_scheduler, config):
        return FakeZero3Engine(model, optimizer, lr_scheduler, config), optimizer, None, lr_scheduler

    module = types.ModuleType("deepspeed")
    module.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)  # find_spec works; no metadata
    module.initialize = initialize
    module.DeepSpeedEngine = FakeZero3Engine  # accelerate imports it when DeepSpeed looks installed
    monkeypatch.setitem(sys.modules, "deepspeed", module)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


def test_deepspeed_backend_writes_and_resumes_the_best_evaluation(tmp_path, fake_deepspeed):
    values, val = {2: 3.0, 4: 1.0, 6: 2.0}, [{"input_ids": token_data(2, seed=2)}]
    cfg = config(max_steps=6, eval_every=2, checkpoint_every=2, precision="fp32")
    batches, ds_config = shuffled_batches(token_data(4), 2), zero3_config(cfg)
    full, snapshots = tiny_llama(), {}
    result = train(full, ce_terms, batches, cfg, tmp_path / "full" / "model", val_batches=val,
                   criterion=scripted(values), deepspeed_config=ds_config, on_step=snapshot_each_step(full, snapshots))
    assert result.best.step == 4
    assert_same_weights(saved_weights(tmp_path / "full" / "model"), snapshots[4])
    assert [p.name for p in (tmp_path / "full" / "ckpt.best" / "step-00000004").iterdir()] == ["weights.pt"]

    def kill_at_5(row):
        if row["step"] == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train(tiny_llama(), ce_terms, batches, cfg, tmp_path / "killed" / "model", val_batches=val,
              criterion=scripted(values), deepspeed_config=ds_config, on_step=kill_at_5)
    train(tiny_llama(seed=123), ce_terms, batches, cfg, tmp_path / "killed" / "model", val_batches=val,
          criterion=scripted(values), deepspeed_config=ds_config)
    assert_same_weights(saved_weights(tmp_path / "killed" / "model"), snapshots[4])
    assert json.loads((tmp_path / "killed" / "best_step.json").read_text())["step"] == 4


def test_checkpoints_do_not_pile_up_only_the_last_and_the_best_stay(tmp_path):
    """A checkpoint at every step, an evaluation at every step, the best early: after each save the run's
    folder holds one full checkpoint (the last step's: weights, optimizer, RNG) and the weights of the
    best step (and of the last checkpoint's best, which a resume needs), nothing else; a kill then a
    resume still ends with the uninterrupted run's best weights."""
    values = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0, 5: 1.5, 6: 5.0}  # best at step 2
    cfg = config(max_steps=6, eval_every=1, checkpoint_every=1)
    val, batches, snapshots = _uninterrupted_run(tmp_path, cfg, values)

    run, seen = tmp_path / "killed", []

    def inspect_then_kill_at_5(row):
        step = row["step"]
        best = min((s for s in values if s <= step), key=lambda s: (values[s], s))
        assert sorted(p.name for p in run.iterdir()) == ["ckpt", "ckpt.best", "train_log.parquet"], step
        state = torch.load(run / "ckpt" / "trainer_state.pt", weights_only=True)
        assert state["progress"]["step"] == step and state["best"]["step"] == best
        assert sorted(p.name for p in (run / "ckpt.best").iterdir()) == [f"step-{best:08d}"], step
        seen.append(step)
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train(tiny_llama(), noisy_ce_terms, batches, cfg, run / "model", val_batches=val,
              criterion=scripted(values), on_step=inspect_then_kill_at_5)
    assert seen == [1, 2, 3, 4, 5]
    resumed = tiny_llama(seed=123)
    result = train(resumed, noisy_ce_terms, batches, cfg, run / "model", val_batches=val, criterion=scripted(values))
    assert result.best.step == 2
    assert_same_weights(saved_weights(run / "model"), snapshots[2])
    assert sorted(p.name for p in run.iterdir()) == ["best_step.json", "ckpt", "ckpt.best", "model",
                                                     "train_log.parquet"]
    assert [p.name for p in (run / "ckpt.best").iterdir()] == ["step-00000002"]
