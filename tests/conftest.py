import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """One model cache for the whole test session (GGUF conversion runs at most once)."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture()
def tiny_config(model_cache):
    from mechdistill.config import load_config

    return load_config(REPO / "config" / "tiny.yaml", {"cache_dir": str(model_cache)})


@pytest.fixture(scope="session")
def icd_space():
    from mechdistill.data.icd10cm import label_table
    from mechdistill.labels import LabelSpace

    return LabelSpace(label_table())
