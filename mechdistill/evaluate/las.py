"""Leakage-Adjusted Simulatability (LAS; Hase et al. 2020, App. D.1).

A simulator learns to predict a model's output y_hat from three views of a document:
x (the input), x+r (input, then the rationale r) and r alone. A rationale *leaks* the answer on
a document when the simulator given r alone is correct there. With acc_v(i) = [sim_v(i) = y_hat_i],
    LAS = 1/2 ( mean_{i: leak}    [acc_xr(i) - acc_x(i)]
              + mean_{i: no leak} [acc_xr(i) - acc_x(i)] ),
so rationales are rewarded for helping the simulator beyond what merely stating the answer
does. If one group is empty, LAS is the mean over the other group alone.

Targets: our outputs are label sets; each document is reduced to ONE target, the model's first
predicted label (`target_label`; the answer's first-named label). Documents without a
prediction are dropped. Which model's output is the target is the caller's choice: Hase et al.
simulate the model that wrote the rationale; the paper (teacher-faithfulness, after Wang et al.
2023) simulates the teacher's answer from the student's rationale.

The simulator is anything with `fit(texts, targets)` / `predict(texts)` (`Simulator`); one is
trained per view. The default `EmbeddingSimulator` is a light stand-in for the paper's
fine-tuned T5: a classifier over frozen sentence embeddings that trains on CPU in seconds. A
seq2seq simulator can be dropped in through the same protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

VIEWS = ("x", "xr", "r")


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...  # [n, d]


class Simulator(Protocol):
    def fit(self, texts: Sequence[str], targets: Sequence[str]) -> Simulator: ...
    def predict(self, texts: Sequence[str]) -> list[str]: ...


def target_label(pred_labels: Sequence[str] | None) -> str | None:
    """The simulation target of one document: its first predicted label (None if none)."""
    return None if pred_labels is None or len(pred_labels) == 0 else str(pred_labels[0])


def view_texts(inputs: Sequence[str], rationales: Sequence[str], sep: str = "\n\n") -> dict[str, list[str]]:
    """The simulator's three inputs per document: x, x + sep + r, and r."""
    if len(inputs) != len(rationales):
        raise ValueError(f"{len(inputs)} inputs but {len(rationales)} rationales")
    return {"x": list(inputs), "xr": [x + sep + r for x, r in zip(inputs, rationales)], "r": list(rationales)}


class EmbeddingSimulator:
    """Classifier over frozen sentence embeddings, predicting among the targets seen in training.

    kind="logreg": multinomial logistic regression (scikit-learn, L2, strength 1/C).
    kind="centroid": nearest class centroid by cosine similarity (fast with many classes).
    """

    def __init__(self, encoder: Encoder, kind: str = "logreg", C: float = 1.0, max_iter: int = 1000) -> None:
        if kind not in ("logreg", "centroid"):
            raise ValueError(f"kind must be 'logreg' or 'centroid', got {kind!r}")
        self.encoder, self.kind, self.C, self.max_iter = encoder, kind, C, max_iter

    def _features(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.encoder.encode(list(texts)), dtype=np.float64)

    def fit(self, texts: Sequence[str], targets: Sequence[str]) -> EmbeddingSimulator:
        if len(texts) != len(targets) or not texts:
            raise ValueError(f"fit needs as many targets as texts, at least one; got {len(texts)}, {len(targets)}")
        features, targets = self._features(texts), np.asarray(targets, dtype=object)
        self.classes = np.array(sorted(set(targets)), dtype=object)
        if len(self.classes) == 1 or self.kind == "centroid":
            self.model = None
            centroids = np.stack([features[targets == c].mean(0) for c in self.classes])
            self.centroids = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
        else:
            from sklearn.linear_model import LogisticRegression

            self.model = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(features, targets)
        return self

    def predict(self, texts: Sequence[str]) -> list[str]:
        if not texts:
            return []
        features = self._features(texts)
        if self.model is not None:
            return [str(t) for t in self.model.predict(features)]
        return [str(self.classes[j]) for j in (features @ self.centroids.T).argmax(1)]


def simulator_correctness(make_simulator: Callable[[], Simulator],
                          train_inputs: Sequence[str], train_rationales: Sequence[str],
                          train_targets: Sequence[str | None],
                          test_inputs: Sequence[str], test_rationales: Sequence[str],
                          test_targets: Sequence[str | None], sep: str = "\n\n") -> dict[str, np.ndarray]:
    """Train one simulator per view on the training split; per test document, is it correct?

    Returns boolean arrays {"x", "xr", "r"} over the test documents whose target is not None.
    """
    train_keep = [i for i, t in enumerate(train_targets) if t is not None]
    test_keep = [i for i, t in enumerate(test_targets) if t is not None]
    if not train_keep or not test_keep:
        raise ValueError("LAS needs at least one training and one test document with a target")
    pick = lambda xs, keep: [xs[i] for i in keep]  # noqa: E731
    train = view_texts(pick(train_inputs, train_keep), pick(train_rationales, train_keep), sep)
    test = view_texts(pick(test_inputs, test_keep), pick(test_rationales, test_keep), sep)
    y_train = [str(t) for t in pick(train_targets, train_keep)]
    y_test = np.array([str(t) for t in pick(test_targets, test_keep)], dtype=object)
    correct = {}
    for view in VIEWS:
        simulator = make_simulator().fit(train[view], y_train)
        correct[view] = np.array(simulator.predict(test[view]), dtype=object) == y_test
    return correct


def las_from_correctness(correct_x: Sequence[bool], correct_xr: Sequence[bool],
                         correct_r: Sequence[bool]) -> dict:
    """LAS from per-document simulator correctness on the x, x+r and r views (module docstring).

    Returns las, las_leak, las_nonleak (NaN for an empty group), n_leak, n_nonleak,
    sim_acc_xr, sim_acc_x, sim_acc_r (= leakage rate).
    """
    x, xr, leak = (np.asarray(v, dtype=bool) for v in (correct_x, correct_xr, correct_r))
    if not (x.shape == xr.shape == leak.shape) or x.ndim != 1 or len(x) == 0:
        raise ValueError(f"correctness arrays must be 1-D, non-empty, of one length; got {x.shape}, "
                         f"{xr.shape}, {leak.shape}")
    gain = xr.astype(float) - x.astype(float)
    las_leak = float(gain[leak].mean()) if leak.any() else float("nan")
    las_nonleak = float(gain[~leak].mean()) if (~leak).any() else float("nan")
    return {"las": float(np.nanmean([las_leak, las_nonleak])), "las_leak": las_leak, "las_nonleak": las_nonleak,
            "n_leak": int(leak.sum()), "n_nonleak": int((~leak).sum()),
            "sim_acc_xr": float(xr.mean()), "sim_acc_x": float(x.mean()), "sim_acc_r": float(leak.mean())}


def leakage_adjusted_simulatability(make_simulator: Callable[[], Simulator],
                                    train_inputs: Sequence[str], train_rationales: Sequence[str],
                                    train_targets: Sequence[str | None],
                                    test_inputs: Sequence[str], test_rationales: Sequence[str],
                                    test_targets: Sequence[str | None], sep: str = "\n\n") -> dict:
    """LAS end to end: `simulator_correctness` then `las_from_correctness`, plus n_docs scored."""
    correct = simulator_correctness(make_simulator, train_inputs, train_rationales, train_targets,
                                    test_inputs, test_rationales, test_targets, sep)
    return {**las_from_correctness(correct["x"], correct["xr"], correct["r"]), "n_docs": int(len(correct["x"]))}
