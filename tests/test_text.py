"""Character spans <-> token positions under two tokenizers (byte-level and SmolLM2), and sentences."""

from mechdistill.text import char_span_to_tokens, sentence_spans, shift_spans, token_offsets, token_units

NON_ASCII = "café — naïve"


def test_byte_offsets_non_ascii(byte_tok):
    off = token_offsets(byte_tok, NON_ASCII)
    # one token per byte: é and ï are 2 bytes, the em dash 3; each byte reports its character
    assert off == [(0, 1), (1, 2), (2, 3), (3, 4), (3, 4), (4, 5), (5, 6), (5, 6), (5, 6),
                   (6, 7), (7, 8), (8, 9), (9, 10), (9, 10), (10, 11), (11, 12)]
    assert char_span_to_tokens(off, (7, 12)) == [10, 11, 12, 13, 14, 15]           # "naïve"
    assert char_span_to_tokens(off, (5, 6)) == [6, 7, 8]                           # "—"


def test_smollm2_offsets_non_ascii(smol_tok):
    off = token_offsets(smol_tok, NON_ASCII)
    # tokens: c | af | é | " —" | " na" | ïve  (a leading space belongs to the next token)
    assert off == [(0, 1), (1, 3), (3, 4), (4, 6), (6, 9), (9, 12)]
    assert char_span_to_tokens(off, (7, 12)) == [4, 5]
    assert token_units(smol_tok, NON_ASCII) == ["c", "af", "é", " —", " na", "ïve"]


def test_special_token_zero_offsets():
    off = [(0, 0), (0, 3), (3, 5), (0, 0)]          # e.g. BOS ... EOS reported as (0, 0)
    assert char_span_to_tokens(off, (0, 2)) == [1]
    assert char_span_to_tokens(off, (0, 5)) == [1, 2]
    assert shift_spans([(0, 3)], 10) == [(10, 13)]


def test_sentences_keep_ids_and_abbreviations():
    text = "HFrEF vs. HFpEF at I50.22. Next one!\n\n  Last"
    assert [text[a:b] for a, b in sentence_spans(text)] == ["HFrEF vs. HFpEF at I50.22.", "Next one!", "Last"]
