import functools

import pytest

from mechdistill.evaluate.las import (
    EmbeddingSimulator,
    Seq2SeqSimulator,
    leakage_adjusted_simulatability,
    make_simulator,
    snap_to_label,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

FILLERS = ["the report says", "patient notes show", "a short mention of", "we observed"]
TEXTS = [f"{filler} {key} case {n}" for n in range(2) for filler in FILLERS for key in ("alpha", "beta")]
TARGETS = ["A1" if "alpha" in text else "B2" for text in TEXTS]  # 16 examples, 2 classes


def word_tokenizer(corpus: list[str]):
    """Word-level tokenizer trained on the corpus: <pad>=0 and </s>=1, as the T5 config expects."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    core = Tokenizer(models.WordLevel(unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models train fastest single-threaded (and do not fight other jobs for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_t5():
    tokenizer = word_tokenizer(TEXTS + TARGETS)
    config = transformers.T5Config(vocab_size=len(tokenizer), d_model=32, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, d_kv=8, decoder_start_token_id=0,
                                   pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(config), tokenizer


def simulator(tiny_t5, **kwargs) -> Seq2SeqSimulator:
    model, tokenizer = tiny_t5
    args = {"model": model, "tokenizer": tokenizer, "epochs": 20, "lr": 3e-3, "device": "cpu", **kwargs}
    return Seq2SeqSimulator(**args)


def test_fits_a_keyword_rule_and_is_deterministic(tiny_t5):
    start = {k: v.clone() for k, v in tiny_t5[0].state_dict().items()}
    first = simulator(tiny_t5).fit(TEXTS, TARGETS)
    assert first.predict(TEXTS) == TARGETS
    assert first.labels == ["A1", "B2"]
    # The given model is left untouched; a second fit with the same seed gives the same weights.
    assert all(torch.equal(v, tiny_t5[0].state_dict()[k]) for k, v in start.items())
    second = simulator(tiny_t5).fit(TEXTS, TARGETS)
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items()):
        assert torch.equal(a, b), name
    assert second.predict(TEXTS) == first.predict(TEXTS)


def test_target_ids_end_in_eos_and_pad_with_ignore_index(tiny_t5):
    sim = simulator(tiny_t5)
    sim._fresh_model()  # resolves the device
    labels = sim._encode_targets(["A1", "patient notes show A1"])
    eos = tiny_t5[1].eos_token_id
    assert labels[0].tolist() == [tiny_t5[1].convert_tokens_to_ids("A1"), eos, -100, -100, -100]
    assert labels[1, -1].item() == eos


def test_runs_inside_las(tiny_t5):
    factory = functools.partial(make_simulator, "seq2seq", **{**dict(model=tiny_t5[0], tokenizer=tiny_t5[1]),
                                                             "epochs": 2, "lr": 3e-3, "device": "cpu"})
    out = leakage_adjusted_simulatability(factory, TEXTS[:8], TEXTS[8:], TARGETS[:8],
                                          TEXTS[8:], TEXTS[:8], TARGETS[8:])
    assert out["n_docs"] == 8 and -1.0 <= out["las"] <= 1.0


def test_snap_to_label():
    labels = ["A1", "B2", "I10"]
    assert snap_to_label("B2", labels) == "B2"
    assert snap_to_label("I1O", labels) == "I10"
    assert snap_to_label("A 1", labels) == "A1"
    assert snap_to_label("zzzz", labels) == "zzzz"
    assert snap_to_label("", labels) == ""


def test_make_simulator(tiny_t5):
    class Encoder:
        def encode(self, texts):
            return torch.zeros(len(texts), 4).numpy()

    for kind in ("logreg", "centroid"):
        sim = make_simulator(kind, encoder=Encoder())
        assert isinstance(sim, EmbeddingSimulator) and sim.kind == kind
    sim = make_simulator("seq2seq", model=tiny_t5[0], tokenizer=tiny_t5[1], epochs=1)
    assert isinstance(sim, Seq2SeqSimulator) and sim.epochs == 1
    with pytest.raises(ValueError, match="logreg, centroid, seq2seq"):
        make_simulator("t5")
    with pytest.raises(ValueError, match="needs an encoder"):
        make_simulator("logreg")
    with pytest.raises(ValueError, match="either"):
        Seq2SeqSimulator()


def test_loads_a_local_directory(tiny_t5, tmp_path):
    model, tokenizer = tiny_t5
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    sim = Seq2SeqSimulator(str(tmp_path), epochs=20, lr=3e-3, device="cpu").fit(TEXTS, TARGETS)
    assert sim.predict(TEXTS) == TARGETS


def test_saved_simulators_load_without_pickles_and_predict_the_same(tiny_t5, tmp_path):
    from mechdistill.evaluate.las import (
        VIEWS,
        fit_view_simulators,
        load_view_simulators,
        save_view_simulators,
    )

    make = lambda: simulator(tiny_t5, epochs=5)  # noqa: E731
    fitted = {}

    def keep(pairs):
        for view, sim in pairs:
            fitted[view] = sim.predict(TEXTS)
            yield view, sim
    save_view_simulators(tmp_path, keep(fit_view_simulators(make, TEXTS, TEXTS, TARGETS)),
                         {"kind": "seq2seq", "seq2seq": {"max_source_length": 512, "max_target_length": 16,
                                                         "batch_size": 8}})
    files = {p.suffix for p in tmp_path.rglob("*") if p.is_file()}
    assert ".safetensors" in files and not files & {".bin", ".pt", ".pkl", ".pth"}
    truncator, loaded = load_view_simulators(tmp_path, device="cpu")
    assert truncator.budget == 512 - truncator.tokenizer.num_special_tokens_to_add(pair=False)
    predictions = {view: sim.predict(TEXTS) for view, sim in loaded}
    assert list(predictions) == list(VIEWS) and predictions == fitted
