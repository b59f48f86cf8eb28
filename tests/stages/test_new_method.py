"""A new distillation method is one module holding its RECIPE and one entry in methods.METHODS: this module is one."""

from __future__ import annotations

import copy

import pandas as pd
import torch

from mechdistill import paths
from mechdistill.distill import methods
from mechdistill.distill.baselines.causal_lm import cot_terms, forward, next_token_ce
from mechdistill.distill.recipe import Item, Recipe, RecipeContext
from mechdistill.stages.distill import run_distill
from tests.stages.conftest import DATASET, STUDENT

LAST_TOKENS = 3


def toy_items(ctx: RecipeContext) -> list[Item]:
    """One item per teacher-forced example, supervising only its last LAST_TOKENS tokens."""
    items = []
    for ex in ctx.examples:
        supervised = torch.zeros(len(ex.input_ids), dtype=torch.bool)
        supervised[-LAST_TOKENS:] = True
        items.append(Item(ex.doc_id, ex.input_ids, supervised, record={"toy_split": ctx.split_name}))
    return items


def toy_loss(model, item: Item, params: dict) -> dict[str, torch.Tensor]:
    logits, _ = forward(model, item.input_ids)
    ce = next_token_ce(logits, item.input_ids, item.supervised)
    return {"loss": params["weight"] * ce, **cot_terms(ce), "toy.weighted": (params["weight"] * ce).detach()}


RECIPE = Recipe("toy", items=toy_items, loss=toy_loss, params=lambda point: {"weight": 2.0})


def test_a_method_defined_only_here_trains_through_the_distill_stage(tiny, tmp_path, monkeypatch):
    """The extension point: a module holding RECIPE (this one) and an entry in methods.METHODS naming it.
    The stage trains it like any other method, and its items and loss terms are what the recipe says."""
    monkeypatch.setitem(methods.METHODS, "toy", methods.Method("toy", description="last tokens only", recipe=__name__))
    tiny.upto("distill")
    config = copy.deepcopy(tiny.config)
    config["methods"] = {**config["methods"], "toy": {}}
    folder = tmp_path / "toy"
    with tiny.inside():
        run_distill(config, DATASET, STUDENT, "toy", "default", model_dir=folder / "model",
                    log_path=folder / "log.parquet", mechanism_path=folder / "mechanism.parquet",
                    ckpt_dir=folder / "ckpt", best_path=folder / "best.json", items_path=folder / "items.parquet")
    items = pd.read_parquet(folder / "items.parquet")
    train_ids = set(pd.read_parquet(tiny.path(paths.anchors(DATASET, "tiny_llama", "train")))["doc_id"])
    assert set(items.loc[items["split"] == "train", "doc_id"]) == train_ids
    assert (items["n_supervised"] == LAST_TOKENS).all()
    assert (items["toy_split"] == items["split"]).all()
    log = pd.read_parquet(folder / "log.parquet")
    train = log[log["split"] == "train"]
    assert list(train["step"]) == [1, 2]
    assert train["loss"].tolist() == train["toy.weighted"].tolist() == (2.0 * train["cot.ce"]).tolist()
    assert (train["cot.kl"] == 0).all()
    assert (folder / "model" / "model.safetensors").exists()
    mechanism = pd.read_parquet(folder / "mechanism.parquet")
    assert set(mechanism["when"]) == {"before", "after"}  # measured for every method, on the student's pools
