import gzip
import json
import logging
import sys
import types

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mechdistill.errors import ConfigError, InputError
from mechdistill.model_sources import ModelCatalog
from mechdistill.teacher import backends, generate
from mechdistill.teacher.backends import TransformersBackend, read_traces, student_generation
from mechdistill.teacher.engines import check_engines, resolve_backend
from mechdistill.teacher.generate import generate_cot, summarize_cot
from mechdistill.teacher.prompts import build_prompts, render_prompt


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
    reference = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "ref" / "test.parquet", gen=tiny_config["generation"])
    assert len(reference) == 5
    # The random model never writes "<answer>": every trace hits max_new_tokens=12 and is
    # budget-forced (force_answer_tokens=4) to write an answer block.
    assert reference["forced_answer"].all() and (reference["finish_reason"] == "length").all()
    assert reference["n_tokens"].between(13, 16).all()
    assert all("\n<answer>" in raw for raw in reference["raw"])
    assert all(raw.startswith(cot) for raw, cot in zip(reference["raw"], reference["cot"]))

    calls = []

    class Flaky(TransformersBackend):
        fail_on_call = 0

        def __call__(self, chats):
            calls.append(len(chats))
            if len(calls) == self.fail_on_call:
                raise Interrupt("killed")
            return super().__call__(chats)

    def flaky_factory(fail_on_call):
        backend = Flaky(ModelCatalog.from_config(tiny_config), "tiny_llama", tiny_config["generation"])
        backend.fail_on_call = fail_on_call
        return backend

    out = tmp_path / "run" / "test.parquet"
    with pytest.raises(Interrupt):  # killed while generating the second shard (shard_size=2)
        generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, out, backend_factory=lambda: flaky_factory(2), gen=tiny_config["generation"])
    assert not out.exists()
    shards = list(out.parent.glob(".test.shards-*/shard-*.parquet"))
    assert [p.name for p in shards] == ["shard-00000.parquet"]

    calls.clear()
    resumed = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, out, backend_factory=lambda: flaky_factory(0), gen=tiny_config["generation"])
    assert calls == [2, 1]  # only the two unfinished shards (2 + 1 documents) were generated
    pd.testing.assert_frame_equal(resumed, reference)
    pd.testing.assert_frame_equal(pd.read_parquet(out), reference)
    assert not list(out.parent.glob(".test.shards-*"))  # cleaned up after success


def test_changed_settings_do_not_reuse_shards(tiny_config, icd_space, prompts, tmp_path):
    out = tmp_path / "test.parquet"
    stale = out.parent / ".test.shards-0000000000000000"
    stale.mkdir(parents=True)
    (stale / "shard-00000.parquet").write_text("from an earlier configuration")
    tiny_config["generation"].update(max_new_tokens=3, force_answer_tokens=0)
    df = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, out, gen=tiny_config["generation"])
    assert not stale.exists() and df["n_tokens"].max() <= 3 and not df["forced_answer"].any()


def test_a_resumed_run_parses_by_the_current_settings(tiny_config, icd_space, prompts, tmp_path):
    """Shards keep generations, not parses: a run killed under fuzzy_threshold 90 and resumed under
    100 maps labels exactly as a fresh run under 100 (before, the first shard kept its 90 parse)."""
    traces = write_traces(tmp_path / "traces.jsonl", [
        {"doc_id": f"d{i}", "cot": "Heart failure.", "answer": "chronic systolc (congestive) heart failre"}
        for i in range(5)])
    tiny_config["generation"].update(backend="file", traces=traces)

    class Killed(backends.FileBackend):
        calls = 0

        def __call__(self, doc_ids):
            Killed.calls += 1
            if Killed.calls == 2:
                raise Interrupt("killed")
            return super().__call__(doc_ids)

    def run(threshold, out, factory=None):
        tiny_config["generation"]["fuzzy_threshold"] = threshold
        return generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, out, "", "", factory, gen=tiny_config["generation"])

    lenient = run(90, tmp_path / "lenient" / "test.parquet")
    assert lenient["pred_labels"].map(list).tolist() == [["I50.22"]] * 5  # the misspelt title maps at 90
    out = tmp_path / "run" / "test.parquet"
    with pytest.raises(Interrupt):
        run(90, out, lambda: Killed(ModelCatalog.from_config(tiny_config), "tiny_llama", tiny_config["generation"], "", ""))
    assert len(list(out.parent.glob(".test.shards-*/shard-*.parquet"))) == 1
    resumed = run(100, out)
    strict = run(100, tmp_path / "strict" / "test.parquet")
    assert resumed["pred_labels"].map(list).tolist() == [[]] * 5
    pd.testing.assert_frame_equal(resumed, strict)


def test_file_backend(tiny_config, icd_space, prompts, tmp_path):
    traces = tmp_path / "traces.jsonl"
    rows = [{"doc_id": f"d{i}", "cot": f"Heart failure, systolic rather than diastolic {i}.", "answer": "I50.22"}
            for i in range(5)]
    traces.write_text("\n".join(json.dumps(r) for r in rows))
    tiny_config["generation"].update(backend="file", traces=str(traces))
    df = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "out.parquet", gen=tiny_config["generation"])
    assert df["pred_labels"].map(list).tolist() == [["I50.22"]] * 5
    assert df["cot"][3] == "Heart failure, systolic rather than diastolic 3."
    assert (df["finish_reason"] == "file").all()
    # byte tokenizer: one token per byte of the trace text
    assert df["n_tokens"][0] == len(df["raw"][0].encode())


@pytest.mark.parametrize("rows, message", [
    ([{"doc_id": "d0", "cot": "ok", "answer": "I10"}], "no trace for 4 of the 5 documents"),
    ([{"doc_id": f"d{i}", "cot": "ok"} for i in (0, 1, 2, 1, 3, 4)],
     "lines 2, 4: doc_id 'd1' appears 2 times"),
    ([{"doc": "d0"}], "traces need columns doc_id"),
])
def test_file_backend_bad_traces(tiny_config, icd_space, prompts, tmp_path, rows, message):
    traces = tmp_path / "traces.jsonl"
    traces.write_text("\n".join(json.dumps(r) for r in rows))
    tiny_config["generation"].update(backend="file", traces=str(traces))
    with pytest.raises(InputError) as err:
        generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "out.parquet", gen=tiny_config["generation"])
    assert message in str(err.value) and str(traces) in str(err.value)


def write_traces(path, rows) -> str:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_file_backend_keeps_empty_cot(tiny_config, icd_space, prompts, tmp_path, caplog):
    """An empty trace is kept as a row with an empty CoT (later stages give it reason "empty CoT"),
    logged with the file and its doc_ids; the rest of the split is generated."""
    rows = [{"doc_id": f"d{i}", "cot": "" if i in (2, 4) else f"Systolic {i}.", "answer": "I50.22"} for i in range(5)]
    rows[4] = {"doc_id": "d4", "output": ""}
    traces = write_traces(tmp_path / "traces.jsonl", rows)
    tiny_config["generation"].update(backend="file", traces=traces)
    with caplog.at_level(logging.WARNING, logger="mechdistill.teacher.backends"):
        df = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "out.parquet", gen=tiny_config["generation"])
    assert df["doc_id"].tolist() == ["d0", "d1", "d2", "d3", "d4"]
    assert df["cot"].tolist() == ["Systolic 0.", "Systolic 1.", "", "Systolic 3.", ""]
    assert df["pred_labels"].map(list).tolist() == [["I50.22"]] * 4 + [[]]
    assert df["n_tokens"][4] == 0
    warning = [r.getMessage() for r in caplog.records if "empty chain" in r.getMessage()]
    assert len(warning) == 2  # one per shard holding an empty trace (shard_size 2: d2 | d4)
    assert traces in warning[0] and "'d2'" in warning[0] and "'d4'" in warning[1]
    assert summarize_cot(df)["empty_cot"] == 2


def test_file_backend_unknown_doc_ids_warn(tiny_config, icd_space, prompts, tmp_path, caplog):
    """Traces of documents not in the split are ignored with a warning (a file may hold several splits)."""
    rows = [{"doc_id": d, "cot": "ok", "answer": "I10"} for d in ["d0", "d1", "x7", "d2", "d3", "d4", "x8"]]
    traces = write_traces(tmp_path / "traces.jsonl", rows)
    tiny_config["generation"].update(backend="file", traces=traces)
    with caplog.at_level(logging.WARNING, logger="mechdistill.teacher.backends"):
        df = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "out.parquet", gen=tiny_config["generation"])
    assert len(df) == 5
    warning = [r.getMessage() for r in caplog.records if "not among" in r.getMessage()]
    assert len(warning) == 1 and "2 doc_id(s)" in warning[0] and "'x7', 'x8'" in warning[0]
    assert traces in warning[0]


def test_file_backend_reports_all_missing_doc_ids(tiny_config, icd_space, prompts, tmp_path):
    traces = write_traces(tmp_path / "traces.jsonl", [{"doc_id": "d0", "cot": "ok"}, {"doc_id": "d3", "cot": "ok"}])
    tiny_config["generation"].update(backend="file", traces=traces)
    with pytest.raises(InputError) as err:
        generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "out.parquet", gen=tiny_config["generation"])
    assert "no trace for 3 of the 5 documents" in str(err.value) and "'d1', 'd2', 'd4'" in str(err.value)


def test_file_backend_flags_answer_anomalies(tiny_config, icd_space, prompts, tmp_path):
    """A label outside the candidates stays a prediction but is flagged; two answer blocks are
    counted, the CoT ends before the first and the last complete block is the answer."""
    cands = prompts.set_index("doc_id")["candidates"].map(list)
    outside = next(lab for lab in icd_space.assignable if lab not in cands["d1"])
    rows = [{"doc_id": f"d{i}", "cot": "ok", "answer": cands[f"d{i}"][0]} for i in range(5)]
    rows[1] = {"doc_id": "d1", "cot": "ok", "answer": f"{cands['d1'][0]}; {outside}"}
    rows[3] = {"doc_id": "d3", "output": f"Think. <answer>{cands['d3'][1]}</answer> No: <answer>{cands['d3'][0]}</answer>"}
    traces = write_traces(tmp_path / "traces.jsonl", rows)
    tiny_config["generation"].update(backend="file", traces=traces)
    df = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "out.parquet", gen=tiny_config["generation"])
    assert df["pred_labels"].map(list)[1] == [cands["d1"][0], outside]
    assert df["outside_candidates"].map(list).tolist() == [[], [outside], [], [], []]
    assert df["n_answer_blocks"].tolist() == [1, 1, 1, 2, 1]
    assert df["cot"][3] == "Think." and df["pred_labels"].map(list)[3] == [cands["d3"][0]]
    stats = summarize_cot(df)
    assert (stats["outside_candidates"], stats["several_answer_blocks"]) == (1, 1)
    schema = pq.read_schema(tmp_path / "out.parquet")
    assert (schema.field("outside_candidates").type, schema.field("n_answer_blocks").type) == (
        pa.list_(pa.string()), pa.int64())


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"doc_id": "d0", "cot": "ok"}\n{"doc_id": "d1", "cot": "caf\xe9"}\n',
     "row 2: not UTF-8 text"),
    ("bad.jsonl", b'{"doc_id": "d0", "cot": "ok"}\n{"doc_id": "d1", "cot": \n', "row 2: not a JSON object"),
    ("trunc.jsonl.gz", gzip.compress(b'{"doc_id": "d0", "cot": "ok"}\n' * 50)[:30], "truncated gzip file"),
    ("plain.jsonl.gz", b'{"doc_id": "d0", "cot": "ok"}\n', "not a gzip file"),
    ("bad.parquet", b"PAR1 not really", "cannot read Parquet"),
])
def test_read_traces_undecodable_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        read_traces(str(path))
    assert str(err.value).startswith(f"{path}") and message in str(err.value) and "Fix:" in str(err.value)


def test_read_traces_gzip_jsonl(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"doc_id": 7, "cot": "ok"}\n\n{"doc_id": "d1", "output": "x"}\n'))
    df = read_traces(str(path))
    assert df["doc_id"].tolist() == ["7", "d1"] and df["cot"].tolist()[0] == "ok"


def test_vllm_backend_wiring(tiny_config, icd_space, prompts, tmp_path, monkeypatch):
    """The calls we make to vLLM on GPUs (a stand-in: no GPU here) and how its outputs are read,
    including budget forcing through `LLM.generate` on token ids."""
    seen = {"sampling": [], "chats": [], "generate": []}
    from mechdistill.models import load_tokenizer
    tok = load_tokenizer(ModelCatalog.from_config(tiny_config), "tiny_llama")

    def result(text, reason):  # vLLM's output: token ids, which the backend decodes with our tokenizer
        out = types.SimpleNamespace(text="(vLLM's own text, unused)", finish_reason=reason,
                                    token_ids=tok(text, add_special_tokens=False)["input_ids"])
        return types.SimpleNamespace(outputs=[out])

    class SamplingParams:
        def __init__(self, **kw):
            seen["sampling"].append(kw)
            self.kw = kw

    class LLM:
        def __init__(self, **kw):
            seen["llm"] = kw

        def chat(self, chats, params, use_tqdm=False):
            seen["chats"].append(chats)  # first doc of each shard answers; the others run out of tokens
            return [result("Heart. <answer>I50.22</answer>", "stop")] + \
                [result("Heart, systolic.", "length") for _ in chats[1:]]

        def generate(self, prompts, params, use_tqdm=False):
            seen["generate"].append((prompts, params.kw))
            return [result("I50.22</answer>", "stop") for _ in prompts]

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams))
    monkeypatch.setattr(backends, "vllm_problem", lambda device: None)  # as if 8 GPUs were visible
    tiny_config["generation"].update(backend="vllm", device="cuda", tensor_parallel_size=8, max_model_len=4096)
    df = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "out.parquet", gen=tiny_config["generation"])
    assert seen["llm"]["tensor_parallel_size"] == 8 and seen["llm"]["max_model_len"] == 4096
    assert seen["llm"]["trust_remote_code"] is False and seen["llm"]["enforce_eager"] is False  # CUDA graphs on GPU
    assert (df["engine"].str.match(r"vllm \S+ \(cuda, compiled, auto\)")).all()
    assert seen["sampling"][0]["temperature"] == 0.0 and seen["sampling"][0]["max_tokens"] == 12
    assert [len(c) for c in seen["chats"]] == [2, 2, 1]  # one call per shard
    assert seen["chats"][0][0][-1]["role"] == "user"
    assert [len(p) for p, _ in seen["generate"]] == [1, 1]  # the two cut-off traces, forced
    forced_prompt, forced_params = seen["generate"][0]
    assert forced_params["max_tokens"] == 4
    text = tok.decode(forced_prompt[0]["prompt_token_ids"])
    assert text.endswith("<|im_start|>assistant\nHeart, systolic.\n<answer>")
    assert df["pred_labels"].map(list).tolist() == [["I50.22"]] * 5
    assert df["forced_answer"].tolist() == [False, True, False, True, False]
    answered, cut, forced = (len(tok(t, add_special_tokens=False)["input_ids"]) for t in
                             ("Heart. <answer>I50.22</answer>", "Heart, systolic.", "I50.22</answer>"))
    assert df["n_tokens"].tolist() == [answered, cut + forced, answered, cut + forced, answered]
    assert df["cot"][1] == "Heart, systolic."


def test_vllm_missing_is_explained(tiny_config, icd_space, prompts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    tiny_config["generation"]["backend"] = "vllm"
    with pytest.raises(ConfigError, match="vllm is not installed.*generation.backend: auto"):
        generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "out.parquet", gen=tiny_config["generation"])
    with pytest.raises(ConfigError, match="generation.backend is 'vllm' but vllm is not installed"):
        check_engines(tiny_config)  # device cpu: found when the workflow starts
    tiny_config["generation"]["backend"] = "auto"  # where vLLM cannot run, transformers generates
    df = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "auto.parquet", gen=tiny_config["generation"])
    assert df["engine"].str.startswith("transformers ").all() and resolve_backend(tiny_config["generation"]) == "transformers"


def test_students_generate_with_their_own_model():
    """A student's predictions never come from the teacher's trace file; auto follows the teacher's engine."""
    assert student_generation({"backend": "file", "student_backend": "auto"})["backend"] == "transformers"
    assert student_generation({"backend": "vllm", "student_backend": "auto", "tensor_parallel_size": 8}) == {
        "backend": "vllm", "student_backend": "auto", "tensor_parallel_size": 1,  # one GPU per student job
        "stop_at_answer": True}  # and it stops at </answer>
    assert student_generation({"backend": "vllm", "student_backend": "transformers"})["backend"] == "transformers"


def long_prompts(icd_space, n_docs: int, doc_id: str, note_chars: int) -> pd.DataFrame:
    """Prompts of `n_docs` short notes d0, d1, ... (as the `prompts` fixture), document `doc_id`'s note
    made `note_chars` characters long."""
    ids = [f"d{i}" for i in range(n_docs)]
    docs = pd.DataFrame({"doc_id": ids,
                         "text": [("Chronic systolic heart failure. " * note_chars)[:note_chars] if d == doc_id
                                  else f"Note {d[1:]}: chronic systolic heart failure." for d in ids],
                         "labels": [["I50.22"]] * n_docs})
    return build_prompts(docs, icd_space, {"strategy": "hierarchy", "size": 4, "n_near_miss": 2},
                         {"exemplar": False, "system": "S", "instruction": "Pick."}, seed=0)


def rendered_lengths(tok, prompts) -> list[int]:
    return [len(tok(render_prompt(tok, json.loads(m)), add_special_tokens=False)["input_ids"]) for m in prompts["messages"]]


def test_an_over_long_prompt_is_skipped_named_and_not_retried(tiny_config, icd_space, tmp_path, caplog):
    """A model of 512 positions (max_new_tokens 12, forced answer "\\n<answer>" 9 byte tokens + 4): a prompt
    of more than 512 - 12 - 13 = 487 tokens is never sent to the model, which here rejects it as vLLM
    does; its row is written (empty CoT, skipped, its token count), the split finishes, the summary names
    it, and a run killed after its shard resumes without generating that shard again."""
    tiny_config["models"]["tiny_llama"]["config"]["max_position_embeddings"] = 512
    prompts = long_prompts(icd_space, 5, "d2", 600)   # shard 1 (shard_size 2): d2, d3
    sent, fail_on_call = [], [0]

    class Strict(TransformersBackend):
        """Rejects a prompt that leaves no room for the generation, as vLLM rejects one >= max_model_len."""

        def __call__(self, chats):
            lengths = [len(self.tok(render_prompt(self.tok, c), add_special_tokens=False)["input_ids"]) for c in chats]
            sent.append(lengths)
            if len(sent) == fail_on_call[0]:
                raise Interrupt("killed")
            if max(lengths) > 512 - 12:
                raise ValueError(f"prompt of {max(lengths)} tokens is longer than the maximum model length")
            return super().__call__(chats)

    def factory():
        return Strict(ModelCatalog.from_config(tiny_config), "tiny_llama", tiny_config["generation"])

    out = tmp_path / "run" / "test.parquet"
    fail_on_call[0] = 3  # killed at shard 2, after shard 1 (with the long prompt) was written
    with pytest.raises(Interrupt):
        generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, out, backend_factory=factory,
                     gen=tiny_config["generation"])
    assert len(list(out.parent.glob(".test.shards-*/shard-*.parquet"))) == 2
    tok = factory().tok
    lengths = rendered_lengths(tok, prompts)
    assert lengths[2] > 487 and max(lengths[:2] + lengths[3:]) <= 487
    assert sent == [lengths[0:2], lengths[3:4], lengths[4:5]]  # d2 never reached the model

    sent.clear()
    fail_on_call[0] = 0
    with caplog.at_level(logging.WARNING, logger="mechdistill.teacher.generate"):
        df = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, out,
                          "tiny_icd", "test", factory, gen=tiny_config["generation"])
    assert sent == [lengths[4:5]]  # only the unfinished shard
    assert df["doc_id"].tolist() == [f"d{i}" for i in range(5)]
    assert df["skipped"].tolist() == ["", "", "prompt_too_long", "", ""]
    assert df["prompt_tokens"].tolist() == lengths
    row = df.iloc[2]
    assert (row["cot"], row["raw"], list(row["pred_labels"]), row["n_tokens"], row["finish_reason"]) == ("", "", [], 0, "skipped")
    assert (df.drop(index=2)["n_tokens"] > 0).all()
    assert pd.read_parquet(out)["skipped"].tolist() == df["skipped"].tolist()
    summary = [r.getMessage() for r in caplog.records if "teacher CoT" in r.getMessage()]
    assert len(summary) == 1 and "teacher CoT tiny_icd/test: 1 of 5 prompts skipped" in summary[0]
    assert f"longest {lengths[2]:,} tokens (doc ids 'd2')" in summary[0]
    assert summarize_cot(df)["skipped_prompt_too_long"] == 1


def test_the_prompt_budget_names_its_terms(tiny_config, icd_space, tmp_path, caplog):
    """A fresh run logs the limit it skips by, naming the keys: the model's max_position_embeddings -
    generation.max_new_tokens - forced answer."""
    tiny_config["models"]["tiny_llama"]["config"]["max_position_embeddings"] = 512
    prompts = long_prompts(icd_space, 5, "d4", 600).iloc[3:]
    with caplog.at_level(logging.WARNING, logger="mechdistill.teacher.generate"):
        df = generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "o.parquet",
                          gen=tiny_config["generation"])
    assert df["skipped"].tolist() == ["", "prompt_too_long"]
    lines = [r.getMessage() for r in caplog.records if "prompts skipped" in r.getMessage()]
    assert lines and all("longer than the model's max_position_embeddings - generation.max_new_tokens - forced answer "
                         "= 512 - 12 - 13 = 487 "
                         "tokens" in line for line in lines)


def test_a_split_whose_every_prompt_is_too_long_stops_naming_the_key_and_largest(tiny_config, icd_space, tmp_path):
    """No prompt fits (transformers: the model's 512 positions): a ConfigError before anything is generated or
    written, naming what sets the context, the largest prompt's document and token count, and the fix."""
    tiny_config["models"]["tiny_llama"]["config"]["max_position_embeddings"] = 512
    prompts = long_prompts(icd_space, 3, "d1", 600).iloc[1:2]   # only the long prompt
    out = tmp_path / "run" / "test.parquet"
    with pytest.raises(ConfigError) as err:
        generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, out, "tiny_icd", "test",
                     gen=tiny_config["generation"])
    tok = TransformersBackend(ModelCatalog.from_config(tiny_config), "tiny_llama", tiny_config["generation"]).tok
    (n,) = rendered_lengths(tok, prompts)
    assert n > 487
    assert (f"tiny_llama tiny_icd/test: every prompt is too long: none of the 1 fits the model's max_position_embeddings "
            f"- generation.max_new_tokens - forced answer = 512 - 12 - 13 = 487 tokens; the largest, doc_id 'd1', has "
            f"{n:,} tokens") in str(err.value)
    assert "Fix: use a model with a longer context than 512 tokens" in str(err.value)
    assert not out.exists() and not list(out.parent.glob(".test.shards-*/shard-*.parquet"))


def test_every_prompt_too_long_for_vllm_names_generation_max_model_len(tiny_config, icd_space, tmp_path, monkeypatch):
    """With vLLM the context is generation.max_model_len (here 64; a stand-in engine that is never asked to
    generate): the error names the key and the value that fits the largest prompt."""
    class LLM:
        def __init__(self, **kw):
            self.kw = kw

        def chat(self, *args, **kw):
            raise AssertionError("no prompt fits: nothing may be generated")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, SamplingParams=lambda **kw: kw))
    monkeypatch.setattr(backends, "vllm_problem", lambda device: None)
    tiny_config["generation"].update(backend="vllm", device="cuda", max_model_len=64)
    prompts = long_prompts(icd_space, 3, "d1", 600)
    with pytest.raises(ConfigError) as err:
        generate_cot(ModelCatalog.from_config(tiny_config), "tiny_llama", prompts, icd_space, tmp_path / "o.parquet",
                     "tiny_icd", "test", gen=tiny_config["generation"])
    lengths = rendered_lengths(backends.load_tokenizer(ModelCatalog.from_config(tiny_config), "tiny_llama"), prompts)
    assert lengths[1] == max(lengths)
    assert ("none of the 3 fits generation.max_model_len - generation.max_new_tokens - forced answer = 64 - 12 - 13 = "
            f"39 tokens; the largest, doc_id 'd1', has {lengths[1]:,} tokens, the shortest {min(lengths):,}") in str(err.value)
    assert f"Fix: raise generation.max_model_len to at least {lengths[1] + 25:,}" in str(err.value)


def test_text_generator_leaves_over_long_texts_empty(tiny_config, caplog):
    """A baseline's teacher calls (text_generator): a text with no room for max_new_tokens gets "" and a
    warning; the others are generated as without it."""
    tiny_config["models"]["tiny_llama"]["config"]["max_position_embeddings"] = 64
    backend = TransformersBackend(ModelCatalog.from_config(tiny_config), "tiny_llama", tiny_config["generation"])
    generate = backends.text_generator(backend, batch_size=2)
    short, long = "Heart failure", "x" * 60   # 13 and 60 byte tokens; 64 - 8 = 56
    with caplog.at_level(logging.WARNING, logger="mechdistill.teacher.backends"):
        out = generate([short, long, short], max_new_tokens=8)
    assert out[1] == "" and out[0] == out[2] == generate([short], max_new_tokens=8)[0] != ""
    assert any("1 of 3 prompts skipped: longer than the model's max_position_embeddings - max_new_tokens = 64 - 8 = 56 "
               "tokens; "
               "longest 60 tokens (texts '1')" in r.getMessage() for r in caplog.records)


def test_synced_ranks_keep_stepping_together_when_one_skips(tiny_config, icd_space, monkeypatch):
    """With synced_gpus every rank must make as many generate calls as the others: a rank that skipped
    its over-long prompts pads with calls on a short stand-in prompt (another rank made 3 calls)."""
    tiny_config["models"]["tiny_llama"]["config"]["max_position_embeddings"] = 512
    prompts = long_prompts(icd_space, 2, "d1", 600)
    backend = TransformersBackend(ModelCatalog.from_config(tiny_config), "tiny_llama", tiny_config["generation"])
    calls = []
    generate_call = backend.model.generate

    def one_rank_generate(**kw):  # no process group here: the model steps alone
        calls.append(tuple(kw["input_ids"].shape))
        return generate_call(**{**kw, "synced_gpus": False})

    monkeypatch.setattr(backend.model, "generate", one_rank_generate)
    monkeypatch.setattr(generate, "_gather", lambda value: [value, 3])  # the other rank: 3 calls
    outputs = generate._run_backend(backend, prompts, {**tiny_config["generation"], backends.SYNCED_GPUS: True})
    assert [g.skipped for g in outputs] == ["", "prompt_too_long"] and outputs[0].forced_answer
    # d0 (one call), then 2 stand-in calls; budget forcing of d0 (one call), then 2 stand-in calls
    d0 = rendered_lengths(backend.tok, prompts)[0]
    assert len(calls) == 6 and calls[0] == (1, d0)
    assert all(shape[0] == 1 and shape[1] < d0 for shape in calls[1:3] + calls[4:])


def test_a_skipped_row_is_an_empty_cot_downstream(byte_tok):
    """The row of a skipped prompt, as parse_generations writes it, goes through anchors (reason "empty CoT
    (prompt_too_long)") and distillation's examples (left out, as an empty CoT) without error."""
    from mechdistill.anchors.anchor_table import anchor_table
    from mechdistill.distill.signals import make_examples
    from mechdistill.io import SplitArtifacts
    from mechdistill.teacher.answers import AnswerParser
    from mechdistill.teacher.generate import GENERATION_COLUMNS, parse_generations
    from tests.helpers import icd_subtree

    space = icd_subtree("I50")
    candidates = ["I50.22", "I50.21", "I50.9", "I50.20"]
    messages = json.dumps([{"role": "user", "content": "Pick.\n\nDocument:\nChronic systolic heart failure.\n\n"
                                                       "Candidate labels:\n- Chronic systolic heart failure [I50.22]"}])
    prompts = pd.DataFrame({"doc_id": ["ok", "long"], "candidates": [candidates] * 2, "messages": [messages] * 2})
    generations = pd.DataFrame([
        dict(doc_id="ok", raw="Chronic systolic heart failure [I50.22] rather than [I50.9].\n<answer>I50.22</answer>",
             n_tokens=20, finish_reason="stop", forced_answer=False, engine="e", prompt_tokens=30, skipped=""),
        dict(doc_id="long", raw="", n_tokens=0, finish_reason="skipped", forced_answer=False, engine="e",
             prompt_tokens=900, skipped="prompt_too_long")], columns=GENERATION_COLUMNS)
    cot = parse_generations(generations, prompts, AnswerParser(space)).set_index("doc_id")
    assert cot.loc["long", "cot"] == "" and list(cot.loc["long", "pred_labels"]) == []
    assert summarize_cot(cot.reset_index())["empty_cot"] == 1
    docs = pd.DataFrame({"doc_id": ["ok", "long"], "labels": [["I50.22"]] * 2})
    settings = {"near_miss": {"strategies": ["hierarchy"], "n": 2}, "ancestor_levels": 0, "early_tokens": 5}
    anchors = anchor_table(docs, cot, prompts.set_index("doc_id"), space, byte_tok, settings)
    assert anchors["reason"].tolist()[1] == "empty CoT (prompt_too_long)" and anchors["reason"][0] == ""
    split = SplitArtifacts(docs.set_index("doc_id"), prompts.set_index("doc_id"), cot, anchors, space)
    assert [ex.doc_id for ex in make_examples(byte_tok, split)] == ["ok"]


def test_budget_forcing_leaves_out_a_prefix_with_no_room(tiny_config, caplog):
    """A cut-off trace whose prompt + CoT + "\\n<answer>" leaves no room for the forced tokens in the model's
    context is kept unforced (vLLM would reject the whole call), with a warning; the others are forced."""
    tiny_config["models"]["tiny_llama"]["config"]["max_position_embeddings"] = 200
    backend = TransformersBackend(ModelCatalog.from_config(tiny_config), "tiny_llama", tiny_config["generation"])
    chat = [{"role": "user", "content": "Pick."}]
    cut = [backends.Generation("Heart failure.", 12, "length"), backends.Generation("x" * 170, 12, "length")]
    lengths = [len(backend.tok(render_prompt(backend.tok, chat) + g.text + "\n<answer>",
                               add_special_tokens=False)["input_ids"]) for g in cut]
    assert lengths[0] <= 200 - 4 < lengths[1]
    with caplog.at_level(logging.WARNING, logger="mechdistill.teacher.generate"):
        out = generate.force_answers(backend, [chat, chat], list(cut), n_tokens=4, batch_size=2)
    assert [g.forced_answer for g in out] == [True, False] and out[1] == cut[1]
    assert any("budget forcing: 1 of 2 prompts skipped: longer than the model's max_position_embeddings - "
               "generation.force_answer_tokens = "
               f"200 - 4 = 196 tokens; longest {lengths[1]} tokens (traces '1')" in r.getMessage() for r in caplog.records)


def test_a_vllm_engine_gets_max_model_len_capped_at_its_models_positions(tmp_path):
    from transformers import LlamaConfig

    from mechdistill.teacher.backends import engine_context

    LlamaConfig(max_position_embeddings=40_960).save_pretrained(tmp_path)  # Qwen3-14B's positions
    assert engine_context(49_152, tmp_path, "student") == 40_960
    assert engine_context(32_768, tmp_path, "student") == 32_768
