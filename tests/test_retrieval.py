"""Retrieval KV policies on small random cases, against direct formulas."""
import numpy as np
import pytest

from a2ats_lite.errors import SidecarError
from a2ats_lite.kv import make_kv_cache
from a2ats_lite.kv.base import AttnLayer
from a2ats_lite.rope import Rope
from a2ats_lite.vq import Calibration, train_codebook

H, G, D = 4, 2, 16


def layers(n=2, swa_first=True):
    rope = Rope(head_dim=D, base=10000.0, pairing="half")
    return [AttnLayer(i, H, G, D, D ** -0.5, 8 if (swa_first and i == 0) else None, rope)
            for i in range(n)]


def fill(kv, T, rng, decode=3):
    """Prefill T - decode tokens, then decode the rest one by one; returns the q/k/v used."""
    seq = kv.add_sequence()
    q = rng.standard_normal((T, H, D)).astype(np.float32)
    k = rng.standard_normal((T, G, D)).astype(np.float32)
    v = rng.standard_normal((T, G, D)).astype(np.float32)
    outs = []
    for a, b in [(0, T - decode)] + [(t, t + 1) for t in range(T - decode, T)]:
        pos = np.arange(a, b)
        for layer in range(len(kv.layers)):
            kv.append(layer, seq, k[a:b], v[a:b], pos)
        outs.append([kv.attend(layer, seq, q[a:b], pos) for layer in range(len(kv.layers))])
        kv.advance(seq, b - a)
    return seq, q, k, v, outs


def ref_attention(L, q, k, v, i, sel=None):
    """float64 attention of query position i over positions sel (default 0..i)."""
    qr = L.rope(q[i:i + 1], [i])[0].astype(np.float64)
    kr = L.rope(k[:i + 1], np.arange(i + 1)).astype(np.float64)
    out = np.empty((H, D))
    for h in range(H):
        g = h // (H // G)
        idx = np.arange(i + 1) if sel is None else sel[g]
        s = kr[idx, g] @ qr[h] * L.scale
        p = np.exp(s - s.max())
        out[h] = p @ v[idx, g] / p.sum()
    return out


def calibration(ls, rng, n_centroids=16):
    books_a, books_v = {}, {}
    for L in ls:
        if L.window is None:
            for g in range(G):
                keys = rng.standard_normal((400, D))
                qt = rng.standard_normal((300, D))
                books_a[(L.index, g)] = train_codebook(keys, qt, n_centroids, iters=10)
                books_v[(L.index, g)] = train_codebook(keys, None, n_centroids, iters=10)
    return Calibration(params={}, fingerprint="", a2ats=books_a, vq=books_v)


def make_policy(policy, ls, rng, budget):
    kw = {"calib": calibration(ls, rng)} if policy in ("a2ats", "vq") else {}
    return make_kv_cache(policy, ls, 256, budget=budget, sinks=2, window=4, **kw)


@pytest.mark.parametrize("policy", ["window", "oracle", "quest", "a2ats", "vq"])
def test_budget_covering_everything_equals_dense(policy):
    ls = layers()
    kv = make_policy(policy, ls, np.random.default_rng(0), budget=200)
    dense = make_kv_cache("dense", ls, 256)
    _, _, _, _, out = fill(kv, 60, np.random.default_rng(1))
    _, _, _, _, ref = fill(dense, 60, np.random.default_rng(1))
    for a, b in zip(out, ref):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", ["window", "oracle", "quest", "a2ats", "vq"])
def test_sparse_attention_is_exact_over_the_selection(policy):
    rng = np.random.default_rng(2)
    ls = layers()
    kv = make_policy(policy, ls, rng, budget=5)
    seq, q, k, v, out = fill(kv, 80, rng)
    sel = kv.last_selection[(1, seq)]
    for g in range(G):
        assert set(range(2)) <= set(sel[g]) and set(range(76, 80)) <= set(sel[g])
        assert len(sel[g]) <= 2 + 4 + 5 * (H // G) and len(set(sel[g])) == len(sel[g])
    np.testing.assert_allclose(out[-1][1][0], ref_attention(ls[1], q, k, v, 79, sel), rtol=1e-4, atol=1e-5)
    # the sliding-window layer is untouched by the policy: exact over its window
    assert (1, seq) in kv.last_selection and (0, seq) not in kv.last_selection


def test_window_selects_the_most_recent_tokens():
    kv = make_kv_cache("window", layers(), 256, budget=5, sinks=3, window=4)
    seq, *_ = fill(kv, 50, np.random.default_rng(3))
    for g in range(G):
        assert sorted(kv.last_selection[(1, seq)][g]) == [0, 1, 2] + list(range(41, 50))


def test_oracle_picks_the_true_top_k():
    rng = np.random.default_rng(4)
    ls = layers()
    kv = make_kv_cache("oracle", ls, 256, budget=3, sinks=1, window=2)
    seq, q, k, v, _ = fill(kv, 40, rng)
    L = ls[1]
    qr = L.rope(q[39:40], [39])[0]
    kr = L.rope(k, np.arange(40))
    for g in range(G):
        chosen = set(kv.last_selection[(1, seq)][g]) - {0, 38, 39}
        for h in range(g * 2, g * 2 + 2):
            s = kr[1:38, g] @ qr[h]
            top = set((np.argsort(-s)[:3] + 1).tolist())
            assert top <= chosen


def test_quest_page_bound_dominates_true_scores():
    rng = np.random.default_rng(5)
    ls = layers()
    kv = make_kv_cache("quest", ls, 256, budget=16, sinks=1, window=2)
    seq, q, k, *_ = fill(kv, 70, rng)
    L, s = ls[1], kv.slot[1]
    q_rot = L.rope(q[69:70], [69])[0]
    cand = np.arange(1, 68)
    bound = kv.scores(L, seq, s, 0, None, q_rot[:2], cand)
    true = q_rot[:2] @ kv.stores[seq].keys(s)[cand, 0].T
    assert (bound >= true - 1e-5).all()


def test_a2ats_scores_are_wrope_query_dot_centroid_of_prerope_code():
    rng = np.random.default_rng(6)
    ls = layers()
    cal = calibration(ls, rng)
    kv = make_kv_cache("a2ats", ls, 256, budget=4, sinks=1, window=2, calib=cal, wrope_b=37)
    seq, q, k, *_ = fill(kv, 50, rng)
    L, s, g = ls[1], kv.slot[1], 1
    book = cal.a2ats[(1, g)]
    codes = book.assign(k[:, g])
    np.testing.assert_array_equal(kv.codes[seq][s, :50, g], codes)
    q_pre = q[49, 2:4]
    cand = np.arange(1, 48)
    expect = L.rope(q_pre[None], [37])[0].astype(np.float64) @ book.centroids[codes[cand]].T.astype(np.float64)
    np.testing.assert_allclose(kv.scores(L, seq, s, g, q_pre, None, cand), expect, rtol=1e-4, atol=1e-5)


def test_coded_policies_need_a_calibration():
    with pytest.raises(SidecarError, match="needs a calibration"):
        make_kv_cache("a2ats", layers(), 64)
    cal = calibration(layers(), np.random.default_rng(7))
    cal.a2ats.pop((1, 0))
    with pytest.raises(SidecarError, match="no a2ats codebook"):
        make_kv_cache("a2ats", layers(), 64, calib=cal)


def test_removed_sequence_frees_its_store(tmp_path):
    kv = make_kv_cache("oracle", layers(), 128, budget=4, spill_dir=tmp_path)
    seq, *_ = fill(kv, 30, np.random.default_rng(8))
    store = kv.stores[seq]
    kv.remove_sequence(seq)
    assert seq not in kv.stores and store._mm is None
    assert list(tmp_path.iterdir()) == []
