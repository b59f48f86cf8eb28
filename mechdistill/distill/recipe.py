"""What a distillation method is made of: a `Recipe`.

Every method (vanilla, mech and its ablations in `distill/mech.py`; the four baselines UniCoTT,
MoRSD, SemCoT, CWT in `distill/baselines/`) keeps the trainer, the optimizer and the budget
(`distill.trainer`, `distill.train`) and says, in the fields of its `Recipe`:

    items         what it trains on: `Item`s (token ids, the positions the CE supervises, named spans,
                  anything its loss reads), built per split from a `RecipeContext`: the split's
                  artifacts, its teacher-forced examples, the student's head pools, the teacher's
                  targets (`needs_targets`), the method's teacher data and, where the method says so,
                  the student itself (MoRSD's rationale difficulty)
    loss          its objective on one item: loss(model, item, params) -> {"loss", "cot.ce", "cot.kl", ...};
                  `params` is what `params` built for the run (a baseline: its settings dict)
    params        MethodPoint -> the loss's params (the method at its grid point, with the run's shared
                  settings: loss weights, KL temperature, head settings)
    teacher_data  optional: extra teacher output it needs, built once per method (train and val) by the
                  `baseline_teacher_data` rule -> results/{dataset}/{teacher}/baseline_data/{method}/{split}.parquet
    relabel       optional: labels computed once with the student as it is at the start of epoch
                  `params["skip_from_epoch"]` (CWT's skippable chunks); the run keeps them next to the
                  checkpoint, so a resumed run reuses them
    epoch_items   optional: the items of one epoch, from the fixed items and the labels (None before
                  relabelling); pure, so a resumed run rebuilds the same epoch
    predict       optional: its own inference (SemCoT's implicit thought tokens); None generates as
                  vanilla does (`teacher.generate.generate_cot` with the student)

`distill.run.distill` runs any recipe. Adding a method is one module holding its `RECIPE` and one
entry in `methods.METHODS` naming that module.

Every item a recipe builds is recorded in the grid point's training_items.parquet (doc_id, n_tokens,
n_supervised and the recipe's own columns), so what each method trained on can be read back.

The CoT loss terms "cot.ce" and "cot.kl" keep their meaning across methods: CE on the tokens the
method supervises, and the KL to the teacher's top-k (0 for the baselines: none of the four papers
distils logits), so `distill.select.criterion` val_cot_loss ranks grid points by the CoT loss.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from torch import Tensor, nn

from ..characterize.scores import CoarseVariant
from ..io import SplitArtifacts
from .catalog import Baseline
from .methods import Method
from .pools import HeadPool
from .signals import Example
from .targets import TeacherTargets

Span = tuple[int, int]  # token positions [start, end)


@dataclass
class Item:
    """One training sample: a token sequence for the student and what its loss reads.

    supervised[i] is True when token i is a CE target (predicted by the logits at i - 1).
    spans: named lists of token spans, e.g. {"nodes": [(12, 30), (30, 41)]}.
    extra: anything else the loss needs (tensors, labels, the teacher-forced example); record: columns
    of training_items.parquet.
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
    """What a recipe builds its items from, for one split: the teacher's traces (`split`), their
    teacher-forced examples for this student (`examples`, `signals.make_examples`), the student's head
    pools, the teacher's targets (for a recipe with `needs_targets`), the method's params and teacher
    data (None without) and, for recipes that score data with the student, the student as loaded."""

    tokenizer: Any
    split: SplitArtifacts
    split_name: str
    params: Any
    seed: int
    teacher_data: pd.DataFrame | None = None
    model: nn.Module | None = None
    examples: Sequence[Example] = ()
    pools: Mapping[str, HeadPool] = field(default_factory=dict)
    targets: TeacherTargets | None = None
    rank: int = 0                      # this process's rank of `world` (ZeRO-3): a recipe that scores items
    world: int = 1                     # with the student shares the work (`baselines.causal_lm.across_ranks`)


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
class MethodPoint:
    """A method at one grid point, with the run-wide settings a recipe's params may read."""

    method: Method
    point: str                         # the grid point's name ("default" without a grid)
    settings: Mapping[str, Any]        # the method's config entry at this point (`methods.grid_point`)
    weights: Mapping[str, float]       # distill.weights with the entry's `weights` over them
    temperature: float                 # distill.temperature: the KL's
    tau: float                         # heads.tau
    coarse: CoarseVariant              # heads.coarse


def baseline_params(spec: Baseline) -> Callable[[MethodPoint], dict[str, Any]]:
    """A baseline's `Recipe.params`: its defaults with the entry's `params:` over them."""
    return lambda point: spec.params(point.settings.get("params"))


@dataclass(frozen=True)
class Recipe:
    """A method's parts (module docstring). `spec`, for a baseline, is what the workflow knows of it
    without torch (`catalog.Baseline`); its `teacher_data` / `own_inference` flags must match the
    recipe's callables."""

    name: str
    items: Callable[[RecipeContext], list[Item]]
    loss: Callable[[nn.Module, Item, Any], dict[str, Tensor]]
    params: Callable[[MethodPoint], Any]
    needs_targets: bool = False        # the run loads the teacher's targets into RecipeContext.targets
    items_need_student: bool = False   # items are built with the student (ctx.model), once training has started
    teacher_data: Callable[[TeacherDataContext], pd.DataFrame] | None = None
    relabel: Callable[[RecipeContext, list[Item], nn.Module], pd.DataFrame] | None = None
    epoch_items: Callable[[RecipeContext, list[Item], int, pd.DataFrame | None], list[Item]] | None = None
    predict: Callable[..., pd.DataFrame] | None = None
    spec: Baseline | None = None

    def __post_init__(self) -> None:
        if self.spec is None:
            return
        for flag, part in (("teacher_data", self.teacher_data), ("own_inference", self.predict)):
            if getattr(self.spec, flag) != (part is not None):
                raise ValueError(f"{self.name}: catalog.BASELINES[{self.name!r}].{flag} is {getattr(self.spec, flag)}, "
                                 f"but the recipe {'lacks' if part is None else 'has'} it")


def baseline_recipe(spec: Baseline, **parts: Any) -> Recipe:
    """The Recipe of baseline `spec`: its name, its settings as params, and `parts`."""
    return Recipe(spec.name, params=baseline_params(spec), spec=spec, **parts)


def items_frame(items: Sequence[Item], split: str, epoch: int | None = None) -> pd.DataFrame:
    """training_items.parquet rows of `items` (split, epoch: None for items fixed before training)."""
    return pd.DataFrame([{"split": split, "epoch": epoch, **item.summary()} for item in items])
