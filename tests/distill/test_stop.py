"""Students are taught to stop: the supervised sequence ends with the chat template's
end-of-turn token after `</answer>`, and a tiny student trained on it stops there when it generates."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from mechdistill.distill.signals import make_examples
from mechdistill.io import SplitArtifacts
from mechdistill.teacher.answers import end_of_turn
from mechdistill.teacher.backends import STOP_AT_ANSWER, TransformersBackend
from mechdistill.teacher.prompts import render_prompt
from tests.helpers import icd_subtree, tiny_llama

MESSAGES = json.dumps([{"role": "user", "content": "Code.\nDocument:\nEF 35%."}])
COT = "Systolic [I50.22]."
ANSWER = "<answer>I50.22</answer>"


def split(raw: str) -> SplitArtifacts:
    return SplitArtifacts(
        docs=pd.DataFrame({"doc_id": ["d0"], "labels": [["I50.22"]]}).set_index("doc_id"),
        prompts=pd.DataFrame({"doc_id": ["d0"], "messages": [MESSAGES]}).set_index("doc_id"),
        cot=pd.DataFrame({"doc_id": ["d0"], "cot": [COT], "raw": [raw]}).set_index("doc_id"),
        anchors=pd.DataFrame([{"doc_id": "d0", "early_span": [0, 8], "refine_spans": [], "shortlist_spans": [],
                               "nearmiss_spans": [], "anchors": ["systolic"], "near_misses": []}]),
        space=icd_subtree("I50"))


def test_supervised_labels_end_with_the_end_of_turn_token(byte_tok):
    """The CE positions predict the CoT, the answer block and then <|im_end|> (the byte tokenizer's
    ChatML turn end); text the teacher wrote after </answer> is not taught."""
    (ex,) = make_examples(byte_tok, split(f"{COT}\n{ANSWER}\nMore words."))
    eot = byte_tok.convert_tokens_to_ids("<|im_end|>")
    labels = ex.input_ids[[p + 1 for p in ex.cot_positions]]
    assert int(labels[-1]) == eot and int((labels == eot).sum()) == 1
    assert byte_tok.decode(labels[:-1]) == f"{COT}\n{ANSWER}"


@pytest.fixture(scope="module")
def trained(byte_tok):
    """A tiny random Llama overfit for 80 steps on the one supervised sequence (CE on its CoT positions)."""
    (ex,) = make_examples(byte_tok, split(f"{COT}\n{ANSWER}"))
    model = tiny_llama(len(byte_tok), seed=0).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    positions = torch.tensor(list(ex.cot_positions))
    for _ in range(80):
        logits = model(input_ids=ex.input_ids[None]).logits[0]             # [seq, V]
        loss = F.cross_entropy(logits[positions], ex.input_ids[positions + 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("stop_at_answer", [False, True])
def test_a_trained_tiny_student_stops(byte_tok, trained, stop_at_answer):
    """Greedy generation ends after </answer> well before max_new_tokens: with the end-of-turn token alone
    (the student learned to write it) and with the </answer> stop string of student_generation."""
    gen = {"temperature": 0.0, "repetition_penalty": 1.0, "max_new_tokens": 120, STOP_AT_ANSWER: stop_at_answer}
    backend = TransformersBackend.from_model(trained, byte_tok, gen)
    (out,) = backend.complete([render_prompt(byte_tok, json.loads(MESSAGES))], gen["max_new_tokens"])
    assert out.text == f"{COT}\n{ANSWER}"
    assert out.finish_reason == "stop" and out.n_tokens < gen["max_new_tokens"]
    # bytes of the text, plus the end-of-turn token when the model itself stopped
    assert out.n_tokens == len(out.text.encode()) + (0 if stop_at_answer else 1)


def test_the_answer_stop_string_cuts_a_student_that_never_learned_to_stop(byte_tok):
    """A random model writes on to max_new_tokens; a text holding </answer> is cut right after it."""
    from mechdistill.teacher.backends import cut_at_stop

    assert cut_at_stop("a <answer>X</answer> junk </answer>", ["</answer>"]) == ("a <answer>X</answer>", True)
    assert cut_at_stop("a <answer>X", ["</answer>"]) == ("a <answer>X", False)
    assert cut_at_stop("a </answer>", []) == ("a </answer>", False)


@pytest.mark.parametrize("template, turn_end", [
    ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endfor %}",
     "<|eot_id|>"),
    ("{% for m in messages %}<start_of_turn>{{ m.role }}\n{{ m.content }}<end_of_turn>\n{% endfor %}", "<end_of_turn>"),
])
def test_end_of_turn_is_read_from_the_chat_template(template, turn_end):
    from mechdistill.models import byte_tokenizer

    tok = byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                                                         "<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = template
    assert end_of_turn(tok) == turn_end
    tok.chat_template = None
    assert end_of_turn(tok) == tok.eos_token == "<|im_end|>"


def test_targets_made_before_the_end_of_turn_are_refused(byte_tok):
    """Teacher targets of the old supervised text (no end of turn) are a token prefix of the student's new
    sequence: student_loss stops instead of treating the same tokenizer as another one."""
    from mechdistill.distill.methods import METHODS
    from mechdistill.distill.objective import student_loss, teacher_targets
    from mechdistill.errors import InputError

    (new,) = make_examples(byte_tok, split(f"{COT}\n{ANSWER}"))
    old = make_examples(byte_tok, split(f"{COT}\n{ANSWER}"))[0]
    old.input_ids = new.input_ids[:-1]  # the sequence as it was tokenized before the end of turn was taught
    model = tiny_llama(len(byte_tok), seed=0)
    targets = teacher_targets(model, old, {}, 0.0, top_k=4)
    with pytest.raises(InputError, match="rerun teacher_targets"):
        student_loss(model, new, targets, {}, METHODS["vanilla"], 0.0, 2.0)
