"""Answer parsing: the reasoning before <answer>, and label ids from ids, titles and fuzzy titles."""

import pytest

from mechdistill.teacher.answers import AnswerParser

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
    ("first <answer>I10</answer> again <answer>I50.21</answer>", "first <answer>I10</answer> again", ["I50.21"], []),
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
