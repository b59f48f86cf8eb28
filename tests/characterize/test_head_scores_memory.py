"""score_heads' memory does not grow with the number of documents: while a document is scored, the arrays
that earlier documents' scoring returned and that are still alive weigh the same for 4 and for 16
documents (counted through weak references, so the test is exact, unlike an RSS measurement).
"""

from __future__ import annotations

import weakref

import numpy as np


def _arrays(value) -> list[np.ndarray]:
    if isinstance(value, np.ndarray):
        return [value]
    if isinstance(value, dict):
        return [a for v in value.values() for a in _arrays(v)]
    return []


def _alive_bytes_while_scoring(n_docs: int, monkeypatch) -> tuple[int, int]:
    """(most bytes of earlier documents' returned arrays alive when a document starts being scored,
    bytes of one document's returned arrays)."""
    import torch

    from mechdistill.characterize import head_scores
    from mechdistill.characterize.teacher_forcing import ForcedSequence
    from mechdistill.models import byte_tokenizer
    from tests.helpers import tiny_llama

    tok = byte_tokenizer()
    model = tiny_llama(len(tok), seed=0)
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(0))
    seq = ForcedSequence(input_ids=ids, prompt_chars=0, cot_token_start=150, early_queries=[150, 151, 152],
                         refine_positions=[180, 190], shortlist_positions=[10, 11, 160],
                         nearmiss_positions=[40, 41, 170], document_positions=list(range(150)))
    docs = [dict(doc_id=f"d{i}", seq=seq, anchors=["fits"], gold_titles=["A"], nearmiss_titles=["B"])
            for i in range(n_docs)]
    returned: list[tuple[weakref.ref, int]] = []
    most_alive, one_doc = 0, 0
    real = head_scores.score_document

    def tracked(*args, **kwargs):
        nonlocal most_alive, one_doc
        most_alive = max(most_alive, sum(size for ref, size in returned if ref() is not None))
        out = real(*args, **kwargs)
        arrays = _arrays(out)
        one_doc = sum(a.nbytes for a in arrays)
        returned.extend((weakref.ref(a), a.nbytes) for a in arrays)
        return out

    monkeypatch.setattr(head_scores, "score_document", tracked)
    coarse, refine, _ = head_scores.score_heads(model, tok, docs, tau=0.0, n_stages=2)
    assert coarse["n_queries"].eq(3 * n_docs).all() and refine["n_positions"].eq(2 * n_docs).all()
    return most_alive, one_doc


def test_score_heads_keeps_one_documents_arrays(monkeypatch):
    """Only the first document's Fig. 4 rows outlive its scoring (and the previous document's values,
    until the loop takes the next): the rest is added to running sums."""
    few, one_doc = _alive_bytes_while_scoring(4, monkeypatch)
    many, _ = _alive_bytes_while_scoring(16, monkeypatch)
    assert many == few <= 2 * one_doc, (few, many, one_doc)
