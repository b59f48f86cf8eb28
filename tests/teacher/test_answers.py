"""Answer parsing: the reasoning before <answer>, and label ids from ids, titles and fuzzy titles."""

import pytest

from mechdistill.teacher.answers import AnswerParser, supervised_output

CANDS = ["I50.22", "I50.21", "I50.32", "I10"]


@pytest.fixture(scope="module")
def parser(icd_space):
    return AnswerParser(icd_space, fuzzy_threshold=90)


@pytest.mark.parametrize("output, cot, pred, unmapped", [
    ("Heart. <answer>I50.22; I10</answer>", "Heart.", ["I50.22", "I10"], []),
    ("x <answer>i50.22, I5021\n- I10: Essential (primary) hypertension</answer>", "x", ["I50.22", "I50.21", "I10"], []),
    ("y <answer>Chronic systolic (congestive) heart failure</answer>", "y", ["I50.22"], []),  # exact title
    ("z <answer>chronic diastolic congestive heart failure</answer>", "z", ["I50.32"], []),  # normalised title
    ("t <answer>chronic diastolc (congestive) heart failre</answer>", "t", ["I50.32"], []),  # fuzzy, candidates
    ("u <answer>Chronic systolic (congestive) heart failure [I50.22]</answer>", "u", ["I50.22"], []),
    ("w <answer>I50.22; I50.22; banana split</answer>", "w", ["I50.22"], ["banana split"]),  # dedupe + junk
    ("v <answer>I50.22; I10", "v", ["I50.22", "I10"], []),                          # unclosed block
    ("first <answer>I10</answer> again <answer>I50.21</answer>", "first", ["I50.21"], []),   # last block
    ("a <answer>I10</answer> b <answer>I50.2", "a", ["I10"], []),                       # last complete block
    ("no answer block at all", "no answer block at all", [], []),
    ("<answer></answer>", "", [], []),
    ("ishable Eliath ### <answer>;;; ,, Q99.XYZ ##</answer>", "ishable Eliath ###", [], ["Q99.XYZ ##"]),
])
def test_answer_parsing(parser, output, cot, pred, unmapped):
    parsed = parser.parse(output, CANDS)
    assert (parsed.cot, parsed.pred_labels, parsed.unmapped) == (cot, pred, unmapped)


def test_fuzzy_matching_only_within_candidates(parser):
    # A near-spelling of a label that is not a candidate stays unmapped.
    assert parser.parse("<answer>chronic diastolc (congestive) heart failre</answer>", ["I10"]).pred_labels == []


@pytest.mark.parametrize("output, n_blocks, answer, supervised", [
    ("c <answer>I10</answer>", 1, "I10", "c\n<answer>I10</answer><E>"),
    ("c <answer>I10</answer> no <answer>I50.21</answer>", 2, "I50.21", "c\n<answer>I50.21</answer><E>"),
    ("c <answer>I10</answer> no <answer>I50.2", 2, "I10", "c\n<answer>I10</answer><E>"),
    ("c <answer>I10", 1, "I10", "c\n<answer>I10"),  # never closed: no end of turn is taught
    ("c", 0, "", "c"),
])
def test_answer_blocks(parser, output, n_blocks, answer, supervised):
    """Several blocks: the CoT ends before the first, the last complete block is the answer, and the
    student is taught the CoT then that block through its </answer> (what follows it is not taught), then
    the end-of-turn token ("<E>" here) when the block is closed."""
    parsed = parser.parse(output, CANDS)
    assert (parsed.n_answer_blocks, parsed.answer) == (n_blocks, answer)
    assert supervised_output(parsed.cot, output, "<E>") == supervised


def test_labels_outside_candidates(parser):
    parsed = parser.parse("<answer>I50.22; I50.9; banana</answer>", ["I50.22", "I10"])
    assert (parsed.pred_labels, parsed.outside_candidates, parsed.unmapped) == (["I50.22", "I50.9"], ["I50.9"], ["banana"])
