import json
import sys
import types

import pandas as pd
import pytest

from mechdistill.errors import InputError
from mechdistill.generate import TransformersBackend, generate_cot
from mechdistill.prompts import build_prompts


@pytest.fixture()
def prompts(icd_space):
    docs = pd.DataFrame({
        "doc_id": [f"d{i}" for i in range(5)],
        "text": [f"Note {i}: chronic systolic heart failure." for i in range(5)],
        "labels": [["I50.22"]] * 5,
    })
    cfg = {"strategy": "hierarchy", "size": 4, "n_near_miss": 2}
    pcfg = {"exemplar": False, "system": "S", "instruction": "Pick."}
    return build_prompts(docs, icd_space, cfg, pcfg, seed=0)


class Interrupt(Exception):
    pass


def test_resume_after_interrupted_generation(tiny_config, icd_space, prompts, tmp_path):
    reference = generate_cot(tiny_config, "tiny_llama", prompts, icd_space, tmp_path / "ref" / "test.parquet")
    assert len(reference) == 5 and reference["n_tokens"].between(1, 12).all()

    calls = []

    def flaky_factory(fail_on_call):
        backend = TransformersBackend(tiny_config, "tiny_llama", tiny_config["generation"])

        def run(chats):
            calls.append(len(chats))
            if len(calls) == fail_on_call:
                raise Interrupt("killed")
            return backend(chats)
        return run

    out = tmp_path / "run" / "test.parquet"
    with pytest.raises(Interrupt):  # killed while generating the second shard (shard_size=2)
        generate_cot(tiny_config, "tiny_llama", prompts, icd_space, out, backend_factory=lambda: flaky_factory(2))
    assert not out.exists()
    shards = list(out.parent.glob(".test.shards-*/shard-*.parquet"))
    assert [p.name for p in shards] == ["shard-00000.parquet"]

    calls.clear()
    resumed = generate_cot(tiny_config, "tiny_llama", prompts, icd_space, out, backend_factory=lambda: flaky_factory(0))
    assert calls == [2, 1]  # only the two unfinished shards (2 + 1 documents) were generated
    pd.testing.assert_frame_equal(resumed, reference)
    pd.testing.assert_frame_equal(pd.read_parquet(out), reference)
    assert not list(out.parent.glob(".test.shards-*"))  # cleaned up after success


def test_changed_settings_do_not_reuse_shards(tiny_config, icd_space, prompts, tmp_path):
    out = tmp_path / "test.parquet"
    stale = out.parent / ".test.shards-0000000000000000"
    stale.mkdir(parents=True)
    (stale / "shard-00000.parquet").write_text("from an earlier configuration")
    tiny_config["generation"]["max_new_tokens"] = 3
    df = generate_cot(tiny_config, "tiny_llama", prompts, icd_space, out)
    assert not stale.exists() and df["n_tokens"].max() <= 3


def test_file_backend(tiny_config, icd_space, prompts, tmp_path):
    traces = tmp_path / "traces.jsonl"
    rows = [{"doc_id": f"d{i}", "cot": f"Heart failure, systolic rather than diastolic {i}.", "answer": "I50.22"}
            for i in range(5)]
    traces.write_text("\n".join(json.dumps(r) for r in rows))
    tiny_config["generation"].update(backend="file", traces=str(traces))
    df = generate_cot(tiny_config, "tiny_llama", prompts, icd_space, tmp_path / "out.parquet")
    assert df["pred_labels"].map(list).tolist() == [["I50.22"]] * 5
    assert df["cot"][3] == "Heart failure, systolic rather than diastolic 3."
    assert (df["finish_reason"] == "file").all()
    # byte tokenizer: one token per byte of the trace text
    assert df["n_tokens"][0] == len(df["raw"][0].encode())


@pytest.mark.parametrize("rows, message", [
    ([{"doc_id": "d0", "cot": "ok", "answer": "I10"}], "no trace for doc_id 'd1'"),
    ([{"doc_id": f"d{i}", "cot": "" if i == 2 else "ok"} for i in range(5)], "row 2: empty chain of thought"),
    ([{"doc": "d0"}], "traces need columns doc_id"),
])
def test_file_backend_bad_traces(tiny_config, icd_space, prompts, tmp_path, rows, message):
    traces = tmp_path / "traces.jsonl"
    traces.write_text("\n".join(json.dumps(r) for r in rows))
    tiny_config["generation"].update(backend="file", traces=str(traces))
    with pytest.raises(InputError) as err:
        generate_cot(tiny_config, "tiny_llama", prompts, icd_space, tmp_path / "out.parquet")
    assert message in str(err.value) and str(traces) in str(err.value)


def test_vllm_backend_wiring(tiny_config, icd_space, prompts, tmp_path, monkeypatch):
    """vLLM itself needs a GPU; check the calls we make and how its outputs are read."""
    seen = {}

    class SamplingParams:
        def __init__(self, **kw):
            seen["sampling"] = kw

    class LLM:
        def __init__(self, **kw):
            seen["llm"] = kw

        def chat(self, chats, params, use_tqdm=False):
            seen.setdefault("chats", []).append(chats)
            out = types.SimpleNamespace(text="Heart. <answer>I50.22</answer>", token_ids=[1, 2, 3], finish_reason="stop")
            return [types.SimpleNamespace(outputs=[out]) for _ in chats]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    tiny_config["generation"].update(backend="vllm", tensor_parallel_size=8, max_model_len=4096)
    df = generate_cot(tiny_config, "tiny_llama", prompts, icd_space, tmp_path / "out.parquet")
    assert seen["llm"]["tensor_parallel_size"] == 8 and seen["llm"]["max_model_len"] == 4096
    assert seen["llm"]["trust_remote_code"] is False
    assert seen["sampling"]["temperature"] == 0.0 and seen["sampling"]["max_tokens"] == 12
    assert [len(c) for c in seen["chats"]] == [2, 2, 1]  # one call per shard
    assert seen["chats"][0][0][-1]["role"] == "user"
    assert df["pred_labels"].map(list).tolist() == [["I50.22"]] * 5 and (df["n_tokens"] == 3).all()


def test_vllm_missing_is_explained(tiny_config, icd_space, prompts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    tiny_config["generation"]["backend"] = "vllm"
    with pytest.raises(ImportError, match="envs/vllm.yaml"):
        generate_cot(tiny_config, "tiny_llama", prompts, icd_space, tmp_path / "out.parquet")
