"""Teacher chain-of-thought generation: backends `transformers`, `vllm`, `file`, resumable shards.

`generate_cot` splits the prompts into shards of `shard_size` documents, writes each finished
shard atomically into a hidden folder keyed by a fingerprint of (model, generation settings,
prompts), and concatenates them at the end. A rerun after a kill skips finished shards; a
change of model, settings or prompts starts a fresh folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .errors import InputError
from .io import read_parquet, write_parquet
from .models import load_model, load_tokenizer, model_spec, pick_device, resolve_model_path, spec_key
from .prompts import ANSWER_CLOSE, ANSWER_OPEN, AnswerParser, render_prompt

log = logging.getLogger(__name__)

# Settings that change what is generated (batch size and device do not, under greedy decoding).
FINGERPRINT_KEYS = ("backend", "max_new_tokens", "temperature", "repetition_penalty", "shard_size",
                    "dtype", "traces", "force_answer_tokens")


@dataclass
class Generation:
    text: str
    n_tokens: int
    finish_reason: str  # "stop" (end of turn), "length" (hit max_new_tokens), "file"
    forced_answer: bool = False  # the answer block was started for the model (budget forcing)


class TransformersBackend:
    """Batched generation with transformers (CPU or GPU); greedy unless temperature > 0."""

    def __init__(self, config: dict, model_name: str, gen: dict) -> None:
        device = pick_device(gen.get("device", "auto"))
        self.model, self.tok = load_model(config, model_name, device=device, dtype=gen.get("dtype"))
        self.tok.padding_side = "left"
        self.gen = gen
        stop = {self.tok.eos_token_id, self.tok.convert_tokens_to_ids("<|im_end|>")}
        self.stop_ids = sorted(i for i in stop if isinstance(i, int) and i >= 0)

    def __call__(self, chats: list[list[dict]]) -> list[Generation]:
        return self.complete([render_prompt(self.tok, m) for m in chats], self.gen["max_new_tokens"])

    @torch.no_grad()
    def complete(self, texts: list[str], max_new_tokens: int) -> list[Generation]:
        """Continue already-rendered texts (chat template applied) by up to `max_new_tokens`."""
        # The chat template already holds any BOS token: do not add special tokens twice.
        enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        temperature = self.gen.get("temperature", 0.0)
        out = self.model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
            repetition_penalty=self.gen.get("repetition_penalty", 1.0),
            eos_token_id=self.stop_ids, pad_token_id=self.tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]                            # [batch, new_tokens]
        results = []
        for row in new.tolist():
            stop_at = next((i for i, t in enumerate(row) if t in self.stop_ids), None)
            kept = row if stop_at is None else row[: stop_at + 1]
            results.append(Generation(self.tok.decode(kept, skip_special_tokens=True),
                                      n_tokens=len(kept),
                                      finish_reason="length" if stop_at is None else "stop"))
        return results


class VllmBackend:
    """vLLM on GPU(s), `LLM.chat` with tensor parallelism; imported only when used."""

    def __init__(self, config: dict, model_name: str, gen: dict) -> None:
        try:
            from vllm import LLM, SamplingParams
        except ImportError as exc:
            raise ImportError("generation.backend is 'vllm' but vllm is not installed. Fix: use the "
                              "GPU environment (envs/vllm.yaml) or generation.backend: transformers.") from exc
        spec = model_spec(config, model_name)
        kwargs = dict(model=resolve_model_path(config, model_name),
                      tensor_parallel_size=gen.get("tensor_parallel_size", 1),
                      gpu_memory_utilization=gen.get("gpu_memory_utilization", 0.9),
                      dtype=gen.get("dtype", "auto"), seed=config.get("seed", 0),
                      trust_remote_code=spec.get("trust_remote_code", False))
        if gen.get("max_model_len"):
            kwargs["max_model_len"] = gen["max_model_len"]
        self.llm = LLM(**kwargs)
        self.tok = load_tokenizer(config, model_name)
        self.sampling = lambda max_tokens: SamplingParams(
            temperature=gen.get("temperature", 0.0), max_tokens=max_tokens,
            repetition_penalty=gen.get("repetition_penalty", 1.0), seed=config.get("seed", 0))
        self.params = self.sampling(gen["max_new_tokens"])

    def __call__(self, chats: list[list[dict]]) -> list[Generation]:
        return self._read(self.llm.chat(chats, self.params, use_tqdm=False))

    def complete(self, texts: list[str], max_new_tokens: int) -> list[Generation]:
        """Continue already-rendered texts; token ids are passed so no second BOS is added."""
        prompts = [{"prompt_token_ids": self.tok(t, add_special_tokens=False)["input_ids"]} for t in texts]
        return self._read(self.llm.generate(prompts, self.sampling(max_new_tokens), use_tqdm=False))

    @staticmethod
    def _read(outputs) -> list[Generation]:
        return [Generation(o.outputs[0].text, n_tokens=len(o.outputs[0].token_ids),
                           finish_reason="length" if o.outputs[0].finish_reason == "length" else "stop")
                for o in outputs]


def read_traces(path: str) -> pd.DataFrame:
    """User-supplied traces: Parquet or JSON lines with `doc_id` and `output` or `cot` (+ `answer`)."""
    p = Path(path)
    if not p.exists():
        raise InputError("traces file does not exist.", file=path,
                         fix="set generation.traces to a Parquet/JSONL file with doc_id and cot columns.")
    try:
        df = pd.read_parquet(p) if p.suffix == ".parquet" else pd.read_json(p, lines=True, dtype={"doc_id": str})
    except ValueError as exc:
        raise InputError(f"cannot read traces ({exc}).", file=path,
                         fix="write one JSON object per line, or a Parquet file.") from exc
    if "doc_id" not in df.columns or not ({"output", "cot"} & set(df.columns)):
        raise InputError(f"traces need columns doc_id and output (or cot, optionally answer); found "
                         f"{list(df.columns)}.", file=path)
    df["doc_id"] = df["doc_id"].astype(str)
    return df


class FileBackend:
    """Traces a user brings; each row's text becomes the 'generation' and is parsed like one."""

    def __init__(self, config: dict, model_name: str, gen: dict, dataset: str, split: str) -> None:
        self.path = gen["traces"].format(dataset=dataset, split=split)
        df = read_traces(self.path)
        self.rows = {d: i for i, d in enumerate(df["doc_id"])}
        self.df = df
        self.tok = load_tokenizer(config, model_name)

    def text(self, doc_id: str) -> str:
        if doc_id not in self.rows:
            raise InputError(f"no trace for doc_id {doc_id!r}.", file=self.path,
                             fix="add a row for every document of the split.")
        i = self.rows[doc_id]
        row = self.df.iloc[i]
        if "output" in self.df.columns and isinstance(row["output"], str):
            text = row["output"]
        else:
            text = row["cot"] if isinstance(row["cot"], str) else ""
            if isinstance(row.get("answer"), str):
                text += f"\n{ANSWER_OPEN}{row['answer']}{ANSWER_CLOSE}"
        cot = text.split(ANSWER_OPEN)[0]
        if not cot.strip():
            raise InputError(f"empty chain of thought for doc_id {doc_id!r}.", file=self.path, row=i,
                             fix="drop the document or supply its reasoning text.")
        return text

    def __call__(self, doc_ids: list[str]) -> list[Generation]:
        texts = [self.text(d) for d in doc_ids]
        return [Generation(t, len(self.tok(t, add_special_tokens=False)["input_ids"]), "file") for t in texts]


def fingerprint(config: dict, model_name: str, gen: dict, prompts: pd.DataFrame) -> str:
    h = hashlib.sha1()
    h.update(spec_key(config, model_name).encode())
    h.update(json.dumps({k: gen.get(k) for k in FINGERPRINT_KEYS}, sort_keys=True).encode())
    for doc_id, msgs in zip(prompts["doc_id"], prompts["messages"]):
        h.update(f"{doc_id}\0{msgs}\0".encode())
    return h.hexdigest()[:16]


def generate_cot(config: dict, model_name: str, prompts: pd.DataFrame, space, out_path: str | Path,
                 dataset: str = "", split: str = "",
                 backend_factory: Callable[[], Callable] | None = None) -> pd.DataFrame:
    """Generate, parse and write the CoT artifact for `prompts`; resumable by shard.

    Output columns: doc_id, cot, answer, pred_labels, unmapped, n_tokens, finish_reason, raw,
    has_answer_block.
    """
    gen = config["generation"]
    out_path = Path(out_path)
    shard_dir = out_path.parent / f".{out_path.stem}.shards-{fingerprint(config, model_name, gen, prompts)}"
    for stale in out_path.parent.glob(f".{out_path.stem}.shards-*"):
        if stale != shard_dir:
            log.info("removing shards of an earlier configuration: %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
    size = gen["shard_size"]
    starts = list(range(0, len(prompts), size))
    todo = [s for s in starts if not (shard_dir / f"shard-{s // size:05d}.parquet").exists()]
    if len(todo) < len(starts):
        log.info("resuming: %d of %d shards already done in %s", len(starts) - len(todo), len(starts), shard_dir)
    parser = AnswerParser(space, gen.get("fuzzy_threshold", 90))
    if todo:
        if backend_factory is None:
            backend_factory = {"transformers": lambda: TransformersBackend(config, model_name, gen),
                               "vllm": lambda: VllmBackend(config, model_name, gen),
                               "file": lambda: FileBackend(config, model_name, gen, dataset, split),
                               }[gen["backend"]]
        backend = backend_factory()
        bar = tqdm(total=len(prompts), initial=len(prompts) - sum(min(size, len(prompts) - s) for s in todo),
                   desc=f"teacher CoT {dataset}/{split}", unit="doc")
        for start in todo:
            shard = prompts.iloc[start:start + size]
            outputs = _run_backend(backend, shard, gen)
            rows = []
            for (doc_id, cands), g in zip(shard[["doc_id", "candidates"]].itertuples(index=False), outputs):
                parsed = parser.parse(g.text, list(cands))
                rows.append(dict(doc_id=doc_id, cot=parsed.cot, answer=parsed.answer,
                                 pred_labels=parsed.pred_labels, unmapped=parsed.unmapped,
                                 n_tokens=g.n_tokens, finish_reason=g.finish_reason, raw=g.text,
                                 has_answer_block=parsed.has_answer_block, forced_answer=g.forced_answer))
            write_parquet(pd.DataFrame(rows, columns=COT_COLUMNS), shard_dir / f"shard-{start // size:05d}.parquet", "cot")
            bar.update(len(shard))
        bar.close()
    parts = [read_parquet(shard_dir / f"shard-{s // size:05d}.parquet") for s in starts]
    result = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COT_COLUMNS)
    write_parquet(result, out_path, "cot")
    shutil.rmtree(shard_dir, ignore_errors=True)
    summarize_cot(result, dataset, split)
    return result


COT_COLUMNS = ["doc_id", "cot", "answer", "pred_labels", "unmapped", "n_tokens", "finish_reason", "raw",
               "has_answer_block", "forced_answer"]


def _run_backend(backend, shard: pd.DataFrame, gen: dict) -> list[Generation]:
    if isinstance(backend, FileBackend):
        return backend(shard["doc_id"].tolist())
    chats = [json.loads(m) for m in shard["messages"]]
    bs = len(chats) if isinstance(backend, VllmBackend) else gen.get("batch_size", 8)  # vLLM batches itself
    outputs = [g for i in range(0, len(chats), bs) for g in backend(chats[i:i + bs])]
    if gen.get("force_answer_tokens", 0):
        outputs = force_answers(backend, chats, outputs, gen["force_answer_tokens"], bs)
    return outputs


def force_answers(backend, chats: list[list[dict]], outputs: list[Generation], n_tokens: int,
                  batch_size: int) -> list[Generation]:
    """Budget forcing: a trace cut off by max_new_tokens before its answer block gets
    "\n<answer>" appended and `n_tokens` more tokens to write the answer. The reasoning (cot)
    is unchanged; the row is marked `forced_answer`."""
    todo = [i for i, g in enumerate(outputs) if g.finish_reason == "length" and ANSWER_OPEN not in g.text]
    prefixes = [render_prompt(backend.tok, chats[i]) + outputs[i].text + "\n" + ANSWER_OPEN for i in todo]
    for start in range(0, len(todo), batch_size):
        conts = backend.complete(prefixes[start:start + batch_size], n_tokens)
        for i, cont in zip(todo[start:start + batch_size], conts):
            g = outputs[i]
            outputs[i] = Generation(g.text + "\n" + ANSWER_OPEN + cont.text, g.n_tokens + cont.n_tokens,
                                    g.finish_reason, forced_answer=True)
    return outputs


def summarize_cot(df: pd.DataFrame, dataset: str = "", split: str = "") -> dict:
    """Counts for the rule log: how many traces are usable downstream."""
    n = len(df)
    stats = {
        "documents": n,
        "with_answer_block": int(df["has_answer_block"].sum()) if n else 0,
        "with_mapped_labels": int((df["pred_labels"].map(len) > 0).sum()) if n else 0,
        "empty_cot": int((df["cot"].str.strip() == "").sum()) if n else 0,
        "hit_max_new_tokens": int((df["finish_reason"] == "length").sum()) if n else 0,
        "forced_answer": int(df["forced_answer"].sum()) if n else 0,
        "mean_tokens": float(df["n_tokens"].mean()) if n else 0.0,
        "unmapped_items": int(df["unmapped"].map(len).sum()) if n else 0,
    }
    log.info("teacher CoT %s/%s: %s", dataset, split, stats)
    return stats
