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


@pytest.mark.parametrize("k", [1, 3, 5, 8, 15])
def test_ranking_metrics_match_loops(k):
    gold, pred, train = random_data(seed=k)
    prop = xmc.propensities(train)
    p, r, n, s = [], [], [], []
    nums, dens = [], []
    for g, ranked in zip(gold, pred):
        g = set(g)
        hits = [lab in g for lab in ranked[:k]]
        p.append(sum(hits) / k)
        r.append(sum(hits) / len(g))
        dcg = sum(1 / math.log2(j + 2) for j, h in enumerate(hits) if h)
        idcg = sum(1 / math.log2(j + 2) for j in range(min(k, len(g))))
        n.append(dcg / idcg)
        nums.append(sum(1 / loop_propensity(train, lab) for lab, h in zip(ranked, hits) if h) / k)
        dens.append(sum(sorted((1 / loop_propensity(train, lab) for lab in g), reverse=True)[:k]) / k)
    s = np.array(nums) / np.mean(dens)
    np.testing.assert_allclose(xmc.precision_at_k(gold, pred, k), p)
    np.testing.assert_allclose(xmc.recall_at_k(gold, pred, k), r)
    np.testing.assert_allclose(xmc.ndcg_at_k(gold, pred, k), n)
    np.testing.assert_allclose(xmc.psp_at_k(gold, pred, k, prop), s)
    np.testing.assert_allclose(xmc.psp_at_k(gold, pred, k, prop, normalize=False), nums)
    assert xmc.psp_at_k(gold, pred, k, prop).mean() == pytest.approx(sum(nums) / sum(dens))
    assert xmc.precision_at_k(gold, pred, k)[0] == 0.0  # empty prediction


def test_hand_case_and_perfect_ranking():
    gold, pred = [["a", "b"]], [["c", "a", "d", "b"]]
    assert xmc.precision_at_k(gold, pred, 1)[0] == 0
    assert xmc.precision_at_k(gold, pred, 3)[0] == pytest.approx(1 / 3)
    assert xmc.recall_at_k(gold, pred, 3)[0] == pytest.approx(0.5)
    assert xmc.ndcg_at_k(gold, pred, 3)[0] == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert xmc.ndcg_at_k(gold, [["b", "a"]], 5)[0] == pytest.approx(1.0)
    assert xmc.precision_at_k(gold, [["a", "a", "b"]], 2)[0] == 1.0  # duplicates dropped
    np.testing.assert_array_equal(xmc.exact_match([["a", "b"], ["a"]], [["b", "a"], ["a", "b"]]), [1.0, 0.0])


def test_propensity_formula():
    train = [["a"]] * 10 + [["b"]] * 90
    prop = xmc.propensities(train, A=0.55, B=1.5)
    c = (math.log(100) - 1) * 2.5 ** 0.55
    assert prop["a"] == pytest.approx(1 / (1 + c * 11.5 ** -0.55))
    assert prop["never-seen"] == pytest.approx(1 / (1 + c * 1.5 ** -0.55))
    assert prop["never-seen"] < prop["a"] < prop["b"]  # rarer labels are less likely to be observed


def test_errors_name_the_document():
    with pytest.raises(ValueError, match="document 1 has no gold"):
        xmc.precision_at_k([["a"], []], [["a"], ["a"]], 1)
    with pytest.raises(ValueError, match=r"document 1: predicted label 'zz'"):
        xmc.macro_f1([["a"], ["a"]], [["a"], ["zz"]], label_space=["a", "b"])
    with pytest.raises(ValueError, match="2 documents but pred has 1"):
        xmc.summarize([["a"], ["b"]], [["a"]])


def test_summarize_and_per_instance():
    gold, pred, train = random_data()
    table = xmc.summarize(gold, pred, train, ks=(1, 5))
    assert list(table.columns) == ["metric", "value"]
    assert list(table.metric) == ["P@1", "P@5", "nDCG@1", "nDCG@5", "PSP@1", "PSP@5", "R@1", "R@5",
                                  "macro_f1", "micro_f1", "exact_match", "instance_f1", "n_docs"]
    value = dict(zip(table.metric, table.value))
    assert value["P@5"] == pytest.approx(xmc.precision_at_k(gold, pred, 5).mean())
    assert value["macro_f1"] == pytest.approx(xmc.macro_f1(gold, pred))
    assert value["exact_match"] == pytest.approx(xmc.exact_match(gold, pred).mean())
    assert value["n_docs"] == len(gold)
    rows = xmc.per_instance(gold, pred, train, ks=(1, 5))
    assert set(rows.columns) == {"doc", "doc_id", "metric", "value"}
    p5 = rows[rows.metric == "P@5"].sort_values("doc")
    np.testing.assert_allclose(p5.value, xmc.precision_at_k(gold, pred, 5))
    psp = rows[rows.metric == "PSP@5"].value.mean()
    assert psp == pytest.approx(value["PSP@5"])
    assert "PSP@1" not in set(xmc.summarize(gold, pred, ks=(1,)).metric)  # no training labels, no PSP


def test_excluded_pairs_removed_from_gold_and_predictions():
    ids = ["d0", "d1", "d2"]
    gold = [["a", "self0"], ["b"], ["self2"]]
    pred = [["self0", "a"], ["c", "b"], ["self2"]]
    excluded = {("d0", "self0"), ("d2", "self2")}
    table = xmc.summarize(gold, pred, ks=(1,), doc_ids=ids, excluded_pairs=excluded)
    value = dict(zip(table.metric, table.value))
    assert value["n_docs"] == 2  # d2 had only an excluded label
    assert value["P@1"] == pytest.approx(0.5)  # d0: "a" moves to rank 1; d1: "c" misses
    rows = xmc.per_instance(gold, pred, ks=(1,), doc_ids=ids, excluded_pairs=excluded)
    assert sorted(set(rows.doc_id)) == ["d0", "d1"]
    with pytest.raises(ValueError, match="doc_ids"):
        xmc.summarize(gold, pred, excluded_pairs=excluded)


def test_candidates_extend_ranking_but_not_the_answer():
    gold, pred, cands = [["a", "b"]], [["a"]], [["c", "a", "b"]]
    assert xmc.ranked_with_candidates(pred, cands) == [["a", "c", "b"]]
    value = dict(zip(*xmc.summarize(gold, pred, ks=(3,), candidates=cands).to_dict("list").values()))
    assert value["P@3"] == pytest.approx(2 / 3)
    assert value["R@3"] == pytest.approx(1.0)
    assert value["micro_f1"] == pytest.approx(2 / 3)  # F1 sees the answer only: tp 1, fn 1


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
