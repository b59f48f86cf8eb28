"""Patched generation (mechdistill.patching.runs, patterns.PatternTape/PatternPatch) on tiny random models."""

from __future__ import annotations

import pytest
import torch

from mechdistill.characterize.attention import attention_hooks, attention_modules
from mechdistill.inflight import in_flight
from mechdistill.patching.patterns import PatternPatch
from mechdistill.patching.runs import DocumentRuns, HeadSet, greedy_from, head_mask, patched_runs, prefill
from tests.helpers import VOCAB, lockstep, tiny_model

STEPS = 6
ARCHS = ["llama", "qwen2", "gemma3"]


def _ids(seed: int, seq: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (seq,), generator=torch.Generator().manual_seed(seed))


def _all_heads(model) -> list[tuple[int, int]]:
    mods = attention_modules(model)
    n_heads = mods[0].o_proj.weight.shape[1] // mods[0].head_dim
    return [(layer, h) for layer in range(len(mods)) for h in range(n_heads)]


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    return tiny_model(request.param)


def test_greedy_from_matches_plain_greedy(model):
    ids = _ids(1)
    prefix = prefill(model, ids)
    tokens = greedy_from(model, prefix, STEPS)[0]
    seq = ids.clone()
    with torch.no_grad():
        for _ in range(STEPS):  # no cache, full recompute
            seq = torch.cat([seq, model(input_ids=seq[None]).logits[0, -1].argmax()[None]])
    assert torch.equal(tokens, seq[len(ids):])
    assert torch.equal(greedy_from(model, prefix, STEPS)[0], tokens)  # the prefix cache was not modified


def test_self_patch_changes_nothing(model):
    """Patching any head set with the run's own patterns leaves tokens and logits unchanged."""
    ids = _ids(2)
    heads = _all_heads(model)
    runs = DocumentRuns(model, STEPS, heads)
    clean = runs.reference("clean", ids)
    runs.reference("corrupt", ids)  # same input: the 'other' run's patterns are the run's own
    sets = [heads[:3], heads[::2], heads]
    for direction in ("denoise", "noise"):
        patched = runs.patched(direction, sets)
        assert torch.equal(patched, clean.tokens[None].expand(len(sets), -1))
    # first step logits, patched with all heads vs unpatched
    patch = PatternPatch(clean.tape, head_mask([heads], runs.n_layers, runs.n_heads))
    last = torch.tensor([[clean.prefix.last_token]])
    import copy

    with torch.no_grad():
        plain = model(input_ids=last, past_key_values=copy.deepcopy(clean.prefix.cache)).logits
        with attention_hooks(model, patch.hooks()):
            patched_logits = model(input_ids=last, past_key_values=copy.deepcopy(clean.prefix.cache)).logits
    torch.testing.assert_close(patched_logits, plain, atol=1e-5, rtol=1e-5)


def test_tape_rows_equal_eager_attention_of_the_generated_sequence(model):
    ids = _ids(3)
    runs = DocumentRuns(model, STEPS, _all_heads(model))
    ref = runs.reference("clean", ids)
    full = torch.cat([ids, ref.tokens])
    impl = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(input_ids=full[None], output_attentions=True).attentions  # L x [1, H, seq, seq]
    finally:
        model.set_attn_implementation(impl)
    for layer, steps in ref.tape.rows.items():
        assert len(steps) == STEPS
        for t, row in enumerate(steps):  # step t is produced at query len(ids) - 1 + t
            q, kv = len(ids) - 1 + t, row.shape[-1]  # sliding-window layers cache only the last keys
            torch.testing.assert_close(row[0], att[layer][0, :, q, q + 1 - kv: q + 1].float(), atol=1e-5, rtol=1e-4)
            assert att[layer][0, :, q, : q + 1 - kv].sum() < 1e-6


def test_patched_heads_use_source_pattern_others_compute_normally(model):
    """In a patched run, z of a patched head = A_source V_run at every step; other heads = softmax(qK) V."""
    clean_ids, corrupt_ids = _ids(4), _ids(5)
    heads = _all_heads(model)
    runs = DocumentRuns(model, STEPS, heads)
    clean = runs.reference("clean", clean_ids)
    runs.reference("corrupt", corrupt_ids)
    layer = 1
    patched_heads = [(layer, 0), (layer, 2)]
    mods = attention_modules(model)
    head_dim = mods[layer].head_dim
    observed = {"z": [], "value": [], "natural": []}

    def observe(call):
        observed["value"].append(call.value)
        observed["natural"].append(call.last_rows())

    handle = mods[layer].o_proj.register_forward_pre_hook(
        lambda mod, args: observed["z"].append(args[0][:, -1].view(args[0].shape[0], -1, head_dim)))
    try:
        with attention_hooks(model, {layer: observe}):
            tokens = runs.patched("denoise", [patched_heads])
    finally:
        handle.remove()
    assert tokens.shape == (1, STEPS)
    n_rep = runs.n_heads // observed["value"][0].shape[1]
    for t in range(STEPS):
        value = observed["value"][t].repeat_interleave(n_rep, dim=1).float()  # [1, H, kv, d]
        source = clean.tape.rows[layer][t]  # [1, H, kv]
        z = observed["z"][t].float()  # [1, H, d]
        for h in range(runs.n_heads):
            pattern = source[0, h] if (layer, h) in patched_heads else observed["natural"][t][0, h]
            torch.testing.assert_close(z[0, h], pattern @ value[0, h], atol=1e-5, rtol=1e-4)
        # the patched heads' own q.k pattern differs from the clean one (the inputs differ)
        assert not torch.allclose(observed["natural"][t][0, 0], source[0, 0], atol=1e-4)


def test_patching_rejects_misaligned_or_unrecorded(model):
    heads = _all_heads(model)
    runs = DocumentRuns(model, STEPS, heads[:2])
    runs.reference("clean", _ids(6, seq=20))
    runs.reference("corrupt", _ids(7, seq=20))
    with pytest.raises(ValueError, match="not in the source tape"):
        runs.patched("denoise", [heads[-1:]])
    runs.reference("corrupt", _ids(7, seq=21))
    with pytest.raises(RuntimeError, match="key length"):
        runs.patched("denoise", [heads[:1]])


def test_patched_runs_records_every_set_and_direction(model):
    heads = _all_heads(model)
    runs = DocumentRuns(model, 3, heads)
    runs.reference("clean", _ids(8))
    runs.reference("corrupt", _ids(9))
    sets = [HeadSet("top", 2, 0, heads[:2]), HeadSet("most_negative", 2, 0, heads[-2:]),
            HeadSet("random", 2, 1, heads[3:5])]
    seen = []
    records = patched_runs(runs, sets, batch_size=2, on_batch=seen.append)
    assert seen == [2, 1, 2, 1]
    assert [(r["direction"], r["kind"]) for r in records] == [
        (d, k) for d in ("denoise", "noise") for k in ("top", "most_negative", "random")]
    assert all(r["tokens"].shape == (3,) for r in records)


def test_documents_in_flight_record_and_patch_what_they_do_alone(model):
    """Two documents of different lengths, reference and patched runs in two threads at once (in lockstep,
    layer by layer): tapes and tokens equal those of one document at a time. Hooks dispatch by thread;
    before, each document's tape recorded the other's calls too."""
    heads = _all_heads(model)
    head_sets = [heads[:3], heads[-2:]]
    docs = [(_ids(11, 17), _ids(12, 17)), (_ids(13, 26), _ids(14, 26))]

    def run(doc):
        clean, corrupt = doc
        runs = DocumentRuns(model, STEPS, heads)
        runs.reference("clean", clean)
        runs.reference("corrupt", corrupt)
        tapes = {name: ref.tape.rows for name, ref in runs.refs.items()}  # {layer: [[1, H, kv] per step]}
        tokens = {name: ref.tokens for name, ref in runs.refs.items()}
        return tapes, tokens, [runs.patched(direction, head_sets) for direction in ("denoise", "noise")]

    alone = [run(doc) for doc in docs]
    with lockstep(model):
        together = list(in_flight(run, docs, workers=2))
    for (tapes, tokens, patched), (tapes_t, tokens_t, patched_t) in zip(alone, together):
        for name in tapes:
            assert tapes_t[name].keys() == tapes[name].keys()
            for layer, steps in tapes[name].items():
                assert len(tapes_t[name][layer]) == len(steps) == STEPS
                assert all(torch.equal(a, b) for a, b in zip(tapes_t[name][layer], steps)), (name, layer)
            assert torch.equal(tokens_t[name], tokens[name])
        assert all(torch.equal(a, b) for a, b in zip(patched_t, patched))
