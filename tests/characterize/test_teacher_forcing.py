import json

import pytest
import torch

from mechdistill.characterize.scores import margin_gradient
from mechdistill.characterize.teacher_forcing import forced_sequence, margin_tokens
from mechdistill.models import byte_tokenizer

# ICD-10-CM siblings (E11.65, E11.10): the same first five words
HYPERGLYCEMIA = "Type 2 diabetes mellitus with hyperglycemia"
KETOACIDOSIS = "Type 2 diabetes mellitus with ketoacidosis without coma"


def test_forced_sequence_maps_cot_spans_to_tokens():
    tok = byte_tokenizer()  # one token per byte: positions are easy to compute by hand
    user = "Code it.\n\nDocument:\nNote\n\nCandidate labels:\n- A [I1]"
    messages = json.dumps([{"role": "user", "content": user}])
    cot = "Heart. A [I1] rather than B [I2]."
    row = {"early_span": [0, 3], "refine_spans": [[7, 33]], "shortlist_spans": [[9, 13]], "nearmiss_spans": [[28, 32]]}
    fs = forced_sequence(tok, messages, cot, row)
    prompt = f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert fs.prompt_chars == len(prompt) and fs.cot_token_start == start
    assert tok.decode(fs.input_ids[start:]) == cot
    assert fs.early_queries == [start - 1, start, start + 1]  # each produces one of "Hea"
    assert fs.shortlist_positions == list(range(start + 9, start + 13))   # "[I1]"
    assert fs.nearmiss_positions == list(range(start + 28, start + 32))   # "[I2]"
    assert fs.refine_positions == [start + 32]                            # last token of the sentence
    doc = len(tok(prompt[:prompt.index("Document:")], add_special_tokens=False)["input_ids"])  # <|im_start|>: 1 token
    assert fs.document_positions == list(range(doc, doc + len("Document:\nNote\n\nCandidate labels:\n- A [I1]")))


def test_margin_tokens_by_hand(byte_tok):
    """One token per byte: " Heart failure" vs " Heart attack" share " Heart " (7 bytes)."""
    def byte(ch: str) -> int:
        return byte_tok(ch, add_special_tokens=False)["input_ids"][0]

    assert margin_tokens(byte_tok, ["Heart failure", ""], ["Heart attack"]) == ([byte("f")], [byte("a")])
    # a title that is a prefix of the other's: its last token; the longer one's next token (" ")
    assert margin_tokens(byte_tok, ["Heart"], ["Heart attack", "Hepatitis"]) == ([byte("t")], [byte(" "), byte("p")])
    # the longest common prefix with ANY label of the other group decides
    assert margin_tokens(byte_tok, ["Heart failure"], ["Hepatitis", "Heart attack"]) == ([byte("f")],
                                                                                       [byte("p"), byte("a")])
    # no other group: the first token of the mid-sentence form, here the space
    assert margin_tokens(byte_tok, ["Heart"], []) == ([byte(" ")], [])


@pytest.mark.slow  # converts SmolLM2's GGUF once per session
def test_margin_tokens_of_siblings_on_smollm2(smol_tok):
    def ids(text: str) -> list[int]:
        return smol_tok(text, add_special_tokens=False)["input_ids"]

    targets, nearmisses = margin_tokens(smol_tok, [HYPERGLYCEMIA], [KETOACIDOSIS])
    assert targets == ids(" hyperglycemia")[:1] and nearmisses == ids(" ketoacidosis")[:1]
    assert smol_tok.convert_ids_to_tokens(targets + nearmisses) == ["Ġhyper", "Ġketo"]
    assert ids(" Type") != ids("Type")  # mid-sentence, the space-prefixed token

    # grad M_t with an identity final norm is W[target] - W[near-miss]: zero when both are the same token
    torch.manual_seed(0)
    unembed = torch.randn(len(smol_tok), 16, dtype=torch.float64)    # [vocab, d]
    h = torch.randn(3, 16, dtype=torch.float64)                       # [positions, d]
    grad = margin_gradient(h, torch.nn.Identity(), unembed, targets, nearmisses)
    expected = (unembed[ids(" hyperglycemia")[0]] - unembed[ids(" ketoacidosis")[0]]).expand(3, 16)
    assert torch.allclose(grad, expected) and grad.abs().sum() > 0
    first = [ids(HYPERGLYCEMIA)[0]], [ids(KETOACIDOSIS)[0]]                # the old first-token form: "Type"
    assert first[0] == first[1]
    assert torch.equal(margin_gradient(h, torch.nn.Identity(), unembed, *first), torch.zeros(3, 16, dtype=torch.float64))


def test_document_positions_cover_the_last_document_and_its_candidates(byte_tok):
    """With a one-shot exemplar about the SAME note, the document keys are the final user message's
    "Document:" line through its candidate list, nothing of the system prompt, instruction, exemplar
    turns, chat template or CoT."""
    from mechdistill.teacher.prompts import build_messages, document_char_span, format_user_prompt
    from tests.helpers import icd_subtree

    space = icd_subtree("I50")
    note = "Progressive dyspnea; chronic systolic heart failure."
    exemplar = (format_user_prompt(note, ["I50.22", "I50.32"], space, "Code the note."), "I50.22 fits.")
    user = format_user_prompt(note, ["I50.22", "I50.32", "I50.9"], space, "Code the note.")
    messages = build_messages(user, "You are a coder.", exemplar)
    seq = forced_sequence(byte_tok, json.dumps(messages), "The work-up focused on heart failure.",
                          {"early_span": [0, 4], "refine_spans": [], "shortlist_spans": [], "nearmiss_spans": []})
    expected = user[user.index("Document:"):]
    assert expected.startswith("Document:\n" + note) and expected.endswith("[I50.9]")
    positions = seq.document_positions
    assert positions == list(range(positions[0], positions[-1] + 1))     # one contiguous run
    assert byte_tok.decode(seq.input_ids[positions]) == expected
    assert positions[-1] < seq.cot_token_start
    assert byte_tok.decode(seq.input_ids[positions[0] - 40: positions[0]]).count("Code the note.") == 1  # the last one
    with pytest.raises(ValueError, match="Document:"):
        document_char_span("User: Note", [{"role": "user", "content": "Note"}])
    with pytest.raises(ValueError, match="rewrote|changed"):
        document_char_span("User: DOCUMENT", [{"role": "user", "content": "Document:\nx"}])


def test_length_cap_is_the_setting_else_the_models_context():
    from types import SimpleNamespace

    from mechdistill.characterize.teacher_forcing import length_cap

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))
    assert length_cap(None, model) == 8192 and length_cap(512, model) == 512
    assert length_cap(None, object()) is None  # nothing known: no cap


def test_within_cap_skips_and_names_the_long_documents(caplog):
    from mechdistill.characterize.teacher_forcing import within_cap

    docs = [("a", 5), ("b", 12), ("c", 10), ("d", 400)]
    with caplog.at_level("WARNING"):
        kept = within_cap(docs, lambda d: d[1], lambda d: d[0], 10, "cot/train.parquet")
    assert kept == [("a", 5), ("c", 10)]  # at most the cap is kept
    assert "cot/train.parquet: 2 of 4 documents are longer than max_tokens=10 and are skipped: b (12 tokens), " \
           "d (400 tokens)" in caplog.text
    assert within_cap(docs, lambda d: d[1], lambda d: d[0], None, "x") == docs


def test_length_cap_reads_the_text_config_of_a_multimodal_model():
    from types import SimpleNamespace

    from mechdistill.characterize.teacher_forcing import length_cap

    text = SimpleNamespace(max_position_embeddings=131_072)
    multimodal = SimpleNamespace(config=SimpleNamespace(get_text_config=lambda: text))  # Gemma 3: no top-level field
    assert length_cap(None, multimodal) == 131_072
    assert length_cap(4096, multimodal) == 4096
    assert length_cap(None, SimpleNamespace(config=SimpleNamespace(max_position_embeddings=8192))) == 8192
