"""Model accessors of mechdistill.characterize.attention: the final norm and the unembedding, by HF layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaModel

from mechdistill.characterize.attention import final_norm, unembed
from mechdistill.characterize.capture import final_residual
from tests.helpers import tiny_llama


class Wrapper(nn.Module):
    """Holds the model as `.module`, as a DeepSpeed engine or DDP does."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(vocab=50, seed=0)


def test_llama_layout(llama):
    assert final_norm(llama) is llama.model.norm
    assert unembed(llama) is llama.lm_head


def test_a_training_wrapper_is_looked_through(llama):
    wrapped = Wrapper(Wrapper(llama))
    assert final_norm(wrapped) is llama.model.norm
    assert unembed(wrapped) is llama.lm_head


def test_the_norm_and_unembedding_give_the_model_logits(llama):
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    with torch.no_grad(), final_residual(llama) as residual:
        out = llama(ids)
    logits = unembed(llama)(final_norm(llama)(residual.h))  # [1, 5, vocab]
    torch.testing.assert_close(logits, out.logits)


def test_gpt2_layout():
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=32, n_layer=1, n_head=4, n_positions=64))
    assert final_norm(model) is model.transformer.ln_f
    assert unembed(model) is model.lm_head


def test_a_model_without_them_is_named():
    base = LlamaModel(tiny_llama(vocab=50, seed=0).config)  # the decoder alone: no lm_head
    with pytest.raises(ValueError, match="LlamaModel: no output embeddings"):
        unembed(base)
    with pytest.raises(ValueError, match="Linear: no final norm"):
        final_norm(nn.Linear(2, 2))
