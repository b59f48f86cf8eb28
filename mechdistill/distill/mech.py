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
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..characterize.scores import CoarseVariant
from .methods import Method
from .objective import student_loss
from .pools import HeadPool
from .recipe import Item, MethodPoint, Recipe, RecipeContext
from .signals import Example

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


def items(ctx: RecipeContext) -> list[Item]:
    """The split's examples the teacher has targets for (the others are named in a warning: the
    teacher's length cap skipped them), each with its pools and targets."""
    untargeted = [ex.doc_id for ex in ctx.examples if not ctx.targets.has(ctx.split_name, ex.doc_id)]
    if untargeted:
        log.warning("%s: %d documents have no teacher targets (skipped by the teacher's length cap?) and are "
                    "not trained on: %s", ctx.split_name, len(untargeted), untargeted[:10])
    targets, split = ctx.targets, ctx.split_name
    return [example_item(ex, pools=ctx.pools, targets=lambda doc_id=ex.doc_id: targets.get(split, doc_id),
                         scales=targets.scales)
            for ex in ctx.examples if targets.has(split, ex.doc_id)]


def loss(model: nn.Module, item: Item, params: MechParams) -> dict[str, Tensor]:
    pools: dict[str, HeadPool] = item.extra["pools"]
    return student_loss(model, item.extra["example"], item.extra["targets"](), pools, params.method, params.tau,
                        params.temperature, params.weights, coarse=params.coarse, scales=item.extra["scales"])


RECIPE = Recipe("mech", items=items, loss=loss, params=params, needs_targets=True)
