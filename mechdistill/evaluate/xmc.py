"""Extreme multi-label classification (XMC) metrics, one row per document.

Inputs, per document i:
- gold[i]: the true label ids G_i (a list or set; order and duplicates are ignored). A document
  without gold labels is an error (ValueError naming its index): no metric is defined for it.
- pred[i]: a RANKED list of predicted label ids: the labels of the model's answer in the order
  the answer names them (`prompts.AnswerParser` keeps that order). Duplicates are dropped keeping
  the first occurrence; an empty list is a valid prediction (it scores 0). The whole list is the
  predicted set for F1 and exact match, so do not pad it. To rank beyond the answer, pass
  `candidates` to `summarize`/`per_instance`: ranking metrics then use the answer followed by the
  unanswered candidates in the prompt's candidate order (`ranked_with_candidates`), while F1 and
  exact match still use the answer alone.

Ranking metrics at cut-off k, with T_k = the first k ranked labels and hit_j = [t_j in G]:
  P@k    = (1/k) sum_{j<=k} hit_j                 (divided by k even when fewer than k predictions)
  R@k    = (1/|G|) sum_{j<=k} hit_j
  nDCG@k = DCG@k / IDCG@k,  DCG@k = sum_{j<=k} hit_j / log2(j+1),  IDCG@k = sum_{j<=min(k,|G|)} 1/log2(j+1)
  PSP@k  = propensity-scored precision (Jain et al. 2016), see `psp_at_k`.
Set metrics (no cut-off): exact_match = [set(pred) == G]; macro-F1 and micro-F1 (App. D.2):
  F1_l = 2 TP_l / (2 TP_l + FP_l + FN_l)   (0 when P_l is 0/0, as scikit-learn zero_division=0)
  macro-F1 = (1/|L|) sum_{l in L} F1_l,  L = labels gold for some scored document (TP_l + FN_l > 0).
  micro-F1 = 2 sum_l TP_l / (2 sum_l TP_l + sum_l FP_l + sum_l FN_l).
The class set L is the gold's, so it is one set per test set for every model: a predicted label
that no document has as gold is a false positive in micro-F1 (and in no F1_l) but adds no class
to the macro average; a predicted label in L counts as FP_l in its F1_l. Labels never gold are
left out (counting the whole label space would make macro-F1 shrink with its size, 501k labels for
LF-WikiSeeAlso). This equals scikit-learn's `f1_score(average="macro", labels=L)` on the binarised
matrix. On a bootstrap resample (`macro_f1_resamples`) L is the resample's gold labels, as
`macro_f1` on those documents; on the val set (distill/selection.py) the val gold's.

Per-document functions return numpy arrays aligned with the input documents, so that two
systems can be paired document by document in `evaluate.stats`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Collection, Iterable, Sequence

import numpy as np
import pandas as pd
from scipy import sparse

from ..stats import resample_indices

DEFAULT_KS = (1, 3, 5, 8, 15)
RESAMPLE = "resample:"  # doc_id prefix of a corpus metric's value on one bootstrap resample

Labels = Sequence[Iterable[str]]


# ---------------------------------------------------------------- inputs

def _gold_sets(gold: Labels) -> list[set[str]]:
    sets = []
    for i, labels in enumerate(gold):
        if isinstance(labels, str):
            raise TypeError(f"gold of document {i} is a string ({labels!r}); give a list of label ids")
        labels = set(labels)
        if not labels:
            raise ValueError(f"document {i} has no gold labels; metrics are undefined for it "
                             "(drop it before scoring)")
        sets.append(labels)
    return sets


def _ranked_lists(pred: Labels) -> list[list[str]]:
    lists = []
    for i, labels in enumerate(pred):
        if isinstance(labels, str):
            raise TypeError(f"prediction of document {i} is a string ({labels!r}); give a list of label ids")
        lists.append(list(dict.fromkeys(labels)))
    return lists


def _checked(gold: Labels, pred: Labels) -> tuple[list[set[str]], list[list[str]]]:
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} documents but pred has {len(pred)}")
    return _gold_sets(gold), _ranked_lists(pred)


def ranked_with_candidates(pred: Labels, candidates: Labels) -> list[list[str]]:
    """Answer labels in answer order, then the document's unanswered candidates in candidate order."""
    if len(pred) != len(candidates):
        raise ValueError(f"pred has {len(pred)} documents but candidates has {len(candidates)}")
    return [list(dict.fromkeys([*p, *c])) for p, c in zip(pred, candidates)]


def remove_excluded(doc_ids: Sequence[str], gold: Labels, pred: Labels,
                    excluded_pairs: Collection[tuple[str, str]]) -> tuple[list[list[str]], list[list[str]]]:
    """Drop every (doc_id, label) pair in `excluded_pairs` from both gold and predictions.

    This is the ECLARE/XML-repository convention for LF-WikiSeeAlso ("filter" files: pairs such
    as an article listing itself), applied before any metric. Order of the remaining predictions
    is kept. Documents whose gold becomes empty are returned empty; `summarize` drops them.
    """
    if not (len(doc_ids) == len(gold) == len(pred)):
        raise ValueError(f"doc_ids, gold and pred lengths differ: {len(doc_ids)}, {len(gold)}, {len(pred)}")
    excluded = set(excluded_pairs)
    keep = lambda d, labels: [lab for lab in labels if (d, lab) not in excluded]  # noqa: E731
    return ([keep(d, g) for d, g in zip(doc_ids, gold)], [keep(d, p) for d, p in zip(doc_ids, pred)])


# ---------------------------------------------------------------- propensities

class Propensities(dict):
    """label -> propensity p_l; labels never seen in training get p_l at N_l = 0."""

    def __init__(self, values: dict[str, float], unseen: float) -> None:
        super().__init__(values)
        self.unseen = unseen

    def __missing__(self, label: str) -> float:
        return self.unseen


def propensities(train_label_lists: Labels, A: float = 0.55, B: float = 1.5) -> Propensities:
    """Jain et al. (2016) propensity model fitted on the training labels.

    p_l = 1 / (1 + C (N_l + B)^(-A)),  C = (ln N - 1) (B + 1)^A,
    N = number of training documents, N_l = number of training documents with label l.
    Defaults A = 0.55, B = 1.5 (the XML repository's values for most datasets; Amazon uses
    0.6/2.6, Wikipedia-LSHTC 0.5/0.4). Labels absent from training get p_l at N_l = 0.
    """
    counts: Counter[str] = Counter()
    n_train = 0
    for labels in train_label_lists:
        counts.update(set(labels))
        n_train += 1
    if n_train < 3:
        raise ValueError(f"propensities need at least 3 training documents (C = (ln N - 1)(B+1)^A "
                         f"must be positive); got {n_train}")
    C = (math.log(n_train) - 1.0) * (B + 1.0) ** A
    p = lambda n_l: 1.0 / (1.0 + C * (n_l + B) ** (-A))  # noqa: E731
    return Propensities({lab: p(n) for lab, n in counts.items()}, unseen=p(0))


# ---------------------------------------------------------------- ranking metrics

def _hit_matrix(golds: list[set[str]], ranked: list[list[str]], k: int,
                weight: dict[str, float] | None = None) -> np.ndarray:
    """[n_docs, k]: weight(label) (1 if no weights) where the j-th ranked label is gold, else 0."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    hits = np.zeros((len(golds), k))
    for i, (g, r) in enumerate(zip(golds, ranked)):
        for j, lab in enumerate(r[:k]):
            if lab in g:
                hits[i, j] = 1.0 if weight is None else weight[lab]
    return hits


def _discounts(k: int) -> np.ndarray:
    return 1.0 / np.log2(np.arange(2, k + 2))


def precision_at_k(gold: Labels, pred: Labels, k: int) -> np.ndarray:
    """P@k per document: |T_k ∩ G| / k."""
    golds, ranked = _checked(gold, pred)
    return _hit_matrix(golds, ranked, k).sum(1) / k


def recall_at_k(gold: Labels, pred: Labels, k: int) -> np.ndarray:
    """R@k per document: |T_k ∩ G| / |G|."""
    golds, ranked = _checked(gold, pred)
    return _hit_matrix(golds, ranked, k).sum(1) / np.array([len(g) for g in golds], float)


def ndcg_at_k(gold: Labels, pred: Labels, k: int) -> np.ndarray:
    """nDCG@k per document: sum_{j<=k} hit_j / log2(j+1), over the same sum for a perfect ranking."""
    golds, ranked = _checked(gold, pred)
    disc = _discounts(k)
    ideal = np.array([disc[:min(k, len(g))].sum() for g in golds])
    return _hit_matrix(golds, ranked, k) @ disc / ideal


def _psp_ideal(golds: list[set[str]], k: int, propensity: dict[str, float]) -> np.ndarray:
    """Best achievable PSP@k numerator per document: the k gold labels of largest 1/p_l, over k."""
    return np.array([sum(sorted((1.0 / propensity[lab] for lab in g), reverse=True)[:k]) for g in golds]) / k


def psp_at_k(gold: Labels, pred: Labels, k: int, propensity: dict[str, float],
             normalize: bool = True) -> np.ndarray:
    """Propensity-scored precision PSP@k per document (Jain et al. 2016).

    Unnormalised: psp_i = (1/k) sum_{j<=k} hit_j / p_{t_j}.
    Normalised (default, the pyxclib / XML-repository convention): the dataset score is
    sum_i psp_i / sum_i best_i, where best_i is psp_i of the ideal ranking (gold labels sorted by
    1/p_l, at most k of them). Per document we return psp_i / mean_j(best_j): the mean of these
    values is that dataset score, and the normaliser depends on gold only, so two systems scored
    on the same documents stay paired.
    """
    golds, ranked = _checked(gold, pred)
    inverse = {lab: 1.0 / propensity[lab] for r in ranked for lab in r}
    psp = _hit_matrix(golds, ranked, k, inverse).sum(1) / k
    return psp / _psp_ideal(golds, k, propensity).mean() if normalize else psp


# ---------------------------------------------------------------- set metrics

def exact_match(gold: Labels, pred: Labels) -> np.ndarray:
    """1.0 where the predicted set equals the gold set, else 0.0."""
    golds, ranked = _checked(gold, pred)
    return np.array([float(set(r) == g) for g, r in zip(golds, ranked)])


def _check_label_space(golds: list[set[str]], ranked: list[list[str]], label_space: Sequence[str] | None) -> None:
    if label_space is None:
        return
    space = set(label_space)
    for i, (g, r) in enumerate(zip(golds, ranked)):
        for kind, labels in (("gold", g), ("predicted", r)):
            outside = sorted(lab for lab in labels if lab not in space)
            if outside:
                raise ValueError(f"document {i}: {kind} label {outside[0]!r} is not in the label space")


def _label_counts(golds: list[set[str]], ranked: list[list[str]]) -> tuple[Counter[str], Counter[str], Counter[str]]:
    """Per-label true positives, false positives and false negatives over all documents."""
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for g, r in zip(golds, ranked):
        p = set(r)
        tp.update(g & p)
        fp.update(p - g)
        fn.update(g - p)
    return tp, fp, fn


def _macro_f1(tp: Counter[str], fp: Counter[str], fn: Counter[str]) -> float:
    """Mean F1_l over the gold labels (TP_l + FN_l > 0; module docstring); 0.0 if there is none."""
    labels = {lab for lab in set(tp) | set(fn) if tp[lab] + fn[lab] > 0}
    if not labels:
        return 0.0
    return float(np.mean([2 * tp[lab] / (2 * tp[lab] + fp[lab] + fn[lab]) for lab in labels]))


def _micro_f1(tp: Counter[str], fp: Counter[str], fn: Counter[str]) -> float:
    tp_, fp_, fn_ = (sum(c.values()) for c in (tp, fp, fn))
    return 2 * tp_ / (2 * tp_ + fp_ + fn_) if (tp_ + fp_ + fn_) else 0.0


def macro_f1(gold: Labels, pred: Labels, label_space: Sequence[str] | None = None) -> float:
    """Macro-F1 over the labels gold for some document (see module docstring).

    `label_space`, when given, only validates: a gold or predicted label outside it raises
    ValueError naming the document index and the label. Returns 0.0 if no label occurs at all
    (impossible with non-empty gold).
    """
    golds, ranked = _checked(gold, pred)
    _check_label_space(golds, ranked, label_space)
    return _macro_f1(*_label_counts(golds, ranked))


def macro_f1_resamples(gold: Labels, pred: Labels, resamples: np.ndarray) -> np.ndarray:
    """Macro-F1 recomputed on each bootstrap resample of the documents (App. E: an aggregate metric
    has no per-document value, so its paired test resamples the test set).

    resamples: [S, n] document indices (`stats.resample_indices`); a document drawn twice counts
    twice in TP/FP/FN. Returns [S]; each value equals `macro_f1` on that resample's documents.
    """
    golds, ranked = _checked(gold, pred)
    resamples = np.asarray(resamples)
    if resamples.ndim != 2 or (resamples.size and (resamples.min() < 0 or resamples.max() >= len(golds))):
        raise ValueError(f"resamples must be [S, n] indices into {len(golds)} documents; got shape {resamples.shape}")
    labels = sorted(set().union(*golds, *map(set, ranked))) if golds else []
    if not labels:
        return np.zeros(len(resamples))
    column = {lab: j for j, lab in enumerate(labels)}
    cells: list[list[tuple[int, int]]] = [[], [], []]  # (doc, label) of each TP, FP, FN
    for i, (g, r) in enumerate(zip(golds, ranked)):
        p = set(r)
        for kind, part in enumerate((g & p, p - g, g - p)):
            cells[kind] += [(i, column[lab]) for lab in part]
    shape = (len(golds), len(labels))
    counts = [sparse.csr_matrix((np.ones(len(c)), ([i for i, _ in c], [j for _, j in c])), shape=shape)
              for c in cells]  # [doc, label] indicators, sparse: MIMIC-IV has ~10^4 docs x ~10^4 labels
    weights = np.stack([np.bincount(row, minlength=len(golds)) for row in resamples]).astype(float)  # [S, n]
    tp, fp, fn = (np.asarray((c.T @ weights.T).T) for c in counts)  # each [S, labels]
    gold = (tp + fn) > 0  # [S, labels]: the class set of each resample (module docstring)
    f1 = np.divide(2 * tp, 2 * tp + fp + fn, out=np.zeros_like(tp), where=gold)
    return f1.sum(1) / np.maximum(gold.sum(1), 1)


def micro_f1(gold: Labels, pred: Labels, label_space: Sequence[str] | None = None) -> float:
    """Micro-F1: 2 sum TP / (2 sum TP + sum FP + sum FN) over all (document, label) pairs.

    `label_space` validates as in `macro_f1`.
    """
    golds, ranked = _checked(gold, pred)
    _check_label_space(golds, ranked, label_space)
    return _micro_f1(*_label_counts(golds, ranked))


# ---------------------------------------------------------------- tables

def _scored_documents(gold: Labels, pred: Labels, doc_ids: Sequence[str] | None,
                      excluded_pairs: Collection[tuple[str, str]] | None, candidates: Labels | None,
                      label_space: Sequence[str] | None = None):
    """Validate, apply exclusions, and drop documents left without gold labels.

    Returns (kept document positions, doc ids, gold, answer, ranking) for the kept documents.
    """
    golds, answers = _checked(gold, pred)
    _check_label_space(golds, answers, label_space)
    ids = [str(i) for i in range(len(golds))] if doc_ids is None else [str(d) for d in doc_ids]
    if len(ids) != len(golds):
        raise ValueError(f"doc_ids has {len(ids)} entries but gold has {len(golds)} documents")
    ranking = answers if candidates is None else ranked_with_candidates(answers, candidates)
    if excluded_pairs:
        if doc_ids is None:
            raise ValueError("excluded_pairs are (doc_id, label) pairs: give doc_ids too")
        gold_lists, answers = remove_excluded(ids, golds, answers, excluded_pairs)
        _, ranking = remove_excluded(ids, golds, ranking, excluded_pairs)
        golds = [set(g) for g in gold_lists]
    keep = [i for i, g in enumerate(golds) if g]
    pick = lambda xs: [xs[i] for i in keep]  # noqa: E731
    return keep, pick(ids), pick(golds), pick(answers), pick(ranking)


def _per_document(golds, answers, ranking, ks, propensity) -> dict[str, np.ndarray]:
    kmax = max(ks)
    hits = _hit_matrix(golds, ranking, kmax)
    n_gold = np.array([len(g) for g in golds], float)
    disc = _discounts(kmax)
    out: dict[str, np.ndarray] = {}
    for k in ks:
        out[f"P@{k}"] = hits[:, :k].sum(1) / k
    for k in ks:
        ideal = np.array([disc[:min(k, len(g))].sum() for g in golds])
        out[f"nDCG@{k}"] = hits[:, :k] @ disc[:k] / ideal
    if propensity is not None:
        inverse = {lab: 1.0 / propensity[lab] for r in ranking for lab in r}
        weighted = _hit_matrix(golds, ranking, kmax, inverse)
        for k in ks:
            out[f"PSP@{k}"] = (weighted[:, :k].sum(1) / k) / _psp_ideal(golds, k, propensity).mean()
    for k in ks:
        out[f"R@{k}"] = hits[:, :k].sum(1) / n_gold
    out["exact_match"] = np.array([float(set(a) == g) for g, a in zip(golds, answers)])
    # instance F1 of the answer set, 2|A & G| / (|A| + |G|): the per-document partner of macro-F1
    # for paired significance tests (macro-F1 itself has no per-document value)
    out["f1"] = np.array([2 * len(set(a) & g) / (len(set(a)) + len(g)) for g, a in zip(golds, answers)])
    return out


def per_instance(gold: Labels, pred: Labels, train_labels: Labels | None = None, ks: Sequence[int] = DEFAULT_KS,
                 A: float = 0.55, B: float = 1.5, doc_ids: Sequence[str] | None = None,
                 excluded_pairs: Collection[tuple[str, str]] | None = None,
                 candidates: Labels | None = None) -> pd.DataFrame:
    """Long table of per-document metrics: columns doc (position in the input), doc_id, metric, value.

    Metrics: P@k, nDCG@k, PSP@k (only when `train_labels` is given), R@k, exact_match, f1 (instance F1
    of the answer set, 2|A & G| / (|A| + |G|)).
    `excluded_pairs` ((doc_id, label) pairs, needs `doc_ids`) are removed from gold and
    predictions first; documents left without gold labels are dropped. `candidates` extends the
    ranking beyond the answer (module docstring).
    """
    keep, ids, golds, answers, ranking = _scored_documents(gold, pred, doc_ids, excluded_pairs, candidates)
    propensity = None if train_labels is None else propensities(train_labels, A, B)
    metrics = _per_document(golds, answers, ranking, ks, propensity) if keep else {}
    return pd.DataFrame({
        "doc": np.tile(np.array(keep, dtype=np.int64), len(metrics)),
        "doc_id": ids * len(metrics),
        "metric": np.repeat(list(metrics), len(keep)),
        "value": np.concatenate(list(metrics.values())) if metrics else np.zeros(0),
    })


def summarize(gold: Labels, pred: Labels, train_labels: Labels | None = None, ks: Sequence[int] = DEFAULT_KS,
              A: float = 0.55, B: float = 1.5, doc_ids: Sequence[str] | None = None,
              excluded_pairs: Collection[tuple[str, str]] | None = None,
              candidates: Labels | None = None, label_space: Sequence[str] | None = None) -> pd.DataFrame:
    """Dataset-level metrics: columns metric, value.

    Rows: P@k, nDCG@k, PSP@k (if `train_labels`), R@k for each k, then macro_f1, micro_f1,
    exact_match, and n_docs (documents scored, after dropping those that `excluded_pairs` left
    without gold). Ranking metrics are means of the `per_instance` values; F1 and exact match use
    the answers. `label_space` validates every gold and predicted label (as in `macro_f1`).
    """
    keep, _, golds, answers, ranking = _scored_documents(gold, pred, doc_ids, excluded_pairs, candidates,
                                                          label_space)
    if not keep:
        raise ValueError("no document left to score (every gold label was excluded)")
    propensity = None if train_labels is None else propensities(train_labels, A, B)
    rows = {name: float(values.mean()) for name, values in
            _per_document(golds, answers, ranking, ks, propensity).items()}
    match = rows.pop("exact_match")
    instance_f1 = rows.pop("f1")
    counts = _label_counts(golds, answers)
    rows.update(macro_f1=_macro_f1(*counts), micro_f1=_micro_f1(*counts), exact_match=match, instance_f1=instance_f1,
                n_docs=float(len(keep)))
    return pd.DataFrame({"metric": list(rows), "value": list(rows.values())})


def macro_f1_resample_rows(gold: Labels, pred: Labels, n_resamples: int = 1000, seed: int = 0,
                           doc_ids: Sequence[str] | None = None,
                           excluded_pairs: Collection[tuple[str, str]] | None = None) -> pd.DataFrame:
    """Macro-F1 on `n_resamples` bootstrap resamples of the scored documents (those `summarize`
    scores), as metrics rows: doc_id "resample:<s>", metric "macro_f1", value.

    The resamples depend only on (number of scored documents, n_resamples, seed), so two systems
    evaluated on one test set with one seed are paired resample by resample (App. E).
    """
    keep, _, golds, answers, _ = _scored_documents(gold, pred, doc_ids, excluded_pairs, None)
    if not keep:
        return pd.DataFrame({"doc_id": pd.Series(dtype=str), "metric": pd.Series(dtype=str),
                             "value": pd.Series(dtype=float)})
    values = macro_f1_resamples(golds, answers, resample_indices(len(keep), n_resamples, seed))
    return pd.DataFrame({"doc_id": [f"{RESAMPLE}{s}" for s in range(n_resamples)], "metric": "macro_f1",
                         "value": values})
