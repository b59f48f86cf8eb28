"""Big-model placement (`models.load_model(device_map=...)`, `models.input_device`): a tiny LLaMA whose
layer 1 and final norm are offloaded to disk (their weights sit on the meta device between forwards)
computes what the same model on one device computes: head capture, the final residual, the margin
gradient, the distillation phase signals and pattern-patched generation."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close
from transformers import LlamaForCausalLM

from mechdistill.characterize.attention import attention_hooks, attention_modules
from mechdistill.characterize.capture import ALL_WHAT, capture_heads, final_residual
from mechdistill.characterize.scores import margin_gradient
from mechdistill.distill.signals import forward_signals
from mechdistill.models import ModelCatalog, input_device, load_model, placement
from mechdistill.patching.patterns import PatternPatch
from mechdistill.patching.runs import DocumentRuns, head_mask
from tests.distill.test_objective import example, pools
from tests.helpers import tiny_llama

PLACEMENTS = {
    # no GPU: "cpu" modules stay in memory, "disk" ones are read from the offload folder at each forward
    "cpu": {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
            "model.layers.1": "disk", "model.norm": "disk", "lm_head": "cpu"},
    # a GPU: "cpu" and "disk" modules are offloaded and run on GPU 0
    "cuda": {"model.embed_tokens": "cpu", "model.rotary_emb": 0, "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.norm": 0, "lm_head": 0},
}
QPOS, KPOS = [[3, 11, 20, 29]], [[0, 5, 11, 18]]
TARGETS, NEARMISSES = [7, 40], [12]
RECORD = [(0, 1), (1, 0), (1, 3)]  # heads the patched runs take from the clean run
STEPS = 4


def _biased_llama(vocab: int) -> LlamaForCausalLM:
    """helpers.tiny_llama (2 layers, GQA) with random attention biases: writes must leave o_proj's out."""
    config = tiny_llama(vocab, seed=0).config
    config.attention_bias = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for attn in attention_modules(model):
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                proj.bias.normal_(0, 0.5)
    return model


@pytest.fixture(scope="module", params=list(PLACEMENTS))
def pair(request, byte_tok, tmp_path_factory):
    """(the model on one device, the same model placed by PLACEMENTS[device], device)."""
    device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no GPU")
    folder = tmp_path_factory.mktemp("device-map")
    _biased_llama(len(byte_tok)).save_pretrained(folder / "model")
    byte_tok.save_pretrained(folder / "model")
    config = {"models": {"m": {"source": "local", "path": str(folder / "model")}}}
    single, _ = load_model(ModelCatalog.from_config(config), "m", device=device, dtype="float32")
    section = {"device_map": PLACEMENTS[device], "offload_folder": str(folder / "offload")}
    placed, _ = load_model(ModelCatalog.from_config(config), "m", device=device, dtype="float32", **placement(section))
    return single, placed, device


def _ids(seed: int, seq: int = 32) -> torch.Tensor:
    return torch.randint(0, 200, (seq,), generator=torch.Generator().manual_seed(seed))


def test_weights_follow_the_device_map(pair):
    single, placed, device = pair
    assert placed.hf_device_map == PLACEMENTS[device]
    assert placed.model.layers[1].self_attn.o_proj.weight.device.type == "meta"  # on disk between forwards
    assert placed.model.norm.weight.device.type == "meta"
    expected = torch.device("cpu") if device == "cpu" else torch.device("cuda", 0)
    assert input_device(placed) == input_device(single) == expected


def _capture(model, ids: torch.Tensor):
    """(logits, final residual, margin gradient at QPOS, HeadCapture of everything), all on the CPU."""
    with torch.no_grad(), final_residual(model) as residual:
        out, cap = capture_heads(model, ids[None].to(input_device(model)), query_positions=QPOS,
                                 key_positions=KPOS, what=ALL_WHAT)
    grad = margin_gradient(residual.h[0, QPOS[0]], model.model.norm, model.lm_head, TARGETS, NEARMISSES)
    return out.logits.cpu(), residual.h.cpu(), grad.cpu(), cap


def test_head_capture_residual_and_margin_gradient_equal_one_device(pair):
    single, placed, _ = pair
    ids = _ids(0)
    *want, want_cap = _capture(single, ids)
    *got, got_cap = _capture(placed, ids)
    for w, g in zip(want, got):  # logits, residual [1, seq, d], gradient [nq, d]
        assert_close(g, w)
    assert want[2].abs().max() > 0
    for name in ("rows", "queries", "keys", "values", "writes", "value_writes", "z"):
        w, g = getattr(want_cap, name), getattr(got_cap, name)
        assert sorted(g) == sorted(w) == [0, 1], name
        for layer in w:
            assert_close(g[layer].cpu(), w[layer].cpu(), msg=lambda m, n=name, i=layer: f"{n}[{i}]: {m}")


def test_phase_signals_equal_one_device(pair, byte_tok):
    """Phase 1 pools layer 0, Phase 2 layer 1 (on disk): rows, writes, value writes, margin gradient."""
    single, placed, _ = pair
    ex = example(byte_tok)
    with torch.no_grad():
        want_logits, want = forward_signals(single, ex, pools(0), tau=0.0)
        got_logits, got = forward_signals(placed, ex, pools(0), tau=0.0)
    assert_close(got_logits.cpu(), want_logits.cpu())
    assert set(got) == set(want) == {"phase1", "phase2"}
    for phase, signals in want.items():
        assert signals["mask"].any(), phase
        for key, value in signals.items():
            assert_close(got[phase][key].cpu(), value.cpu(), msg=lambda m, p=phase, k=key: f"{p}.{k}: {m}")


def _patched_logits(model, runs: DocumentRuns, heads: list[tuple[int, int]]) -> torch.Tensor:
    """Greedy steps of the corrupted input with the clean run's patterns in `heads` -> logits [STEPS, vocab]."""
    patch = PatternPatch(runs.refs["clean"].tape, head_mask([heads], runs.n_layers, runs.n_heads))
    prefix = runs.refs["corrupt"].prefix
    cache = copy.deepcopy(prefix.cache)  # the reference run's KV cache, layer 1's on its own device
    token = torch.tensor([[prefix.last_token]], device=input_device(model))
    steps = []
    with torch.no_grad(), attention_hooks(model, patch.hooks()):
        for _ in range(STEPS):
            logits = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1]
            steps.append(logits[0].cpu())
            token = logits.argmax(-1, keepdim=True).to(token.device)
    return torch.stack(steps)


def _patching(model):
    runs = DocumentRuns(model, STEPS, RECORD, repetition_penalty=1.3)
    clean, corrupt = runs.reference("clean", _ids(1)), runs.reference("corrupt", _ids(2))
    tape = [row.cpu() for layer in sorted(clean.tape.rows) for row in clean.tape.rows[layer]]
    return dict(tokens=torch.cat([clean.tokens, corrupt.tokens]).cpu(), tape=tape,
                patched=_patched_logits(model, runs, RECORD), unpatched=_patched_logits(model, runs, []),
                batched=runs.patched("denoise", [RECORD, RECORD[:1]]).cpu())


def test_pattern_patched_runs_equal_one_device(pair):
    single, placed, _ = pair
    want, got = _patching(single), _patching(placed)
    assert not torch.allclose(want["patched"], want["unpatched"])  # the clean patterns change the run
    assert len(want["tape"]) == 2 * STEPS  # layers 0 and 1, one row per step
    for key in want:
        assert_close(got[key], want[key], msg=lambda m, k=key: f"{k}: {m}")


def test_placement_reads_a_sections_keys():
    section = {"teacher_device_map": "auto", "teacher_max_memory": {0: "40GiB"}, "device_map": None}
    assert placement(section, "teacher_") == {"device_map": "auto", "max_memory": {0: "40GiB"}, "offload_folder": None}
    assert placement(section) == {"device_map": None, "max_memory": None, "offload_folder": None}
