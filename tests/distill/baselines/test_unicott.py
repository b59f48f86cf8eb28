"""UniCoTT: its loss terms against numpy, the chain / tree / graph structures, items and a few training steps."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from mechdistill.distill.baselines.unicott import (
    RECIPE,
    chain_steps,
    choose_negatives,
    covariance_term,
    relation_weighted,
    supcon,
    variance_term,
)
from mechdistill.distill.recipe import RecipeContext, TeacherDataContext
from mechdistill.io import SplitArtifacts
from mechdistill.labels import LabelSpace
from tests.helpers import tiny_llama

LABELS = {"A1": "Heart failure", "B1": "Atrial fibrillation", "C1": "Fracture of femur"}
DOCS = {  # doc_id: (text, gold labels, CoT)
    "d0": ("Dyspnea, low EF.", ["A1"], "Heart is weak. EF is low.\nSo heart failure."),
    "d1": ("Low EF, irregular pulse.", ["A1", "B1"], "Pulse irregular. EF low. Both apply."),
    "d2": ("Fell, hip pain.", ["C1"], "A fall. Hip hurts. Femur broken."),
    "d3": ("Nothing written.", ["C1"], "  "),
}


def supcon_ref(x: np.ndarray, pos: np.ndarray, t: float) -> float:
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = z @ z.T / t
    losses = []
    for i in range(len(z)):
        ps = [p for p in range(len(z)) if pos[i, p]]
        if ps:
            denom = sum(np.exp(s[i, a]) for a in range(len(z)) if a != i)
            losses.append(-np.mean([np.log(np.exp(s[i, p]) / denom) for p in ps]))
    return float(np.mean(losses))


def structural_ref(h: np.ndarray, rel: np.ndarray, gamma: float) -> tuple[float, float]:
    a = rel + np.eye(len(h))
    deg = a.sum(1)
    g = a / np.sqrt(np.outer(deg, deg)) @ h
    var = np.mean(np.maximum(0.0, gamma - np.sqrt(g.var(0, ddof=1) + 1e-4)))
    c = np.cov(g, rowvar=False)
    return float(var), float(((c ** 2).sum() - (np.diag(c) ** 2).sum()) / h.shape[1])


@pytest.fixture(scope="module")
def split() -> SplitArtifacts:
    space = LabelSpace(pd.DataFrame({"label_id": list(LABELS), "title": list(LABELS.values()), "parent": None,
                                     "ancestors": [[] for _ in LABELS], "assignable": True}))
    ids = list(DOCS)
    messages = [json.dumps([{"role": "user", "content": f"Code: {text}"}]) for text, _, _ in DOCS.values()]
    raws = [f"{cot}\n<answer>{'; '.join(labels)}</answer>" for _, labels, cot in DOCS.values()]
    return SplitArtifacts(
        docs=pd.DataFrame({"doc_id": ids, "text": [v[0] for v in DOCS.values()],
                           "labels": [v[1] for v in DOCS.values()]}).set_index("doc_id"),
        prompts=pd.DataFrame({"doc_id": ids, "messages": messages, "candidates": [list(LABELS)] * 4}).set_index("doc_id"),
        cot=pd.DataFrame({"doc_id": ids, "cot": [v[2] for v in DOCS.values()], "raw": raws}).set_index("doc_id"),
        anchors=pd.DataFrame({"doc_id": ids}), space=space, source="test")


def fake_teacher(split: SplitArtifacts, structure: str):
    """teacher_data with a generate that names each output uniquely and remembers its prompt."""
    calls, prompt_of = [], {}

    def generate(texts, max_new_tokens, temperature=0.0, seed=0):
        start = sum(len(c) for c in calls)
        calls.append(texts)
        outs = [f"<t{start + i}>" for i in range(len(texts))]
        prompt_of.update(zip(outs, texts))
        return [f" {o}\n" for o in outs]

    ctx = TeacherDataContext(generate=generate, render=lambda m: "R|" + m[0]["content"], split=split,
                             split_name="train", params=RECIPE.spec.params({"structure": structure}), seed=0)
    return RECIPE.teacher_data(ctx), calls, prompt_of


def make_items(split, tok, teacher_data=None, **params):
    return RECIPE.items(RecipeContext(tokenizer=tok, split=split, split_name="train",
                                      params=RECIPE.spec.params(params), seed=0, teacher_data=teacher_data))


def test_supcon_matches_numpy():
    x = np.array([[1.0, 0.2, 0.0], [0.8, 0.1, 0.3], [-0.5, 1.0, 0.2], [0.0, -1.0, 1.0]])
    pos = np.array([[0, 1, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=bool)  # node 2: no positive
    got = supcon(torch.tensor(x, dtype=torch.float32), torch.tensor(pos), 0.5)
    assert got.item() == pytest.approx(supcon_ref(x, pos, 0.5), rel=1e-5)
    assert supcon(torch.tensor(x), torch.zeros(4, 4, dtype=torch.bool), 0.5).item() == 0.0


def test_structural_terms_match_numpy():
    h = np.array([[3.0, 0.0, 0.1], [0.0, 0.2, 0.0], [-3.0, 0.1, 0.3]])   # dim 0 spreads past gamma, dims 1-2 not
    rel = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=float)       # chain 0 - 1 - 2
    mixed = relation_weighted(torch.eye(3, dtype=torch.float64), torch.tensor(rel))
    assert mixed[0].tolist() == pytest.approx([1 / 2, 1 / 6 ** 0.5, 0.0])   # (R + I) / sqrt(deg_i deg_j), deg 2, 3, 2
    g = relation_weighted(torch.tensor(h), torch.tensor(rel))
    var_ref, cov_ref = structural_ref(h, rel, 1.0)
    assert 0 < var_ref < 1 and cov_ref > 0
    assert variance_term(g, 1.0).item() == pytest.approx(var_ref, rel=1e-6)
    assert covariance_term(g).item() == pytest.approx(cov_ref, rel=1e-6)
    assert variance_term(g[:1], 1.0).item() == covariance_term(g[:1]).item() == 0.0


def test_chain_steps():
    cot = "We see I50.22 here. It is chronic.\nSo systolic. Not diastolic. Done."
    sentences = ["We see I50.22 here.", "It is chronic.", "So systolic.", "Not diastolic.", "Done."]
    assert chain_steps(cot, 10) == sentences
    assert chain_steps(cot, 2) == ["We see I50.22 here. It is chronic.", "So systolic. Not diastolic. Done."]
    assert chain_steps("  ", 3) == []


@pytest.mark.parametrize("structure, parents", [
    ("tree", [[], [0], [0], [1], [1], [2], [2]]),
    ("graph", [[], [0], [0], [1], [1, 2], [1, 2], [2]]),
])
def test_structured_teacher_data(split, structure, parents):
    frame, calls, prompt_of = fake_teacher(split, structure)
    assert [len(c) for c in calls] == [4, 8, 16]  # one batch per level over the 4 documents
    assert len(frame) == 4 * 7 and frame.groupby("doc_id")["parents"].apply(list).map(
        lambda ps: [list(p) for p in ps]).tolist() == [parents] * 4
    for doc_id, nodes in frame.groupby("doc_id"):
        texts = nodes.sort_values("node")["text"].tolist()
        text, labels, _ = DOCS[doc_id]
        for k, node_text in enumerate(texts):
            prompt = prompt_of[node_text]
            assert prompt.startswith("R|") and text in prompt and all(LABELS[g] in prompt for g in labels)
            assert [j for j, other in enumerate(texts) if other in prompt] == parents[k]
            assert not any(DOCS[o][0] in prompt for o in DOCS if o != doc_id)


def test_chain_teacher_data(split):
    frame, calls, _ = fake_teacher(split, "chain")
    assert calls == []
    d0 = frame[frame["doc_id"] == "d0"]
    assert d0["text"].tolist() == ["Heart is weak.", "EF is low.", "So heart failure."]
    assert [list(p) for p in d0["parents"]] == [[], [0], [1]]
    assert "d3" not in set(frame["doc_id"])


def test_negatives_prefer_documents_with_other_labels():
    pool = [f"p{i}" for i in range(10)]
    gold = {d: {"A"} if i % 2 else {"B", "C"} for i, d in enumerate(pool)}  # p0, p2, ...: no label shared with p1
    orders = []
    for seed in range(4):
        picked = choose_negatives("p1", pool, gold, 7, seed)
        assert set(picked[:5]) == {"p0", "p2", "p4", "p6", "p8"} and set(picked[5:]) <= {"p3", "p5", "p7", "p9"}
        assert picked == choose_negatives("p1", pool, gold, 7, seed)
        orders.append(picked)
    assert len({tuple(o) for o in orders}) > 1  # the seed changes the choice


@pytest.mark.parametrize("structure", ["chain", "tree"])
def test_items_spans_cover_the_nodes(split, byte_tok, structure):
    frame, _, _ = fake_teacher(split, structure)
    items = make_items(split, byte_tok, frame, structure=structure, n_negatives=2)
    assert [it.doc_id for it in items] == ["d0", "d1", "d2"]  # d3: empty CoT
    for it in items:
        nodes = frame[frame["doc_id"] == it.doc_id].sort_values("node")
        assert [byte_tok.decode(it.input_ids[s:e]) for s, e in it.spans["nodes"]] == nodes["text"].tolist()
        first = it.spans["nodes"][0][0]
        assert not it.supervised[:first].any() and it.supervised[first:].all()
        tail = "\n".join(nodes["text"]) + f"\n<answer>{'; '.join(DOCS[it.doc_id][1])}</answer><|im_end|>"
        assert byte_tok.decode(it.input_ids[first:]) == tail
        n = len(nodes)
        rel = torch.zeros(n, n)
        for k, ps in enumerate(nodes["parents"]):
            rel[k, list(ps)] = rel[list(ps), k] = 1.0
        assert torch.equal(it.extra["relation"], rel)
    d0 = items[0]  # d2 shares no label with d0, so it comes first; d1 shares A1
    assert d0.record["negatives"] == ["d2", "d1"] and d0.record["n_negatives_sharing_label"] == 1
    assert d0.extra["shares_label"].tolist() == [[True, False, True], [False, True, False], [True, False, True]]
    assert items[1].record["negatives"][0] == "d2"
    assert make_items(split, byte_tok, frame, structure=structure)[2].record == items[2].record == \
        make_items(split, byte_tok, frame, structure=structure, n_negatives=2)[2].record  # seeded


@pytest.fixture(scope="module")
def model(byte_tok):
    return tiny_llama(vocab=len(byte_tok), seed=0)


def test_loss_terms_on_the_model(split, byte_tok, model):
    """The loss's contrastive and structural terms from hidden states taken directly from the model."""
    items = {it.doc_id: it for it in make_items(split, byte_tok, n_negatives=2)}
    item = items["d0"]

    def node_reps(it):  # from the whole sequence (the loss reads the negatives' prefix)
        with torch.no_grad():
            hidden = model(input_ids=it.input_ids[None], output_hidden_states=True).hidden_states[-1][0]
        return np.stack([hidden[s:e].mean(0).numpy() for s, e in it.spans["nodes"]]).astype(np.float64)

    reps = [node_reps(items[d]) for d in ["d0", "d2", "d1"]]
    doc = np.repeat([0, 1, 2], [len(r) for r in reps])
    pos = np.array([[True, False, True], [False, True, False], [True, False, True]])[doc][:, doc]
    np.fill_diagonal(pos, False)
    params = RECIPE.spec.params({})
    out = RECIPE.loss(model, item, params)
    assert out["unicott.con"].item() == pytest.approx(supcon_ref(np.concatenate(reps), pos, 0.1), rel=1e-4)
    rel = np.array([[0, 1, 0], [1, 0, 1], [0, 1, 0]], dtype=float)
    var_ref, cov_ref = structural_ref(reps[0], rel, 1.0)
    assert out["unicott.var"].item() == pytest.approx(var_ref, rel=1e-4)
    assert out["unicott.cov"].item() == pytest.approx(cov_ref, rel=1e-4)
    expected = out["cot.ce"].item() + 0.5 * out["unicott.con"].item() + 0.2 * (var_ref + cov_ref)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5) and out["loss"].requires_grad
    assert out["cot.kl"].item() == 0.0 and all(v.dim() == 0 for v in out.values())


def test_training_lowers_the_loss(split, byte_tok):
    student = tiny_llama(vocab=len(byte_tok), seed=1).train()
    item = make_items(split, byte_tok, n_negatives=2)[0]
    params = RECIPE.spec.params({})
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(6):
        out = RECIPE.loss(student, item, params)
        losses.append(out["loss"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.1
