import math

import numpy as np
import pytest
import sacrebleu
import torch

from mechdistill.evaluate.text import bleu4, cot_token_ids, sentence_bleu4, trace_perplexity


def test_bleu4_hand_computed():
    # "a b c d e" vs "a b c d f": n-gram precisions 4/5, 3/4, 2/3, 1/2; no brevity penalty
    assert bleu4(["a b c d e"], ["a b c d f"]) == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # all n-grams match but the hypothesis is short: BP = exp(1 - 6/4)
    assert bleu4(["a b c d"], ["a b c d e f"]) == pytest.approx(100 * math.exp(-0.5))
    # the corpus score pools n-gram counts and lengths over documents
    pooled = math.exp(1 - 11 / 9) * (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25
    assert bleu4(["a b c d e", "a b c d"], ["a b c d f", "a b c d e f"]) == pytest.approx(100 * pooled)
    assert bleu4(["the same trace ."], ["the same trace ."]) == pytest.approx(100.0)


def test_sentence_bleu4_matches_sacrebleu():
    hyps = ["The dog bit the man.", "It wasn't surprising.", "The man had just bitten him."]
    refs = ["The dog bit the man.", "It was not unexpected.", "The man bit him first."]
    expected = [sacrebleu.sentence_bleu(h, [r]).score for h, r in zip(hyps, refs)]
    np.testing.assert_allclose(sentence_bleu4(hyps, refs), expected)
    assert sentence_bleu4(hyps, refs)[0] == pytest.approx(100.0)
    with pytest.raises(ValueError, match="2 hypotheses but 1 references"):
        bleu4(["a", "b"], ["a"])


@pytest.fixture(scope="module")
def tiny_llama(byte_tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(byte_tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=byte_tok.pad_token_id)
    return LlamaForCausalLM(config).eval()


def manual_perplexity(model, tok, prompt, cot):
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    cot_ids = tok(cot, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + cot_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0], dim=-1)
    nll = [-logprobs[t - 1, ids[0, t]].item() for t in range(len(prompt_ids), ids.shape[1])]
    return math.exp(sum(nll) / len(nll))


def test_cot_tokens_start_after_prompt(byte_tok):
    ids, start = cot_token_ids(byte_tok, "Note: chest pain.\n", "Think: cardiac.")
    assert start == len("Note: chest pain.\n")  # one token per byte
    assert byte_tok.decode(ids[start:]) == "Think: cardiac."


def test_trace_perplexity_matches_manual(tiny_llama, byte_tok):
    prompts = ["Note: chest pain, dyspnea.\nCodes?", "short", "A much longer prompt with more context here. "]
    cots = [" Heart failure rather than pneumonia.", " so: I50.9", " anchors first, then refine."]
    got = trace_perplexity(tiny_llama, byte_tok, prompts, cots, batch_size=2)
    expected = [manual_perplexity(tiny_llama, byte_tok, p, c) for p, c in zip(prompts, cots)]
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    # the prompt is context only: changing it changes the value, but it is not scored
    alone = trace_perplexity(tiny_llama, byte_tok, ["x"], [cots[0]])
    assert alone[0] != pytest.approx(got[0], rel=1e-6)
    # random init over ~259 tokens: perplexity is near the vocabulary size
    assert 100 < got.mean() < 600


def test_trace_perplexity_empty_cot_is_nan(tiny_llama, byte_tok):
    got = trace_perplexity(tiny_llama, byte_tok, ["prompt", "prompt"], ["", " text"])
    assert np.isnan(got[0]) and np.isfinite(got[1])
