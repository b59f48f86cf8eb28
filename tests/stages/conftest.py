"""The tiny pipeline, run in process, one stage function at a time.

`tiny` is a working folder shared by every stage test of the session (config/tiny.yaml: a random
2-layer LLaMA teacher, its 1-layer student, 8 documents). A test asks for the stages it needs with
`tiny.upto("anchors")` (the stages before it) or `tiny.ensure("anchors")` (and that stage): each stage
runs once per session, in pipeline order, through its `run_*` function, so each stage's test reads
what its function wrote from real artifacts of the stages before it, where Snakemake would put
them (`mechdistill.paths`, relative to the folder).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import pytest

from mechdistill import paths
from mechdistill.config import load_config
from mechdistill.stages import anchors, characterize, data, distill, evaluate, model_free, patching, teacher
from tests.helpers import REPO

DATASET, TEACHER, STUDENT = "tiny_icd", "tiny_llama", "tiny_student"


def _stages(config: dict) -> list[tuple[str, Callable[[], None]]]:
    """(name, runner) of every stage of the tiny pipeline, in DAG order."""
    clean = paths.clean_splits(config)

    def each_split(fn, *args, splits=paths.SPLITS + tuple(clean)):
        return lambda: [fn(config, DATASET, *args, split) for split in splits]

    return [
        ("prepare_dataset", lambda: data.run_prepare_dataset(config, DATASET)),
        ("build_prompts", each_split(data.run_build_prompts, splits=paths.SPLITS)),
        ("clean_prompts", each_split(data.run_clean_prompts, splits=clean)),
        ("teacher_cot", each_split(teacher.run_teacher_cot)),
        ("anchors", each_split(anchors.run_anchors, TEACHER)),
        ("trajectories", lambda: anchors.run_trajectories(config, DATASET, TEACHER)),
        ("head_scores", lambda: [characterize.run_head_scores(config, DATASET, m) for m in (TEACHER, STUDENT)]
         + [characterize.run_head_scores(config, DATASET, TEACHER, s) for s in paths.compared_splits(config)]),
        ("head_comparison", lambda: model_free.run_head_comparison(config, DATASET)),
        ("patching", lambda: [patching.run_patching(config, DATASET, phase) for phase in paths.PHASES]),
        ("teacher_targets", lambda: [distill.run_teacher_targets(config, DATASET, s) for s in ("train", "val")]),
        ("distill", lambda: distill.run_distill(config, DATASET, STUDENT, "mech")),
        ("student_predict", lambda: distill.run_student_predict(config, DATASET, STUDENT, "mech")),
        ("student_trajectories", lambda: anchors.run_trajectories(config, DATASET, f"{STUDENT}/mech")),
        ("las_simulator", lambda: evaluate.run_las_simulator(config, DATASET)),
        ("evaluate", lambda: evaluate.run_evaluate(config, DATASET, STUDENT, "mech")),
    ]


class TinyPipeline:
    def __init__(self, root: Path, config: dict) -> None:
        self.root, self.config = root, config
        self.stages = dict(_stages(config))
        self.done: set[str] = set()

    @contextmanager
    def inside(self):
        """Run with the working folder as current directory (artifact paths are relative)."""
        old = os.getcwd()
        os.chdir(self.root)
        try:
            yield self
        finally:
            os.chdir(old)

    def upto(self, stage: str, inclusive: bool = False) -> TinyPipeline:
        """Make sure every stage before `stage` (and `stage` itself if `inclusive`) has run, in
        pipeline order; each runs at most once per session."""
        names = list(self.stages)
        for name in names[: names.index(stage) + inclusive]:
            if name not in self.done:
                with self.inside():
                    self.stages[name]()
                self.done.add(name)
        return self

    def ensure(self, stage: str) -> TinyPipeline:
        """`stage` and everything before it have run: the stage's own test reads what it wrote."""
        return self.upto(stage, inclusive=True)

    def path(self, relative: str) -> Path:
        return self.root / relative


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, model_cache) -> TinyPipeline:
    config = load_config(REPO / "config" / "tiny.yaml", {"cache_dir": str(model_cache)})
    return TinyPipeline(tmp_path_factory.mktemp("tiny-pipeline"), config)
