"""score_document against an independent computation from eager attentions and o_proj inputs."""

import numpy as np
import torch

from mechdistill.characterize.head_scores import score_document
from mechdistill.characterize.teacher_forcing import ForcedSequence
from mechdistill.models import load_model


def test_coarse_score_matches_eager_reference(tiny_config):
    model, tok = load_model(tiny_config, "tiny_llama", device="cpu", dtype="float32")
    ids = tok("Patient with chronic systolic heart failure. Heart failure fits.", return_tensors="pt")["input_ids"][0]
    early = [40, 41, 42, 43]
    seq = ForcedSequence(input_ids=ids, prompt_chars=0, cot_token_start=40, early_queries=early,
                         refine_positions=[], shortlist_positions=[], nearmiss_positions=[])
    anchors = ["heart failure", "systolic"]
    got = score_document(model, tok, seq, anchors, ["Heart"], ["Lung"], tau=0.01, n_stages=2)["coarse"]

    # Reference: eager attention rows, per-head writes from o_proj inputs, numpy kurtosis and cosine.
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
    for layer in range(model.config.num_hidden_layers):
        wo = model.model.layers[layer].self_attn.o_proj.weight.detach().numpy()     # [d, H*hd]
        expected = np.zeros(H)
        for h in range(H):
            vals = []
            for q in early:
                p = attn[layer][0, h, q, : q + 1].numpy().astype(np.float64)           # causal keys only
                m2, m4 = ((p - p.mean()) ** 2).mean(), ((p - p.mean()) ** 4).mean()
                kappa = m4 / (m2 + 1e-6) ** 2 - 3
                write = wo[:, h * hd:(h + 1) * hd] @ z[layer][0, q, h * hd:(h + 1) * hd].numpy()
                cos = write @ centroid / (np.linalg.norm(write) * np.linalg.norm(centroid))
                vals.append(kappa * cos)
            expected[h] = np.mean(vals)
        np.testing.assert_allclose(got["coarse"][layer], expected, rtol=2e-3, atol=1e-4)


def test_refine_qk_term_matches_eager_log_attention(tiny_config):
    """QK loop-back = mean_S q.k*s - mean_N q.k*s = mean_S log A - mean_N log A (the softmax
    normaliser cancels), so eager attention probabilities give an independent reference."""
    model, tok = load_model(tiny_config, "tiny_llama", device="cpu", dtype="float32")
    ids = tok("A [I1] fits rather than B [I2]; so A [I1] rather than B [I2] here.", return_tensors="pt")["input_ids"][0]
    shortlist, nearmiss, refine = [3, 4], [24, 25], [40, 55]
    seq = ForcedSequence(input_ids=ids, prompt_chars=0, cot_token_start=0, early_queries=[],
                         refine_positions=refine, shortlist_positions=shortlist, nearmiss_positions=nearmiss)
    out = score_document(model, tok, seq, [], ["Heart"], ["Lung"], tau=0.0, n_stages=2)
    assert out["n_positions"] == 2 and out["refine"]["qk"].shape == (2, 4)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        attn = model(ids[None], output_attentions=True).attentions
    for layer in range(2):
        logp = torch.log(attn[layer][0].double())                          # [H, q, k]
        per_t = [logp[:, t, shortlist].mean(-1) - logp[:, t, nearmiss].mean(-1) for t in refine]
        np.testing.assert_allclose(out["refine"]["qk"][layer], torch.stack(per_t).mean(0).numpy(), rtol=1e-3, atol=1e-4)
