"""Choosing by validation ("hyperparameters are selected based on validation performance on the
development split"): the criteria, the best step of a train log, the best grid point of a method,
and publishing that point's files as the method's.

A criterion (`distill.select.criterion`) is computed on the val split at every evaluation of the
trainer (every `eval_every` steps and at the end) and logged in the train log's val rows under its
name. The trainer keeps the weights of the best evaluation; `select_point` then compares the grid
points of a method by the best value in each point's log. Both use `Criterion.better`: a strictly
better value wins, so ties keep the earliest step and the first point; NaN never wins.

    val_cot_loss  (default) mean CE + KL of the student on the teacher's val CoT, unweighted
                  ("cot.ce" + "cot.kl" of the val row): the same quantity for every method and
                  grid point whatever their loss weights, so it compares them fairly
    val_loss      the method's own total loss: each method and grid point weighs its terms
                  differently, so it only compares the steps of one run (never grid points:
                  `methods.check_methods`)
    val_macro_f1  macro-F1 of the labels the student answers on the first distill.select.val_docs val
                  prompts, generated greedily as student_predict does (`TransformersBackend.from_model`;
                  a method with its own inference through its recipe's `predict`; the stage scores it with
                  evaluate.xmc). DeepSpeed ranks share the documents and step each generation together
                  (`teacher.generate.answers_across_ranks`). Expensive: every evaluation generates a full
                  CoT for each of those documents (demo, 2 CPU threads: about 15 s for its 4 val documents
                  on top of the 7 s of the loss evaluation, i.e. 2-3 training steps)
"""

from __future__ import annotations

import logging
import math
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from ..io import atomic_path, make_empty_dir, publish_dir, temp_dir_for

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Criterion:
    """What makes an evaluation the best so far.

    value(model, val_row) -> float runs after each evaluation, with the model in eval mode and
    val_row the evaluation's log row so far (split, step, epoch and the mean loss terms "loss",
    "<term>", ...); the value is logged in that row under `name`. Lower is better unless
    `maximize`. Only a strictly better value wins, so ties keep the earliest step; NaN never wins
    (the first evaluation stands until a value that is not NaN comes).
    """

    name: str
    value: Callable[[Any, Mapping[str, float]], float]
    maximize: bool = False

    def better(self, value: float, best: float | None) -> bool:
        """Whether `value` replaces `best` (None: nothing evaluated yet)."""
        if best is None:
            return True
        if math.isnan(value):
            return False
        if math.isnan(best):
            return True
        return value > best if self.maximize else value < best


VAL_LOSS = Criterion("val_loss", lambda model, row: float(row["loss"]))


CRITERIA = {"val_cot_loss": False, "val_loss": False, "val_macro_f1": True}  # name -> maximize
DEFAULT_CRITERION = "val_cot_loss"
COT_TERMS = ("cot.ce", "cot.kl")
LINK_MIN_BYTES = 1 << 20  # published files this large are hard links (weights); smaller ones copies


def cot_loss_value(model: Any, row: Mapping[str, float]) -> float:
    """val_cot_loss of an evaluation: the unweighted sum of its CoT terms."""
    missing = [term for term in COT_TERMS if term not in row]
    if missing:
        raise ValueError(f"criterion val_cot_loss needs the loss terms {list(COT_TERMS)}; the loss "
                         f"function returned none of {missing} (keys: {sorted(row)})")
    return float(sum(row[term] for term in COT_TERMS))


def make_criterion(name: str, value: Callable[[Any, Mapping[str, float]], float] | None = None) -> Criterion:
    """The criterion `name` (module docstring). val_macro_f1 needs its `value` function
    (model, val_row) -> macro-F1, which the stage builds (generation and evaluate.xmc)."""
    if name not in CRITERIA:
        raise ValueError(f"unknown criterion {name!r}; known: {', '.join(CRITERIA)}")
    if name == "val_loss":
        return VAL_LOSS
    if name == "val_cot_loss":
        value = cot_loss_value
    elif value is None:
        raise ValueError("criterion val_macro_f1 needs a value function (generation + macro-F1)")
    return Criterion(name, value, CRITERIA[name])


def generation_criterion(name: str, answer: Callable[[Any], list[list[str]]], gold: list[list[str]],
                         score: Callable[[list[list[str]], list[list[str]]], float]) -> Criterion:
    """A criterion that has the model answer (`answer(model)`: each document's predicted labels) and
    scores the answers against `gold` (e.g. val_macro_f1: `evaluate.xmc.macro_f1` of greedy answers)."""
    return make_criterion(name, lambda model, row: score(gold, answer(model)))


def _rule(name: str) -> Criterion:
    """A criterion that only compares values (of a log)."""
    return Criterion(name, lambda model, row: math.nan, CRITERIA[name])


def best_row(log: pd.DataFrame, name: str) -> pd.Series | None:
    """The val row of a train log that the trainer chose under criterion `name` (the first
    strictly best); None without val rows."""
    if name not in log.columns:
        raise ValueError(f"the train log has no {name!r} column: it was trained under another criterion "
                         "(or an older version); rerun its distill job")
    rule, best = _rule(name), None
    for _, row in log[log["split"] == "val"].iterrows():
        if rule.better(float(row[name]), None if best is None else float(best[name])):
            best = row
    return best


def _json_number(value: float) -> float | None:
    return None if math.isnan(value) else value


def select_point(logs: Mapping[str, pd.DataFrame], values: Mapping[str, dict[str, float]],
                 name: str) -> dict[str, Any]:
    """The grid point whose train log has the best value of criterion `name`.

    logs: point name -> its train log, in grid order (ties keep the first); values: point name ->
    its grid values. Returns the selection record: criterion, maximize, point, values, step, value
    (of the chosen point) and candidates (each point's point, values, step, value; step and value
    None for a point never evaluated, which never wins unless no point was)."""
    rule, candidates, chosen = _rule(name), [], None
    for point, train_log in logs.items():
        row = best_row(train_log, name)
        value = math.nan if row is None else float(row[name])
        step = None if row is None else int(row["step"])
        candidates.append({"point": point, "values": dict(values[point]), "step": step, "value": value})
        if rule.better(value, None if chosen is None else chosen["value"]):
            chosen = candidates[-1]
    if chosen is None:
        raise ValueError("select_point: no grid point to choose from")
    candidates = [{**c, "value": _json_number(c["value"])} for c in candidates]
    return {"criterion": name, "maximize": CRITERIA[name], "point": chosen["point"], "values": chosen["values"],
            "step": chosen["step"], "value": _json_number(chosen["value"]), "candidates": candidates}


# ----------------------------------------------------------------------------- publishing


def link_dir(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Publish folder `source` again at `target`, atomically (built aside, then renamed): files of
    LINK_MIN_BYTES or more as hard links (the weights: nothing big is copied; a copy where the file
    system refuses links), smaller ones copied, so they are newer than `source`'s (Snakemake
    compares the times of config.json)."""
    source, target = Path(source), Path(target)
    tmp = temp_dir_for(target)
    make_empty_dir(tmp)
    for path in sorted(source.rglob("*")):
        dest = tmp / path.relative_to(source)
        if path.is_dir():
            dest.mkdir(parents=True, exist_ok=True)
            continue
        if path.stat().st_size >= LINK_MIN_BYTES:
            try:
                os.link(path, dest)
                continue
            except OSError as err:
                log.warning("cannot hard-link %s (%s): copying it", path, err)
        shutil.copyfile(path, dest)
    publish_dir(tmp, target)


def copy_file(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a (small) file atomically."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)
