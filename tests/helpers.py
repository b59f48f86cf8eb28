"""Builders shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import simple_icd_10_cm as icd
import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config, LlamaConfig, LlamaForCausalLM

from mechdistill.characterize.attention import attention_modules
from mechdistill.data.icd10cm import title
from mechdistill.labels import LabelSpace
from mechdistill.models import TINY_ARCH_DEFAULTS

REPO = Path(__file__).resolve().parent.parent


def load_benchmark(name: str):
    """The script benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module
VOCAB = 97
WINDOW = 8  # gemma3 sliding window, shorter than the test sequences so it matters


def icd_subtree(code: str) -> LabelSpace:
    """A real ICD-10-CM subtree (with its ancestors' rows), built fast without the whole table."""
    codes = icd.get_ancestors(code)[::-1] + [code] + icd.get_descendants(code)
    return LabelSpace(pd.DataFrame(
        [(c, title(c), icd.get_parent(c) or None, icd.get_ancestors(c), icd.is_leaf(c)) for c in codes],
        columns=["label_id", "title", "parent", "ancestors", "assignable"]))


def tiny_llama(vocab: int, seed: int):
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                      max_position_embeddings=512)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


# Gemma 2 with a sharp attention soft-cap (logits within +-2).
GEMMA2_FIELDS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, max_position_embeddings=512,
                     attn_logit_softcapping=2.0)


def tiny_gemma2(attn: str = "eager", seed: int = 0):
    """A 2-layer Gemma 2 whose q/k weights are scaled up (x30) so its attention logits, ~10 before the
    cap, are capped to +-2: with the default init they are ~0.1 and the cap changes nothing."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(Gemma2Config(vocab_size=VOCAB, **GEMMA2_FIELDS),
                                             attn_implementation=attn).eval()
    with torch.no_grad():
        for m in attention_modules(model):
            m.q_proj.weight.mul_(30)
            m.k_proj.weight.mul_(30)
    return model


def tiny_model(arch: str, attn: str = "sdpa"):
    fields = dict(TINY_ARCH_DEFAULTS[arch])
    model_type = fields.pop("model_type")
    fields.update(vocab_size=VOCAB, num_hidden_layers=3)
    if arch == "llama":
        fields["attention_bias"] = True  # o_proj bias: must not be part of the head writes
    if arch == "gemma3":
        fields.update(sliding_window=WINDOW,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    cfg = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    with torch.no_grad():  # random biases (default init is zero) so the bias test means something
        for m in attention_modules(model):
            for proj in (m.q_proj, m.k_proj, m.v_proj, m.o_proj):
                if proj.bias is not None:
                    proj.bias.normal_(0, 0.5)
    return model


class StubEmbedder:
    """Looks texts up in a dict (KeyError on any unexpected text); records what it was asked."""

    def __init__(self, vectors: dict[str, tuple[float, ...]]) -> None:
        self.vectors = {k: np.asarray(v, np.float32) for k, v in vectors.items()}
        self.seen: list[str] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.seen += texts
        return np.stack([self.vectors[t] for t in texts])


class LetterCountEmbedder:
    """Reads only the first `max_seq_length` tokens of each text, as a sentence-transformers model
    does, and embeds what it read as the unit vector of its counts of a, b, c, d (zeros if none);
    exposes `.model.tokenizer` and `.model.max_seq_length` as `SentenceEmbedder` does."""

    def __init__(self, tokenizer, max_seq_length: int) -> None:
        self.model = SimpleNamespace(tokenizer=tokenizer, max_seq_length=max_seq_length)
        self.seen: list[str] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.seen += texts
        tok, limit = self.model.tokenizer, self.model.max_seq_length
        read = [tok.decode(tok(t, add_special_tokens=False)["input_ids"][:limit]) for t in texts]
        counts = np.array([[text.count(ch) for ch in "abcd"] for text in read], np.float64)  # [n, 4]
        return (counts / np.maximum(np.linalg.norm(counts, axis=1, keepdims=True), 1.0)).astype(np.float32)


@contextlib.contextmanager
def lockstep(model: nn.Module, parties: int = 2) -> Iterator[None]:
    """Every decoder layer's forward waits until `parties` threads have reached that layer (a plain pre-hook:
    it fires for every thread), so forwards run in threads really overlap, layer by layer. The threads must
    make the same number of layer calls; a thread left alone fails after 30 s (BrokenBarrierError)."""
    barrier = threading.Barrier(parties, timeout=30)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    assert layers

    def wait(_module: nn.Module, _args: tuple) -> None:
        barrier.wait()

    handles = [layer.register_forward_pre_hook(wait) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
