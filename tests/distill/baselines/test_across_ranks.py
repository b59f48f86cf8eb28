"""Baseline preparation shared by the ranks (`causal_lm.across_ranks`): MoRSD's Rationale Difficulty and CWT's
chunk search and skip labels, each rank scoring every world-th request, give every rank what one process
gives, and each rank makes about 1/world of the forwards (the same count on every rank, for ZeRO-3).

Two ranks are two threads here, each with its own copy of the student, exchanging results through a
fake `gather_to_all` (a barrier); `across_ranks` itself also runs on two real gloo processes
(torch.distributed's all_gather_object, `launch.gather_to_all`). A two-rank ZeRO-3 run of a baseline
(`tests/stages/test_distill_ranks.py`'s launch) takes minutes on CPU and is not run here."""

from __future__ import annotations

import copy
import threading
from collections import Counter
from collections.abc import Callable

import pandas as pd
import pytest
import torch

from mechdistill.distill.baselines import causal_lm, cwt, morsd
from mechdistill.distill.recipe import RecipeContext
from mechdistill.models import byte_tokenizer
from tests.distill.baselines.test_cwt import context as cwt_context
from tests.distill.baselines.test_morsd import split_artifacts, teacher_frame
from tests.helpers import tiny_llama

WORLD = 2


class FakeRanks:
    """`world` threads as ranks: run(fn) calls fn(rank) on each; `gather` is their all_gather_object."""

    def __init__(self, world: int) -> None:
        self.world, self.local = world, threading.local()
        self.slots: list = [None] * world
        self.barrier = threading.Barrier(world, timeout=120)

    @property
    def rank(self) -> int:
        return getattr(self.local, "rank", 0)

    def gather(self, value) -> list:
        self.slots[self.rank] = value
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them all
        return out

    def run(self, fn: Callable[[int], object]) -> list:
        results, errors = [None] * self.world, []

        def body(rank: int) -> None:
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except BaseException as error:  # noqa: BLE001 - reraised below, in the test's thread
                errors.append(error)
                self.barrier.abort()
        threads = [threading.Thread(target=body, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


@pytest.fixture()
def ranks(monkeypatch) -> FakeRanks:
    fake = FakeRanks(WORLD)
    monkeypatch.setattr(causal_lm, "gather_to_all", fake.gather)
    return fake


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def counted(monkeypatch, ranks: FakeRanks, module, name: str) -> Counter:
    """Count the calls of module.name (one forward each) by rank."""
    calls, real = Counter(), getattr(module, name)

    def wrapper(*args, **kwargs):
        calls[ranks.rank] += 1
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, wrapper)
    return calls


def test_across_ranks_gives_every_rank_every_result_and_each_scores_its_share(ranks):
    requests = list("abcde")
    scored: dict[int, list[str]] = {0: [], 1: []}

    def score(request: str) -> str:
        scored[ranks.rank].append(request)
        return request.upper()
    out = ranks.run(lambda rank: causal_lm.across_ranks(score, requests, rank, WORLD))
    assert out == [list("ABCDE")] * WORLD
    assert scored == {0: ["a", "c", "e"], 1: ["b", "d", "a"]}  # rank 1's third is padding: the same count


def test_morsd_rationale_difficulty_on_two_ranks_is_one_process_s(tok, ranks, monkeypatch):
    model = tiny_llama(vocab=len(tok), seed=0)

    def context(rank: int, world: int) -> RecipeContext:
        return RecipeContext(tokenizer=tok, split=split_artifacts(), split_name="train",
                             params=morsd.RECIPE.spec.params(None), seed=0, teacher_data=teacher_frame(),
                             model=copy.deepcopy(model), rank=rank, world=world)
    alone = morsd.items(context(0, 1))
    calls = counted(monkeypatch, ranks, morsd, "answer_ce")
    shared = ranks.run(lambda rank: morsd.items(context(rank, WORLD)))
    # d1's 2 unique correct rationales and d2's greedy fallback: 3 x (with, without) = 6 answer CEs
    assert calls == {0: 3, 1: 3}
    for items in shared:
        assert [(i.doc_id, i.record) for i in items] == [(i.doc_id, i.record) for i in alone]
        assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(items, alone))


def test_cwt_skip_labels_and_chunk_search_on_two_ranks_are_one_process_s(tok, ranks, monkeypatch):
    model = tiny_llama(vocab=len(tok), seed=0)
    cots = {f"d{i}": "Aaaa. Bbbb. Cccc. Dddd. Eeee. " * (i + 1) for i in range(3)}

    def context(rank: int, world: int) -> RecipeContext:
        ctx = cwt_context(tok, cots, model=copy.deepcopy(model), chunking="search", n_chunks=4)
        ctx.rank, ctx.world = rank, world
        return ctx

    def prepare(rank: int, world: int) -> tuple[list, pd.DataFrame]:
        ctx = context(rank, world)
        items = cwt.items(ctx)
        return items, cwt.relabel(ctx, items, ctx.model)
    alone_items, alone_labels = prepare(0, 1)
    searches = counted(monkeypatch, ranks, cwt, "token_nll")
    answers = counted(monkeypatch, ranks, cwt, "answer_ce")
    shared = ranks.run(lambda rank: prepare(rank, WORLD))
    assert searches == {0: 2, 1: 2}  # 3 documents searched: rank 1 pads with a repeat
    assert answers == {0: 5, 1: 5}   # 3 documents x (the whole CoT + 2 middle chunks) = 9 answer CEs, padded to 10
    for items, labels in shared:
        assert [(i.doc_id, i.record) for i in items] == [(i.doc_id, i.record) for i in alone_items]
        pd.testing.assert_frame_equal(labels, alone_labels)


def _gloo_rank(rank: int, init: str, out: str) -> None:
    """One of two real gloo ranks: `across_ranks` with torch.distributed's all_gather_object."""
    import json

    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        scored: list[int] = []

        def score(request: int) -> int:
            scored.append(request)
            return request * request
        results = causal_lm.across_ranks(score, list(range(7)), rank, WORLD)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"results": results, "scored": scored}, f)
    finally:
        torch.distributed.destroy_process_group()


def test_across_ranks_on_two_gloo_processes(tmp_path):
    import json

    torch.multiprocessing.spawn(_gloo_rank, args=(f"file://{tmp_path / 'init'}", str(tmp_path / "out")), nprocs=WORLD)
    outs = [json.loads((tmp_path / f"out.{rank}").read_text()) for rank in range(WORLD)]
    assert [o["results"] for o in outs] == [[i * i for i in range(7)]] * WORLD
    assert [o["scored"] for o in outs] == [[0, 2, 4, 6], [1, 3, 5, 0]]  # 4 each: rank 1 pads with request 0
