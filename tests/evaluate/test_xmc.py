import math
import random

import numpy as np
import pytest
from sklearn.metrics import f1_score
from sklearn.preprocessing import MultiLabelBinarizer

from mechdistill.evaluate import xmc

LABELS = [f"L{i}" for i in range(30)]


def random_data(n_docs: int = 60, seed: int = 0):
    rng = random.Random(seed)
    gold = [rng.sample(LABELS, rng.randint(1, 5)) for _ in range(n_docs)]
    pred = [rng.sample(LABELS, rng.randint(0, 10)) for _ in range(n_docs)]
    pred[0] = []  # an empty prediction must score 0
    pred[1] = list(gold[1])  # and an exact one 1
    train = [rng.sample(LABELS[:25], rng.randint(1, 6)) for _ in range(200)]  # L25..L29 unseen
    return gold, pred, train


def loop_propensity(train, label, A=0.55, B=1.5):
    n = len(train)
    n_l = sum(label in set(t) for t in train)
    c = (math.log(n) - 1) * (B + 1) ** A
    return 1 / (1 + c * (n_l + B) ** (-A))


def test_f1_matches_sklearn_on_the_gold_labels():
    gold, pred, _ = random_data()
    present = sorted({lab for g, p in zip(gold, pred) for lab in [*g, *p]})
    gold_labels = sorted({lab for g in gold for lab in g})
    mlb = MultiLabelBinarizer(classes=present).fit([present])
    y_true, y_pred = mlb.transform(gold), mlb.transform(pred)
    columns = [present.index(lab) for lab in gold_labels]
    assert xmc.macro_f1(gold, pred) == pytest.approx(
        f1_score(y_true[:, columns], y_pred[:, columns], average="macro", zero_division=0))
    assert xmc.micro_f1(gold, pred) == pytest.approx(f1_score(y_true, y_pred, average="micro", zero_division=0))
    # labels never gold do not dilute the average, whatever the label space
    assert xmc.macro_f1(gold, pred, label_space=LABELS + ["X1", "X2"]) == xmc.macro_f1(gold, pred)


def test_macro_f1_hand_case():
    # class set = the gold labels {a, c}; a: tp 1, fn 1 -> 2/3; c: tp 1 -> 1; b (predicted, never gold): no class
    assert xmc.macro_f1([["a", "c"], ["a"]], [["b", "c"], ["a"]]) == pytest.approx((2 / 3 + 1) / 2)
    # a appears twice, predicted once: tp 1, fn 1; micro = 2*2 / (2*2 + 1 + 1): b's FP counts here
    assert xmc.micro_f1([["a", "c"], ["a"]], [["b", "c"], ["a"]]) == pytest.approx(4 / 6)


def test_macro_f1_class_set_is_the_gold_for_every_model():
    # gold {A}, {B}. Model 1 answers [A, C], [A]; model 2 answers [A], [A]. Both get A right once and
    # miss B; model 1 also names C, never gold. Class set {A, B} for both:
    #   model 1: A tp 1, fp 1 (doc 1) -> 2/3; B fn 1 -> 0; C: no class   -> macro (2/3 + 0) / 2 = 1/3
    #   model 2: A tp 1, fp 1 -> 2/3; B -> 0                             -> macro 1/3
    # (gold U predicted would give model 1 (2/3 + 0 + 0) / 3 = 2/9: one more class than model 2)
    gold = [["A"], ["B"]]
    one, two = [["A", "C"], ["A"]], [["A"], ["A"]]
    assert xmc.macro_f1(gold, one) == pytest.approx(1 / 3) and xmc.macro_f1(gold, two) == pytest.approx(1 / 3)
    # C's false positive stays in micro-F1: tp 1, fp 2, fn 1 vs tp 1, fp 1, fn 1
    assert xmc.micro_f1(gold, one) == pytest.approx(2 / 5) and xmc.micro_f1(gold, two) == pytest.approx(2 / 4)
    rows = xmc.summarize(gold, one).set_index("metric")["value"]
    assert rows["macro_f1"] == pytest.approx(1 / 3)
    assert xmc.macro_f1_resamples(gold, one, np.array([[0, 1], [0, 0]])) == pytest.approx([1 / 3, 1.0])


def test_macro_f1_on_resamples_equals_macro_f1_of_each_resample():
    from mechdistill.evaluate.xmc import macro_f1_resample_rows, macro_f1_resamples
    from mechdistill.stats import resample_indices

    gold = [["a", "b"], ["c"], ["a"], ["d", "e"], ["b"]]
    pred = [["a"], ["c", "x"], [], ["d"], ["a", "b"]]
    resamples = resample_indices(len(gold), 40, seed=5)
    direct = [xmc.macro_f1([gold[i] for i in idx], [pred[i] for i in idx]) for idx in resamples]
    assert macro_f1_resamples(gold, pred, resamples) == pytest.approx(direct)
    # hand-computed: documents 0 and 1 once each -> gold labels a (tp), b (fn), c (tp); x (fp) is no class
    assert macro_f1_resamples(gold, pred, np.array([[0, 1]]))[0] == pytest.approx((1 + 0 + 1) / 3)
    rows = macro_f1_resample_rows(gold, pred, 40, seed=5)
    assert list(rows["doc_id"][:2]) == ["resample:0", "resample:1"] and set(rows["metric"]) == {"macro_f1"}
    assert rows["value"].to_numpy() == pytest.approx(direct)  # same draws for the same (n, S, seed)
    with pytest.raises(ValueError, match="indices into 5 documents"):
        macro_f1_resamples(gold, pred, np.array([[0, 7]]))
