"""Generation backends: `transformers` (CPU or GPU), `vllm` (GPUs, or its CPU build) and `file`
(traces a user brings). Each turns chats into `Generation`s; `make_backend` picks one by config.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..errors import ConfigError, InputError
from ..io import read_jsonl
from ..models import (
    ModelCatalog,
    input_device,
    load_model,
    load_tokenizer,
    model_spec,
    pick_device,
    resolve_model_path,
)
from .answers import ANSWER_CLOSE, ANSWER_OPEN, end_of_turn
from .engines import FIX, package_version, resolve_backend, resolve_device, vllm_problem
from .prompts import render_prompt

log = logging.getLogger(__name__)

# generation key: every rank of a torch.distributed group steps each `generate` call together until all are done
# (transformers' synced_gpus), as DeepSpeed ZeRO-3 needs: each forward gathers the partitioned weights from all
# ranks. Unset: transformers decides (ZeRO-3 while its HfDeepSpeedConfig is alive).
SYNCED_GPUS = "synced_gpus"

# generation key set by `student_generation`: stop at the first `</answer>` (a student's supervised output has
# one answer block and then the end of turn, `answers.supervised_output`); the teacher writes on to its end of turn.
STOP_AT_ANSWER = "stop_at_answer"


def stop_strings(gen: dict) -> list[str]:
    """The strings that end a generation besides the end-of-turn token: `</answer>` for a student."""
    return [ANSWER_CLOSE] if gen.get(STOP_AT_ANSWER) else []


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """`text` through the first of `stops` it holds (the stop string kept), and whether one was found."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return (text[:min(ends)], True) if ends else (text, False)


@dataclass
class Generation:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end of turn), "length" (hit max_new_tokens), "file"
    forced_answer: bool = False  # the answer block was started for the model (budget forcing)


class TransformersBackend:
    """Batched generation with transformers (CPU or GPU); greedy unless temperature > 0."""

    def __init__(self, catalog: ModelCatalog, model_name: str, gen: dict) -> None:
        device = pick_device(gen["device"])
        self._attach(*load_model(catalog, model_name, device=device, dtype=gen.get("dtype")), gen)

    @classmethod
    def from_model(cls, model, tok, gen: dict) -> TransformersBackend:
        """The backend around a model already in memory (e.g. a student during training), so it
        generates exactly as from disk without loading weights. `tok` is set to left padding."""
        backend = cls.__new__(cls)
        backend._attach(model, tok, gen)
        return backend

    def _attach(self, model, tok, gen: dict) -> None:
        self.model, self.tok, self.gen = model, tok, gen
        self.engine = f"transformers {package_version('transformers')} ({next(model.parameters()).device.type}, " \
                      f"{str(next(model.parameters()).dtype).removeprefix('torch.')})"
        self.tok.padding_side = "left"
        turn_end = end_of_turn(tok)
        stop = {tok.eos_token_id, tok.convert_tokens_to_ids(turn_end) if turn_end else None}
        self.stop_ids = sorted(i for i in stop if isinstance(i, int) and i >= 0)
        self.stops = stop_strings(gen)

    def __call__(self, chats: list[list[dict]]) -> list[Generation]:
        return self.complete([render_prompt(self.tok, m) for m in chats], self.gen["max_new_tokens"])

    @torch.no_grad()
    def complete(self, texts: list[str], max_new_tokens: int, temperature: float | None = None,
                 seed: int | None = None) -> list[Generation]:
        """Continue already-rendered texts (chat template applied) by up to `max_new_tokens`.
        temperature / seed: this call's sampling (default: generation.temperature; torch's RNG as it is)."""
        # The chat template already holds any BOS token: do not add special tokens twice.
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(input_device(self.model))
        temperature = self.gen["temperature"] if temperature is None else temperature
        if seed is not None and temperature > 0:
            torch.manual_seed(seed)
        out = self.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
            synced_gpus=self.gen.get(SYNCED_GPUS),
            repetition_penalty=self.gen["repetition_penalty"],
            eos_token_id=self.stop_ids, pad_token_id=self.tok.pad_token_id,
            **({"stop_strings": self.stops, "tokenizer": self.tok} if self.stops else {}))
        new = out[:, enc["input_ids"].shape[1]:]                            # [batch, new_tokens]
        results = []
        for row in new.tolist():
            stop_at = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            kept = row if stop_at is None else row[: stop_at + 1]
            text, at_string = cut_at_stop(self.tok.decode(kept, skip_special_tokens=True), self.stops)
            if at_string:  # the tokens through the one that completes the stop string (padding follows it)
                kept = kept[:next(k for k in range(1, len(kept) + 1)
                                  if cut_at_stop(self.tok.decode(kept[:k], skip_special_tokens=True), self.stops)[1])]
            results.append(Generation(text, n_tokens=len(kept),
                                      finish_reason="stop" if stop_at is not None or at_string else "length"))
        return results


def cpu_threads_bind(n_threads: int | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for this process: the first `n_threads` CPUs it may run on (default: the
    job's threads, OMP_NUM_THREADS as Snakemake sets it, else all), e.g. "0-1" or "0,2"."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = n_threads or int(os.environ.get("OMP_NUM_THREADS") or len(cpus))
    chosen = cpus[:max(1, min(n, len(cpus)))]
    return f"{chosen[0]}-{chosen[-1]}" if chosen == list(range(chosen[0], chosen[-1] + 1)) else ",".join(map(str, chosen))


class VllmBackend:
    """vLLM `LLM.chat` on GPUs (tensor parallel) or on CPU (the `vllm-cpu` build); imported only when used.

    On CPU: eager mode unless generation.enforce_eager is false (torch.compile costs ~160 s of start-up
    for ~8% more tokens/s on 2 cores), a KV cache of generation.kv_cache_gib GiB, float32 for dtype
    "auto" (as the transformers backend on CPU), OpenMP threads bound to the job's CPUs, and the engine
    in this process (generation.in_process). vLLM's default engine runs in spawned processes, which
    re-import the main script: every workflow script keeps its work under `if __name__ == "__main__":`,
    so both ways work from every rule.
    """

    def __init__(self, catalog: ModelCatalog, model_name: str, gen: dict) -> None:
        device = resolve_device(gen["device"])
        problem = vllm_problem(device)
        if problem:
            raise ConfigError(f"generation.backend is 'vllm' but {problem}. {FIX}")
        from vllm import LLM, SamplingParams  # optional and heavy: only this backend needs it

        dtype = gen["dtype"]
        if device == "cpu":
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gen["kv_cache_gib"])
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_threads_bind())
            dtype = "float32" if dtype == "auto" else dtype
        in_process = gen.get("in_process")
        in_process = device == "cpu" if in_process is None else in_process
        before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
        if in_process:  # vLLM reads it when the engine starts; the default spawns an engine process
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        spec = model_spec(catalog, model_name)
        eager = gen.get("enforce_eager")
        kwargs = dict(model=resolve_model_path(catalog, model_name), dtype=dtype, seed=catalog.seed,
                      enforce_eager=device == "cpu" if eager is None else eager,
                      trust_remote_code=spec.get("trust_remote_code", False))
        if device != "cpu":
            kwargs.update(tensor_parallel_size=gen["tensor_parallel_size"],
                          gpu_memory_utilization=gen["gpu_memory_utilization"])
        if in_process and kwargs.get("tensor_parallel_size", 1) == 1:
            kwargs["distributed_executor_backend"] = "uni"  # the worker in this process too
        if gen.get("max_model_len"):
            kwargs["max_model_len"] = gen["max_model_len"]
        started = time.perf_counter()
        try:
            self.llm = LLM(**kwargs)
        finally:  # the next engine of this process chooses for itself
            if before is None:
                os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
            else:
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before
        self.engine = f"vllm {package_version('vllm-cpu' if device == 'cpu' else 'vllm')} ({device}, " \
                      f"{'eager' if kwargs['enforce_eager'] else 'compiled'}, {dtype}" \
                      f"{', in-process' if in_process else ''})"
        log.info("%s: %s started in %.0f s", model_name, self.engine, time.perf_counter() - started)
        self.tok = load_tokenizer(catalog, model_name)
        # Per-request seeds: on GPUs each sampled call is reproducible on its own. vllm-cpu 0.32.0's per-request
        # generators fail once a chunked prefill discards a sampled token ("CPU Generator does not use
        # offset"), so on CPU sampling draws from the engine's generator, seeded once with the config's seed.
        per_request = device != "cpu"
        self.stops = stop_strings(gen)
        self.sampling = lambda max_tokens, temperature=None, seed=None: SamplingParams(
            temperature=gen["temperature"] if temperature is None else temperature, max_tokens=max_tokens,
            repetition_penalty=gen["repetition_penalty"], stop=self.stops or None, include_stop_str_in_output=True,
            seed=(catalog.seed if seed is None else seed) if per_request else None)
        self.params = self.sampling(gen["max_new_tokens"])

    def __call__(self, chats: list[list[dict]]) -> list[Generation]:
        return self._read(self.llm.chat(chats, self.params, use_tqdm=False))

    def complete(self, texts: list[str], max_new_tokens: int, temperature: float | None = None,
                 seed: int | None = None) -> list[Generation]:
        """Continue already-rendered texts; token ids are passed so no second BOS is added."""
        prompts = [{"prompt_token_ids": self.tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
        return self._read(self.llm.generate(prompts, self.sampling(max_new_tokens, temperature, seed), use_tqdm=False))

    def close(self) -> None:
        """Stop vLLM's engine process now (else it stops at interpreter exit, logging to closed streams)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def _read(self, outputs) -> list[Generation]:
        """Generations from vLLM's outputs, their tokens decoded by our tokenizer as the transformers
        backend decodes them (vLLM's own incremental text drops bytes of an unfinished character), cut
        after a stop string as vLLM cut its own text."""
        return [Generation(cut_at_stop(self.tok.decode(list(o.outputs[0].token_ids), skip_special_tokens=True),
                                       self.stops)[0],
                           n_tokens=len(o.outputs[0].token_ids),
                           finish_reason="length" if o.outputs[0].finish_reason == "length" else "stop")
                for o in outputs]


def read_traces(path: str) -> pd.DataFrame:
    """User-supplied traces: Parquet or JSON lines (.jsonl, or .jsonl.gz) with `doc_id` and `output`
    or `cot` (+ `answer`). The index is the row's line (JSON lines) or row number from 1, for messages.
    A doc_id twice is an error: which trace would be the teacher's is unknowable."""
    p = Path(path)
    if not p.exists():
        raise InputError("traces file does not exist.", file=path,
                         fix="set generation.traces to a Parquet/JSONL file with doc_id and cot columns.")
    parquet = p.suffix == ".parquet"
    if parquet:
        try:
            df = pd.read_parquet(p)
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise InputError(f"cannot read Parquet ({exc}).", file=path,
                             fix="write the file again with pandas/pyarrow, or use JSON lines.") from exc
        df.index = pd.RangeIndex(1, len(df) + 1, name="row")
    else:
        df = read_jsonl(p)
    if "doc_id" not in df.columns or not ({"output", "cot"} & set(df.columns)):
        raise InputError(f"traces need columns doc_id and output (or cot, optionally answer); found "
                         f"{list(df.columns)}.", file=path)
    df["doc_id"] = df["doc_id"].astype(str)
    dup = df[df["doc_id"].duplicated(keep=False)]
    if len(dup):
        where = dup.groupby("doc_id", sort=False).groups
        shown = "; ".join(f"{'lines' if not parquet else 'rows'} {', '.join(map(str, rows))}: doc_id {d!r} appears "
                          f"{len(rows)} times" for d, rows in list(where.items())[:5])
        raise InputError(f"{shown}{f' (and {len(where) - 5} more doc_ids)' if len(where) > 5 else ''}.", file=path,
                         fix="keep one trace per document.")
    return df


def _examples(ids: list[str], n: int = 5) -> str:
    """The first `n` ids, quoted, with how many more there are."""
    more = f" and {len(ids) - n} more" if len(ids) > n else ""
    return ", ".join(map(repr, ids[:n])) + more


class FileBackend:
    """Traces a user brings; each row's text becomes the 'generation' and is parsed like one.

    An empty trace is kept with an empty CoT (logged): later stages mark it "empty CoT" and go on.
    """

    def __init__(self, catalog: ModelCatalog, model_name: str, gen: dict, dataset: str, split: str) -> None:
        self.path = gen["traces"].format(dataset=dataset, split=split)
        self.split = f"{dataset}/{split}"
        df = read_traces(self.path)
        self.rows = {d: i for i, d in enumerate(df["doc_id"])}
        self.df = df
        self.engine = f"file {self.path}"
        self.tok = load_tokenizer(catalog, model_name)

    def cover(self, doc_ids: list[str]) -> None:
        """Check the file against the split's documents before any is read: every one needs a trace
        (error, listing them all); traces of other documents are ignored with a warning, since one
        file may hold several splits (generation.traces without {split})."""
        missing = [d for d in doc_ids if d not in self.rows]
        if missing:
            raise InputError(f"no trace for {len(missing)} of the {len(doc_ids)} documents of {self.split} "
                             f"(doc_ids {_examples(missing)}).", file=self.path,
                             fix="add a row for every document of the split.")
        wanted = set(doc_ids)
        unknown = [d for d in self.rows if d not in wanted]
        if unknown:
            log.warning("%s: %d doc_id(s) not among the %d documents of %s are ignored (%s); expected only "
                        "when the file holds several splits.", self.path, len(unknown), len(doc_ids),
                        self.split, _examples(unknown))

    def text(self, doc_id: str) -> str:
        if doc_id not in self.rows:
            raise InputError(f"no trace for doc_id {doc_id!r}.", file=self.path,
                             fix="add a row for every document of the split.")
        row = self.df.iloc[self.rows[doc_id]]
        if "output" in self.df.columns and isinstance(row["output"], str):
            return row["output"]
        text = row["cot"] if "cot" in self.df.columns and isinstance(row["cot"], str) else ""
        if isinstance(row.get("answer"), str):
            text += f"\n{ANSWER_OPEN}{row['answer']}{ANSWER_CLOSE}"
        return text

    def __call__(self, doc_ids: list[str]) -> list[Generation]:
        texts = [self.text(d) for d in doc_ids]
        empty = [d for d, t in zip(doc_ids, texts) if not t.split(ANSWER_OPEN)[0].strip()]
        if empty:
            log.warning("%s: empty chain of thought for %d document(s) (doc_ids %s): kept with an empty CoT, "
                        "which later stages mark 'empty CoT'.", self.path, len(empty), _examples(empty))
        return [Generation(t, len(self.tok(t, add_special_tokens=False)["input_ids"]), "file") for t in texts]


def student_generation(gen: dict) -> dict:
    """The generation settings a student's predictions use: generation with `backend` set to
    `student_backend` ("auto": the teacher's backend, but transformers when that is `file`, whose
    traces are the teacher's; a student's traces must come from the student), on one GPU (vLLM:
    tensor_parallel_size 1; the student_predict rule holds one GPU, and an 8B-14B student fits it), stopping at
    the first `</answer>` (STOP_AT_ANSWER: it was taught one answer block, then the end of turn). The teacher
    does not stop there: its traces keep every answer block it writes (the parser reads the last closed one,
    and `answers.supervised_output` teaches that one), as the characterization read them."""
    return {**gen, "backend": resolve_backend(gen, "student_backend"), "tensor_parallel_size": 1,
            STOP_AT_ANSWER: True}


def make_backend(catalog: ModelCatalog, model_name: str, gen: dict, dataset: str = "", split: str = "") -> Callable:
    """The backend `gen["backend"]` names ("auto": vllm where it runs, else transformers), for model
    `model_name` (file: the traces of dataset/split)."""
    backend = resolve_backend(gen)
    if backend == "vllm":
        return VllmBackend(catalog, model_name, gen)
    if backend == "file":
        return FileBackend(catalog, model_name, gen, dataset, split)
    return TransformersBackend(catalog, model_name, gen)


def text_generator(backend, batch_size: int, desc: str = "teacher calls") -> Callable[..., list[str]]:
    """`generate(texts, max_new_tokens, temperature=0.0, seed=0) -> continuations` over a generating
    backend: rendered texts in batches of `batch_size` (vLLM: one batch, it schedules itself), seeded
    per batch (seed + batch index) when sampling, so a rerun draws the same text."""
    if isinstance(backend, FileBackend):
        raise InputError("this step asks the teacher for new text, which the file backend cannot write",
                         fix="set generation.backend to transformers or vllm for it")

    def generate(texts: list[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[str]:
        size = len(texts) if isinstance(backend, VllmBackend) else batch_size
        out = []
        for start in tqdm(range(0, len(texts), max(size, 1)), desc=desc, unit="batch", leave=False):
            batch = backend.complete(texts[start:start + size], max_new_tokens, temperature, seed + start // max(size, 1))
            out += [g.text for g in batch]
        return out

    return generate
