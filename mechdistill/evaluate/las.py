"""Leakage-Adjusted Simulatability (LAS; paper App. D.1, Eq. 8; Hase et al. 2020; Wang et al. 2023).

A simulator learns to predict a target answer y from three views of a document: x (the input),
x+r (input, then the rationale r) and r alone. A rationale *leaks* the answer on a document when
the simulator given r alone is correct there. With acc_v(i) = [sim_v(i) = y_i],
    LAS = 1/2 ( mean_{i: leak}    [acc_xr(i) - acc_x(i)]
              + mean_{i: no leak} [acc_xr(i) - acc_x(i)] ),
so rationales are rewarded for helping the simulator beyond what merely stating the answer
does (Hase et al.'s `compute_sim`: the unweighted mean of the two bins' gains). Two deviations:
if one bin is empty LAS is the other bin's mean (Hase et al. get NaN), and one simulator is
trained per view, each on the view it is tested on (Hase et al. train one T5 on x+e with
explanation dropout and query it with x+e, x and e alone).

Target (`simulation_targets`, config `evaluate.las.target`). The paper's teacher-faithfulness
LAS (after Wang et al. 2023) asks whether the STUDENT's rationale helps a simulator recover the
TEACHER's answer. Simulators are always trained on the train split with the teacher's rationales
(the student writes nothing on it); the targets follow the choice:
    teacher (default)  train: the teacher's answers   test: the teacher's answers
    gold               train: the gold labels         test: the gold labels
    student            train: the teacher's answers   test: the student's answers
("student" is Hase et al.'s self-simulation; it trains on the teacher's answers because the
student has no train-split outputs, so the simulator learns the teacher's mapping.)

One class per document (config `evaluate.las.target_form`, `reduce_target`): our answers are
label sets and a simulator predicts one class, so each set becomes one of
    top_label  its label that is most frequent among the TRAINING targets' sets (`target_label`;
               ties: the first-named). A simulator can only name classes it has seen in training; in
               an extreme label space the first-named label is often one it never saw (and MIMIC's
               gold codes are sorted alphabetically, so "first" means nothing), which would score
               every view wrong by construction.
    label_set  the exact set as one class (`label_set_target`: sorted labels joined by "; "); a
               test set never seen whole in training cannot be recovered by any view.
Documents without a label are left out. docs/las_target_form.md compares the two on the demo.

Once per dataset (stages/las_simulator.py). The simulators depend on the target only through its
train side (`train_target_source`: the teacher's answers, or gold), so one set of simulators per
dataset, trained on the teacher's train traces, serves every method and student and the teacher's
row (`fit_view_simulators` there, `view_correctness` in evaluate); the test targets are reduced
with the training sets' label frequencies saved beside them (`simulation_test_targets`).

Input length. Simulators read a bounded number of tokens (T5: `max_source_length`; the MiniLM
sentence embedder: 256 word-pieces), while a note with its candidate list is thousands. The
rationale comes after the document, so the model's own truncation would cut it away and LAS
would be ~0 by construction. So every simulator exposes a `Truncator` (its tokenizer and token
budget), and `view_texts` fits each view into that budget at token boundaries: x is the
document's start; x+r keeps the WHOLE rationale and cuts the document to the room left (we keep
the document-first order of Hase et al. and trim the document rather than the rationale); if the
rationale alone is longer than the budget, its END (where the conclusion is) is kept, in x+r and
in r alike, and the number of such rationales is logged once per split.

The simulator is anything with `fit(texts, targets)` / `predict(texts)` and optionally a
`truncator` (`Simulator`). `EmbeddingSimulator` (default) is a light stand-in for the paper's
fine-tuned T5-large: a classifier over frozen sentence embeddings that trains on CPU in seconds;
`Seq2SeqSimulator` fine-tunes a seq2seq model as Hase et al. do.
"""

from __future__ import annotations

import copy
import difflib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from safetensors import safe_open
from safetensors.numpy import save_file
from sklearn.linear_model import LogisticRegression
from tqdm.auto import tqdm
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

from ..errors import ConfigError
from ..text import token_offsets

log = logging.getLogger(__name__)

VIEWS = ("x", "xr", "r")
TARGETS = ("teacher", "gold", "student")
TARGET_FORMS = ("top_label", "label_set")
LABEL_SET_SEP = "; "  # joins a label_set target
SIMULATOR_KINDS = ("logreg", "centroid", "seq2seq")
SEQ2SEQ_LABELS = "labels.json"  # beside a saved seq2seq simulator: the labels its generations snap to


class Encoder(Protocol):
    def encode(self, texts: list[str]) -> np.ndarray: ...  # [n, d]


class Simulator(Protocol):
    truncator: Truncator | None  # optional: the simulator's tokenizer and input budget

    def fit(self, texts: Sequence[str], targets: Sequence[str]) -> Simulator: ...
    def predict(self, texts: Sequence[str]) -> list[str]: ...


# ----------------------------------------------------------------------------- input budget

class Truncator:
    """Cuts texts at token boundaries so that a model with `tokenizer` and `max_length` input
    tokens (special tokens included) reads all of what is left: `budget` = max_length minus the
    special tokens the tokenizer adds. Needs a fast (offset-mapping) HF tokenizer."""

    def __init__(self, tokenizer, max_length: int) -> None:
        self.tokenizer = tokenizer
        self.budget = int(max_length) - tokenizer.num_special_tokens_to_add(pair=False)
        if self.budget < 1:
            raise ValueError(f"max_length {max_length} leaves no room for text")

    def _offsets(self, text: str) -> list[tuple[int, int]]:
        return token_offsets(self.tokenizer, text)

    def count(self, text: str) -> int:
        return len(self._offsets(text))

    def _head(self, text: str, n: int) -> str:
        """text up to the end of its n-th token."""
        offsets = self._offsets(text)
        if n >= len(offsets):
            return text
        return text[: offsets[n - 1][1]] if n > 0 else ""

    def _tail(self, text: str, n: int) -> str:
        """text from the start of its n-th token from the end."""
        offsets = self._offsets(text)
        if n >= len(offsets):
            return text
        return text[offsets[-n][0]:] if n > 0 else ""

    def _largest(self, make: Callable[[int], str], start: int) -> str:
        """make(k) for the largest k <= start whose text fits the budget; make(0) if none does
        (re-tokenizing a cut text can take a few more tokens than were kept)."""
        k = start
        while k > 0:
            text = make(k)
            over = self.count(text) - self.budget
            if over <= 0:
                return text
            k -= over
        return make(0)

    def first(self, text: str) -> str:
        """The start of `text` that fits the budget."""
        return self._largest(lambda k: self._head(text, k), self.budget)

    def last(self, text: str) -> str:
        """The end of `text` that fits the budget."""
        return self._largest(lambda k: self._tail(text, k), self.budget)

    def joined(self, document: str, rationale: str, sep: str) -> str:
        """document + sep + rationale in the budget: the whole rationale (its end if it alone is
        too long), after as much of the document's start as fits."""
        rationale = self.last(rationale)
        room = self.budget - self.count(sep + rationale)
        return self._largest(lambda k: self._head(document, k) + sep + rationale if k else rationale, room)


def encoder_truncator(encoder: Encoder) -> Truncator | None:
    """The truncator of a sentence-transformers encoder (`SentenceEmbedder`: `.model.tokenizer`,
    `.model.max_seq_length`); None for an encoder without a token limit."""
    model = getattr(encoder, "model", None)
    tokenizer, max_length = getattr(model, "tokenizer", None), getattr(model, "max_seq_length", None)
    return None if tokenizer is None or max_length is None else Truncator(tokenizer, max_length)


def view_texts(inputs: Sequence[str], rationales: Sequence[str], truncator: Truncator | None = None,
               sep: str = "\n\n") -> dict[str, list[str]]:
    """The simulator's three inputs per document: x, x + sep + r, and r, each fitted to the
    truncator's budget (module docstring); without a truncator, uncut."""
    if len(inputs) != len(rationales):
        raise ValueError(f"{len(inputs)} inputs but {len(rationales)} rationales")
    if truncator is None:
        return {"x": list(inputs), "xr": [x + sep + r for x, r in zip(inputs, rationales)], "r": list(rationales)}
    n_cut = sum(truncator.count(r) > truncator.budget for r in rationales)
    if n_cut:
        log.info("LAS: %d of %d rationales are longer than the simulator's %d-token input; kept their ends",
                 n_cut, len(rationales), truncator.budget)
    return {"x": [truncator.first(x) for x in inputs],
            "xr": [truncator.joined(x, r, sep) for x, r in zip(inputs, rationales)],
            "r": [truncator.last(r) for r in rationales]}


# ----------------------------------------------------------------------------- targets

def label_frequencies(label_sets: Sequence[Sequence[str] | None]) -> Counter:
    """label -> number of sets naming it."""
    return Counter(str(label) for labels in label_sets if labels is not None for label in dict.fromkeys(labels))


def target_label(labels: Sequence[str] | None, frequency: Mapping[str, int] | None = None) -> str | None:
    """The "top_label" simulation target of one document: its label most frequent in `frequency`
    (ties and no frequencies: the first-named); None without labels."""
    if labels is None or len(labels) == 0:
        return None
    labels = [str(label) for label in labels]
    return max(labels, key=lambda label: frequency.get(label, 0)) if frequency else labels[0]


def label_set_target(labels: Sequence[str] | None) -> str | None:
    """The "label_set" simulation target of one document: its exact label set as one class, the
    sorted distinct labels joined by LABEL_SET_SEP; None without labels."""
    if labels is None or len(labels) == 0:
        return None
    return LABEL_SET_SEP.join(sorted({str(label) for label in labels}))


def reduce_target(labels: Sequence[str] | None, form: str, frequency: Mapping[str, int] | None = None) -> str | None:
    """One document's simulation target in `form` (TARGET_FORMS): `target_label` with the training
    sets' `frequency`, or `label_set_target`."""
    if form == "top_label":
        return target_label(labels, frequency)
    if form == "label_set":
        return label_set_target(labels)
    raise ValueError(f"unknown LAS target form {form!r}; expected one of {', '.join(TARGET_FORMS)}")


def train_target_source(target: str) -> str:
    """Whose answers the simulators are trained to recover for `target` (module docstring): "gold"
    for target gold, else "teacher" (the student has no train-split answers). A per-dataset
    simulator depends on the target only through this."""
    if target not in TARGETS:
        raise ValueError(f"unknown LAS target {target!r}; expected one of {', '.join(TARGETS)}")
    return "gold" if target == "gold" else "teacher"


def simulator_identity(las: Mapping[str, Any], embedder: str) -> dict[str, Any]:
    """What a saved simulator set must match to score under the `evaluate.las` settings `las`: its
    kind, whose answers it learned (`train_target_source`), the target form and, for the embedding
    simulators, the sentence embedder (None for seq2seq). Written into the manifest by the
    las_simulator stage and compared with it by evaluate."""
    return {"kind": las["simulator"], "train_source": train_target_source(las["target"]),
            "target_form": las["target_form"], "embedder": None if las["simulator"] == "seq2seq" else embedder}


def simulation_train_targets(source: str, form: str, *, train_teacher: Sequence[Sequence[str]],
                             train_gold: Sequence[Sequence[str]]) -> tuple[list[str | None], dict[str, int]]:
    """(train targets, the training sets' label frequencies) for a `train_target_source`; the
    frequencies reduce test sets to the same form (`simulation_test_targets`)."""
    train_sets = train_gold if source == "gold" else train_teacher
    frequency = dict(label_frequencies(train_sets))
    return [reduce_target(s, form, frequency) for s in train_sets], frequency


def simulation_test_targets(target: str, form: str, frequency: Mapping[str, int], *,
                            test_teacher: Sequence[Sequence[str]], test_gold: Sequence[Sequence[str]],
                            test_student: Sequence[Sequence[str]]) -> list[str | None]:
    """Test targets for `target`, reduced with the TRAINING sets' label `frequency`."""
    train_target_source(target)  # validates the name
    test_sets = {"teacher": test_teacher, "gold": test_gold, "student": test_student}[target]
    return [reduce_target(s, form, frequency) for s in test_sets]


def simulation_targets(target: str, *, train_teacher: Sequence[Sequence[str]], train_gold: Sequence[Sequence[str]],
                       test_teacher: Sequence[Sequence[str]], test_gold: Sequence[Sequence[str]],
                       test_student: Sequence[Sequence[str]],
                       form: str = "top_label") -> tuple[list[str | None], list[str | None]]:
    """(train targets, test targets), one class or None per document, for `target` in TARGETS
    and `form` in TARGET_FORMS (module docstring)."""
    train, frequency = simulation_train_targets(train_target_source(target), form, train_teacher=train_teacher,
                                                train_gold=train_gold)
    return train, simulation_test_targets(target, form, frequency, test_teacher=test_teacher, test_gold=test_gold,
                                          test_student=test_student)


# ----------------------------------------------------------------------------- simulators

class EmbeddingSimulator:
    """Classifier over frozen sentence embeddings, predicting among the targets seen in training.

    kind="logreg": multinomial logistic regression (scikit-learn, L2, strength 1/C).
    kind="centroid": nearest class centroid by cosine similarity (fast with many classes).
    truncator: the encoder's input budget (default `encoder_truncator(encoder)`).
    """

    def __init__(self, encoder: Encoder, kind: str = "logreg", C: float = 1.0, max_iter: int = 1000,
                 truncator: Truncator | None = None) -> None:
        if kind not in ("logreg", "centroid"):
            raise ValueError(f"kind must be 'logreg' or 'centroid', got {kind!r}")
        self.encoder, self.kind, self.C, self.max_iter = encoder, kind, C, max_iter
        self.truncator = truncator or encoder_truncator(encoder)

    def _features(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.encoder.encode(list(texts)), dtype=np.float64)

    def fit(self, texts: Sequence[str], targets: Sequence[str]) -> EmbeddingSimulator:
        if len(texts) != len(targets) or not texts:
            raise ValueError(f"fit needs as many targets as texts, at least one; got {len(texts)}, {len(targets)}")
        features, targets = self._features(texts), np.asarray(targets, dtype=object)
        self.classes = np.array(sorted(set(targets)), dtype=object)
        if len(self.classes) == 1 or self.kind == "centroid":
            centroids = np.stack([features[targets == c].mean(0) for c in self.classes])
            self.weights = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
            self.bias = np.zeros(len(self.classes))
        else:
            model = LogisticRegression(C=self.C, max_iter=self.max_iter).fit(features, targets)
            assert list(model.classes_) == list(self.classes)
            self.weights, self.bias = model.coef_, model.intercept_
        return self

    def predict(self, texts: Sequence[str]) -> list[str]:
        """The class of the highest linear score features @ weights.T + bias ([n, classes]; cosine to
        the centroids, or logistic regression's decision function). Binary logistic regression has
        one row of weights: its score > 0 picks the second class, as scikit-learn's `predict`."""
        if not texts:
            return []
        scores = self._features(texts) @ self.weights.T + self.bias  # [n, classes] or [n, 1]
        picked = (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 < len(self.classes) else scores.argmax(1)
        return [str(self.classes[j]) for j in picked]

    def save(self, path: str | os.PathLike) -> None:
        """The fitted classifier as one safetensors file: weights [classes or 1, d], bias; the kind and
        classes in its metadata. Load with `EmbeddingSimulator.load(path, encoder)`."""
        save_file({"weights": np.ascontiguousarray(self.weights, dtype=np.float64),
                   "bias": np.ascontiguousarray(self.bias, dtype=np.float64)}, str(path),
                  metadata={"kind": self.kind, "classes": json.dumps([str(c) for c in self.classes])})

    @classmethod
    def load(cls, path: str | os.PathLike, encoder: Encoder, truncator: Truncator | None = None) -> EmbeddingSimulator:
        """A fitted simulator from `save`'s file, over `encoder` (the one it was fitted with)."""
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata()
            weights, bias = f.get_tensor("weights"), f.get_tensor("bias")
        simulator = cls(encoder, kind=meta["kind"], truncator=truncator)
        simulator.classes = np.array(json.loads(meta["classes"]), dtype=object)
        simulator.weights, simulator.bias = weights, bias
        return simulator


def snap_to_label(text: str, labels: Sequence[str], cutoff: float = 0.6) -> str:
    """Map a generated string onto a known label: itself if it is one, else the closest label by
    `difflib` similarity (at least `cutoff`), else the string unchanged."""
    if text in labels:
        return text
    close = difflib.get_close_matches(text, list(labels), n=1, cutoff=cutoff)
    return close[0] if close else text


class Seq2SeqSimulator:
    """A fine-tuned seq2seq simulator (Hase et al. 2020 fine-tune T5): text -> target label string.

    Give either `model_name_or_path` (a hub id or local directory, loaded with
    `AutoModelForSeq2SeqLM` / `AutoTokenizer` from the local cache only) or an already-built
    `model` + `tokenizer`. Every `fit` fine-tunes a fresh copy of the starting weights (the given
    model is left untouched), with AdamW and teacher forcing, under `seed` (batch order and
    dropout), so two fits with one seed give the same simulator. Inputs are read up to
    `max_source_length` tokens; `truncator` says so to `view_texts`.

    `predict` decodes greedily. As LAS compares predictions with targets as strings, each
    generation is snapped to the labels seen in training (`snap_to_label`): an exact match is
    kept, otherwise the closest label by difflib similarity (>= `snap_cutoff`), otherwise the
    generated string itself (then counted wrong).
    """

    snap_cutoff: float = 0.6

    def __init__(self, model_name_or_path: str | None = None, model=None, tokenizer=None, epochs: int = 3,
                 lr: float = 1e-4, batch_size: int = 8, max_source_length: int = 512,
                 max_target_length: int = 16, device: str = "auto", seed: int = 0) -> None:
        if (model_name_or_path is None) == (model is None) or (model is not None and tokenizer is None):
            raise ValueError("give either model_name_or_path, or model and tokenizer")
        self.model_name_or_path, self.base_model, self.tokenizer = model_name_or_path, model, tokenizer
        self.epochs, self.lr, self.batch_size, self.seed = epochs, lr, batch_size, seed
        self.max_source_length, self.max_target_length = max_source_length, max_target_length
        self.device_name = device
        self.model = None
        self.labels: list[str] = []

    def _load_tokenizer(self):
        if self.tokenizer is None:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_name_or_path, trust_remote_code=False,
                                                           local_files_only=True)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        return self.tokenizer

    @property
    def truncator(self) -> Truncator:
        return Truncator(self._load_tokenizer(), self.max_source_length)

    def _fresh_model(self):
        """A trainable copy of the starting weights (loaded from the local cache on first use)."""
        self._load_tokenizer()
        if self.base_model is None:
            self.base_model = self._pretrained(self.model_name_or_path)
        return copy.deepcopy(self.base_model).to(self._pick_device())

    @staticmethod
    def _pretrained(path: str):
        return AutoModelForSeq2SeqLM.from_pretrained(path, dtype=torch.float32, trust_remote_code=False,
                                                     local_files_only=True)

    def _pick_device(self) -> torch.device:
        device = self.device_name
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        return self.device

    def _encode_sources(self, texts: Sequence[str]) -> dict:
        enc = self.tokenizer(list(texts), max_length=self.max_source_length, truncation=True, padding=True,
                             return_tensors="pt")
        return {k: enc[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def _encode_targets(self, targets: Sequence[str]):
        """Label ids ending in EOS (appended when the tokenizer does not), padded with -100."""
        eos, rows = self.tokenizer.eos_token_id, []
        for ids in self.tokenizer(list(targets), add_special_tokens=True)["input_ids"]:
            ids = list(ids)[: self.max_target_length]
            if eos is not None and (not ids or ids[-1] != eos):
                ids = ids[: self.max_target_length - 1] + [eos]
            rows.append(ids)
        labels = torch.full((len(rows), max(map(len, rows))), -100, dtype=torch.long)
        for i, ids in enumerate(rows):
            labels[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return labels.to(self.device)

    def fit(self, texts: Sequence[str], targets: Sequence[str]) -> Seq2SeqSimulator:
        if len(texts) != len(targets) or not texts:
            raise ValueError(f"fit needs as many targets as texts, at least one; got {len(texts)}, {len(targets)}")
        texts, targets = list(texts), [str(t) for t in targets]
        self.labels = sorted(set(targets))
        model = self._fresh_model()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            order_rng = torch.Generator().manual_seed(self.seed)
            optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr)
            n_batches = -(-len(texts) // self.batch_size)
            model.train()
            with tqdm(total=self.epochs * n_batches, desc="seq2seq simulator", unit="step", leave=False) as bar:
                for _ in range(self.epochs):
                    order = torch.randperm(len(texts), generator=order_rng).tolist()
                    for start in range(0, len(texts), self.batch_size):
                        batch = order[start: start + self.batch_size]
                        loss = model(**self._encode_sources([texts[i] for i in batch]),
                                     labels=self._encode_targets([targets[i] for i in batch])).loss
                        optimizer.zero_grad()
                        loss.backward()
                        optimizer.step()
                        bar.update(1)
                        bar.set_postfix(loss=f"{loss.item():.4f}")
        self.model = model.eval()
        return self

    def save(self, path: str | os.PathLike) -> None:
        """The fine-tuned model and tokenizer (`save_pretrained`, safetensors) and the training labels
        (labels.json) in folder `path`. Load with `Seq2SeqSimulator.load(path, ...)`."""
        if self.model is None:
            raise RuntimeError("Seq2SeqSimulator.save called before fit")
        path = Path(path)
        self.model.save_pretrained(path, safe_serialization=True)
        self.tokenizer.save_pretrained(path)
        (path / SEQ2SEQ_LABELS).write_text(json.dumps(self.labels))

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs) -> Seq2SeqSimulator:
        """A fitted simulator from `save`'s folder, ready to predict; kwargs as the constructor's
        (max_source_length, batch_size, device, ...: those it was trained with)."""
        simulator = cls(str(path), **kwargs)
        simulator._load_tokenizer()
        simulator.model = cls._pretrained(str(path)).to(simulator._pick_device()).eval()
        simulator.labels = json.loads((Path(path) / SEQ2SEQ_LABELS).read_text())
        return simulator

    def predict(self, texts: Sequence[str]) -> list[str]:
        if self.model is None:
            raise RuntimeError("Seq2SeqSimulator.predict called before fit")
        out: list[str] = []
        with torch.no_grad():
            for start in range(0, len(texts), self.batch_size):
                generated = self.model.generate(**self._encode_sources(texts[start: start + self.batch_size]),
                                                max_new_tokens=self.max_target_length, do_sample=False,
                                                num_beams=1)
                decoded = self.tokenizer.batch_decode(generated, skip_special_tokens=True)
                out += [snap_to_label(d.strip(), self.labels, self.snap_cutoff) for d in decoded]
        return out


def make_simulator(kind: str, encoder: Encoder | None = None, **kwargs) -> Simulator:
    """A fresh simulator of one kind: "logreg" / "centroid" (`EmbeddingSimulator` over `encoder`,
    kwargs to it) or "seq2seq" (`Seq2SeqSimulator(**kwargs)`). For the zero-argument factory that
    `leakage_adjusted_simulatability` takes, bind the arguments: `functools.partial(make_simulator, ...)`.
    """
    if kind in ("logreg", "centroid"):
        if encoder is None:
            raise ValueError(f"simulator kind {kind!r} needs an encoder")
        return EmbeddingSimulator(encoder, kind=kind, **kwargs)
    if kind == "seq2seq":
        return Seq2SeqSimulator(**kwargs)
    raise ValueError(f"unknown simulator kind {kind!r}; expected one of {', '.join(SIMULATOR_KINDS)}")


def simulator_factory(settings: dict, seed: int = 0, encoder: Encoder | None = None) -> Callable[[], Simulator]:
    """A no-argument factory of fresh simulators, as `evaluate.las.simulator` says.

    settings: config["evaluate"]["las"]; encoder: the sentence embedder of the "logreg" / "centroid" kinds.
    """
    kind = settings["simulator"]
    if kind == "seq2seq":
        seq2seq = dict(settings["seq2seq"])
        if not seq2seq.get("model"):
            raise ConfigError("evaluate.las.simulator is seq2seq but evaluate.las.seq2seq.model is not set. "
                              "Fix: give a seq2seq model (hub id in the local cache, or a directory), e.g. t5-large")
        seq2seq["model_name_or_path"] = seq2seq.pop("model")
        return lambda: make_simulator("seq2seq", seed=seed, **seq2seq)
    return lambda: make_simulator(kind, encoder=encoder)


# ----------------------------------------------------------------------------- LAS

def _with_target(targets: Sequence[str | None]) -> list[int]:
    return [i for i, t in enumerate(targets) if t is not None]


def fit_view_simulators(make_simulator: Callable[[], Simulator], train_inputs: Sequence[str],
                        train_rationales: Sequence[str], train_targets: Sequence[str | None],
                        sep: str = "\n\n") -> Iterator[tuple[str, Simulator]]:
    """Train one simulator per view (VIEWS) on the training documents with a target, the views fitted
    to the first simulator's `truncator` (if it has one); yields (view, fitted simulator) one at a
    time (a seq2seq simulator holds a model: save or use it before taking the next)."""
    keep = _with_target(train_targets)
    if not keep:
        raise ValueError("LAS needs at least one training document with a target")
    simulator: Simulator | None = make_simulator()
    train = view_texts([train_inputs[i] for i in keep], [train_rationales[i] for i in keep],
                       getattr(simulator, "truncator", None), sep)
    y_train = [str(train_targets[i]) for i in keep]
    for view in VIEWS:
        fitted = (simulator or make_simulator()).fit(train[view], y_train)
        simulator = None
        yield view, fitted
        del fitted


def view_correctness(simulators: Iterable[tuple[str, Simulator]], truncator: Truncator | None,
                     test_inputs: Sequence[str], test_rationales: Sequence[str],
                     test_targets: Sequence[str | None], sep: str = "\n\n") -> dict[str, np.ndarray]:
    """Per test document with a target, is each view's simulator correct? `simulators` yields
    (view, fitted simulator) for every view in VIEWS (fitted or loaded one at a time); `truncator`
    is the budget the training views were fitted to. Returns boolean arrays {"x", "xr", "r"}."""
    keep = _with_target(test_targets)
    if not keep:
        raise ValueError("LAS needs at least one test document with a target")
    test = view_texts([test_inputs[i] for i in keep], [test_rationales[i] for i in keep], truncator, sep)
    y_test = np.array([str(test_targets[i]) for i in keep], dtype=object)
    correct = {view: np.array(simulator.predict(test[view]), dtype=object) == y_test for view, simulator in simulators}
    if set(correct) != set(VIEWS):
        raise ValueError(f"simulators for views {sorted(correct)}; LAS needs {', '.join(VIEWS)}")
    return correct


def simulator_correctness(make_simulator: Callable[[], Simulator],
                          train_inputs: Sequence[str], train_rationales: Sequence[str],
                          train_targets: Sequence[str | None],
                          test_inputs: Sequence[str], test_rationales: Sequence[str],
                          test_targets: Sequence[str | None], sep: str = "\n\n") -> dict[str, np.ndarray]:
    """Train one simulator per view on the training split (`fit_view_simulators`); per test
    document, is it correct (`view_correctness`)? Boolean arrays {"x", "xr", "r"} over the test
    documents whose target is not None."""
    if not _with_target(train_targets) or not _with_target(test_targets):
        raise ValueError("LAS needs at least one training and one test document with a target")
    truncator = getattr(make_simulator(), "truncator", None)
    return view_correctness(fit_view_simulators(make_simulator, train_inputs, train_rationales, train_targets, sep),
                            truncator, test_inputs, test_rationales, test_targets, sep)


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


def las_contributions(correct: dict[str, np.ndarray]) -> np.ndarray:
    """Per-document LAS terms w_i (c_xr,i - c_x,i), w = 0.5 n / n_group, so their mean is LAS (a group
    with no document gives the other group weight n / n_group, i.e. LAS = that group's mean)."""
    x, xr, leak = (np.asarray(correct[k], dtype=bool) for k in ("x", "xr", "r"))
    gain = xr.astype(float) - x.astype(float)
    n = len(gain)
    groups = [g for g in (leak, ~leak) if g.any()]
    weight = np.zeros(n)
    for g in groups:
        weight[g] = n / (len(groups) * int(g.sum()))
    return weight * gain


def las_rows(correct: Mapping[str, np.ndarray] | None, doc_ids: Sequence[str]) -> pd.DataFrame:
    """LAS rows of the metrics artifact (doc_id, metric, value) from `view_correctness` over the
    documents `doc_ids` (those with a target, in order). Metrics (their scales differ):

        las              per document: its contribution w_i (c_xr - c_x) (`las_contributions`), whose
                         mean is Hase et al.'s leakage-adjusted LAS, in [-1, 1] (0: the rationale
                         does not help the simulator)
        sim_correct_xr   per document: 1 if the x+r simulator recovers the target, else 0
        las_corpus       corpus (doc_id ""): LAS
        sim_acc_xr, sim_acc_x, sim_acc_r   corpus: the simulators' accuracies in [0, 1] on x+r, x
                         and r (sim_acc_r is the leakage rate)

    `correct` None (no target on either split): one corpus "las" row with NaN.
    """
    if correct is None:
        return pd.DataFrame({"doc_id": [""], "metric": ["las"], "value": [float("nan")]})
    if len(doc_ids) != len(correct["x"]):
        raise ValueError(f"{len(doc_ids)} doc ids for {len(correct['x'])} scored documents")
    stats = las_from_correctness(correct["x"], correct["xr"], correct["r"])
    return pd.concat([
        pd.DataFrame({"doc_id": list(doc_ids), "metric": "las", "value": las_contributions(correct)}),
        pd.DataFrame({"doc_id": list(doc_ids), "metric": "sim_correct_xr",
                      "value": np.asarray(correct["xr"], dtype=float)}),
        pd.DataFrame({"doc_id": "", "metric": ["las_corpus", "sim_acc_xr", "sim_acc_x", "sim_acc_r"],
                      "value": [stats["las"], stats["sim_acc_xr"], stats["sim_acc_x"], stats["sim_acc_r"]]}),
    ], ignore_index=True)


def las_table(make_simulator: Callable[[], Simulator], train_inputs: Sequence[str],
              train_rationales: Sequence[str], train_targets: Sequence[str | None], doc_ids: Sequence[str],
              test_inputs: Sequence[str], test_rationales: Sequence[str],
              test_targets: Sequence[str | None]) -> pd.DataFrame:
    """`las_rows` of simulators trained here (`simulator_correctness`); a warning and the NaN row
    when either split has no target. (The pipeline trains them once per dataset instead:
    stages/las_simulator.py, and scores with `view_correctness`.)"""
    keep = _with_target(test_targets)
    if not keep or not _with_target(train_targets):
        log.warning("LAS: no simulation target (no label in the target answers) on the %s split; LAS is NaN",
                    "test" if not keep else "train")
        return las_rows(None, [])
    correct = simulator_correctness(make_simulator, train_inputs, train_rationales, train_targets,
                                    test_inputs, test_rationales, test_targets)
    return las_rows(correct, [doc_ids[i] for i in keep])


# ----------------------------------------------------------------------------- saved simulators

MANIFEST = "simulator.json"  # in a saved simulators' folder: what they were trained on and how
SEQ2SEQ_LOAD_KEYS = ("max_source_length", "max_target_length", "batch_size")  # how a saved seq2seq one reads


def simulator_path(directory: str | os.PathLike, view: str, kind: str) -> Path:
    """Where the `view` simulator of `kind` lives in a saved folder: a save_pretrained folder
    (seq2seq) or one safetensors file (the embedding kinds)."""
    return Path(directory) / (view if kind == "seq2seq" else f"{view}.safetensors")


def save_view_simulators(directory: str | os.PathLike, simulators: Iterable[tuple[str, Simulator]],
                         manifest: dict) -> None:
    """Save each (view, fitted simulator) as it comes (`fit_view_simulators`), then `manifest`
    (needs "kind"; JSON) as MANIFEST. No pickles: safetensors and JSON only."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    views = []
    for view, simulator in simulators:
        simulator.save(simulator_path(directory, view, manifest["kind"]))
        views.append(view)
    if views != list(VIEWS):
        raise ValueError(f"saved views {views}; LAS needs {', '.join(VIEWS)}")
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def load_manifest(directory: str | os.PathLike) -> dict:
    return json.loads((Path(directory) / MANIFEST).read_text())


def load_view_simulators(directory: str | os.PathLike, encoder: Encoder | None = None,
                         device: str = "auto") -> tuple[Truncator | None, Iterator[tuple[str, Simulator]]]:
    """(the truncator the saved simulators' training views were fitted to, an iterator loading each
    (view, simulator) in turn, so at most one seq2seq model is in memory). `encoder`: the sentence
    embedder of the embedding kinds (the one they were fitted over)."""
    manifest = load_manifest(directory)
    kind = manifest["kind"]
    if kind == "seq2seq":
        reads = {k: manifest["seq2seq"][k] for k in SEQ2SEQ_LOAD_KEYS}
        truncator = Seq2SeqSimulator(str(simulator_path(directory, VIEWS[0], kind)), **reads).truncator
        load = lambda view: Seq2SeqSimulator.load(simulator_path(directory, view, kind), device=device, **reads)  # noqa: E731
    else:
        if encoder is None:
            raise ValueError(f"saved {kind} simulators need their encoder")
        truncator = encoder_truncator(encoder)
        load = lambda view: EmbeddingSimulator.load(simulator_path(directory, view, kind), encoder, truncator)  # noqa: E731
    return truncator, ((view, load(view)) for view in VIEWS)
