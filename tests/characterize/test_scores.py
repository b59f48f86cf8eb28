"""Head scores (mechdistill.characterize.scores): values checked against closed forms, scipy, hand sums and finite differences."""

from __future__ import annotations

import math

import pytest
import scipy.stats
import torch

from mechdistill.characterize import scores

D = torch.float64


# ---------------------------------------------------------------- kurtosis


def test_kurtosis_uniform_row_is_minus_three():
    # uniform row over n keys: every deviation is 0, so m2 = m4 = 0 and kappa = 0 / eps^2 - 3 = -3
    for n in (1, 4, 64):
        p = torch.full((n,), 1.0 / n, dtype=D)
        assert scores.excess_kurtosis(p).item() == -3.0


@pytest.mark.parametrize("n", [2, 3, 10, 100])
def test_kurtosis_one_hot_closed_form(n):
    # one-hot over n keys: mean 1/n; deviations (n-1)/n once and -1/n (n-1) times, so
    # m2 = ((n-1)^2 + (n-1)) / n^3 = (n-1)/n^2,  m4 = ((n-1)^4 + (n-1)) / n^5,
    # kappa(eps=0) = m4/m2^2 - 3 = ((n-1)^3 + 1) / (n(n-1)) - 3 = (n^2 - 6n + 6) / (n - 1)
    p = torch.zeros(n, dtype=D)
    p[n // 2] = 1.0
    m2 = (n - 1) / n**2
    m4 = ((n - 1) ** 4 + (n - 1)) / n**5
    eps = 1e-6
    assert scores.excess_kurtosis(p, eps=eps).item() == pytest.approx(m4 / (m2 + eps) ** 2 - 3, rel=1e-12)
    closed = (n * n - 6 * n + 6) / (n - 1)
    assert scores.excess_kurtosis(p, eps=0.0).item() == pytest.approx(closed, rel=1e-10)
    assert closed == pytest.approx(scipy.stats.kurtosis(p.numpy(), fisher=True, bias=True), rel=1e-10)


def test_kurtosis_three_token_pattern_by_hand():
    p = torch.tensor([0.5, 0.3, 0.2], dtype=D)
    mu = 1 / 3
    dev = [0.5 - mu, 0.3 - mu, 0.2 - mu]
    m2 = sum(x**2 for x in dev) / 3
    m4 = sum(x**4 for x in dev) / 3
    assert scores.excess_kurtosis(p, eps=0.0).item() == pytest.approx(m4 / m2**2 - 3, rel=1e-12)
    assert scores.excess_kurtosis(p).item() == pytest.approx(m4 / (m2 + 1e-6) ** 2 - 3, rel=1e-12)
    ref = scipy.stats.kurtosis(p.numpy(), fisher=True, bias=True)
    assert scores.excess_kurtosis(p, eps=0.0).item() == pytest.approx(ref, rel=1e-10)


def test_kurtosis_mask_equals_valid_subvector_and_batches():
    g = torch.Generator().manual_seed(0)
    p = torch.rand(2, 3, 7, generator=g, dtype=D)
    mask = torch.rand(2, 3, 7, generator=g) > 0.4
    mask[..., 0] = True
    mask[1, 2] = False  # a row with no valid key -> NaN
    p_junk = torch.where(mask, p, torch.full_like(p, 1e3))  # masked entries must not matter
    out = scores.excess_kurtosis(p_junk, mask=mask)
    assert out.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            if not mask[i, j].any():
                assert math.isnan(out[i, j].item())
                continue
            sub = p[i, j][mask[i, j]]
            assert out[i, j].item() == pytest.approx(scores.excess_kurtosis(sub).item(), rel=1e-12)
    assert torch.allclose(scores.excess_kurtosis(p), torch.stack([scores.excess_kurtosis(r) for r in p.reshape(6, 7)]).reshape(2, 3))


def test_kurtosis_gradient_is_finite_under_mask():
    p = torch.softmax(torch.randn(4, 6, dtype=D), -1).requires_grad_(True)
    mask = torch.ones(4, 6, dtype=torch.bool).tril(1)
    scores.excess_kurtosis(p, mask=mask).sum().backward()
    assert torch.isfinite(p.grad).all()
    assert (p.grad[~mask] == 0).all()


# ---------------------------------------------------------------- anchors


def test_anchor_centroid_and_alignment_by_hand():
    unembed = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [3.0, -1.0]], dtype=D)
    # label A = tokens (0, 1) -> (0.5, 0.5); label B = token (3) -> (3, -1); empty label skipped
    c = scores.anchor_centroid(unembed, [[0, 1], [3], []])
    assert torch.allclose(c, torch.tensor([1.75, -0.25], dtype=D))
    lin = torch.nn.Linear(2, 4, bias=False)
    lin.weight.data = unembed.float()
    assert torch.allclose(scores.anchor_centroid(lin, [[0, 1], [3]]), c.float())
    writes = torch.tensor([[1.75, -0.25], [0.25, 1.75], [-3.5, 0.5]], dtype=D)
    assert torch.allclose(scores.anchor_alignment(writes, c), torch.tensor([1.0, 0.0, -1.0], dtype=D))
    w = torch.tensor([2.0, 1.0], dtype=D)
    expect = (2 * 1.75 - 0.25) / (math.sqrt(5) * math.sqrt(1.75**2 + 0.25**2))
    assert scores.anchor_alignment(w, c).item() == pytest.approx(expect)
    with pytest.raises(ValueError):
        scores.anchor_centroid(unembed, [[]])


def test_coarse_components_by_hand_and_padding_invariance():
    g = torch.Generator().manual_seed(1)
    b, H, nq, k, d = 2, 3, 4, 5, 6
    rows = torch.softmax(torch.randn(b, H, nq, k, generator=g, dtype=D), -1)
    writes = torch.randn(b, nq, H, d, generator=g, dtype=D)
    centroid = torch.randn(b, d, generator=g, dtype=D)
    qmask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    out = scores.coarse_score_components(rows, writes, centroid, qmask, kind="kurtosis")
    # by hand, loop over example/head/query
    for i in range(b):
        for h in range(H):
            qs = [q for q in range(nq) if qmask[i, q]]
            ks = [scores.excess_kurtosis(rows[i, h, q]).item() for q in qs]
            cs = [torch.nn.functional.cosine_similarity(writes[i, q, h], centroid[i], dim=0).item() for q in qs]
            assert out["sharpness"][i, h].item() == pytest.approx(sum(ks) / len(qs))
            assert out["alignment"][i, h].item() == pytest.approx(sum(cs) / len(qs))
            assert out["coarse"][i, h].item() == pytest.approx(sum(a * c for a, c in zip(ks, cs)) / len(qs))
    assert out["n_queries"].tolist() == [3, 2]

    # pad: 2 junk query positions and 3 junk key positions, masked out
    rows_p = torch.cat([rows, torch.rand(b, H, nq, 3, generator=g, dtype=D)], -1)
    rows_p = torch.cat([rows_p, torch.rand(b, H, 2, k + 3, generator=g, dtype=D)], 2)
    writes_p = torch.cat([writes, 1e3 * torch.randn(b, 2, H, d, generator=g, dtype=D)], 1)
    qmask_p = torch.cat([qmask, torch.zeros(b, 2, dtype=torch.bool)], 1)
    kmask_p = torch.zeros(b, nq + 2, k + 3, dtype=torch.bool)
    kmask_p[:, :, :k] = True
    out_p = scores.coarse_score_components(rows_p, writes_p, centroid, qmask_p, kmask_p, kind="kurtosis")
    for key in ("sharpness", "alignment", "coarse", "n_queries"):
        assert torch.allclose(out_p[key], out[key]), key

    empty = scores.coarse_score_components(rows, writes, centroid, torch.zeros(b, nq, dtype=torch.bool))
    assert torch.isnan(empty["coarse"]).all()


# ---------------------------------------------------------------- margin


def test_margin_by_hand():
    z = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0], [0.0, -1.0, 2.0, 0.5, 1.0]], dtype=D)
    # targets first tokens {0, 3}, near-misses {1, 1, 4} (a repeated first token counts per label)
    m = scores.margin(z, [0, 3], [1, 1, 4])
    assert m.tolist() == pytest.approx([(1 + 4) / 2 - (2 + 2 + 5) / 3, (0 + 0.5) / 2 - (-1 - 1 + 1) / 3])
    per = scores.margin(z, [[0], [2, 3]], [[4], [0]])
    assert per.tolist() == pytest.approx([1 - 5, (2 + 0.5) / 2 - 0])
    z3 = z[:, None, :].expand(2, 3, 5)  # [b, positions, vocab] with per-example labels
    assert torch.allclose(scores.margin(z3, [[0], [2, 3]], [[4], [0]]), per[:, None].expand(2, 3))
    with pytest.raises(ValueError):
        scores.margin(z, [], [1])


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=50,
    )
    model = AutoModelForCausalLM.from_config(cfg).to(D).eval()
    with torch.no_grad():  # non-trivial norm weights, so the norm's Jacobian matters
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model


def _finite_difference(f, h, step):
    fd = torch.zeros_like(h)
    for j in range(h.shape[-1]):
        e = torch.zeros_like(h)
        e[:, j] = step
        fd[:, j] = (f(h + e) - f(h - e)) / (2 * step)
    return fd


def test_margin_gradient_matches_finite_differences(tiny_llama):
    norm, head = tiny_llama.model.norm, tiny_llama.lm_head
    targets, nearmisses = [[3, 7], [11]], [[5], [2, 9, 9]]
    h = torch.randn(2, 32, dtype=D)
    with torch.no_grad():
        grad = scores.margin_gradient(h, norm, head, targets, nearmisses)
        # LlamaRMSNorm computes in float32 even in a float64 model: coarse step, float32 tolerance
        fd = _finite_difference(lambda x: scores.margin(head(norm(x)), targets, nearmisses), h, 1e-3)
    assert grad.shape == (2, 32)
    assert torch.allclose(grad, fd, rtol=1e-3, atol=2e-4)

    # exact check: the same RMSNorm entirely in float64
    norm64 = torch.nn.RMSNorm(32, eps=norm.variance_epsilon, dtype=D)
    with torch.no_grad():
        norm64.weight.copy_(norm.weight)
        grad64 = scores.margin_gradient(h, norm64, head, targets, nearmisses)
        fd64 = _finite_difference(lambda x: scores.margin(head(norm64(x)), targets, nearmisses), h, 1e-6)
    assert torch.allclose(grad64, fd64, rtol=1e-6, atol=1e-9)
    assert torch.allclose(grad, grad64, rtol=1e-4, atol=1e-6)

    # the unembedding as a matrix gives the same; h_final's own graph is untouched
    h_req = h.clone().requires_grad_(True)
    g2 = scores.margin_gradient(h_req * 1.0, norm, head.weight, targets, nearmisses)
    assert torch.allclose(g2, grad) and not g2.requires_grad
    g3 = scores.margin_gradient(h, norm, head, targets, nearmisses, create_graph=True)
    assert g3.requires_grad  # differentiable w.r.t. norm / unembedding parameters


# ---------------------------------------------------------------- Phase 2


def _m(rows):
    return torch.tensor(rows, dtype=torch.bool)[None]  # [1, nr, nk]


def test_earlier_mask():
    mentions = torch.tensor([[1, 0, 1, 1, 0]], dtype=torch.bool)
    out = scores.earlier_mask(mentions, torch.tensor([[3, 5, -1]]))
    assert out[0].int().tolist() == [[1, 0, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 0, 0]]


def test_qk_loopback_by_hand_and_empty_sets():
    # one head, d = 2, keys k0..k3; two refinement positions
    q = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]]]], dtype=D)  # [1, 1, 2, 2]
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]]]], dtype=D)  # [1, 1, 4, 2]
    S = _m([[1, 0, 1, 0], [0, 1, 0, 0]])
    N = _m([[0, 0, 0, 1], [0, 0, 0, 0]])  # second position: no near-miss -> NaN
    out = scores.qk_loopback(q, k, S, N, scaling=0.5)
    assert out.shape == (1, 1, 2)
    # t0: q.k0 = 1, q.k2 = 3, q.k3 = 0 -> 0.5 * ((1 + 3)/2 - 0) = 1
    assert out[0, 0, 0].item() == pytest.approx(1.0)
    assert math.isnan(out[0, 0, 1].item())
    # empty=0.0 keeps the shortlist term: t1: 0.5 * (q.k1 = 1) - 0
    assert scores.qk_loopback(q, k, S, N, scaling=0.5, empty=0.0)[0, 0, 1].item() == pytest.approx(0.5)


def test_ov_helpfulness_by_hand_tau_and_empty_sets():
    # one head, 3 keys, d = 2, three refinement positions
    A = torch.tensor([[[[0.6, 0.1, 0.3], [0.05, 0.05, 0.9], [0.5, 0.5, 0.0]]]], dtype=D)  # [1, 1, 3, 3]
    V = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]]]], dtype=D)  # [1, 1, 3, 2]
    S = _m([[1, 1, 1], [1, 1, 0], [0, 0, 0]])
    grad = torch.tensor([[[1.0, -1.0], [2.0, 1.0], [1.0, 1.0]]], dtype=D)  # [1, 3, 2]
    tau = 0.2
    out = scores.ov_helpfulness(A, V, S, grad, tau)
    # t0: keys 0 (0.6) and 2 (0.3) pass tau, key 1 (0.1) does not:
    #     write = 0.6*(1,0) + 0.3*(2,2) = (1.2, 0.6); <write, (1,-1)> = 0.6
    assert out[0, 0, 0].item() == pytest.approx(0.6)
    # t1: shortlist keys 0, 1 both below tau -> empty sum -> 0
    assert out[0, 0, 1].item() == 0.0
    # t2: no shortlist key at all -> NaN
    assert math.isnan(out[0, 0, 2].item())
    cos = scores.ov_helpfulness_cos(A, V, S, grad, tau)
    assert cos[0, 0, 0].item() == pytest.approx(0.6 / (math.hypot(1.2, 0.6) * math.sqrt(2)))
    assert cos[0, 0, 1].item() == 0.0 and math.isnan(cos[0, 0, 2].item())
    # tau = 0: key 1 joins: write = (1.2, 0.7); <., (1,-1)> = 0.5
    assert scores.ov_helpfulness(A, V, S, grad, 0.0)[0, 0, 0].item() == pytest.approx(0.5)


def _refine_inputs(seed, b=2, H=3, nr=3, nk=6, dh=4, d=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, H, nr, dh, generator=g, dtype=D)
    k = torch.randn(b, H, nk, dh, generator=g, dtype=D)
    A = torch.softmax(torch.randn(b, H, nr, nk, generator=g, dtype=D), -1)
    V = torch.randn(b, H, nk, d, generator=g, dtype=D)
    S = torch.rand(b, nr, nk, generator=g) > 0.5
    N = (torch.rand(b, nr, nk, generator=g) > 0.5) & ~S
    S[0, 0] = False  # example 0, position 0: no shortlist -> not counted
    S[:, 1:, 0] = True
    N[:, 1:, 1] = True
    grad = torch.randn(b, nr, d, generator=g, dtype=D)
    pos = torch.tensor([[1, 1, 1], [1, 1, 0]], dtype=torch.bool)
    return q, k, A, V, S, N, grad, pos


def test_refine_components_mean_of_products_and_padding_invariance():
    q, k, A, V, S, N, grad, pos = _refine_inputs(2)
    scale, tau = 0.5, 0.1
    out = scores.refine_score_components(q, k, A, V, S, N, grad, pos, scale, tau)
    qk = scores.qk_loopback(q, k, S, N, scale)
    ov = scores.ov_helpfulness(A, V, S, grad, tau)
    assert out["n_positions"].tolist() == [2, 2]
    for i, ts in enumerate([[1, 2], [0, 1]]):
        for h in range(3):
            a = [qk[i, h, t].item() for t in ts]
            o = [ov[i, h, t].item() for t in ts]
            assert out["qk"][i, h].item() == pytest.approx(sum(a) / 2)
            assert out["ov"][i, h].item() == pytest.approx(sum(o) / 2)
            assert out["refine_mean_product"][i, h].item() == pytest.approx((a[0] * o[0] + a[1] * o[1]) / 2)
    cos = scores.refine_score_components(q, k, A, V, S, N, grad, pos, scale, tau, cosine=True)
    assert (cos["ov"].abs() <= 1).all()

    # pad 2 refinement positions and 3 key positions with junk, masked out
    b, H = 2, 3
    zk = torch.zeros(b, 3, dtype=torch.bool)
    q_p = torch.cat([q, torch.randn(b, H, 2, 4, dtype=D)], 2)
    k_p = torch.cat([k, torch.randn(b, H, 3, 4, dtype=D)], 2)
    A_p = torch.cat([A, torch.rand(b, H, 3, 3, dtype=D)], 3)
    A_p = torch.cat([A_p, torch.rand(b, H, 2, 9, dtype=D)], 2)
    V_p = torch.cat([V, 1e3 * torch.randn(b, H, 3, 5, dtype=D)], 2)

    def pad_mask(m):
        m = torch.cat([m, zk[:, None].expand(b, 3, 3)], 2)
        return torch.cat([m, torch.ones(b, 2, 9, dtype=torch.bool)], 1)  # junk rows even "valid"

    grad_p = torch.cat([grad, torch.randn(b, 2, 5, dtype=D)], 1)
    pos_p = torch.cat([pos, torch.zeros(b, 2, dtype=torch.bool)], 1)
    out_p = scores.refine_score_components(q_p, k_p, A_p, V_p, pad_mask(S), pad_mask(N), grad_p, pos_p, scale, tau)
    for key in out:
        assert torch.allclose(out_p[key], out[key]), key


def test_refine_gradients_finite_with_nan_positions():
    q, k, A, V, S, N, grad, pos = _refine_inputs(3)
    q.requires_grad_(True)
    V.requires_grad_(True)
    out = scores.refine_score_components(q, k, A, V, S, N, grad, pos, 0.5, 0.1, cosine=True)
    out["refine_mean_product"].sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(V.grad).all()


# ---------------------------------------------------------------- aggregation


def test_weighted_mean_ignores_nan_and_head_table():
    values = torch.tensor([[1.0, float("nan")], [4.0, 2.0], [10.0, 3.0]], dtype=D)
    n = torch.tensor([1, 2, 0])
    # head 0: (1*1 + 2*4) / 3 = 3 (example 2 has n = 0); head 1: only example 1 -> 2
    assert scores.weighted_mean(values, n).tolist() == pytest.approx([3.0, 2.0])
    assert math.isnan(scores.weighted_mean(torch.full((2, 1), float("nan"), dtype=D), torch.tensor([1, 1]))[0].item())

    per = {"coarse_all_kurtosis": values, "sharpness_all_kurtosis": values * 2, "n_queries": n}
    df = scores.head_table(per, n, score="coarse_all_kurtosis")
    assert list(df.columns) == ["head", "score", "score_variant", "coarse_all_kurtosis", "sharpness_all_kurtosis",
                                "n_queries"]
    assert df["score"].tolist() == df["coarse_all_kurtosis"].tolist() == pytest.approx([3.0, 2.0])
    assert set(df["score_variant"]) == {"coarse_all_kurtosis"}
    assert df["sharpness_all_kurtosis"].tolist() == pytest.approx([6.0, 4.0])
    assert df["n_queries"].tolist() == [3, 2]

    layered = {"x": torch.arange(12, dtype=D).reshape(2, 2, 3)}  # [E, L, H]
    df2 = scores.head_table(layered, torch.tensor([1, 3]), score="x", count_name="n_positions")
    assert list(df2.columns) == ["layer", "head", "score", "score_variant", "x", "n_positions"]
    assert df2[["layer", "head"]].values.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert df2["score"].tolist() == pytest.approx([(0 + 3 * 6) / 4 + i for i in range(6)])
    with pytest.raises(KeyError, match="refine_product"):
        scores.head_table(layered, torch.tensor([1, 3]), score="refine_product")


# ---------------------------------------------------------------- sharpness variants (heads.coarse)


def _spike_row(n: int, share: float, at: int = 0) -> torch.Tensor:
    """`share` of the mass on key `at`, the rest spread evenly over the other n - 1 keys."""
    p = torch.full((n,), (1 - share) / (n - 1), dtype=D)
    p[at] = share
    return p


def test_normalized_kurtosis_closed_forms_and_scipy():
    for n in (4, 64):
        assert scores.normalized_kurtosis(torch.full((n,), 1.0 / n, dtype=D)).item() == 0.0  # uniform
        one_hot = torch.zeros(n, dtype=D)
        one_hot[1] = 1.0
        # m4 / (n m2^2) with m2 = (n-1)/n^2, m4 = ((n-1)^4 + (n-1))/n^5 (see the one-hot kurtosis test)
        closed = ((n - 1) ** 3 + 1) / (n * n * (n - 1))
        assert scores.normalized_kurtosis(one_hot, eps=0.0).item() == pytest.approx(closed, rel=1e-12)
    g = torch.Generator().manual_seed(4)
    p = torch.softmax(3 * torch.randn(3, 9, generator=g, dtype=D), -1)
    mask = torch.rand(3, 9, generator=g) > 0.3
    out = scores.normalized_kurtosis(p, eps=0.0, mask=mask)
    for i in range(3):
        sub = p[i][mask[i]].numpy()
        assert out[i].item() == pytest.approx(scipy.stats.kurtosis(sub, fisher=False, bias=True) / len(sub), rel=1e-10)
    assert torch.equal(scores.sharpness(p, "kurtosis", mask=mask), scores.excess_kurtosis(p, mask=mask))
    with pytest.raises(ValueError, match="normalized"):
        scores.sharpness(p, "pearson")


def test_normalized_sharpness_does_not_grow_with_the_number_of_keys():
    raw = [scores.excess_kurtosis(_spike_row(n, 0.9)).item() for n in (1000, 8000)]
    norm = [scores.normalized_kurtosis(_spike_row(n, 0.9)).item() for n in (1000, 8000)]
    assert raw[1] > 7 * raw[0]                           # raw kurtosis ~ n: length, not shape
    assert norm[1] == pytest.approx(norm[0], rel=0.10)
    # kurtosis is shift- and scale-free: one key apart from a flat rest scores as a one-hot row,
    # whatever its share (so ~1 here, not 0.9^2)
    for n in (1000, 8000):
        closed = ((n - 1) ** 3 + 1) / (n * n * (n - 1))
        assert scores.normalized_kurtosis(_spike_row(n, 0.9), eps=0.0).item() == pytest.approx(closed, rel=1e-9)
        assert scores.normalized_kurtosis(_spike_row(n, 0.2), eps=0.0).item() == pytest.approx(closed, rel=1e-9)


def test_coarse_key_mask_causal_and_document():
    qpos = torch.tensor([[2, 5]])
    causal = scores.coarse_key_mask(qpos, 7)
    assert causal[0].int().tolist() == [[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]]
    doc = scores.coarse_key_mask(qpos, 7, [1, 2, 3, 6])
    assert doc[0].int().tolist() == [[0, 1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0, 0]]


@pytest.mark.parametrize("kind", ["kurtosis", "normalized"])
def test_document_keys_rank_a_sink_below_a_document_focused_head(kind):
    """Head 0 puts 0.9 of its attention on BOS (an attention sink) and spreads the rest evenly;
    head 1 puts 0.6 on three document tokens. Over all keys the sink is the sharper row; over the
    document's keys only, the sink head is flat there and the document-focused head wins."""
    n, document, query = 300, list(range(20, 200)), 299
    sink = _spike_row(n, 0.9, at=0)
    focused = torch.full((n,), 0.4 / (n - 3), dtype=D)
    focused[[40, 90, 150]] = 0.2
    rows = torch.stack([sink, focused])[None, :, None, :]                   # [1, H=2, nq=1, n]
    centroid = torch.tensor([[1.0, 0.0]], dtype=D)
    writes = torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]], dtype=D)            # cos = 1: coarse = sharpness
    qpos = torch.tensor([[query]])
    masks = {"all": scores.coarse_key_mask(qpos, n), "document": scores.coarse_key_mask(qpos, n, document)}
    out = scores.coarse_variants(rows, writes, centroid, torch.ones(1, 1, dtype=torch.bool), masks)
    by_all, by_doc = out[f"coarse_all_{kind}"][0], out[f"coarse_document_{kind}"][0]
    assert by_all[0] > by_all[1] and by_doc[0] < by_doc[1]

    def reference(x):  # numpy moments of the kept keys, eps as documented (absolute / relative to 1/n)
        dev = x - x.mean()
        m2, m4 = (dev**2).mean(), (dev**4).mean()
        return m4 / (m2 + 1e-6) ** 2 - 3 if kind == "kurtosis" else m4 / (len(x) * (m2 + 1e-6 / len(x)) ** 2)

    for h, row in enumerate((sink, focused)):
        for got, keys in ((by_all, list(range(n))), (by_doc, document)):
            assert got[h].item() == pytest.approx(reference(row[keys].numpy()), rel=1e-9, abs=1e-9)
    assert torch.equal(out[f"sharpness_document_{kind}"], out[f"coarse_document_{kind}"])
    assert set(out) == {v.name for v in scores.COARSE_VARIANTS} | {v.sharpness_name for v in scores.COARSE_VARIANTS} \
        | {"alignment", "n_queries"}


def test_coarse_variant_names_and_validation():
    assert scores.CoarseVariant().name == "coarse_document_normalized"
    assert scores.CoarseVariant("all", "kurtosis").sharpness_name == "sharpness_all_kurtosis"
    with pytest.raises(ValueError, match="keys"):
        scores.CoarseVariant("prompt", "normalized")
    assert scores.refine_variant("both_positive") == "refine_both_positive"
    with pytest.raises(ValueError, match="product"):
        scores.refine_variant("mean")


# ---------------------------------------------------------------- RefineScore rankings (heads.refine)


def test_refine_score_is_the_product_of_means_over_positions_and_documents():
    """One head, two documents. Per refinement position (QK_t, OV_t): document A has one position
    (1, 2); document B two, (3, -1) and (-1, 1). Over the 3 positions: mean QK = (1 + 3 - 1) / 3 = 1,
    mean OV = (2 - 1 + 1) / 3 = 2/3, so RefineScore = 2/3; the mean of the per-position products is
    (2 - 3 - 1) / 3 = -2/3 (the sign flips)."""
    per_example = {"qk": torch.tensor([[1.0], [1.0]], dtype=D),                # per-document means
                   "ov": torch.tensor([[2.0], [0.0]], dtype=D),
                   "refine_mean_product": torch.tensor([[2.0], [-2.0]], dtype=D),
                   "n_positions": torch.tensor([1, 2])}
    table = scores.head_table(per_example, torch.tensor([1, 2]), score="refine_product", count_name="n_positions",
                              derived=lambda m: scores.refine_rankings(m["qk"], m["ov"]))
    row = table.iloc[0]
    assert row["qk"] == pytest.approx(1.0) and row["ov"] == pytest.approx(2 / 3)
    assert row["score"] == row["refine_product"] == pytest.approx(2 / 3)
    assert row["refine_mean_product"] == pytest.approx(-2 / 3)
    assert row["refine_both_positive"] == pytest.approx(2 / 3) and row["n_positions"] == 3
    assert row["score_variant"] == "refine_product"


def test_both_positive_scores_zero_for_a_head_negative_on_qk_and_ov():
    qk = torch.tensor([-0.5, 0.5, 0.5, float("nan")], dtype=D)
    ov = torch.tensor([-2.0, 2.0, -2.0, 1.0], dtype=D)
    out = scores.refine_rankings(qk, ov)
    assert out["refine_product"][:3].tolist() == [1.0, 1.0, -1.0]               # head 0: > 0 by the product
    assert out["refine_both_positive"][:3].tolist() == [0.0, 1.0, 0.0]           # ... but 0 here
    assert math.isnan(out["refine_product"][3]) and math.isnan(out["refine_both_positive"][3])


# ---------------------------------------------------------------- half-precision captures (heads.dtype bfloat16)


def test_bfloat16_captures_are_reduced_in_float32():
    """A bfloat16 model's captures: q.k near 100 has a bfloat16 spacing of 0.5, so head 0's true QK
    loop-back of +0.125 (100.125 - 100) would round to 0 and RefineScore's both_positive would drop it;
    attention weights 0.6 rounded to bfloat16 shift OV; the cosine of the writes loses ~3 digits.
    Every value must equal the float64 computation from the same bfloat16 numbers."""
    bf = torch.bfloat16
    q = torch.ones(1, 2, 1, 4, dtype=bf)                                             # [b, H, nr, dh]
    plain, bumped = [25.0, 25.0, 25.0, 25.0], [25.0, 25.0, 25.0, 25.125]            # exact in bfloat16
    k = torch.tensor([[bumped, plain], [plain, bumped]], dtype=bf)[None]               # [b, H, nk=2, dh]
    shortlist, nearmiss = torch.tensor([[[True, False]]]), torch.tensor([[[False, True]]])  # [b, nr, nk]
    rows = torch.tensor([[0.6, 0.3], [0.7, 0.2]], dtype=torch.float32)[None, :, None]    # [b, H, nr, nk]
    value_writes = torch.tensor([[[1.0, 3.0, -2.0], [2.0, 1.0, 1.0]]] * 2, dtype=bf)[None]  # [b, H, nk, d]
    grad = torch.tensor([[[1.0, 0.5, 0.25]]])                                           # [b, nr, d]
    out = scores.refine_score_components(q, k, rows, value_writes, shortlist, nearmiss, grad,
                                         torch.ones(1, 1, dtype=torch.bool), 1.0, 0.1)
    logits = torch.einsum("hd,hkd->hk", q[0, :, 0].double(), k[0].double())           # [H, nk]
    qk = logits[:, 0] - logits[:, 1]                                                   # +0.125, -0.125
    ov = (rows[0, :, 0, 0].double()[:, None] * value_writes[0, :, 0].double()) @ grad[0, 0].double()
    assert qk.tolist() == [0.125, -0.125]
    torch.testing.assert_close(out["qk"][0].double(), qk, rtol=1e-6, atol=0)
    torch.testing.assert_close(out["ov"][0].double(), ov, rtol=1e-6, atol=0)
    both = scores.refine_rankings(out["qk"][0], out["ov"][0])["refine_both_positive"]
    assert both[0] > 0 and both[1] == 0                                                # head 0 is a Phase-2 head

    writes = torch.tensor([[[3.0, -1.0, 0.5, 7.0], [1.0, 1.0, 1.0, 1.0]]], dtype=bf)[:, None]  # [b, nq, H, d]
    centroid = torch.tensor([2.0, 0.25, -1.0, 5.0], dtype=bf)
    align = scores.anchor_alignment(writes, centroid)                                  # [b, nq, H]
    w, c = writes.double(), centroid.double()
    torch.testing.assert_close(align.double(), (w @ c) / (w.norm(dim=-1) * c.norm()), rtol=1e-6, atol=0)
