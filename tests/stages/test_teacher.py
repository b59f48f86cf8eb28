"""rules/teacher.smk stage: teacher_cot on the tiny prompts."""

import pandas as pd

from mechdistill import paths
from tests.stages.conftest import DATASET, TEACHER


def test_teacher_cot_parses_one_trace_per_prompt(tiny):
    tiny.ensure("teacher_cot")
    labels = pd.read_parquet(tiny.path(paths.labels(DATASET)))
    for split in paths.SPLITS:
        prompts = pd.read_parquet(tiny.path(paths.prompts(DATASET, split)))
        cot = pd.read_parquet(tiny.path(paths.cot(DATASET, TEACHER, split)))
        assert list(cot["doc_id"]) == list(prompts["doc_id"])
        # 12 new tokens, then at most 4 more to write a forced answer block
        assert cot["n_tokens"].between(1, 12 + 4).all()
        assert cot["forced_answer"].eq(cot["has_answer_block"] & cot["finish_reason"].eq("length")).all()
        for row in cot.itertuples():
            assert row.raw.strip().startswith(row.cot)  # the reasoning is what precedes <answer>
            assert set(row.pred_labels) <= set(labels["label_id"])
    assert not list(tiny.path(paths.cot(DATASET, TEACHER, "test")).parent.glob(".*shards-*"))  # cleaned up
