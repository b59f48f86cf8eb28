"""CoT segmentation: early span, mentions and refinement sentences, their token positions under two
tokenizers, edge cases (the span <-> token helpers themselves: tests/test_text.py)."""

import pytest

from mechdistill.anchors.segment import (
    find_mentions,
    mention_spans,
    refine_spans,
    ruled_out,
    segment_cot,
)
from mechdistill.text import char_span_to_tokens, first_tokens_span, spans_to_token_positions, token_offsets
from tests.helpers import icd_subtree
from tests.test_text import NON_ASCII

COT = ("The work-up focused on heart failure.\n"
       "Chronic systolic (congestive) heart failure [I50.22] fits the note "
       "rather than Acute systolic (congestive) heart failure [I50.21].\n"
       "I50.22 and I50.21 were both considered.")
S2 = COT.index("Chronic")        # start of sentence 2
S3 = COT.index("I50.22 and")     # start of sentence 3


@pytest.fixture(scope="module")
def space():
    """The real ICD-10-CM subtree I50 (heart failure)."""
    return icd_subtree("I50")


def test_early_span_ends_on_a_whole_character(byte_tok, smol_tok):
    off = token_offsets(byte_tok, NON_ASCII)                                       # one token per byte
    assert first_tokens_span(NON_ASCII, off, 4) == (0, 4)                                 # "café"
    assert first_tokens_span(NON_ASCII, off, 5) == (0, 4)                                 # 2nd byte of é
    assert first_tokens_span(NON_ASCII, off, 100) == (0, 12)
    assert first_tokens_span(NON_ASCII, token_offsets(smol_tok, NON_ASCII), 2) == (0, 3)  # c | af


def test_mention_spans_to_tokens_on_two_tokenizers(space, byte_tok, smol_tok):
    spans = mention_spans(COT, ["I50.21"], space)
    start, end = COT.index("Acute systolic"), COT.index("[I50.21]") + 8       # "Title [ID]"
    assert spans == [(start, end), (S3 + 11, S3 + 17)]
    byte_pos = spans_to_token_positions(token_offsets(byte_tok, COT), spans)
    assert byte_pos == [list(range(start, end)), list(range(S3 + 11, S3 + 17))]     # 1 char = 1 token
    off = token_offsets(smol_tok, COT)
    for (s, e), pos in zip(spans, spans_to_token_positions(off, spans)):
        assert pos == list(range(pos[0], pos[-1] + 1))                             # contiguous
        assert off[pos[0]][0] <= s < off[pos[0]][1] and off[pos[-1]][0] < e <= off[pos[-1]][1]
    # the last token of a span (a refinement position) ends the sentence under both tokenizers
    sent = refine_spans(COT, None, [], [])[0]
    assert spans_to_token_positions(token_offsets(byte_tok, COT), [sent])[0][-1] == sent[1] - 1
    assert off[char_span_to_tokens(off, sent)[-1]][1] == sent[1]


def test_early_span_skips_zero_width_tokens():
    off = [(0, 0), (0, 3), (3, 5), (0, 0)]          # e.g. BOS ... EOS reported as (0, 0)
    assert first_tokens_span("abcde", off, 1) == (0, 0)
    assert first_tokens_span("abcde", off, 2) == (0, 3)


def test_mentions_title_and_id(space):
    m = find_mentions(COT, space, ["I50.22", "I50.21"])
    end22 = COT.index("[I50.22]") + 8
    a21 = COT.index("Acute systolic")
    end21 = COT.index("[I50.21]") + 8
    # "Title [ID]" is one mention; bare IDs count; the ancestor title inside a longer title does not
    assert m == [(S2, end22, "I50.22"), (a21, end21, "I50.21"),
                 (S3, S3 + 6, "I50.22"), (S3 + 11, S3 + 17, "I50.21")]
    assert ruled_out(COT, m) == [False, True, False, False]
    assert mention_spans("chronic SYSTOLIC (congestive) heart failure", ["I50.22"], space) == [(0, 43)]
    assert mention_spans("x [i50.22] y i50.22", ["I50.22"], space) == [(2, 10)]   # bare ids: exact case
    assert mention_spans("Heart failure", ["I50.9"], space) == []


def test_refine_spans_cue_and_label_aware(space):
    s2 = (S2, COT.index("[I50.21].") + 9)
    s3 = (S3, len(COT))
    assert refine_spans(COT, None, [], []) == [s2]                                  # "rather than"
    short = mention_spans(COT, ["I50.22"], space)
    near = mention_spans(COT, ["I50.21"], space)
    assert refine_spans(COT, [], short, near) == [s2, s3]                           # label-aware only
    assert refine_spans(COT, None, short, near) == [s2, s3]
    assert refine_spans(COT, [r"\bfocused\b"], [], []) == [(0, COT.index(".") + 1)]
    assert refine_spans("Ruling out A; B is unlikely", None, [], []) == [(0, 27)]


def test_segment_cot(space, byte_tok):
    seg = segment_cot(COT, token_offsets(byte_tok, COT), 10, ["I50.22"], ["I50.21"], space)
    assert seg["early_span"] == (0, 10)
    assert seg["reason"] == ""
    assert seg["shortlist_spans"] == [(S2, COT.index("[I50.22]") + 8), (S3, S3 + 6)]
    assert len(seg["nearmiss_spans"]) == 2 and len(seg["refine_spans"]) == 2


def test_segment_cot_edge_cases(space, byte_tok):
    empty = segment_cot("", token_offsets(byte_tok, ""), 10, [], [], space)
    assert empty == {"early_span": (0, 0), "refine_spans": [], "shortlist_spans": [],
                     "nearmiss_spans": [], "reason": "empty CoT"}
    flat = "Heart failure it is."
    seg = segment_cot(flat, token_offsets(byte_tok, flat), 10, [], ["I50.21"], space)
    assert seg["reason"] == "no refinement position" and seg["early_span"] == (0, 10)
    assert segment_cot(flat, [], 10, [], [], space)["reason"] == "no near-misses"
    seg = segment_cot(NON_ASCII + " rather than I50.21", token_offsets(byte_tok, NON_ASCII), 3,
                      ["I50.22"], ["I50.21"], space)
    assert seg["nearmiss_spans"] == [(25, 31)] and seg["reason"] == "no shortlist mention"
