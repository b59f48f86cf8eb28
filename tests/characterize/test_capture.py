"""Per-head capture (mechdistill.characterize.capture) against transformers' eager reference, on tiny GQA models."""

from __future__ import annotations

import pytest
import torch

from mechdistill.characterize.attention import attention_modules, head_out_proj, position_ids_from_mask
from mechdistill.characterize.capture import capture_heads, capture_nbytes
from tests.helpers import VOCAB, WINDOW, tiny_gemma2, tiny_model

ARCHS = ["llama", "qwen2", "qwen3", "gemma3"]
SEQ = 24


@pytest.fixture(scope="module", params=ARCHS)
def arch_model(request):
    return request.param, tiny_model(request.param)


def _ids(batch: int = 1, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, seq), generator=g)


QPOS = torch.tensor([[2, 9, 17, 23]])
KPOS = torch.tensor([[0, 4, 9, 20]])


def _eager_attentions(model, ids, **kw):
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(ids, output_attentions=True, **kw).attentions
    finally:
        model.set_attn_implementation("sdpa")


def test_rows_match_eager_and_logits_unchanged(arch_model):
    arch, model = arch_model
    ids = _ids()
    with torch.no_grad():
        plain = model(ids).logits
        out, cap = capture_heads(model, ids, query_positions=QPOS, key_positions=KPOS)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert torch.equal(out.logits, plain)
    ref = _eager_attentions(model, ids)
    n_layers = len(attention_modules(model))
    assert sorted(cap.rows) == list(range(n_layers))
    for layer in range(n_layers):
        rows = cap.rows[layer]  # [1, H, nq, seq]
        assert rows.shape == (1, 4, QPOS.shape[1], SEQ)
        torch.testing.assert_close(rows, ref[layer][:, :, QPOS[0]].float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(rows.sum(-1), torch.ones(1, 4, QPOS.shape[1]))
    if arch == "gemma3":  # sliding layer: query 23 sees only keys 16..23
        assert cap.rows[0][0, :, -1, : 23 - WINDOW + 1].abs().max() == 0
        assert cap.rows[1][0, :, -1, : 23 - WINDOW + 1].abs().max() > 0  # full layer does not


def test_writes_sum_to_o_proj_output(arch_model):
    _, model = arch_model
    ids = _ids()
    outs: dict[int, torch.Tensor] = {}
    mods = attention_modules(model)
    handles = [m.o_proj.register_forward_hook(lambda mod, a, o, i=i: outs.__setitem__(i, o))
               for i, m in enumerate(mods)]
    try:
        with torch.no_grad():
            _, cap = capture_heads(model, ids, query_positions=QPOS, what=("writes",))
    finally:
        for h in handles:
            h.remove()
    assert not cap.rows and not cap.queries
    for i, m in enumerate(mods):
        w = cap.writes[i]  # [1, nq, H, D]
        assert w.shape == (1, QPOS.shape[1], 4, model.config.hidden_size)
        total = w.sum(2) + (m.o_proj.bias if m.o_proj.bias is not None else 0)
        torch.testing.assert_close(total, outs[i][:, QPOS[0]], atol=1e-5, rtol=1e-5)


def test_queries_keys_reproduce_rows(arch_model):
    arch, model = arch_model
    ids = _ids()
    all_keys = torch.arange(SEQ)[None]
    with torch.no_grad():
        _, cap = capture_heads(model, ids, query_positions=QPOS, key_positions=all_keys,
                               what=("rows", "qk", "values", "value_writes"))
    for layer, m in enumerate(attention_modules(model)):
        q, k = cap.queries[layer], cap.keys[layer]  # [1, H, nq, d], [1, H, seq, d]
        logits = q @ k.transpose(-1, -2) * cap.scaling[layer]
        qi, ki = QPOS[0][:, None], torch.arange(SEQ)[None]
        allowed = ki <= qi
        if getattr(m, "sliding_window", None):
            allowed &= qi - ki < m.sliding_window
        rows = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)
        torch.testing.assert_close(rows, cap.rows[layer], atol=1e-5, rtol=1e-4)
        # GQA: query heads 0,1 share kv head 0; 2,3 share kv head 1
        assert torch.equal(k[:, 0], k[:, 1]) and torch.equal(k[:, 2], k[:, 3])
        assert not torch.equal(k[:, 0], k[:, 2])
        # value writes v_j W_O^h, and A V W_O reproduces the head writes' ingredients
        vw = torch.einsum("bhkd,hdm->bhkm", cap.values[layer], head_out_proj(m))
        torch.testing.assert_close(cap.value_writes[layer], vw)


def test_writes_equal_rows_times_value_writes():
    model = tiny_model("qwen3")
    ids = _ids()
    all_keys = torch.arange(SEQ)[None]
    with torch.no_grad():
        _, cap = capture_heads(model, ids, query_positions=QPOS, key_positions=all_keys,
                               what=("rows", "writes", "value_writes"))
    for layer in cap.writes:
        delta = torch.einsum("bhqk,bhkm->bqhm", cap.rows[layer], cap.value_writes[layer])
        torch.testing.assert_close(delta, cap.writes[layer], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_matches_single_examples(arch_model, side):
    _, model = arch_model
    lens = [SEQ, SEQ - 7]
    seqs = [_ids(seq=n, seed=10 + i)[0] for i, n in enumerate(lens)]
    qloc = [torch.tensor([1, 5, n - 1]) for n in lens]  # positions within each example
    kloc = [torch.tensor([0, 3, n - 2]) for n in lens]
    ids = torch.zeros(2, SEQ, dtype=torch.long)
    mask = torch.zeros(2, SEQ, dtype=torch.long)
    offs = []
    for i, (s, n) in enumerate(zip(seqs, lens)):
        off = SEQ - n if side == "left" else 0
        ids[i, off:off + n], mask[i, off:off + n] = s, 1
        offs.append(off)
    qpos = torch.stack([q + o for q, o in zip(qloc, offs)])
    kpos = torch.stack([k + o for k, o in zip(kloc, offs)])
    with torch.no_grad():
        _, batched = capture_heads(model, ids, mask, query_positions=qpos, key_positions=kpos)
        for i, (s, n, off) in enumerate(zip(seqs, lens, offs)):
            _, alone = capture_heads(model, s[None], query_positions=qloc[i], key_positions=kloc[i])
            for layer in alone.rows:
                b_rows = batched.rows[layer][i:i + 1, :, :, off:off + n]
                torch.testing.assert_close(b_rows, alone.rows[layer], atol=1e-5, rtol=1e-4)
                assert batched.rows[layer][i].sum(-1).sub(1).abs().max() < 1e-5  # padding gets 0
                for name in ("queries", "keys", "values", "writes"):
                    torch.testing.assert_close(getattr(batched, name)[layer][i:i + 1],
                                               getattr(alone, name)[layer], atol=1e-5, rtol=1e-4)


def test_eager_base_and_layer_subset():
    model = tiny_model("gemma3", attn="eager")
    ids = _ids()
    with torch.no_grad():
        plain = model(ids, output_attentions=True)
        out, cap = capture_heads(model, ids, query_positions=QPOS, layers=[1, 2], what=("rows",))
    assert model.config._attn_implementation == "eager"
    assert torch.equal(out.logits, plain.logits)
    assert sorted(cap.rows) == [1, 2]
    for layer in (1, 2):
        torch.testing.assert_close(cap.rows[layer], plain.attentions[layer][:, :, QPOS[0]], atol=1e-6, rtol=1e-5)


def test_soft_capped_rows_match_eager_gemma2():
    """Gemma 2 soft-caps its attention logits: the captured rows are eager's capped probabilities (the
    attention the model computes under eager, which `models.load_model` picks for it)."""
    model = tiny_gemma2(attn="eager")
    ids = _ids()
    with torch.no_grad():
        plain = model(ids, output_attentions=True)
        out, cap = capture_heads(model, ids, query_positions=QPOS, what=("rows", "writes"))
        sdpa = tiny_gemma2(attn="sdpa")(ids).logits
    assert torch.equal(out.logits, plain.logits)
    assert not torch.allclose(sdpa, plain.logits, atol=1e-3)  # SDPA drops the cap: another model
    for layer in range(2):
        torch.testing.assert_close(cap.rows[layer], plain.attentions[layer][:, :, QPOS[0]], atol=1e-6, rtol=1e-5)
        rows = cap.rows[layer][0]  # [H, nq, seq]: capped logits lie in (-2, 2): no weight ratio above e^4
        ratio = (rows.amax(-1) / rows.masked_fill(rows == 0, 1).amin(-1)).max()
        assert torch.e ** 3 < ratio <= torch.e ** 4 * (1 + 1e-4)  # the cap is reached, never passed


def test_gradients_flow_and_restore_on_error():
    model = tiny_model("llama")
    ids = _ids()
    _, cap = capture_heads(model, ids, query_positions=QPOS, key_positions=KPOS)
    loss = cap.rows[1].pow(2).sum() + cap.writes[0].sum() + cap.keys[1].sum()
    loss.backward()
    attn = attention_modules(model)
    assert attn[1].q_proj.weight.grad is not None and attn[1].q_proj.weight.grad.abs().sum() > 0
    assert attn[0].o_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="positions"):
        capture_heads(model, ids, query_positions=[SEQ + 5])
    hook = attention_modules(model)[0].register_forward_hook(lambda *a: 1 / 0)
    try:
        with pytest.raises(ZeroDivisionError):
            capture_heads(model, ids, query_positions=QPOS)
    finally:
        hook.remove()
    assert model.config._attn_implementation == "sdpa"
    assert not any(m.o_proj._forward_pre_hooks for m in attn)
    assert not any(hasattr(m, "_mechdistill_capture") for m in attn)


def test_nbytes_formula_and_position_ids():
    model = tiny_model("qwen2")
    ids = _ids(batch=2)
    with torch.no_grad():
        _, cap = capture_heads(model, ids, query_positions=QPOS[0], key_positions=KPOS[0],
                               what=("rows", "qk", "values", "writes", "value_writes", "z"))
    c = model.config
    est = capture_nbytes(n_layers=3, n_heads=4, head_dim=c.hidden_size // 4, d_model=c.hidden_size, seq=SEQ,
                         n_query=4, n_key=4, batch=2, bytes_per=4,
                         what=("rows", "qk", "values", "writes", "value_writes", "z"))
    assert est["total_held"] == cap.nbytes()
    m1 = attention_modules(model)[1]
    torch.testing.assert_close(torch.einsum("bqhd,hdm->bqhm", cap.z[1], head_out_proj(m1)), cap.writes[1])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert position_ids_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 2, 2]]
