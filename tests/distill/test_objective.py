"""The distillation objective end to end on tiny models: teacher targets -> student loss -> training."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mechdistill.distill.methods import METHODS, resolve_method
from mechdistill.distill.objective import student_loss, teacher_targets
from mechdistill.distill.pools import select_pool
from mechdistill.distill.signals import has_phase, make_example
from mechdistill.errors import ConfigError
from tests.helpers import tiny_llama

NOTE = "Note: progressive dyspnea, EF 35%, chronic systolic heart failure."
COT = (" The work-up focused on heart failure. Chronic systolic [I50.22] fits rather than diastolic [I50.32];"
       " so systolic [I50.22] rather than diastolic [I50.32] here.")
MESSAGES = json.dumps([{"role": "user", "content": f"Code the note.\n\nDocument:\n{NOTE}\n\nCandidate labels:\n"
                                                  "- Chronic systolic heart failure [I50.22]\n"
                                                  "- Chronic diastolic heart failure [I50.32]"}])
TAU, TEMPERATURE = 0.0, 2.0


def _spans(sub: str) -> list[list[int]]:
    out, start = [], 0
    while (i := COT.find(sub, start)) >= 0:
        out.append([i, i + len(sub)])
        start = i + 1
    return out


ANCHORS_ROW = {
    "early_span": [0, 20],
    "refine_spans": [[COT.index("Chronic"), COT.index(";")], [COT.index(" so") + 1, len(COT) - 1]],
    "shortlist_spans": _spans("[I50.22]"),
    "nearmiss_spans": _spans("[I50.32]"),
}


def pools(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    table = pd.DataFrame({"layer": [layer for layer in range(2) for _ in range(4)], "head": list(range(4)) * 2,
                          "score": torch.rand(8, generator=g).tolist()})
    return {"phase1": select_pool(table, 2, 3, 0.5, (0.0, 0.5)), "phase2": select_pool(table, 2, 3, 0.5, (0.5, 1.0))}


def example(tok):
    return make_example(tok, "d0", MESSAGES, COT, ANCHORS_ROW, ["heart failure", "systolic"],
                        ["Systolic heart failure"], ["Diastolic heart failure"])


@pytest.fixture(scope="module")
def teacher(byte_tok):
    return tiny_llama(len(byte_tok), seed=0)


@pytest.fixture(scope="module")
def ex(byte_tok):
    out = example(byte_tok)
    assert has_phase(out, "phase1") and has_phase(out, "phase2")
    assert len(out.refine) == 2 and out.refine_span == [0, 1]
    return out


def test_example_positions(byte_tok, ex):
    text = byte_tok.decode(ex.input_ids)
    assert text.endswith(COT)
    assert text[ex.offsets[ex.cot_start][0]:].startswith(COT[:5])
    assert [ex.offsets[q + 1][0] - ex.offsets[ex.cot_start][0] for q in ex.early_queries] == list(range(20))
    assert len(ex.cot_positions) == len(ex.input_ids) - ex.cot_start


def test_the_loss_covers_the_answer_block(byte_tok, ex):
    """The student is taught the teacher's whole output: CoT, then the answer block and the end of turn; the phase
    positions (spans into the CoT) are those of the CoT alone."""
    from mechdistill.distill.signals import make_examples
    from mechdistill.io import SplitArtifacts
    from tests.helpers import icd_subtree

    answer = "<answer>I50.22</answer>"
    split = SplitArtifacts(
        docs=pd.DataFrame({"doc_id": ["d0"], "labels": [["I50.22"]]}).set_index("doc_id"),
        prompts=pd.DataFrame({"doc_id": ["d0"], "messages": [MESSAGES]}).set_index("doc_id"),
        cot=pd.DataFrame({"doc_id": ["d0"], "cot": [COT], "raw": [COT + "\n" + answer + "\n"]}).set_index("doc_id"),
        anchors=pd.DataFrame([{"doc_id": "d0", **ANCHORS_ROW, "anchors": ["heart failure", "systolic"],
                               "near_misses": ["I50.32"]}]),
        space=icd_subtree("I50"))
    (full,) = make_examples(byte_tok, split)
    assert full.text.endswith(COT + "\n" + answer + "<|im_end|>")
    predicted = byte_tok.decode(full.input_ids[[p + 1 for p in full.cot_positions]])  # what the CE/KL positions predict
    assert predicted == COT + "\n" + answer + "<|im_end|>"  # and then the end of turn: the student learns to stop
    for field in ("cot_start", "early_queries", "refine", "keys", "n_shortlist"):
        assert getattr(full, field) == getattr(ex, field), field
    no_answer = split.cot.assign(raw=COT)  # a trace cut before any answer block: the CoT alone
    (cot_only,) = make_examples(byte_tok, SplitArtifacts(split.docs, split.prompts, no_answer, split.anchors,
                                                         split.space))
    assert cot_only.text.endswith(COT) and len(cot_only.input_ids) == len(ex.input_ids)


def test_identical_student_has_zero_distillation_terms(teacher, byte_tok, ex):
    targets = teacher_targets(teacher, ex, pools(0), TAU, top_k=8)
    student = copy.deepcopy(teacher)
    out = student_loss(student, ex, targets, pools(0), METHODS["mech"], TAU, TEMPERATURE)
    for term in ("cot.kl", "phase1.attn", "phase1.write", "phase1.interaction", "phase2.qk", "phase2.ov",
                 "phase2.interaction"):
        assert abs(float(out[term])) < 1e-6, term
    assert float(out["cot.ce"]) > 0
    with torch.no_grad():
        for p in student.model.layers.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = student_loss(student, ex, targets, pools(0), METHODS["mech"], TAU, TEMPERATURE)
    for term in ("cot.kl", "phase1.attn", "phase1.write", "phase1.interaction", "phase2.qk", "phase2.ov"):
        assert float(out[term]) > 1e-8, term


def test_precomputed_targets_give_the_online_loss(teacher, ex, tmp_path):
    from safetensors.torch import load_file, save_file

    student = tiny_llama(teacher.config.vocab_size, seed=1)
    online = teacher_targets(teacher, ex, pools(0), TAU, top_k=8)
    save_file({k: v.contiguous() for k, v in online.items()}, str(tmp_path / "t.safetensors"))
    loaded = load_file(str(tmp_path / "t.safetensors"))
    a = student_loss(student, ex, online, pools(1), METHODS["mech"], TAU, TEMPERATURE)
    b = student_loss(student, ex, loaded, pools(1), METHODS["mech"], TAU, TEMPERATURE)
    assert torch.equal(a["loss"], b["loss"])


def test_gradients_only_into_the_student(teacher, ex):
    student = tiny_llama(teacher.config.vocab_size, seed=2).train()
    targets = teacher_targets(teacher, ex, pools(0), TAU, top_k=8)
    student_loss(student, ex, targets, pools(1), METHODS["mech"], TAU, TEMPERATURE)["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_vanilla_switches_phase_terms_off(teacher, ex):
    student = tiny_llama(teacher.config.vocab_size, seed=3)
    targets = teacher_targets(teacher, ex, pools(0), TAU, top_k=8)
    vanilla = student_loss(student, ex, targets, pools(1), METHODS["vanilla"], TAU, TEMPERATURE)
    torch.testing.assert_close(vanilla["loss"], vanilla["cot.ce"] + vanilla["cot.kl"])
    mech = student_loss(student, ex, targets, pools(1), METHODS["mech"], TAU, TEMPERATURE)
    assert float(mech["loss"].detach()) > float(vanilla["loss"].detach())
    assert resolve_method("mine", {"base": "mech", "switches": {"phase2": False}}).switches == {"phase2": False}
    with pytest.raises(ConfigError, match="unknown method"):
        resolve_method("unknown", {})


def test_mech_losses_decrease_over_20_steps(teacher, ex, tmp_path):
    from mechdistill.distill.train_config import TrainConfig
    from mechdistill.distill.trainer import train

    student = tiny_llama(teacher.config.vocab_size, seed=4)
    targets = teacher_targets(teacher, ex, pools(0), TAU, top_k=8)
    result = train(student, lambda m, b: student_loss(m, ex, targets, pools(1), METHODS["mech"], TAU, TEMPERATURE),
                   lambda epoch: [0], TrainConfig(lr=3e-3, max_steps=20, seed=0, device="cpu", log_every=1),
                   tmp_path / "model")
    log = result.log[result.log["split"] == "train"]
    phase = log[["phase1.attn", "phase1.write", "phase2.qk", "phase2.ov"]].sum(axis=1)
    assert log["loss"].iloc[-1] < 0.8 * log["loss"].iloc[0]
    assert phase.iloc[-5:].mean() < phase.iloc[:5].mean()


@pytest.fixture(scope="module")
def bpe_tok():
    """A second tokenizer (BPE with merges, another vocabulary), trained in code."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator([NOTE + COT] * 20, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=core)


def test_cross_tokenizer_student(teacher, ex, bpe_tok):
    """A student with another tokenizer: CE on its tokens, ULD instead of KL, Phase-1 rows over the
    teacher's token spans at character-aligned queries, Phase 2 paired by refinement span."""
    student_ex = example(bpe_tok)
    assert len(student_ex.input_ids) < len(ex.input_ids)  # merges: fewer tokens than bytes
    student = tiny_llama(len(bpe_tok), seed=5).train()
    targets = teacher_targets(teacher, ex, pools(0), TAU, top_k=8)
    out = student_loss(student, student_ex, targets, pools(1), METHODS["mech"], TAU, TEMPERATURE)
    for term in ("cot.kl", "phase1.attn", "phase1.write", "phase2.qk"):
        assert torch.isfinite(out[term]) and float(out[term]) > 0, term
    out["loss"].backward()
    assert student.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_auto_pool_temperature_is_score_std():
    table = pd.DataFrame({"layer": [0, 0, 0, 1], "head": [0, 1, 2, 0], "score": [80.0, 60.0, 40.0, 90.0]})
    pool = select_pool(table, n_layers=2, k=3, temperature="auto", layer_range=(0.0, 0.5))
    scores = torch.tensor([80.0, 60.0, 40.0])
    assert pool.heads == [(0, 0), (0, 1), (0, 2)]
    torch.testing.assert_close(pool.weights, torch.softmax(scores / scores.std(), 0))
    assert float(select_pool(table, 2, 3, 1.0, (0.0, 0.5)).weights[0]) > 0.999  # T = 1 on raw scores: one head


def test_method_kinds():
    from mechdistill.distill.methods import Method, method_kinds

    kinds = method_kinds({"vanilla": {}, "mech": {}, "phase1_only": {}, "no_p2_ov": {},
                          "mech_strong": {"base": "mech"}, "mine": {"base": "mech", "kind": "ablation"}})
    assert kinds == {"vanilla": "baseline", "mech": "ours", "phase1_only": "ablation", "no_p2_ov": "ablation",
                     "mech_strong": "ours", "mine": "ablation"}
    assert resolve_method("mine", {"base": "vanilla", "kind": "ours"}).switches == METHODS["vanilla"].switches
    with pytest.raises(ValueError, match="kind must be one of"):
        Method("x", kind="teacher")


def _sharp_attention(vocab: int, seed: int, factor: float = 30.0):
    """A tiny LLaMA whose q and k projections are scaled up: peaked attention rows, as in trained models
    (the random init attends almost uniformly, so every kurtosis would be ~ -3)."""
    model = tiny_llama(vocab, seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(factor)
            layer.self_attn.k_proj.weight.mul_(factor)
    return model


@pytest.mark.parametrize("keys", ["all", "document"])
@pytest.mark.parametrize("kind", ["kurtosis", "normalized"])
def test_phase1_sharpness_is_the_chosen_variant_of_the_pooled_row(byte_tok, ex, keys, kind):
    """p1.sharpness against eager attention: the pool's weighted row, moments over the chosen keys only."""
    from mechdistill.characterize.scores import CoarseVariant
    from mechdistill.distill.signals import forward_signals

    model = _sharp_attention(len(byte_tok), seed=0)
    assert ex.document_positions and max(ex.document_positions) < ex.cot_start
    model.set_attn_implementation("eager")
    with torch.no_grad():
        _, signals = forward_signals(model, ex, pools(0), TAU, coarse=CoarseVariant(keys, kind))
        attn = model(ex.input_ids[None], output_attentions=True).attentions
    pool = pools(0)["phase1"]
    for i, q in enumerate(ex.early_queries):
        row = sum(w * attn[layer][0, h, q, : q + 1].double() for (layer, h), w in zip(pool.heads, pool.weights.tolist()))
        p = row[ex.document_positions] if keys == "document" else row
        dev = p - p.mean()
        m2, m4, n = float((dev**2).mean()), float((dev**4).mean()), len(p)
        expected = m4 / (m2 + 1e-6) ** 2 - 3 if kind == "kurtosis" else m4 / (n * (m2 + 1e-6 / n) ** 2)
        assert float(signals["phase1"]["sharpness"][0, i]) == pytest.approx(expected, rel=2e-3, abs=1e-5)


def test_interaction_terms_in_units_of_the_teacher_scale(byte_tok, ex):
    """Peaked attention: the raw Phase-1 interaction under raw kurtosis is ~100x the CE (the demo's
    6000 vs 14) and ~1/1000 of it under normalized kurtosis; divided by the teacher's RMS of
    kappa*Align (resp. QK*OV) both are O(1), like the other terms."""
    from mechdistill.characterize.scores import CoarseVariant
    from mechdistill.distill.targets import interaction_scales

    teacher, student = _sharp_attention(len(byte_tok), seed=0), _sharp_attention(len(byte_tok), seed=4)
    for variant in (CoarseVariant("all", "kurtosis"), CoarseVariant("document", "normalized")):
        targets = teacher_targets(teacher, ex, pools(0), TAU, top_k=8, coarse=variant)
        scales = interaction_scales([targets])
        for phase, (a, b) in {"phase1": ("p1.sharpness", "p1.align"), "phase2": ("p2.loopback", "p2.helpfulness")}.items():
            mask = targets[f"{a[:2]}.mask"].numpy()
            values = (targets[a].double().numpy() * targets[b].double().numpy())[mask]
            assert scales[phase] == pytest.approx(float(np.sqrt(np.mean(values**2))), rel=1e-9)
        raw = student_loss(student, ex, targets, pools(1), METHODS["mech"], TAU, TEMPERATURE, coarse=variant)
        scaled = student_loss(student, ex, targets, pools(1), METHODS["mech"], TAU, TEMPERATURE, coarse=variant,
                              scales=scales)
        for phase in ("phase1", "phase2"):
            term = f"{phase}.interaction"
            assert float(scaled[term]) == pytest.approx(float(raw[term]) / scales[phase] ** 2, rel=1e-4)
            assert 0.01 * float(scaled["cot.ce"]) < float(scaled[term]) < 10 * float(scaled["cot.ce"]), (variant, term)
        assert float(scaled["phase1.write"]) == float(raw["phase1.write"])          # only the interactions change
        ratio = float(raw["phase1.interaction"]) / float(raw["cot.ce"])
        assert ratio > 10 if variant.sharpness == "kurtosis" else ratio < 0.01


def test_a_pool_band_with_no_layer_of_the_model_gives_no_pool_instead_of_a_crash(caplog):
    """A 1-layer student whose RefineScores are finite (its traces have refinement sentences): the default
    Phase 2 band [0.33, 1.0) holds none of its layers. Before, building its pools raised for every method,
    vanilla included; now that phase has no pool (its metrics unmeasured), with a warning."""
    from mechdistill.distill.pools import head_pools

    table = pd.DataFrame({"layer": [0, 0], "head": [0, 1], "score": [0.5, 0.2]})
    settings = {"phase1": {"k": 4, "temperature": 1.0, "layers": [0.0, 0.5]},
                "phase2": {"k": 4, "temperature": 1.0, "layers": [0.33, 1.0]}}
    with caplog.at_level("WARNING"):
        pools = head_pools(settings, 1, table, table, source="student heads")
    assert list(pools) == ["phase1"] and pools["phase1"].heads == [(0, 0), (0, 1)]
    assert "distill.pools.phase2.layers [0.33, 1.0] holds no layer of this 1-layer model" in caplog.text
    with pytest.raises(ValueError, match="no head with a finite score"):  # select_pool itself still says why
        select_pool(table, 1, 4, 1.0, (0.33, 1.0))


def _difflib_char_map(source: str, target: str) -> list[int]:
    """The reference: one character-level difflib over the whole texts (quadratic)."""
    import difflib
    out = [-1] * len(source)
    for block in difflib.SequenceMatcher(a=source, b=target, autojunk=False).get_matching_blocks():
        for i in range(block.size):
            out[block.a + i] = block.b + i
    return out


def _two_templates(n_lines: int) -> tuple[str, str]:
    """One prompt + CoT rendered as ChatML (SmolLM2, Qwen) and as Llama 3: same content, other markup;
    repeated lines (blank lines, one candidate twice) included."""
    rng = np.random.default_rng(0)
    words = ["fever", "cough", "type", "2", "diabetes", "mellitus", "with", "hyperglycemia", "[E11.65]", "."]
    note = "\n".join(" ".join(rng.choice(words, 12)) for _ in range(n_lines)) + "\n\n- Asthma [J45]\n- Asthma [J45]"
    cot = "The note is about endocrine disease.\nE11.65 fits.\n<answer>E11.65</answer>"
    system = "You are an expert annotator."
    chatml = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{note}<|im_end|>\n"
              f"<|im_start|>assistant\n{cot}<|im_end|>")
    llama = (f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n"
             f"Today Date: 26 Jul 2024\n\n{system}<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{note}<|eot_id|>"
             f"<|start_header_id|>assistant<|end_header_id|>\n\n{cot}<|eot_id|>")
    return chatml, llama


@pytest.mark.parametrize("n_lines", [3, 40])
def test_char_map_aligns_two_chat_templates_as_one_difflib_does(n_lines):
    from mechdistill.distill.objective import char_map
    student, teacher = _two_templates(n_lines)
    mapped, reference = list(char_map(student, teacher)), _difflib_char_map(student, teacher)
    # as many characters aligned as one difflib over all characters aligns, and the same index for every
    # character of the content (only which of Llama's two header newlines a ChatML newline takes may differ)
    assert sum(j >= 0 for j in mapped) == sum(j >= 0 for j in reference)
    content = [i for i, ch in enumerate(student) if i > student.index("<|im_start|>user\n") + 17 and ch != "\n"]
    assert [mapped[i] for i in content] == [reference[i] for i in content]
    # every content character maps onto the same character; markup of one template maps nowhere it is absent
    assert all(teacher[j] == student[i] for i, j in enumerate(mapped) if j >= 0)
    start = student.index("The note is about")
    assert mapped[start] == teacher.index("The note is about")


def _render(messages: list[dict], cot: str, template: str) -> str:
    """A conversation + the assistant's CoT as ChatML (SmolLM2, Qwen) or Llama 3 render it."""
    if template == "chatml":
        turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return f"{turns}<|im_start|>assistant\n{cot}<|im_end|>"
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in messages)
    return f"<|begin_of_text|>{turns}<|start_header_id|>assistant<|end_header_id|>\n\n{cot}<|eot_id|>"


def test_char_map_aligns_20_demo_traces_as_one_difflib_does():
    """Real demo traces (tests/fixtures/demo_traces: one-shot prompts, notes, CoTs) rendered in two chat templates:
    every character of every message and of the CoT maps where one difflib over all characters maps it."""
    import json

    from mechdistill.distill.objective import char_map
    traces = pd.read_parquet(Path(__file__).parents[1] / "fixtures" / "demo_traces" / "traces.parquet")
    assert len(traces) == 20
    for row in traces.itertuples():
        messages = json.loads(row.messages)
        student, teacher = _render(messages, row.cot, "chatml"), _render(messages, row.cot, "llama3")
        mapped, reference = list(char_map(student, teacher)), _difflib_char_map(student, teacher)
        assert sum(j >= 0 for j in mapped) == sum(j >= 0 for j in reference), row.doc_id
        content, start = [], 0
        for text in [m["content"] for m in messages] + [row.cot]:  # the texts both templates hold
            at = student.index(text, start)
            content += [i for i in range(at, at + len(text)) if student[i] != "\n"]
            start = at + len(text)
        assert [mapped[i] for i in content] == [reference[i] for i in content], row.doc_id
        assert all(teacher[j] == student[i] for i, j in enumerate(mapped) if j >= 0)


def test_char_map_time_grows_linearly_from_1k_to_30k_characters():
    """char_map's time per character stays flat from ~1k to ~30k characters (a quadratic map's would grow
    30-fold); the best of 3 runs per length, each on a text it has not cached."""
    import time

    from mechdistill.distill.objective import char_map
    per_char = {}
    for n_lines in (12, 60, 375):                          # ~1.2k, ~5k, ~30k characters
        student, teacher = _two_templates(n_lines)
        best = float("inf")
        for attempt in range(3):
            started = time.perf_counter()
            char_map(student + " " * (attempt + 1), teacher)
            best = min(best, time.perf_counter() - started)
        per_char[len(student)] = best / len(student)
    lengths = sorted(per_char)
    assert lengths[0] < 1_500 and lengths[-1] > 29_000, lengths
    print({n: f"{t * 1e6:.2f} us/char" for n, t in per_char.items()})
    assert per_char[lengths[-1]] < 4 * per_char[lengths[0]], per_char


def test_char_map_is_fast_on_a_long_document():
    import time

    from mechdistill.distill.objective import char_map
    student, teacher = _two_templates(200)                # ~17k characters, the size that took 0.75 s
    assert len(student) > 11_700
    started = time.perf_counter()
    mapped = char_map(student + " ", teacher)             # not cached
    assert time.perf_counter() - started < 0.2
    assert mapped[student.index("<answer>")] == teacher.index("<answer>")


def test_split_examples_build_make_examples_documents_when_read(byte_tok):
    """`SplitExamples` (each Example built when read, a few kept) gives the documents, order and Examples of
    `make_examples`, with the same skips (empty CoT, over max_tokens); offsets are a [seq, 2] int32 array."""
    from mechdistill.distill.signals import SplitExamples, chain, make_examples
    from mechdistill.io import SplitArtifacts
    from tests.helpers import icd_subtree

    ids = ["d0", "empty", "d1", "long", "d2"]
    cots = {"d0": COT, "empty": " ", "d1": COT[:-20], "long": COT * 4, "d2": COT[10:]}
    split = SplitArtifacts(
        docs=pd.DataFrame({"doc_id": ids, "labels": [["I50.22"]] * 5}).set_index("doc_id"),
        prompts=pd.DataFrame({"doc_id": ids, "messages": [MESSAGES] * 5}).set_index("doc_id"),
        cot=pd.DataFrame({"doc_id": ids, "cot": [cots[d] for d in ids]}).set_index("doc_id"),
        anchors=pd.DataFrame([{**ANCHORS_ROW, "doc_id": d, "anchors": ["heart failure"], "near_misses": ["I50.32"]}
                              for d in ids]),
        space=icd_subtree("I50"))
    cap = len(make_examples(byte_tok, split)[0].input_ids) + 5
    eager = make_examples(byte_tok, split, max_tokens=cap)
    lazy = SplitExamples(byte_tok, split, max_tokens=cap, cache_size=2)
    assert [e.doc_id for e in eager] == lazy.doc_ids == ["d0", "d1", "d2"]  # "empty": no CoT; "long": over the cap
    assert [e.n_tokens for e in lazy.info] == [len(e.input_ids) for e in eager]
    for a, b in zip(eager, lazy):
        assert isinstance(b.offsets, np.ndarray) and b.offsets.dtype == np.int32 and b.offsets.shape == (len(b.input_ids), 2)
        for field in ("doc_id", "text", "cot_start", "early_queries", "refine", "keys", "anchor_token_ids"):
            assert getattr(a, field) == getattr(b, field), field
        assert torch.equal(a.input_ids, b.input_ids) and np.array_equal(a.offsets, b.offsets)
    assert lazy[1] is lazy.by_doc_id("d1") and len(lazy.cache) <= 2
    assert [e.doc_id for e in chain(lazy, eager)[2:4]] == ["d2", "d0"]
