import json

from mechdistill.characterize.teacher_forcing import forced_sequence, label_first_tokens
from mechdistill.models import byte_tokenizer


def test_forced_sequence_maps_cot_spans_to_tokens():
    tok = byte_tokenizer()  # one token per byte: positions are easy to compute by hand
    messages = json.dumps([{"role": "user", "content": "Note"}])
    cot = "Heart. A [I1] rather than B [I2]."
    row = {"early_span": [0, 3], "refine_spans": [[7, 33]], "shortlist_spans": [[9, 13]], "nearmiss_spans": [[28, 32]]}
    fs = forced_sequence(tok, messages, cot, row)
    prompt = "<|im_start|>user\nNote<|im_end|>\n<|im_start|>assistant\n"
    start = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert fs.prompt_chars == len(prompt) and fs.cot_token_start == start
    assert tok.decode(fs.input_ids[start:]) == cot
    assert fs.early_queries == [start - 1, start, start + 1]  # each produces one of "Hea"
    assert fs.shortlist_positions == list(range(start + 9, start + 13))   # "[I1]"
    assert fs.nearmiss_positions == list(range(start + 28, start + 32))   # "[I2]"
    assert fs.refine_positions == [start + 32]                            # last token of the sentence
    assert label_first_tokens(tok, ["Heart", ""]) == tok("H", add_special_tokens=False)["input_ids"]
