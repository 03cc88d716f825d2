"""Retrieval KV policies on small random cases, against float64 formulas."""
import numpy as np
import pytest

from kvutil import Selections, append, attend

from a2ats_lite.config import AttnLayer
from a2ats_lite.errors import SidecarError
from a2ats_lite.evaluate import attention_recall, oracle_select, selection_overlap
from a2ats_lite.kv import make_kv_cache
from a2ats_lite.model.forward import load_prefix
from a2ats_lite.rope import Rope
from a2ats_lite.vq import Calibration, Codebook, estimate_H, train_codebook

H, G, D = 4, 2, 16
GROUP = H // G
POLICIES = ["window", "oracle", "quest", "a2ats", "vq", "wrope"]


def layers():
    """0: sliding window 8; 1: full, half pairing; 2: full, adjacent pairing, other base."""
    r1 = Rope(head_dim=D, base=10000.0, pairing="half")
    r2 = Rope(head_dim=D, base=1e6, pairing="adjacent")
    return [AttnLayer(0, H, G, D, D ** -0.5, 8, r1), AttnLayer(1, H, G, D, 0.3, None, r1),
            AttnLayer(2, H, G, D, D ** -0.5, None, r2)]


FULL = [1, 2]


def rope64(L, x, pos):
    """float64 RoPE of x (n, h, d) at positions (n,): an independent reference."""
    x = np.asarray(x, np.float64)
    ang = np.asarray(pos, np.float64)[:, None, None] * L.rope.inv_freq()[None, None, :]
    c, s = np.cos(ang), np.sin(ang)
    out = x.copy()
    if L.rope.pairing == "adjacent":
        a, b = x[..., 0::2], x[..., 1::2]
        out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    else:
        a, b = x[..., :D // 2], x[..., D // 2:]
        out[..., :D // 2], out[..., D // 2:] = a * c - b * s, a * s + b * c
    return out


def data(rng, T, n_layers=3):
    """Per layer q (T, H, D), k (T, G, D), v (T, G, D) float32."""
    return [tuple(rng.standard_normal((T, h, D)).astype(np.float32) for h in (H, G, G))
            for _ in range(n_layers)]


def run(kv, qkv, n_prefill, seq=None):
    """Prefill n_prefill tokens in one chunk, then decode the rest one by one.
    Returns the sequence and per step the outputs of every layer."""
    T = len(qkv[0][0])
    seq = kv.add_sequence() if seq is None else seq
    outs = []
    for a, b in [(0, n_prefill)] + [(t, t + 1) for t in range(n_prefill, T)]:
        pos = np.arange(a, b)
        for layer, (q, k, v) in enumerate(qkv):
            append(kv, layer, seq, k[a:b], v[a:b], pos)
        outs.append([attend(kv, layer, seq, q[a:b], pos) for layer, (q, k, v) in enumerate(qkv)])
        kv.advance(seq, b - a)
    return seq, outs


def ref_attention(L, q, k, v, i, sel=None):
    """float64 attention of the query at position i over positions sel per KV head
    (default: every position it may see: causal, and the layer's window)."""
    qr = rope64(L, q[i:i + 1], [i])[0]
    kr = rope64(L, k[:i + 1], np.arange(i + 1))
    lo = 0 if L.window is None else max(0, i - L.window + 1)
    out = np.empty((H, D))
    for h in range(H):
        g = h // GROUP
        idx = np.arange(lo, i + 1) if sel is None else np.asarray(sel[g])
        s = kr[idx, g] @ qr[h] * L.scale
        p = np.exp(s - s.max())
        out[h] = p @ v[idx, g].astype(np.float64) / p.sum()
    return out


def check_against_reference(ls, qkv, outs, n_prefill, tol=2e-5):
    for step, per_layer in enumerate(outs):
        positions = range(n_prefill) if step == 0 else [n_prefill + step - 1]
        for L, (q, k, v), out in zip(ls, qkv, per_layer):
            for r, i in enumerate(positions):
                np.testing.assert_allclose(out[r], ref_attention(L, q, k, v, i), rtol=tol, atol=tol)


def calibration(ls, rng, n_centroids=16):
    books_a, books_v = {}, {}
    for i in FULL:
        for g in range(G):
            keys = rng.standard_normal((400, D))
            qt = rng.standard_normal((300, D)) * rng.uniform(0.2, 3, D)
            books_a[(i, g)] = train_codebook(keys, qt, n_centroids, iters=10)
            books_v[(i, g)] = train_codebook(keys, None, n_centroids, iters=10)
    return Calibration(params={"b": 2048, "w": 64, "s": 8, "n_centroids": n_centroids},
                       fingerprint="", a2ats=books_a, vq=books_v)


def make(policy, ls, budget, sinks=2, window=4, calib=None, n_ctx=256, **kw):
    if policy in ("a2ats", "vq") and calib is None:
        calib = calibration(ls, np.random.default_rng(99))
    if calib is not None:
        kw["calib"] = calib
    spill = kw.pop("spill_dir", None)
    kv = make_kv_cache(policy, ls, n_ctx, budget=budget, sinks=sinks, window=window,
                       spill_dir=spill, **kw)
    kv.sel = Selections(kv)          # each (layer, seq)'s last decode selection
    return kv


# -- exactness ---------------------------------------------------------------------------
@pytest.mark.parametrize("policy", POLICIES)
def test_budget_covering_everything_equals_dense(policy):
    ls = layers()
    qkv = data(np.random.default_rng(1), 60)
    kv = make(policy, ls, budget=200)
    seq, outs = run(kv, qkv, 50)
    check_against_reference(ls, qkv, outs, 50)
    for i in FULL:   # the decode step really selected every token
        assert [s.tolist() for s in kv.sel[(i, seq)]] == [list(range(60))] * G
    # and the same outputs as the dense policy
    dense = make_kv_cache("dense", ls, 256)
    _, ref = run(dense, qkv, 50)
    for a, b in zip(outs, ref):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy", POLICIES)
def test_sparse_attention_is_exact_over_the_selection(policy):
    ls = layers()
    qkv = data(np.random.default_rng(2), 100)
    kv = make(policy, ls, budget=5)
    seq = kv.add_sequence()
    gathered = []
    orig = kv.B.sparse_attention

    def spy(q, keys, values, idx, lens, scale, seqs=None, layer=None):
        assert kv.B.held_bytes() == 0           # the CPU reads its store in place
        for g in range(idx.shape[1]):
            gathered.append((keys[0].ctypes.data, g, np.array(idx[0, g, :lens[0, g]])))
        return orig(q, keys, values, idx, lens, scale, seqs=seqs, layer=layer)
    kv.B.sparse_attention = spy
    _, outs = run(kv, qkv, 95, seq=seq)
    step = len(outs) - 1
    for i in FULL:
        L, (q, k, v) = ls[i], qkv[i]
        sel = kv.sel[(i, seq)]
        per_head_cap = 16 if policy == "quest" else 5   # quest: at least one 16-token page
        for g in range(G):
            assert set(range(2)) <= set(sel[g]) and set(range(96, 100)) <= set(sel[g])
            assert len(sel[g]) <= 2 + 4 + per_head_cap * GROUP
            assert len(sel[g]) < 100 and np.all(np.diff(sel[g]) > 0)
        np.testing.assert_allclose(outs[step][i][0], ref_attention(L, q, k, v, 99, sel),
                                   rtol=2e-5, atol=2e-5)
    # the attention read exactly the selected rows of this layer's host-store arrays
    last = {(ptr, g): idx for ptr, g, idx in gathered}
    for i in FULL:
        ptr = kv.store_arrays(i, seq)[0].ctypes.data
        for g in range(G):
            np.testing.assert_array_equal(last[(ptr, g)], kv.sel[(i, seq)][g])
    # the sliding-window layer is untouched by the policy: exact over its window
    assert (0, seq) not in kv.sel
    check_against_reference(ls[:1], qkv[:1], [o[:1] for o in outs], 95)


def test_window_selects_exactly_sinks_and_recent():
    kv = make("window", layers(), budget=5, sinks=3, window=4)
    seq, _ = run(kv, data(np.random.default_rng(3), 50), 45)
    for i in FULL:
        for g in range(G):
            assert kv.sel[(i, seq)][g].tolist() == [0, 1, 2] + list(range(41, 50))


def test_fraction_budget_is_per_query_head_share_of_context():
    kv = make("window", layers(), budget=0.1, sinks=1, window=2)
    seq, _ = run(kv, data(np.random.default_rng(4), 71), 70)
    assert kv.policy.k_budget(71) == 8   # ceil(0.1 * 71)
    assert kv.sel[(1, seq)][0].tolist() == [0] + list(range(61, 71))


def test_oracle_picks_the_true_top_k():
    ls = layers()
    qkv = data(np.random.default_rng(5), 80)
    kv = make("oracle", ls, budget=3, sinks=1, window=2)
    seq, _ = run(kv, qkv, 79)
    for i in FULL:
        L, (q, k, _) = ls[i], qkv[i]
        qr, kr = rope64(L, q[79:80], [79])[0], rope64(L, k, np.arange(80))
        for g in range(G):
            heads = qr[g * GROUP:(g + 1) * GROUP]
            expect = set()
            for h in heads:                  # direct: top 3 of q.k among positions 1..77
                expect |= set((np.argsort(-(kr[1:78, g] @ h))[:3] + 1).tolist())
            chosen = kv.sel[(i, seq)][g]
            assert set(chosen.tolist()) == expect | {0, 78, 79}
            assert set(oracle_select(heads, kr[:, g], 1, 2, 3).tolist()) == set(chosen.tolist())


def test_wrope_ablation_scores_are_wrope_on_exact_pre_rope_keys():
    ls = layers()
    qkv = data(np.random.default_rng(15), 90)
    kv = make("wrope", ls, budget=4, sinks=1, window=2, wrope_b=37)
    seq, _ = run(kv, qkv, 89)
    cand = np.arange(1, 88)
    for i in FULL:
        L, (q, k, _) = ls[i], qkv[i]
        q_b = rope64(L, q[89:90], [37])[0] / np.sqrt(D)                # (H, d): R_b q, float64
        for g in range(G):
            heads = slice(g * GROUP, (g + 1) * GROUP)
            direct = q_b[heads] @ np.asarray(k[cand, g], np.float64).T  # (R_b q) . k_pre
            got = kv.policy.scores(L, seq, g, q[89, heads], None, cand)
            np.testing.assert_allclose(got, direct, rtol=1e-4, atol=1e-4)
            expect = set()
            for row in direct:
                expect |= set(cand[np.argsort(-row)[:4]].tolist())
            assert set(kv.sel[(i, seq)][g].tolist()) == expect | {0, 88, 89}


def test_quest_page_bounds_are_exact_min_max_and_dominate_scores():
    ls = layers()
    qkv = data(np.random.default_rng(6), 90)
    kv = make("quest", ls, budget=32, sinks=1, window=2)
    seq, _ = run(kv, qkv, 37)   # pages filled by a prefill chunk, then token by token
    for i in FULL:
        L, s, (q, k, _) = ls[i], kv.storage.slot[i], qkv[i]
        kr = rope64(L, k, np.arange(90))                                # (T, G, d)
        qr = rope64(L, q[89:90], [89])[0] * L.scale
        for g in range(G):
            for p in range(6):   # pages 0..5 hold 90 tokens
                rows = kr[p * 16:(p + 1) * 16, g]
                np.testing.assert_allclose(kv.policy.pmin[seq][s, g, p], rows.min(0), rtol=1e-6, atol=1e-6)
                np.testing.assert_allclose(kv.policy.pmax[seq][s, g, p], rows.max(0), rtol=1e-6, atol=1e-6)
            heads = qr[g * GROUP:(g + 1) * GROUP].astype(np.float32)
            bound = kv.policy.page_bounds(seq, i, g, heads, 0, 6)               # (group, 6)
            for p in range(6):
                true_max = (kr[p * 16:(p + 1) * 16, g] @ heads.T.astype(np.float64)).max(0)
                assert (bound[:, p] >= true_max - 1e-5).all()
            # selection = the top 2 pages per head (32 // 16), restricted to candidates 1..87
            top = np.argsort(-bound, axis=1)[:, :2]
            tok = {t for p in np.unique(top) for t in range(p * 16, p * 16 + 16) if 1 <= t < 88}
            assert set(kv.sel[(i, seq)][g].tolist()) == tok | {0, 88, 89}


@pytest.mark.parametrize("kind", ["a2ats", "vq"])
def test_coded_scores_are_wrope_or_post_rope_dot_products(kind):
    # a codebook whose centroids are the keys themselves: every key is its own code, so
    # the LUT scores must be exactly (R_b q).k / sqrt(d) (a2ats) or q_rot.k_rot (vq)
    ls = layers()
    rng = np.random.default_rng(7)
    T, b = 70, 37
    qkv = data(rng, T)
    books = {}
    for i in FULL:
        L, k = ls[i], qkv[i][1]
        keys = k if kind == "a2ats" else L.rope(k, np.arange(T))
        Lf = estimate_H(rng.standard_normal((200, D)) * rng.uniform(0.2, 3, D))[1] \
            if kind == "a2ats" else np.eye(D)
        for g in range(G):
            books[(i, g)] = Codebook(keys[:, g].astype(np.float32), Lf.astype(np.float32))
    cal = Calibration(params={"b": b, "w": 64, "s": 8, "n_centroids": T}, fingerprint="",
                      **{kind: books})
    kv = make(kind, ls, budget=4, sinks=1, window=2, calib=cal)
    assert kv.policy.wrope_b == b   # taken from the calibration
    seq, _ = run(kv, qkv, 69)
    cand = np.arange(1, 68)           # between the sink and the 2-token window
    for i in FULL:
        L, s, (q, k, _) = ls[i], kv.storage.slot[i], qkv[i]
        for g in range(G):
            np.testing.assert_array_equal(kv.policy.codes[seq][s, g, :T], np.arange(T))
            heads = slice(g * GROUP, (g + 1) * GROUP)
            if kind == "a2ats":
                qq = rope64(L, q[69:70, heads], [b])[0] / np.sqrt(D)
                kk = k[:, g].astype(np.float64)
            else:
                qq = rope64(L, q[69:70, heads], [69])[0] * L.scale
                kk = rope64(L, k, np.arange(T))[:, g]
            expect = qq @ kk[cand].T                                      # (group, n_cand)
            q_rot = (L.rope(q[69:70], [69])[0] * np.float32(L.scale))[heads]
            got = kv.policy.scores(L, seq, g, q[69, heads], q_rot, cand)
            np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)
            top = {int(c) for row in expect for c in cand[np.argsort(-row)[:4]]}
            assert set(kv.sel[(i, seq)][g].tolist()) == top | {0, 68, 69}


@pytest.mark.parametrize("kind", ["a2ats", "vq"])
def test_codes_are_assigned_from_the_right_keys(kind):
    ls = layers()
    rng = np.random.default_rng(8)
    cal = calibration(ls, rng)
    qkv = data(rng, 40)
    kv = make(kind, ls, budget=4, calib=cal)
    seq, _ = run(kv, qkv, 30)
    for i in FULL:
        k = qkv[i][1]
        keys = k if kind == "a2ats" else ls[i].rope(k, np.arange(40))   # pre- / post-RoPE
        for g in range(G):
            book = getattr(cal, kind)[(i, g)]
            np.testing.assert_array_equal(kv.policy.codes[seq][kv.storage.slot[i], g, :40], book.assign(keys[:, g]))


def test_coded_policies_need_a_calibration():
    with pytest.raises(SidecarError, match="needs a calibration"):
        make_kv_cache("a2ats", layers(), 64)
    cal = calibration(layers(), np.random.default_rng(9))
    cal.a2ats.pop((2, 1))
    with pytest.raises(SidecarError, match="no a2ats codebook"):
        make_kv_cache("a2ats", layers(), 64, calib=cal)
    cal = calibration(layers(), np.random.default_rng(9))
    cal.vq = {key: Codebook(cb.centroids[:, :8], cb.L[:8, :8]) for key, cb in cal.vq.items()}
    with pytest.raises(SidecarError, match="head dim"):
        make_kv_cache("vq", layers(), 64, calib=cal)


@pytest.mark.parametrize("budget", [0, -1, 1.5, True, 0.0])
def test_bad_budget_is_refused(budget):
    with pytest.raises(ValueError, match="budget"):
        make_kv_cache("oracle", layers(), 64, budget=budget)


def test_wrong_positions_are_refused():
    kv = make("oracle", layers(), budget=4)
    seq = kv.add_sequence()
    k = np.ones((3, G, D), np.float32)
    with pytest.raises(ValueError, match="expects positions 0"):
        append(kv, 1, seq, k, k, np.arange(1, 4))
    with pytest.raises(ValueError, match="no keys for position"):
        attend(kv, 1, seq, np.ones((1, H, D), np.float32), [0])


# -- sequences, prefix replay, truncation --------------------------------------------------
@pytest.mark.parametrize("policy", ["a2ats", "quest"])
def test_sequences_are_independent(policy, tmp_path):
    ls = layers()
    cal = calibration(ls, np.random.default_rng(10)) if policy == "a2ats" else None
    qa, qb = data(np.random.default_rng(11), 50), data(np.random.default_rng(12), 60)
    alone = make(policy, ls, budget=4, calib=cal)
    _, ref_a = run(alone, qa, 40)
    _, ref_b = run(alone, qb, 45)
    kv = make(policy, ls, budget=4, calib=cal, spill_dir=tmp_path)
    sa, sb = kv.add_sequence(), kv.add_sequence()
    out_a, out_b = [], []
    # interleave: prefill a, prefill b, then alternate decode steps
    steps_a = [(0, 40)] + [(t, t + 1) for t in range(40, 50)]
    steps_b = [(0, 45)] + [(t, t + 1) for t in range(45, 60)]
    for j in range(max(len(steps_a), len(steps_b))):
        for seq, steps, qkv, out in ((sa, steps_a, qa, out_a), (sb, steps_b, qb, out_b)):
            if j < len(steps):
                a, b = steps[j]
                pos = np.arange(a, b)
                for layer, (q, k, v) in enumerate(qkv):
                    append(kv, layer, seq, k[a:b], v[a:b], pos)
                out.append([attend(kv, layer, seq, q[a:b], pos) for layer, (q, k, v) in enumerate(qkv)])
                kv.advance(seq, b - a)
    for got, ref in ((out_a, ref_a), (out_b, ref_b)):
        for x, y in zip(got, ref):
            for a, b in zip(x, y):
                np.testing.assert_array_equal(a, b)
    assert kv.storage.stores[sa] is not kv.storage.stores[sb] and list(tmp_path.iterdir()) == []
    kv.remove_sequence(sa)
    assert sa not in kv.storage.stores and sa not in kv.storage.bufs
    assert sa not in getattr(kv.policy, "codes", getattr(kv.policy, "pmin", {}))
    kv.close()
    assert not kv.storage.stores and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("policy", POLICIES)
def test_load_prefix_equals_prefill_under_the_policy(policy):
    ls = layers()
    qkv = data(np.random.default_rng(13), 70)
    kv = make(policy, ls, budget=4)
    seq, outs = run(kv, qkv, 60)
    replay = make(policy, ls, budget=4)
    seq2 = load_prefix(replay.B, replay.layers, replay, [(k[:60], v[:60]) for _, k, v in qkv])
    assert replay.length(seq2) == 60
    for t in range(60, 70):
        pos = np.array([t])
        for layer, (q, k, v) in enumerate(qkv):
            append(replay, layer, seq2, k[t:t + 1], v[t:t + 1], pos)
        got = [attend(replay, layer, seq2, q[t:t + 1], pos) for layer, (q, k, v) in enumerate(qkv)]
        replay.advance(seq2, 1)
        for a, b in zip(got, outs[t - 59]):
            np.testing.assert_array_equal(a, b)
    for i in FULL:
        for a, b in zip(replay.sel[(i, seq2)], kv.sel[(i, seq)]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", ["quest", "a2ats", "oracle"])
def test_truncate_then_continue_matches_a_fresh_run(policy):
    # the model truncates to drop a failed step's partial appends; prefix reuse truncates too
    ls = layers()
    rng = np.random.default_rng(14)
    qkv, other = data(rng, 60), data(rng, 60)
    kv = make(policy, ls, budget=4)
    seq, _ = run(kv, other, 45)          # 60 tokens of which the first 35 are kept
    first = [(q.copy(), k.copy(), v.copy()) for q, k, v in other]
    for (q, k, v), (q2, k2, v2) in zip(first, qkv):
        q[35:], k[35:], v[35:] = q2[35:], k2[35:], v2[35:]
    kv.truncate(seq, 35)
    assert kv.length(seq) == 35 and kv.storage.stores[seq].n.tolist() == [35, 35]
    outs = []
    for t in range(35, 60):
        pos = np.array([t])
        for layer, (q, k, v) in enumerate(first):
            append(kv, layer, seq, k[t:t + 1], v[t:t + 1], pos)
        outs.append([attend(kv, layer, seq, q[t:t + 1], pos) for layer, (q, k, v) in enumerate(first)])
        kv.advance(seq, 1)
    fresh = make(policy, ls, budget=4)
    _, ref = run(fresh, first, 35)
    for a, b in zip(outs, ref[1:]):
        for x, y in zip(a, b):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)


def test_removed_sequence_frees_its_store(tmp_path):
    kv = make("oracle", layers(), budget=4, spill_dir=tmp_path)
    seq, _ = run(kv, data(np.random.default_rng(15), 30), 25)
    store = kv.storage.stores[seq]
    kv.remove_sequence(seq)
    assert seq not in kv.storage.stores and store.data is None and store._mm is None
    assert list(tmp_path.iterdir()) == []


# -- evaluation helpers -------------------------------------------------------------------
def test_attention_recall_and_selection_overlap():
    rng = np.random.default_rng(16)
    q = rng.standard_normal((3, D))
    k = rng.standard_normal((50, D))
    sel = np.array([0, 4, 9, 10, 33])
    s = 0.7 * q @ k.T
    p = np.exp(s - s.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    assert attention_recall(q, k, sel, 0.7) == pytest.approx(p[:, sel].sum(1).mean(), rel=1e-12)
    assert attention_recall(q[0], k, sel, 0.7) == pytest.approx(p[0, sel].sum(), rel=1e-12)
    assert attention_recall(q, k, np.arange(50), 0.7) == pytest.approx(1.0, rel=1e-12)
    assert selection_overlap([1, 2, 3], [2, 3, 4, 5]) == 0.5
    assert selection_overlap([1, 2], [1, 2]) == 1.0 and selection_overlap([7], [1, 2]) == 0.0


def test_recall_of_oracle_is_at_least_window():
    ls = layers()
    qkv = data(np.random.default_rng(17), 120)
    recalls = {}
    for policy in ("oracle", "window"):
        kv = make(policy, ls, budget=6)
        seq, _ = run(kv, qkv, 119)
        L, (q, k, _) = ls[1], qkv[1]
        qr, kr = rope64(L, q[119:120], [119])[0], rope64(L, k, np.arange(120))
        recalls[policy] = np.mean([attention_recall(qr[g * GROUP:(g + 1) * GROUP], kr[:, g],
                                                    kv.sel[(1, seq)][g], L.scale)
                                   for g in range(G)])
    assert 0 < recalls["window"] <= recalls["oracle"] <= 1


@pytest.mark.parametrize("policy", ["a2ats", "vq", "oracle"])
def test_native_retrieval_path_equals_the_numpy_reference(policy):
    # the same decode steps with the native LUT / top-K / fused sparse attention and with
    # the numpy reference of each: identical selections, outputs within float32 rounding
    from a2ats_lite.backend.cpu import CPUBackend
    ls = layers()
    qkv = data(np.random.default_rng(21), 90)
    cal = calibration(ls, np.random.default_rng(22))
    runs = []
    for native in (True, False):
        kw = {"calib": cal} if policy in ("a2ats", "vq") else {}
        kv = make_kv_cache(policy, ls, 256, backend=CPUBackend(native_retrieval=native),
                           budget=5, sinks=2, window=4, **kw)
        kv.sel = Selections(kv)
        seq, outs = run(kv, qkv, 70)
        runs.append((kv.sel.last, outs))
    (sel_a, out_a), (sel_b, out_b) = runs
    assert sel_a.keys() == sel_b.keys() and sel_a
    for key in sel_a:
        for a, b in zip(sel_a[key], sel_b[key]):
            np.testing.assert_array_equal(a, b)
    for x, y in zip(out_a, out_b):
        for a, b in zip(x, y):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
