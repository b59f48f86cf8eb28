"""The recipe of vanilla, mech and its ablations: the student teacher-forced on the teacher's CoT,
trained on `objective.student_loss` against the teacher's targets.

An item is one teacher-forced example (`signals.Example`, the teacher's CoT and answer in the
student's tokens) of a document the teacher has targets for; it supervises every CoT and answer
token. The loss is the CoT loss (CE + top-k KL) plus the Phase 1 and Phase 2 losses of the
method's switches (`methods.Method`), weighted by distill.weights with the grid point's over them.
vanilla switches both phases off; mech keeps every term; an ablation drops a phase or a term.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..characterize.scores import CoarseVariant
from .methods import Method
from .objective import student_loss
from .pools import HeadPool
from .recipe import Item, MethodPoint, Recipe, RecipeContext
from .signals import Example, SplitExamples

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MechParams:
    """What the loss reads besides the item: the method's switches and weights, the KL temperature,
    heads.tau and heads.coarse (the Phase-1 sharpness the targets were made with)."""

    method: Method
    weights: Mapping[str, float]
    temperature: float
    tau: float
    coarse: CoarseVariant


def params(point: MethodPoint) -> MechParams:
    return MechParams(point.method, dict(point.weights), point.temperature, point.tau, point.coarse)


def example_item(ex: Example, **extra) -> Item:
    """An example as an item: its tokens, supervising every token after the prompt (the CoT and answer)."""
    supervised = torch.zeros(len(ex.input_ids), dtype=torch.bool)
    supervised[[p + 1 for p in ex.cot_positions]] = True
    return Item(ex.doc_id, ex.input_ids, supervised, extra={"example": ex, **extra})


class LazyExampleItem(Item):
    """`example_item` of example `position` of `examples` (`SplitExamples`), made when the trainer reads it:
    an item holds its doc_id and counts, not its tokens, so a rank's items of the whole split stay small."""

    def __init__(self, examples: SplitExamples, position: int, **extra: Any) -> None:
        self.examples, self.position, self.more = examples, position, extra
        self.doc_id, self.spans, self.record = examples.info[position].doc_id, {}, {}

    def _item(self) -> Item:
        return example_item(self.examples[self.position], **self.more)

    @property
    def input_ids(self) -> torch.Tensor:  # [seq]
        return self.examples[self.position].input_ids

    @property
    def supervised(self) -> torch.Tensor:  # [seq] bool
        return self._item().supervised

    @property
    def extra(self) -> dict[str, Any]:
        return {"example": self.examples[self.position], **self.more}

    def summary(self) -> dict[str, Any]:
        info = self.examples.info[self.position]
        return {"doc_id": self.doc_id, "n_tokens": info.n_tokens, "n_supervised": info.n_supervised}


def items(ctx: RecipeContext) -> list[Item]:
    """The split's examples the teacher has targets for (the others are named in a warning: the
    teacher's length cap skipped them), each with its pools and targets (both read when trained on)."""
    examples: Sequence[Example] = ctx.examples
    doc_ids = examples.doc_ids if isinstance(examples, SplitExamples) else [ex.doc_id for ex in examples]
    targets, split = ctx.targets, ctx.split_name
    untargeted = [doc_id for doc_id in doc_ids if not targets.has(split, doc_id)]
    if untargeted:
        log.warning("%s: %d documents have no teacher targets (skipped by the teacher's length cap?) and are "
                    "not trained on: %s", ctx.split_name, len(untargeted), untargeted[:10])

    def extra(doc_id: str) -> dict[str, Any]:
        return dict(pools=ctx.pools, targets=lambda: targets.get(split, doc_id), scales=targets.scales)
    if isinstance(examples, SplitExamples):
        return [LazyExampleItem(examples, i, **extra(doc_id)) for i, doc_id in enumerate(doc_ids)
                if targets.has(split, doc_id)]
    return [example_item(ex, **extra(ex.doc_id)) for ex in examples if targets.has(split, ex.doc_id)]


def loss(model: nn.Module, item: Item, params: MechParams) -> dict[str, Tensor]:
    pools: dict[str, HeadPool] = item.extra["pools"]
    return student_loss(model, item.extra["example"], item.extra["targets"](), pools, params.method, params.tau,
                        params.temperature, params.weights, coarse=params.coarse, scales=item.extra["scales"])


RECIPE = Recipe("mech", items=items, loss=loss, params=params, needs_targets=True)
