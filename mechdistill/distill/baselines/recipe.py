"""What a CoT-distillation baseline is made of, and the causal-LM pieces the four share.

A baseline (UniCoTT, MoRSD, SemCoT, CWT) keeps the trainer, the optimizer and the budget of
vanilla and mech (`distill.trainer`, `distill.train`) and changes three things, each a field of
its `Recipe`:

    teacher_data  extra teacher output it needs, built once per method (train and val) by the
                  `baseline_teacher_data` rule -> results/{dataset}/{teacher}/baseline_data/{method}/{split}.parquet
                  (sampled CoTs, structured explanations, condensed CoTs); None: the greedy traces suffice
    items         what it trains on: `Item`s (token ids, the positions the CE supervises, named spans),
                  built from the split's artifacts, the teacher data and, where the method says so,
                  the student itself (MoRSD's rationale difficulty)
    relabel       optional: labels computed once with the student as it is at the start of epoch
                  `params["skip_from_epoch"]` (CWT's skippable chunks); the stage keeps them in the
                  checkpoint folder, so a resumed run reuses them
    epoch_items   optional: the items of one epoch, from the fixed items and the labels (None before
                  relabelling); pure, so a resumed run rebuilds the same epoch
    loss          its objective on one item: {"loss", "cot.ce", "cot.kl", "<method>.<term>", ...}
    predict       optional: its own inference (SemCoT's implicit thought tokens); None generates as
                  vanilla does (`teacher.generate.generate_cot` with the student)

Every item a recipe builds is recorded in the grid point's training_items.parquet (doc_id, n_tokens,
n_supervised and the recipe's own columns), so what each method trained on can be read back.

The CoT loss terms "cot.ce" and "cot.kl" keep their meaning across methods: CE on the tokens the
method supervises, and the KL to the teacher's top-k (0 for the baselines: none of the four papers
distils logits), so `distill.select.criterion` val_cot_loss ranks a baseline's grid points by its own
validation CE.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...io import SplitArtifacts
from ...models import input_device
from ...teacher.prompts import render_prompt
from ...text import char_span_to_tokens, token_offsets
from .catalog import Baseline

log = logging.getLogger(__name__)

Span = tuple[int, int]  # token positions [start, end)


@dataclass
class Item:
    """One training sample of a baseline: a token sequence for the student and what its loss reads.

    supervised[i] is True when token i is a CE target (predicted by the logits at i - 1).
    spans: named lists of token spans, e.g. {"nodes": [(12, 30), (30, 41)]}.
    extra: anything else the loss needs (tensors, labels); record: columns of training_items.parquet.
    """

    doc_id: str
    input_ids: Tensor                                           # [seq]
    supervised: Tensor                                          # [seq] bool
    spans: dict[str, list[Span]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    record: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The item's row of training_items.parquet."""
        return {"doc_id": self.doc_id, "n_tokens": int(self.input_ids.numel()),
                "n_supervised": int(self.supervised.sum()), **self.record}


@dataclass
class RecipeContext:
    """What a recipe builds its items from: one split of the teacher's traces, the method's teacher
    data for that split (None without), its settings and, for recipes that score data with the
    student, the student as loaded (before training)."""

    tokenizer: Any
    split: SplitArtifacts
    split_name: str
    params: Mapping[str, Any]
    seed: int
    teacher_data: pd.DataFrame | None = None
    model: nn.Module | None = None


@dataclass
class TeacherDataContext:
    """What a recipe's teacher-data builder gets: the teacher's generation (`generate`, rendered
    texts -> continuations, batched, seeded when sampling), its tokenizer's chat template
    (`render`), one split's artifacts and the method's settings."""

    generate: Callable[..., list[str]]
    render: Callable[[list[dict]], str]
    split: SplitArtifacts
    split_name: str
    params: Mapping[str, Any]
    seed: int


@dataclass(frozen=True)
class Recipe:
    """A baseline method's parts (module docstring). `spec` is what the workflow knows of it without
    torch (`catalog.Baseline`: name, settings, the settings its teacher data depends on); the
    recipe's callables must match the spec's `teacher_data` / `own_inference` flags."""

    spec: Baseline
    items: Callable[[RecipeContext], list[Item]]
    loss: Callable[[nn.Module, Item, Mapping[str, Any]], dict[str, Tensor]]
    teacher_data: Callable[[TeacherDataContext], pd.DataFrame] | None = None
    relabel: Callable[[RecipeContext, list[Item], nn.Module], pd.DataFrame] | None = None
    epoch_items: Callable[[RecipeContext, list[Item], int, pd.DataFrame | None], list[Item]] | None = None
    predict: Callable[..., pd.DataFrame] | None = None

    def __post_init__(self) -> None:
        for flag, part in (("teacher_data", self.teacher_data), ("own_inference", self.predict)):
            if getattr(self.spec, flag) != (part is not None):
                raise ValueError(f"{self.name}: catalog.BASELINES[{self.name!r}].{flag} is {getattr(self.spec, flag)}, "
                                 f"but the recipe {'lacks' if part is None else 'has'} it")

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def defaults(self) -> Mapping[str, Any]:
        return self.spec.defaults

    def params(self, overrides: Mapping[str, Any] | None) -> dict[str, Any]:
        """The defaults with the config's overrides (`catalog.Baseline.params`)."""
        return self.spec.params(overrides)


# ----------------------------------------------------------------------------- sequences


def encode(tokenizer, messages_json: str, pieces: Sequence[tuple[str, str]], supervise: Sequence[str] | None = None
           ) -> tuple[Tensor, Tensor, dict[str, Span]]:
    """The prompt (chat template of `messages_json`) followed by the text `pieces` [(name, text), ...].

    Returns input_ids [seq], supervised [seq] bool (the tokens of the pieces named in `supervise`,
    default all pieces) and each piece's token span {name: (start, end)} (a token straddling two
    pieces belongs to the first; a piece with no token of its own gets an empty span).
    """
    prompt = render_prompt(tokenizer, json.loads(messages_json))
    text, bounds = prompt, {}
    for name, piece in pieces:
        bounds[name] = (len(text), len(text) + len(piece))
        text += piece
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    offsets = token_offsets(tokenizer, text)
    spans, taken = {}, 0
    for name, (start, end) in bounds.items():
        tokens = [t for t in char_span_to_tokens(offsets, (start, end)) if t >= taken]
        spans[name] = (tokens[0], tokens[-1] + 1) if tokens else (taken, taken)
        taken = max(taken, spans[name][1])
    supervised = torch.zeros(len(ids), dtype=torch.bool)
    for name in (supervise if supervise is not None else bounds):
        start, end = spans[name]
        supervised[start:end] = True
    return torch.tensor(ids, dtype=torch.long), supervised, spans


def forward(model: nn.Module, input_ids: Tensor, hidden: bool = False) -> tuple[Tensor, Tensor | None]:
    """Logits [1, seq, vocab] of one sequence, and its last hidden states [1, seq, d] when asked."""
    out = model(input_ids=input_ids[None].to(input_device(model)), output_hidden_states=hidden, use_cache=False)
    return out.logits, (out.hidden_states[-1] if hidden else None)


def next_token_ce(logits: Tensor, input_ids: Tensor, supervised: Tensor) -> Tensor:
    """Mean CE of the supervised tokens: -1/|S| sum_{i in S} log p(x_i | x_<i) (logits [1, seq, V] of the
    same sequence; position 0 is never a target). 0 (with grad) when nothing is supervised."""
    targets = supervised[1:].to(logits.device)                                 # [seq-1]
    if not targets.any():
        return logits.sum() * 0.0
    nll = F.cross_entropy(logits[0, :-1].float(), input_ids[1:].to(logits.device), reduction="none")
    return nll[targets].mean()


def span_means(hidden: Tensor, spans: Sequence[Span]) -> Tensor:
    """Mean hidden state over each token span: hidden [1, seq, d] -> [n_spans, d] (an empty span: zeros)."""
    rows = [hidden[0, start:end].mean(0) if end > start else hidden.new_zeros(hidden.shape[-1])
            for start, end in spans]
    return torch.stack(rows) if rows else hidden.new_zeros(0, hidden.shape[-1])


def cot_terms(ce: Tensor) -> dict[str, Tensor]:
    """The CoT terms of a baseline's loss dict: its CE, and a KL of 0 (no logit distillation)."""
    return {"cot.ce": ce, "cot.kl": ce.new_zeros(())}


def items_frame(items: Sequence[Item], split: str, epoch: int | None = None) -> pd.DataFrame:
    """training_items.parquet rows of `items` (split, epoch: None for items fixed before training)."""
    return pd.DataFrame([{"split": split, "epoch": epoch, **item.summary()} for item in items])


def progress(iterable, desc: str, total: int | None = None):
    """A progress bar for a recipe's per-document work (scoring, labelling)."""
    return tqdm(iterable, desc=desc, total=total, unit="doc", leave=False)
