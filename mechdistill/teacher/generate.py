"""Teacher chain-of-thought generation, resumable by shard, with budget forcing.

`generate_cot` splits the prompts into shards of `shard_size` documents and runs the configured
backend (`backends.py`) on each. Every finished shard is kept (`shards.Shards`) under a key of
(model, generation settings, prompts); the shards are concatenated at the end. A rerun after a
kill skips finished shards; a change of model, settings or prompts starts afresh.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch.distributed as dist
from tqdm.auto import tqdm

from ..io import write_parquet
from ..models import ModelCatalog, spec_key
from ..shards import Shards, content_key
from .answers import ANSWER_OPEN, AnswerParser
from .backends import (
    PROMPT_TOO_LONG,
    SYNCED_GPUS,
    FileBackend,
    Generation,
    PromptBudget,
    TransformersBackend,
    VllmBackend,
    every_prompt_too_long,
    make_backend,
    prompt_budget,
    prompt_lengths,
    skipped_line,
    within_budget,
)
from .engines import resolve_backend
from .prompts import render_prompt

log = logging.getLogger(__name__)

# Settings that change what is generated (batch size and device do not, under greedy decoding);
# max_model_len decides which prompts are skipped as too long.
FINGERPRINT_KEYS = ("backend", "max_new_tokens", "temperature", "repetition_penalty", "shard_size",
                    "dtype", "traces", "force_answer_tokens", "stop_at_answer", "max_model_len")

# A stand-in prompt for generate calls that only keep ranks stepping together (synced_gpus): short enough
# for any model's context, whatever prompts a rank skipped.
FILLER_CHAT = [{"role": "user", "content": "."}]


def fingerprint(catalog: ModelCatalog, model_name: str, gen: dict, prompts: pd.DataFrame) -> str:
    """Key of the shards: the model entry, the settings that change the text, every prompt."""
    return content_key(spec_key(catalog, model_name), {k: gen.get(k) for k in FINGERPRINT_KEYS},
                       list(zip(prompts["doc_id"], prompts["messages"])))


def generate_cot(catalog: ModelCatalog, model_name: str, prompts: pd.DataFrame, space, out_path: str | Path,
                 dataset: str = "", split: str = "",
                 backend_factory: Callable[[], Callable] | None = None, *, gen: dict) -> pd.DataFrame:
    """Generate, parse and write the CoT artifact for `prompts`; resumable by shard. gen: the
    generation settings (`GenerationSettings.mapping()`); `catalog` gives the model specs and the seed.

    Output columns: doc_id, cot, answer, pred_labels, unmapped, n_tokens, finish_reason, raw,
    has_answer_block, forced_answer, n_answer_blocks (more than 1: the last complete block is the
    answer), outside_candidates (pred_labels not on the prompt's candidate list, kept as predictions),
    engine (the backend that wrote the row and its version, e.g. "vllm 0.32.0 (cpu, eager, float32)").
    """
    gen = {**gen, "backend": resolve_backend(gen)}  # auto: what runs here
    # The shards hold generations only; parsing (label space, fuzzy_threshold) runs over all of them
    # at the end, so a resumed run and a fresh one map labels by the same, current settings.
    shards = Shards(out_path, "shards", fingerprint(catalog, model_name, gen, prompts))
    size = gen["shard_size"]
    names = {start: f"shard-{start // size:05d}.parquet" for start in range(0, len(prompts), size)}
    todo = [start for start, name in names.items() if not shards.done(name)]
    budget = None
    if len(todo) < len(names):
        log.info("resuming: %d of %d shards already done in %s", len(names) - len(todo), len(names), shards.dir)
    if todo:
        backend = (backend_factory or (lambda: make_backend(catalog, model_name, gen, dataset, split)))()
        engine = getattr(backend, "engine", type(backend).__name__)
        if isinstance(backend, FileBackend):
            backend.cover(prompts["doc_id"].tolist())
        budget = prompt_budget(backend, gen["max_new_tokens"], gen["force_answer_tokens"], "generation.max_new_tokens")
        _require_a_prompt_that_fits(backend, budget, prompts, f"{model_name} {dataset}/{split}")
        log.info("%s %s/%s: generating with %s%s", model_name, dataset, split, engine,
                 f"; prompts of at most {budget.describe()}" if budget is not None else "")
        bar = tqdm(total=len(prompts), initial=len(prompts) - sum(min(size, len(prompts) - s) for s in todo),
                   desc=f"teacher CoT {dataset}/{split}", unit="doc")
        for start in todo:
            shard = prompts.iloc[start:start + size]
            outputs = _run_backend(backend, shard, gen)
            rows = [dict(doc_id=doc_id, raw=g.text, n_tokens=g.n_tokens, finish_reason=g.finish_reason,
                         forced_answer=g.forced_answer, engine=engine, prompt_tokens=g.prompt_tokens,
                         skipped=g.skipped)
                    for doc_id, g in zip(shard["doc_id"], outputs)]
            shards.write_parquet(names[start], pd.DataFrame(rows, columns=GENERATION_COLUMNS))
            bar.update(len(shard))
        bar.close()
        if hasattr(backend, "close"):  # vLLM's engine process
            backend.close()
    parts = [shards.read_parquet(name) for name in names.values()]
    generations = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=GENERATION_COLUMNS)
    result = parse_generations(generations, prompts, AnswerParser(space, gen["fuzzy_threshold"]))
    write_parquet(result, out_path, "cot")
    shards.clear()
    summarize_cot(result, dataset, split, budget)
    return result


def answers_in_memory(model, tokenizer, prompts: pd.DataFrame, space, gen: dict) -> list[list[str]]:
    """The labels a model in memory (e.g. a student during training) answers on `prompts`, generated
    and parsed as `generate_cot` does (same shards, batches, budget forcing and parser), with nothing
    written. The tokenizer is copied: the backend pads on the left. gen[SYNCED_GPUS] (one rank of
    several, `answers_across_ranks`): every generate call, budget forcing's included, is stepped
    with the other ranks, which must pass prompts of the same length."""
    backend = TransformersBackend.from_model(model, copy.deepcopy(tokenizer), gen)
    size = gen["shard_size"]
    outputs = [g for start in range(0, len(prompts), size) for g in _run_backend(backend, prompts.iloc[start:start + size], gen)]
    parser = AnswerParser(space, gen["fuzzy_threshold"])
    return [parser.parse(g.text, list(candidates)).pred_labels for g, candidates in zip(outputs, prompts["candidates"])]


GENERATION_COLUMNS = ["doc_id", "raw", "n_tokens", "finish_reason", "forced_answer", "engine", "prompt_tokens",
                      "skipped"]


def parse_generations(generations: pd.DataFrame, prompts: pd.DataFrame, parser: AnswerParser) -> pd.DataFrame:
    """The CoT artifact's rows: each generation (GENERATION_COLUMNS) parsed against its prompt's candidates."""
    candidates = dict(zip(prompts["doc_id"], prompts["candidates"]))
    rows = []
    for g in generations.itertuples(index=False):
        parsed = parser.parse(g.raw, list(candidates[g.doc_id]))
        rows.append(dict(doc_id=g.doc_id, cot=parsed.cot, answer=parsed.answer, pred_labels=parsed.pred_labels,
                         unmapped=parsed.unmapped, n_tokens=int(g.n_tokens), finish_reason=g.finish_reason,
                         raw=g.raw, has_answer_block=parsed.has_answer_block, forced_answer=bool(g.forced_answer),
                         n_answer_blocks=parsed.n_answer_blocks, outside_candidates=parsed.outside_candidates,
                         engine=g.engine, prompt_tokens=None if pd.isna(g.prompt_tokens) else int(g.prompt_tokens),
                         skipped=g.skipped if isinstance(g.skipped, str) else ""))
    return pd.DataFrame(rows, columns=COT_COLUMNS)


COT_COLUMNS = ["doc_id", "cot", "answer", "pred_labels", "unmapped", "n_tokens", "finish_reason", "raw",
               "has_answer_block", "forced_answer", "n_answer_blocks", "outside_candidates", "engine", "prompt_tokens",
               "skipped"]


def _run_backend(backend, shard: pd.DataFrame, gen: dict) -> list[Generation]:
    """The generations of a shard's prompts. A prompt (chat template applied) longer than the backend's
    `prompt_budget` is not sent to the engine, which would reject it (vLLM) or run past the model's
    positions (transformers): its Generation is empty, finish_reason "skipped", skipped PROMPT_TOO_LONG.
    Every Generation carries its prompt's token count. synced (ranks stepping together): every rank makes
    as many generate calls as the rank with the most, the extra ones on FILLER_CHAT, discarded."""
    if isinstance(backend, FileBackend):
        return backend(shard["doc_id"].tolist())
    chats = [json.loads(m) for m in shard["messages"]]
    synced = bool(gen.get(SYNCED_GPUS))
    lengths = prompt_lengths(backend.tok, [render_prompt(backend.tok, chat) for chat in chats])
    budget = prompt_budget(backend, gen["max_new_tokens"], gen["force_answer_tokens"], "generation.max_new_tokens")
    kept = within_budget(budget, lengths)
    if len(kept) < len(chats):
        log.warning(skipped_line(budget, lengths, shard["doc_id"].tolist(), kept))
    kept_chats = [chats[i] for i in kept]
    bs = max(len(kept_chats), 1) if isinstance(backend, VllmBackend) else gen["batch_size"]  # vLLM batches itself
    starts = range(0, len(kept_chats), bs)
    outputs = [g for i in starts for g in backend(kept_chats[i:i + bs])]
    if synced:
        for _ in range(max(_gather(len(starts))) - len(starts)):
            backend([FILLER_CHAT])
    if gen["force_answer_tokens"]:
        outputs = force_answers(backend, kept_chats, outputs, gen["force_answer_tokens"], bs, synced)
    generated = dict(zip(kept, outputs))
    skipped = Generation("", 0, "skipped", skipped=PROMPT_TOO_LONG)
    return [replace(generated.get(i, skipped), prompt_tokens=n) for i, n in enumerate(lengths)]


def _require_a_prompt_that_fits(backend, budget: PromptBudget | None, prompts: pd.DataFrame, where: str) -> None:
    """Stop before generating when no prompt of the split fits `budget` (a split of empty CoTs is no result):
    a ConfigError naming the key, the largest prompt and the fix. Some too long: they are skipped (`_run_backend`)."""
    if budget is None or prompts.empty:
        return
    lengths = prompt_lengths(backend.tok, [render_prompt(backend.tok, json.loads(m)) for m in prompts["messages"]])
    if not within_budget(budget, lengths):
        if hasattr(backend, "close"):  # vLLM's engine process
            backend.close()
        raise every_prompt_too_long(budget, lengths, prompts["doc_id"].tolist(), where)


def force_answers(backend, chats: list[list[dict]], outputs: list[Generation], n_tokens: int,
                  batch_size: int, synced: bool = False) -> list[Generation]:
    """Budget forcing: a trace cut off by max_new_tokens before its answer block gets
    "\n<answer>" appended and `n_tokens` more tokens to write the answer. The reasoning (cot)
    is unchanged; the row is marked `forced_answer`. synced (ranks stepping together): every rank
    makes as many completion calls as the rank with the most to force, the extra ones on FILLER_CHAT
    (a rank may have no prompt left: all skipped), discarded. A prefix with no room for `n_tokens` in the
    model's context is not forced (a warning counts them): prompts are skipped by a budget that holds the
    forced answer (`_run_backend`), so only a trace that re-tokenizes longer than it was generated gets here."""
    todo = [i for i, g in enumerate(outputs) if g.finish_reason == "length" and ANSWER_OPEN not in g.text]
    prefixes = [render_prompt(backend.tok, chats[i]) + outputs[i].text + "\n" + ANSWER_OPEN for i in todo]
    budget = prompt_budget(backend, n_tokens, new_tokens_name="generation.force_answer_tokens")
    lengths = prompt_lengths(backend.tok, prefixes) if budget is not None else [0] * len(prefixes)
    fits = within_budget(budget, lengths)
    if len(fits) < len(todo):
        log.warning("budget forcing: %s; those traces keep no answer block",
                    skipped_line(budget, lengths, [str(i) for i in todo], fits, "traces"))
        todo, prefixes = [todo[k] for k in fits], [prefixes[k] for k in fits]
    starts = list(range(0, len(todo), batch_size))
    for start in starts:
        conts = backend.complete(prefixes[start:start + batch_size], n_tokens)
        for i, cont in zip(todo[start:start + batch_size], conts):
            g = outputs[i]
            outputs[i] = Generation(g.text + "\n" + ANSWER_OPEN + cont.text, g.n_tokens + cont.n_tokens,
                                    g.finish_reason, forced_answer=True)
    if synced:
        for _ in range(max(_gather(len(starts))) - len(starts)):
            backend.complete([render_prompt(backend.tok, FILLER_CHAT) + "\n" + ANSWER_OPEN], n_tokens)
    return outputs


def _gather(value: Any) -> list[Any]:
    """`value` of every rank of the default torch.distributed group, in rank order."""
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def answers_across_ranks(answer: Callable[[pd.DataFrame], list[list[str]]], prompts: pd.DataFrame, rank: int,
                         world: int) -> list[list[str]]:
    """`answer(prompts)` shared by `world` ranks that must step together (DeepSpeed ZeRO-3): rank r
    answers documents r, r + world, ... padded with the first document to ceil(n / world) prompts, so
    every rank makes the same calls; the answers are gathered, and every rank returns all of them in
    the order of `prompts`. One rank: answer(prompts)."""
    if world == 1:
        return answer(prompts)
    mine = prompts.iloc[rank::world]
    per_rank = -(-len(prompts) // world)
    padded = pd.concat([mine] + [prompts.iloc[:1]] * (per_rank - len(mine))) if per_rank else mine
    shards = _gather(answer(padded)[:len(mine)])                          # [world][documents of the rank]
    return [shards[i % world][i // world] for i in range(len(prompts))]


def summarize_cot(df: pd.DataFrame, dataset: str = "", split: str = "", budget: PromptBudget | None = None) -> dict:
    """Counts for the rule log: how many traces are usable downstream, and how many prompts were skipped
    as too long (a warning names them; `budget`: the limit they broke, when this run generated)."""
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
    flags = {  # absent from artifacts written before these columns
        "outside_candidates": ("outside_candidates", lambda c: c.map(len) > 0,
                               "name labels outside their candidates (kept as predictions)"),
        "several_answer_blocks": ("n_answer_blocks", lambda c: c > 1,
                                  "have several answer blocks (the last complete one is the answer)"),
    }
    skipped = df["skipped"].eq(PROMPT_TOO_LONG).to_numpy() if n and "skipped" in df.columns else []
    stats["skipped_prompt_too_long"] = int(sum(skipped))
    if stats["skipped_prompt_too_long"]:
        lengths = df["prompt_tokens"].fillna(0).astype(int).tolist()
        kept = [i for i, s in enumerate(skipped) if not s]
        log.warning("teacher CoT %s/%s: %s; their rows have an empty CoT, which later stages skip as they skip "
                    "an empty one", dataset, split, skipped_line(budget, lengths, df["doc_id"].tolist(), kept))
    for key, (column, test, what) in flags.items():
        hit = df.loc[test(df[column]), "doc_id"].tolist() if n and column in df.columns else []
        stats[key] = len(hit)
        if hit:
            log.warning("teacher CoT %s/%s: %d trace(s) %s, flagged in column %s (doc_ids %s)", dataset, split,
                        len(hit), what, column, ", ".join(map(repr, hit[:5])) + (" ..." if len(hit) > 5 else ""))
    log.info("teacher CoT %s/%s: %s", dataset, split, stats)
    return stats
