"""score_document against an independent computation from eager attentions and o_proj inputs."""

import numpy as np
import torch

from mechdistill.characterize.head_scores import score_document
from mechdistill.characterize.teacher_forcing import ForcedSequence
from mechdistill.models import ModelCatalog, load_model


def test_coarse_score_matches_eager_reference(tiny_config):
    model, tok = load_model(ModelCatalog.from_config(tiny_config), "tiny_llama", device="cpu", dtype="float32")
    ids = tok("Patient with chronic systolic heart failure. Heart failure fits.", return_tensors="pt")["input_ids"][0]
    early = [40, 41, 42, 43]
    document = list(range(8, 30))
    seq = ForcedSequence(input_ids=ids, prompt_chars=0, cot_token_start=40, early_queries=early,
                         refine_positions=[], shortlist_positions=[], nearmiss_positions=[],
                         document_positions=document)
    anchors = ["heart failure", "systolic"]
    got = score_document(model, tok, seq, anchors, ["Heart"], ["Lung"], tau=0.01, n_stages=2)["coarse"]

    # Reference: eager attention rows, per-head writes from o_proj inputs, numpy kurtosis and cosine,
    # for every variant: keys all causal ones or the document's, raw or normalized kurtosis.
    model.set_attn_implementation("eager")
    z = {}
    hooks = [layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a, i=i: z.__setitem__(i, a[0]))
             for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        attn = model(ids[None], output_attentions=True).attentions
    for h in hooks:
        h.remove()
    W = model.lm_head.weight.detach().numpy()
    centroid = np.mean([W[tok(a, add_special_tokens=False)["input_ids"]].mean(0) for a in anchors], 0)
    H, d = model.config.num_attention_heads, model.config.hidden_size
    hd = d // H
    sharpness = {"kurtosis": lambda m2, m4, n: m4 / (m2 + 1e-6) ** 2 - 3,
                 "normalized": lambda m2, m4, n: m4 / (n * (m2 + 1e-6 / n) ** 2)}
    for keys, kind in [(k, s) for k in ("all", "document") for s in sharpness]:
        for layer in range(model.config.num_hidden_layers):
            wo = model.model.layers[layer].self_attn.o_proj.weight.detach().numpy()     # [d, H*hd]
            expected = np.zeros(H)
            for h in range(H):
                vals = []
                for q in early:
                    p = attn[layer][0, h, q, : q + 1].numpy().astype(np.float64)       # causal keys only
                    p = p[document] if keys == "document" else p
                    m2, m4 = ((p - p.mean()) ** 2).mean(), ((p - p.mean()) ** 4).mean()
                    write = wo[:, h * hd:(h + 1) * hd] @ z[layer][0, q, h * hd:(h + 1) * hd].numpy()
                    cos = write @ centroid / (np.linalg.norm(write) * np.linalg.norm(centroid))
                    vals.append(sharpness[kind](m2, m4, len(p)) * cos)
                expected[h] = np.mean(vals)
            np.testing.assert_allclose(got[f"coarse_{keys}_{kind}"][layer], expected, rtol=2e-3, atol=1e-4,
                                       err_msg=f"{keys} {kind}")


def test_refine_qk_term_matches_eager_log_attention(tiny_config):
    """QK loop-back = mean_S q.k*s - mean_N q.k*s = mean_S log A - mean_N log A (the softmax
    normaliser cancels), so eager attention probabilities give an independent reference."""
    model, tok = load_model(ModelCatalog.from_config(tiny_config), "tiny_llama", device="cpu", dtype="float32")
    ids = tok("A [I1] fits rather than B [I2]; so A [I1] rather than B [I2] here.", return_tensors="pt")["input_ids"][0]
    shortlist, nearmiss, refine = [3, 4], [24, 25], [40, 55]
    seq = ForcedSequence(input_ids=ids, prompt_chars=0, cot_token_start=0, early_queries=[],
                         refine_positions=refine, shortlist_positions=shortlist, nearmiss_positions=nearmiss,
                         document_positions=[])
    out = score_document(model, tok, seq, [], ["Heart"], ["Lung"], tau=0.0, n_stages=2)
    assert out["n_positions"] == 2 and out["refine"]["qk"].shape == (2, 4)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(ids[None], output_attentions=True).attentions
    for layer in range(2):
        logp = torch.log(attn[layer][0].double())                          # [H, q, k]
        per_t = [logp[:, t, shortlist].mean(-1) - logp[:, t, nearmiss].mean(-1) for t in refine]
        np.testing.assert_allclose(out["refine"]["qk"][layer], torch.stack(per_t).mean(0).numpy(), rtol=1e-3, atol=1e-4)


def test_score_heads_tables_hold_every_variant_and_score_the_chosen_one(tiny_config):
    """Two documents: the coarse table has every CoarseVariant and `score` = the chosen one; the refine
    table's product is taken after averaging QK and OV over both documents' positions."""
    from mechdistill.characterize.head_scores import score_heads
    from mechdistill.characterize.scores import COARSE_VARIANTS, CoarseVariant

    model, tok = load_model(ModelCatalog.from_config(tiny_config), "tiny_llama", device="cpu", dtype="float32")
    ids = tok("Doc: A [I1] and B [I2]. A [I1] fits rather than B [I2]; so A [I1] rather than B [I2].",
              return_tensors="pt")["input_ids"][0]
    docs = [dict(doc_id=f"d{i}", anchors=["fits"], gold_titles=["A"], nearmiss_titles=["B"],
                 seq=ForcedSequence(input_ids=ids, prompt_chars=0, cot_token_start=26, early_queries=[25, 26, 27],
                                    refine_positions=refine, shortlist_positions=[7, 8, 9, 10],
                                    nearmiss_positions=[18, 19, 20, 21], document_positions=list(range(0, 24))))
            for i, refine in enumerate([[45], [60, 80]])]
    coarse, refine, _ = score_heads(model, tok, docs, tau=0.0, n_stages=2,
                                    coarse_variant=CoarseVariant("all", "kurtosis"), refine_ranking="product")
    assert {v.name for v in COARSE_VARIANTS} | {v.sharpness_name for v in COARSE_VARIANTS} <= set(coarse.columns)
    assert set(coarse["score_variant"]) == {"coarse_all_kurtosis"}
    np.testing.assert_array_equal(coarse["score"], coarse["coarse_all_kurtosis"])
    assert not np.allclose(coarse["coarse_all_kurtosis"], coarse["coarse_document_normalized"])
    assert (refine["n_positions"] == 3).all() and set(refine["score_variant"]) == {"refine_product"}
    per_doc = [score_document(model, tok, d["seq"], d["anchors"], d["gold_titles"], d["nearmiss_titles"], 0.0, 2)
               for d in docs]
    qk = (per_doc[0]["refine"]["qk"] * 1 + per_doc[1]["refine"]["qk"] * 2) / 3                     # [L, H]
    ov = (per_doc[0]["refine"]["ov"] * 1 + per_doc[1]["refine"]["ov"] * 2) / 3
    np.testing.assert_allclose(refine["score"], (qk * ov).reshape(-1), rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(refine["refine_both_positive"], np.where((qk > 0) & (ov > 0), qk * ov, 0).reshape(-1),
                               rtol=1e-5, atol=1e-9)
    mean_product = (per_doc[0]["refine"]["refine_mean_product"] + 2 * per_doc[1]["refine"]["refine_mean_product"]) / 3
    np.testing.assert_allclose(refine["refine_mean_product"], mean_product.reshape(-1), rtol=1e-5, atol=1e-9)


def _in_flight_documents(tok) -> list[dict]:
    """Five documents of different lengths, with early queries and refinement positions."""
    text = "Doc: A [I1] and B [I2]. A [I1] fits rather than B [I2]; so A [I1] rather than B [I2]. " * 2
    docs = []
    for i in range(5):
        ids = tok(text[: 120 + 10 * i], return_tensors="pt")["input_ids"][0]
        docs.append(dict(doc_id=f"d{i}", anchors=["fits"], gold_titles=["A"], nearmiss_titles=["B"],
                         seq=ForcedSequence(input_ids=ids, prompt_chars=0, cot_token_start=26,
                                            early_queries=[25, 26, 27 + i], refine_positions=[45 + i, 60, 80 + 3 * i],
                                            shortlist_positions=[7, 8, 9, 10], nearmiss_positions=[18, 19, 20, 21],
                                            document_positions=list(range(0, 24)))))
    return docs


def _score_in_flight(tiny_config, workers: int):
    from mechdistill.characterize.head_scores import score_heads

    model, tok = load_model(ModelCatalog.from_config(tiny_config), "tiny_llama", device="cpu", dtype="float32")
    docs = _in_flight_documents(tok)
    one_by_one = score_heads(model, tok, docs, tau=0.0, n_stages=2)
    return one_by_one, score_heads(model, tok, docs, tau=0.0, n_stages=2, in_flight_docs=workers)


def _assert_same_tables(expected, got) -> None:
    import pandas as pd

    for want, have in zip(expected, got):
        pd.testing.assert_frame_equal(have, want, check_exact=True)


def test_score_heads_in_flight_one_is_the_sequential_run(tiny_config):
    """in_flight_docs=1 (the default) gives the same tables, bit for bit, as one document after another;
    and the tables are those of the per-document values (a document-order weighted mean)."""
    from mechdistill.characterize.head_scores import score_document, score_heads

    (coarse, refine, example), again = _score_in_flight(tiny_config, 1)
    _assert_same_tables((coarse, refine, example), again)
    model, tok = load_model(ModelCatalog.from_config(tiny_config), "tiny_llama", device="cpu", dtype="float32")
    docs = _in_flight_documents(tok)
    per_doc = [score_document(model, tok, d["seq"], d["anchors"], d["gold_titles"], d["nearmiss_titles"], 0.0, 2)
               for d in docs]
    n = np.array([r["n_positions"] for r in per_doc], dtype=float)
    qk = sum(w * r["refine"]["qk"].astype(float) for w, r in zip(n, per_doc)) / n.sum()
    np.testing.assert_allclose(refine["qk"], qk.reshape(-1), rtol=1e-12)
    stage = np.nanmean(np.stack([r["stages"]["ov"] for r in per_doc]), 0).reshape(-1, 2)
    np.testing.assert_allclose(np.stack(refine["ov_by_stage"]), stage, rtol=1e-12)
    assert len(score_heads(model, tok, iter(docs), tau=0.0, n_stages=2)[2]) == 26  # any iterable; Fig. 4: the prompt


def test_score_heads_two_in_flight_equal_the_sequential_run(tiny_config):
    _assert_same_tables(*_score_in_flight(tiny_config, 2))
