import math
import zlib

import numpy as np
import pytest

from mechdistill.evaluate.las import (
    EmbeddingSimulator,
    las_from_correctness,
    leakage_adjusted_simulatability,
    target_label,
    view_texts,
)


class HashedBagOfWords:
    """Deterministic stand-in for a sentence embedder: unit-norm hashed word counts."""

    def __init__(self, dim: int = 256) -> None:
        self.dim = dim

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for i, text in enumerate(texts):
            for word in text.lower().split():
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)


def test_las_hand_case():
    x = [1, 0, 0, 1, 0, 0, 1, 0]
    xr = [1, 1, 1, 1, 0, 1, 0, 0]
    r = [1, 1, 1, 0, 0, 0, 0, 1]
    # leaking docs 0, 1, 2, 7: gains 0, 1, 1, 0 -> 0.5; non-leaking 3..6: gains 0, 0, 1, -1 -> 0
    out = las_from_correctness(x, xr, r)
    assert out["las"] == pytest.approx(0.25)
    assert out["las_leak"] == pytest.approx(0.5) and out["las_nonleak"] == pytest.approx(0.0)
    assert (out["n_leak"], out["n_nonleak"]) == (4, 4)
    assert out["sim_acc_xr"] == pytest.approx(5 / 8) and out["sim_acc_x"] == pytest.approx(3 / 8)


def test_las_one_empty_group_uses_the_other():
    out = las_from_correctness([0, 0, 1], [1, 1, 1], [1, 1, 1])
    assert out["las"] == pytest.approx(2 / 3) and math.isnan(out["las_nonleak"]) and out["n_nonleak"] == 0
    with pytest.raises(ValueError, match="one length"):
        las_from_correctness([1], [1, 0], [1])


def test_targets_and_views():
    assert target_label(["B02", "A01"]) == "B02" and target_label([]) is None and target_label(None) is None
    views = view_texts(["note"], ["because"], sep=" | ")
    assert views == {"x": ["note"], "xr": ["note | because"], "r": ["because"]}


@pytest.mark.parametrize("kind", ["logreg", "centroid"])
def test_embedding_simulator_learns_label_words(kind):
    train = [f"the answer is {lab}" for lab in ["a01", "b02", "c03"] * 3]
    targets = ["A01", "B02", "C03"] * 3
    sim = EmbeddingSimulator(HashedBagOfWords(), kind=kind, C=100.0).fit(train, targets)
    assert sim.predict(["answer c03", "is a01", "the b02"]) == ["C03", "A01", "B02"]
    assert sim.predict([]) == []
    single = EmbeddingSimulator(HashedBagOfWords()).fit(["x", "y"], ["Z", "Z"])
    assert single.predict(["anything"]) == ["Z"]  # only the targets seen in training


def test_las_end_to_end_known_answer():
    # x says nothing: the x-simulator predicts the training majority (A01).
    # the rationale names the target, except on the last test doc where it names the wrong one.
    labels = ["A01"] * 4 + ["B02"] * 3 + ["C03"] * 3
    train_x = ["a clinical note"] * len(labels)
    train_r = [f"answer {lab.lower()}" for lab in labels]
    test_targets = ["A01", "B02", "C03", "B02", None]
    test_x = ["a clinical note"] * 5
    test_r = ["answer a01", "answer b02", "answer c03", "answer a01", "answer b02"]
    out = leakage_adjusted_simulatability(lambda: EmbeddingSimulator(HashedBagOfWords(), C=100.0),
                                          train_x, train_r, labels, test_x, test_r, test_targets)
    # correct x: T F F F; x+r: T T T F; r: T T T F -> leak gains 0, 1, 1; non-leak gain 0
    assert out["n_docs"] == 4  # the doc without a target is dropped
    assert (out["n_leak"], out["n_nonleak"]) == (3, 1)
    assert out["sim_acc_x"] == pytest.approx(0.25) and out["sim_acc_xr"] == pytest.approx(0.75)
    assert out["las"] == pytest.approx(0.5 * (2 / 3 + 0.0))
