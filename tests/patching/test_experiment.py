"""Per-document patching experiment: input pairs, Phase-1 words, metrics, peak terms and the effects table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from mechdistill.characterize.attention import attention_modules
from mechdistill.patching.effects import document_effects, summarize_effects
from mechdistill.patching.experiment import (
    confusion_metric,
    content_words,
    control_sets,
    document_region,
    encode,
    focus_metric,
    generated_text,
    patch_document,
    peak_terms,
    phase1_pair,
    phase1_terms,
    phase2_pair,
)
from mechdistill.patching.runs import DocumentRuns, model_heads
from mechdistill.text import token_offsets
from tests.helpers import StubEmbedder, tiny_llama

R2 = math.sqrt(2)


def test_focus_metric_is_final_running_mean_per_text(byte_tok):
    # byte tokenizer: one unit per character
    emb = StubEmbedder({"heart": (1, 0), "lung": (0, 1), "a": (1, 0), "b": (0, 1), "c": (0.6, 0.8)})
    metric = focus_metric(byte_tok, emb, ["heart", "lung"])  # c(x) = (.5, .5)
    values = metric(["ab", "ac", "", "c"])
    np.testing.assert_allclose(values[:2], [(R2 / 2 + R2 / 2) / 2, (R2 / 2 + 0.7 * R2) / 2], rtol=1e-6)
    assert math.isnan(values[2])
    np.testing.assert_allclose(values[3], 0.7 * R2, rtol=1e-6)


def test_confusion_metric_embeds_anchor_text_plus_whole_late_text(byte_tok):
    emb = StubEmbedder({"HFpEF": (0, 1), "Key: HF": (1, 0), "Key: HF xy": (0, 1), "Key: HF xz": (1, 1)})
    metric = confusion_metric(byte_tok, emb, "Key: HF", ["HFpEF"])
    np.testing.assert_allclose(metric([" xy", " xz", ""]), [1.0, 1 / R2, 0.0], rtol=1e-6, atol=1e-7)


def test_generated_text_stops_at_special_token(byte_tok):
    ids = byte_tok("ab", add_special_tokens=False)["input_ids"] + [byte_tok.all_special_ids[0]] + [99]
    assert generated_text(byte_tok, torch.tensor(ids)) == "ab"


PROMPT = "Exemplar: chronic cough.\nDocument:\nChronic systolic heart failure with progressive dyspnea.\nEnd."
DOC = "Chronic systolic heart failure with progressive dyspnea."


def test_phase1_pair_corrupts_only_the_document_and_keeps_length(smol_tok):
    assert document_region(PROMPT, DOC) == (PROMPT.index(DOC), PROMPT.index(DOC) + len(DOC))
    assert content_words(["Chronic systolic (congestive) heart failure", "of the"]) == \
        ["chronic", "congestive", "failure", "heart", "systolic"]
    pair = phase1_pair("d", PROMPT, DOC, {"chronic": "gold label", "heart failure": "anchor", "dyspnea": "x"},
                       smol_tok, mode="labels")
    assert pair.aligned, pair.reason
    assert len(pair.clean_ids) == len(pair.corrupt_ids)
    rec = pair.record()
    assert rec["clean"] == DOC and "Chronic" not in rec["corrupted"] and "dyspnea" not in rec["corrupted"]
    assert rec["terms"] == ["chronic", "heart failure", "dyspnea"] and rec["term_sources"] == ["gold label", "anchor", "x"]
    assert rec["corruption_mode"] == "labels"
    assert pair.corruption.corrupted.startswith("Exemplar: chronic cough.")  # outside the document: untouched
    assert phase1_pair("d", PROMPT, "not in the prompt", {"x": "anchor"}, smol_tok).reason.startswith(
        "document text not found")


def test_phase1_terms_are_the_sources_words_found_in_the_document():
    sources = {"anchor": content_words(["Heart failure", "Renal disease"]),
               "gold label": content_words(["Chronic systolic (congestive) heart failure"])}
    assert phase1_terms(DOC, sources) == {"failure": "anchor, gold label", "heart": "anchor, gold label",
                                          "chronic": "gold label", "systolic": "gold label"}  # no renal, congestive
    assert phase1_terms(DOC, {"anchor": []}) == {}


def test_phase2_pair_swaps_toward_sibling_and_rejects_unalignable(smol_tok, byte_tok):
    title = {"I50.22": "Chronic systolic (congestive) heart failure", "I50.21": "Acute systolic (congestive) heart failure"}
    pair = phase2_pair("d", PROMPT, DOC, " The broad area", ["I50.22"], ["I50.21"], title, smol_tok)
    assert pair.aligned, pair.reason
    assert pair.detail == "I50.22 -> I50.21" and "Acute systolic" in pair.record()["corrupted"]
    assert pair.record()["terms"] == ["Chronic"] and pair.record()["term_sources"] == ["tells I50.22 from I50.21"]
    assert pair.record()["corruption_mode"] == "near_miss"
    assert len(pair.clean_ids) == len(pair.corrupt_ids)
    # byte-level: "Chronic" (7) -> "Acute" (5) cannot be padded to 7 characters with whole filler words
    rejected = phase2_pair("d", PROMPT, DOC, " The", ["I50.22"], ["I50.21"], title, byte_tok, pad=False)
    assert not rejected.aligned and "I50.22 -> I50.21" in rejected.reason


def test_peak_terms_sum_attention_mass_per_document_word(byte_tok):
    class Tape:
        rows = {0: [torch.zeros(1, 2, 12), torch.zeros(1, 2, 13)]}

    class Runs:
        refs = {"clean": type("R", (), {"tape": Tape, "prefix": type("P", (), {"length": 12})})}

    text = "xx lung dyspnea"  # region = the document "lung dyspnea" at chars 3..15 -> but only 12 tokens exist
    offsets = [(i, i + 1) for i in range(len(text))][:12]
    Tape.rows[0][0][0, 1, 3:7] = 0.2  # "lung" gets 0.8 at step 0
    Tape.rows[0][1][0, 1, 8:12] = 0.25  # "dysp" (of dyspnea) gets 1.0 at step 1 (kv 13: first key 0)
    terms = peak_terms(Runs, [(0, 1)], text, offsets, (3, len(text)), n_terms=5)
    assert terms == ["dyspnea", "lung"]
    assert peak_terms(Runs, [(0, 0)], text, offsets, (3, len(text)), n_terms=5) == []


def test_effects_table_by_hand():
    runs = pd.DataFrame([
        # doc a: clean 1.0, corrupt 0.0 -> restoration = value, disruption = 1 - value
        dict(doc_id="a", direction="denoise", kind="top", k=3, seed=0, value=0.6, clean_value=1.0, corrupt_value=0.0),
        dict(doc_id="a", direction="noise", kind="top", k=3, seed=0, value=0.2, clean_value=1.0, corrupt_value=0.0),
        dict(doc_id="a", direction="denoise", kind="random", k=3, seed=0, value=0.1, clean_value=1.0, corrupt_value=0.0),
        dict(doc_id="a", direction="denoise", kind="random", k=3, seed=1, value=0.3, clean_value=1.0, corrupt_value=0.0),
        # doc b: clean 0.5, corrupt 0.25
        dict(doc_id="b", direction="denoise", kind="top", k=3, seed=0, value=0.5, clean_value=0.5, corrupt_value=0.25),
        dict(doc_id="b", direction="noise", kind="top", k=3, seed=0, value=0.5, clean_value=0.5, corrupt_value=0.25),
        # doc c: corruption moved nothing -> no ratio, but relative change and value remain
        dict(doc_id="c", direction="denoise", kind="top", k=3, seed=0, value=0.4, clean_value=0.5, corrupt_value=0.5),
    ])
    effects = document_effects(runs, min_gap=0.01)
    get = effects.set_index(["doc_id", "direction", "kind", "metric"])["effect"]
    assert get[("a", "denoise", "top", "restoration")] == pytest.approx(0.6)
    assert get[("a", "noise", "top", "disruption")] == pytest.approx(0.8)
    assert get[("a", "denoise", "random", "restoration")] == pytest.approx(0.2)  # seeds averaged first
    assert get[("b", "denoise", "top", "restoration")] == pytest.approx(1.0)
    assert get[("b", "noise", "top", "disruption")] == pytest.approx(0.0)
    assert math.isnan(get[("c", "denoise", "top", "restoration")])
    assert get[("c", "denoise", "top", "relative_change")] == pytest.approx(-0.2)  # (0.4 - 0.5) / 0.5
    assert get[("b", "noise", "top", "relative_change")] == pytest.approx(0.0)
    summary = summarize_effects(effects, n_resamples=200).set_index(["direction", "head_set", "k", "metric"])
    row = summary.loc[("denoise", "top", 3, "restoration")]
    assert row["effect"] == pytest.approx(0.8) and row["n_docs"] == 2 and row["ci_low"] <= 0.8 <= row["ci_high"]
    # two documents, restorations 0.6 and 1.0: every resample mean is 0.6, 0.8 or 1.0
    assert row["ci_width"] == pytest.approx(row["ci_high"] - row["ci_low"]) and 0 < row["ci_width"] <= 0.4


# ----------------------------------------------------------------------------- Phase-1 words vs the ranking

NOTE_PROMPT = ("Exemplar: chronic cough.\nDocument:\nChronic systolic heart failure with progressive dyspnea and "
               "orthopnea.\nEnd.")
NOTE = "Chronic systolic heart failure with progressive dyspnea and orthopnea."
TITLES = {"I50.22": "Chronic systolic (congestive) heart failure"}


class FlatEmbedder:
    """The same vector for every text (Focus is not what these tests look at)."""

    def encode(self, texts):
        return np.ones((len(texts), 2), dtype=np.float32)


@pytest.fixture(scope="module")
def peaky_model(byte_tok):
    """A tiny random LLaMA whose heads attend sharply, each to its own document words."""
    model = tiny_llama(len(byte_tok), seed=0)
    with torch.no_grad():
        for attn in attention_modules(model):
            attn.q_proj.weight.mul_(30)
            attn.k_proj.weight.mul_(30)
    return model


def _phase1(model, tok, head_sets, mode):
    settings = dict(phase1_corruption=mode, peak_terms=2, pad=True, batch_size=4, late_tokens=3, value_swaps={})
    return patch_document("phase1", model, tok, FlatEmbedder(), "d", NOTE_PROMPT, NOTE, ["Heart failure"], "", "",
                          ["I50.22"], [], TITLES, head_sets, settings, early_tokens=3, repetition_penalty=1.0)


def test_phase1_corrupted_words_do_not_depend_on_the_head_ranking(peaky_model, byte_tok):
    heads = model_heads(peaky_model)                                  # 2 layers x 4 heads
    ranking_a, ranking_b = heads, heads[::-1]
    scores = [float(s) for s in range(len(heads), 0, -1)]
    sets_a, sets_b = (control_sets(r, scores, bins=[2], n_random=1, seed=0) for r in (ranking_a, ranking_b))
    assert [s.heads for s in sets_a] != [s.heads for s in sets_b]

    # before: the words were the peak terms of the top ranked heads, so they moved with the ranking
    runs = DocumentRuns(peaky_model, 3, heads)
    runs.reference("clean", encode(byte_tok, NOTE_PROMPT))
    offsets, region = token_offsets(byte_tok, NOTE_PROMPT), document_region(NOTE_PROMPT, NOTE)
    old_a, old_b = (peak_terms(runs, r[:2], NOTE_PROMPT, offsets, region, 2) for r in (ranking_a, ranking_b))
    assert old_a != old_b

    # now: the same words whatever the ranking, in both modes
    for mode in ("labels", "all_heads"):
        (rows_a, pair_a), (rows_b, pair_b) = (_phase1(peaky_model, byte_tok, s, mode) for s in (sets_a, sets_b))
        assert pair_a["aligned"], pair_a["reason"]
        assert len(rows_a) == 2 + 2 * len(sets_a)                     # 2 references + every set, both directions
        for column in ("terms", "term_sources", "corrupted", "replacements", "corruption_mode"):
            assert pair_a[column] == pair_b[column], (mode, column)
        assert pair_a["corruption_mode"] == mode
        why = dict(zip(pair_a["terms"], pair_a["term_sources"]))
        if mode == "labels":
            assert why == {"failure": "anchor, gold label", "heart": "anchor, gold label", "chronic": "gold label",
                           "systolic": "gold label"}
            assert len(pair_a["corrupted"]) == len(NOTE)
            assert pair_a["corrupted"].endswith(" with progressive dyspnea and orthopnea.")
            assert not set(why) & set(pair_a["corrupted"].lower().split())
        else:  # the anchor's words, then the words with the most attention mass over all 8 heads
            assert sorted(w for w, source in why.items() if "all-head peak" in source) == \
                sorted(peak_terms(runs, heads, NOTE_PROMPT, offsets, region, 2))
            assert why["heart"] == "anchor"
