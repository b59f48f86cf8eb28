"""Documents in flight in threads on one model (inflight.in_flight) capture exactly what they capture alone:
hooks dispatch by thread, and the attention implementation switch is shared and reference-counted.

The forwards are made to overlap, not by luck (`tests.helpers.lockstep`): a plain forward pre-hook on
every decoder layer (it fires for every thread) waits at a two-party barrier, so the two documents run
their layers in lockstep.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from mechdistill.characterize.attention import _PREFIX, attention_hooks, attention_modules, final_norm
from mechdistill.characterize.capture import ALL_WHAT, capture_heads, final_residual
from mechdistill.inflight import in_flight
from tests.helpers import VOCAB, lockstep, tiny_model

# Two documents of different lengths, with their own query and key positions.
DOCS = [
    (torch.randint(0, VOCAB, (1, 19), generator=torch.Generator().manual_seed(3)), [[4, 11, 18]], [[0, 5, 9]]),
    (torch.randint(0, VOCAB, (1, 31), generator=torch.Generator().manual_seed(4)), [[7, 20, 30]], [[2, 13, 25]]),
]


def _capture(model: nn.Module, doc) -> tuple[torch.Tensor, dict, torch.Tensor]:
    ids, qpos, kpos = doc
    with torch.no_grad(), final_residual(model) as residual:
        out, cap = capture_heads(model, ids, query_positions=qpos, key_positions=kpos, what=ALL_WHAT)
    fields = {name: getattr(cap, name) for name in ("rows", "queries", "keys", "values", "writes",
                                                    "value_writes", "z")}
    return out.logits, fields, residual.h


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_documents_in_flight_capture_what_they_capture_alone(arch):
    model = tiny_model(arch)
    sequential = [_capture(model, doc) for doc in DOCS]
    with lockstep(model):
        concurrent = list(in_flight(lambda doc: _capture(model, doc), DOCS, workers=2))
    n_layers = len(attention_modules(model))
    for (logits, fields, h), (logits_c, fields_c, h_c) in zip(sequential, concurrent):
        assert torch.equal(logits_c, logits)
        assert torch.equal(h_c, h)
        for name, per_layer in fields.items():
            assert sorted(fields_c[name]) == list(range(n_layers)), name
            for layer, tensor in per_layer.items():
                assert torch.equal(fields_c[name][layer], tensor), (name, layer)
    assert model.config._attn_implementation == "sdpa"  # restored by the last one out
    assert not any(m.o_proj._forward_pre_hooks for m in attention_modules(model))
    assert not final_norm(model)._forward_pre_hooks


def test_hooks_fire_for_their_own_thread_and_the_switch_outlives_the_first_exit():
    model = tiny_model("llama")
    ids = DOCS[0][0]
    calls: dict[str, list[int]] = {"a": [], "b": []}
    a_inside, b_inside, a_left, b_ran = (threading.Event() for _ in range(4))

    def thread_a() -> None:
        with attention_hooks(model, {0: lambda call: calls["a"].append(call.query.shape[2])}):
            a_inside.set()
            assert b_inside.wait(30)
        a_left.set()

    def thread_b() -> None:
        assert a_inside.wait(30)
        with attention_hooks(model, {0: lambda call: calls["b"].append(call.query.shape[2])}):
            b_inside.set()
            assert a_left.wait(30)
            assert model.config._attn_implementation == _PREFIX + "sdpa"  # a left, b still hooked
            with torch.no_grad():
                model(ids)
        b_ran.set()

    threads = [threading.Thread(target=thread_a), threading.Thread(target=thread_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert b_ran.is_set()
    assert calls == {"a": [], "b": [ids.shape[1]]}  # a's hook never saw b's forward
    assert model.config._attn_implementation == "sdpa"
    with torch.no_grad():  # a forward in a thread without hooks, while another thread holds some
        with attention_hooks(model, {0: lambda call: calls["a"].append(-1)}):
            worker = threading.Thread(target=lambda: model(ids))
            worker.start()
            worker.join(60)
    assert calls["a"] == []
