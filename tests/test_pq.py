"""Query-aware product quantization (MxBITS code layouts) and the exact re-rank."""
import numpy as np
import pytest
from test_retrieval import FULL, GROUP, G, D, data, layers, make, rope64, run

from a2ats_lite.errors import SidecarError
from a2ats_lite.evaluate import oracle_select
from a2ats_lite.vq import (Calibration, Codebook, calibrate_from_samples, estimate_H,
                           parse_codes, train_codebook)


def _metric(rng, d=D):
    return estimate_H(rng.standard_normal((300, d)) * rng.uniform(0.2, 3, d))[1]


def test_parse_codes():
    assert parse_codes("1x12") == (1, 12) and parse_codes("4x8") == (4, 8)
    for bad in ("4", "0x8", "4x0", "4x17", "x8", "4*8", 12):
        with pytest.raises(ValueError, match="MxBITS"):
            parse_codes(bad)


@pytest.mark.parametrize("M", [1, 2, 4])
def test_approx_score_is_the_sum_of_lut_entries(M):
    # float64 reference: q~ . k^ with k^ the key reconstructed from its M codes, against the
    # LUT the backend builds from q' = q~ L^-T and the k'-space subspace centroids
    from a2ats_lite.backend.cpu import CPUBackend
    rng = np.random.default_rng(M)
    L = _metric(rng)
    keys = rng.standard_normal((600, D))
    qt = rng.standard_normal((300, D)) @ np.linalg.inv(L).T       # H ~ L L^T
    cb = train_codebook(keys, qt, 16, iters=8, n_subspaces=M)
    assert cb.M == M and cb.n_centroids == 16
    codes = cb.assign_codes(keys.astype(np.float32))               # (n, M)
    assert codes.shape == (600, M) and codes.dtype == np.uint16
    q = rng.standard_normal((GROUP, D))
    expect = q @ cb.approx_keys(codes).T                           # (group, n) float64
    W = cb.query_transform()
    np.testing.assert_allclose(W @ cb.L.astype(np.float64).T, np.eye(D), atol=1e-9)
    qp = q @ W
    subs = cb.subspaces()
    ds = D // M
    lut64 = np.stack([qp[:, m * ds:(m + 1) * ds] @ subs[m].T for m in range(M)], 1)
    ref = sum(lut64[:, m, codes[:, m]] for m in range(M))
    np.testing.assert_allclose(ref, expect, rtol=1e-9, atol=1e-9)
    for native in (False, True):
        B = CPUBackend()
        B.native_retrieval = native
        lut = B.build_lut(qp[None, None].astype(np.float32),
                          subs[None].astype(np.float32))[0, 0]     # (group, M, C)
        np.testing.assert_allclose(lut, lut64, rtol=1e-4, atol=1e-4)
        got = B.lut_lookup(lut, np.ascontiguousarray(codes.T))
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)


def _exact_books(ls, qkv, M, rng, bits=5):
    """Per (full layer, KV head) a product codebook in a query-aware metric, and the
    model's pre-RoPE keys replaced by exact combinations of its centroids."""
    books, codes = {}, {}
    C, ds = 2 ** bits, D // M
    for i in FULL:
        k = qkv[i][1]
        for g in range(G):
            L = _metric(rng).astype(np.float32)
            sub = rng.standard_normal((M, C, ds)).astype(np.float32)
            books[(i, g)] = Codebook(None, L, sub)
            c = rng.integers(0, C, (len(k), M))
            kp = np.concatenate([sub[m][c[:, m]] for m in range(M)], 1).astype(np.float64)
            k[:, g] = np.linalg.solve(L.astype(np.float64).T, kp.T).T   # k' = k @ L exactly
            codes[(i, g)] = c
    return books, codes


@pytest.mark.parametrize("M", [2, 4])
def test_exact_combinations_score_like_wrope(M):
    # keys whose every k'-block is one of its centroids: the codes find them back and the
    # approximate score equals the exact WRoPE score (R_b q) . k / sqrt(d)
    ls = layers()
    rng = np.random.default_rng(20 + M)
    T, b = 70, 41
    qkv = data(rng, T)
    books, codes = _exact_books(ls, qkv, M, rng)
    cal = Calibration(params={"b": b, "w": 64, "s": 8, "n_centroids": 32, "codes": f"{M}x5"},
                      fingerprint="", a2ats=books)
    kv = make("a2ats", ls, budget=4, sinks=1, window=2, calib=cal)
    seq, _ = run(kv, qkv, 69)
    cand = np.arange(1, 68)
    for i in FULL:
        L, s, (q, k, _) = ls[i], kv.storage.slot[i], qkv[i]
        for g in range(G):
            np.testing.assert_array_equal(kv.policy.codes[seq][s, g, :, :T], codes[(i, g)].T)
            heads = slice(g * GROUP, (g + 1) * GROUP)
            expect = rope64(L, q[69:70, heads], [b])[0] / np.sqrt(D) @ k[cand, g].astype(np.float64).T
            q_rot = (L.rope(q[69:70], [69])[0] * np.float32(L.scale))[heads]
            got = kv.policy.scores(L, seq, g, q[69, heads], q_rot, cand)
            np.testing.assert_allclose(got, expect, rtol=1e-3, atol=1e-3)
            top = {int(c) for row in expect for c in cand[np.argsort(-row)[:4]]}
            assert set(kv.sel[(i, seq)][g].tolist()) == top | {0, 68, 69}


@pytest.mark.parametrize("kind", ["a2ats", "vq"])
@pytest.mark.parametrize("M", [1, 2])
def test_rerank_large_enough_equals_the_oracle(kind, M):
    ls = layers()
    rng = np.random.default_rng(30 + M)
    T = 90
    qkv = data(rng, T)
    books = {}
    for i in FULL:
        for g in range(G):
            keys = rng.standard_normal((200, D))
            books[(i, g)] = train_codebook(keys, rng.standard_normal((200, D)) if kind == "a2ats"
                                           else None, 8, iters=5, n_subspaces=M)
    cal = Calibration(params={"b": 2048, "w": 64, "s": 8, "n_centroids": 8}, fingerprint="",
                      **{kind: books})
    K, sinks, window = 5, 2, 4
    kv = make(kind, ls, budget=K, sinks=sinks, window=window, calib=cal, rerank=100)
    orc = make("oracle", ls, budget=K, sinks=sinks, window=window)
    seq, _ = run(kv, qkv, 60)
    oseq, _ = run(orc, qkv, 60)
    for i in FULL:
        L, q, k = ls[i], qkv[i][0], qkv[i][1]
        kr = rope64(L, k, np.arange(T))
        qr = rope64(L, q[T - 1:T], [T - 1])[0] * L.scale
        for g in range(G):
            mine = kv.sel[(i, seq)][g].tolist()
            assert mine == orc.sel[(i, oseq)][g].tolist()
            ref = oracle_select(qr[g * GROUP:(g + 1) * GROUP], kr[:, g], sinks, window, K)
            assert mine == sorted(ref.tolist())
    assert kv.policy.stats["reranked_rows"] > 0
    # a small factor still returns at most K per query head (union over the group)
    kv2 = make(kind, ls, budget=K, sinks=sinks, window=window, calib=cal, rerank=3)
    seq2, _ = run(kv2, qkv, 60)
    for i in FULL:
        for g in range(G):
            sel = kv2.sel[(i, seq2)][g]
            assert len(sel) <= sinks + window + K * GROUP


def test_rerank_must_be_a_positive_integer():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="rerank"):
            make("a2ats", layers(), budget=4, rerank=bad)


def test_calibrate_from_samples_product_layout():
    ls = layers()
    rng = np.random.default_rng(5)
    N = 300
    q = {i: rng.standard_normal((N, 4, D)).astype(np.float32) for i in FULL}
    k = {i: rng.standard_normal((N, G, D)).astype(np.float32) for i in FULL}
    pos = {i: np.arange(N) for i in FULL}
    cal = calibrate_from_samples(ls, q, k, pos, n_centroids=999, iters=3, codes="4x3")
    assert cal.params["codes"] == "4x3" and cal.params["n_centroids"] == 8
    for books in (cal.a2ats, cal.vq):
        for cb in books.values():
            assert cb.sub.shape == (4, 8, D // 4) and cb.centroids is None
    assert all(np.array_equal(cb.L, np.eye(D)) for cb in cal.vq.values())
    cal1 = calibrate_from_samples(ls, q, k, pos, iters=3, codes="1x3")
    assert cal1.a2ats[(1, 0)].centroids.shape == (8, D) and cal1.params["codes"] == "1x3"


# -- the sidecar ---------------------------------------------------------------------------
def _cal(M, C=8, d=D, legacy=False):
    rng = np.random.default_rng(M)
    params = {"b": 2048, "w": 64, "s": 8, "n_centroids": C}
    if not legacy:
        params["codes"] = f"{M}x{int(np.log2(C))}"
    books, plain = {}, {}
    for g in range(2):
        L = _metric(rng, d).astype(np.float32)
        if M == 1:
            books[(5, g)] = Codebook(rng.standard_normal((C, d)).astype(np.float32), L)
            plain[(5, g)] = Codebook(rng.standard_normal((C, d)).astype(np.float32),
                                     np.eye(d, dtype=np.float32))
        else:
            books[(5, g)] = Codebook(None, L, rng.standard_normal((M, C, d // M)).astype(np.float32))
            plain[(5, g)] = Codebook(None, np.eye(d, dtype=np.float32),
                                     rng.standard_normal((M, C, d // M)).astype(np.float32))
    return Calibration(params=params, fingerprint="f" * 64, a2ats=books, vq=plain)


@pytest.mark.parametrize("M, legacy", [(1, True), (1, False), (2, False), (4, False)])
def test_sidecar_round_trips_every_layout(tmp_path, M, legacy):
    cal = _cal(M, legacy=legacy)
    p = tmp_path / "s.a2ats"
    cal.save(p)
    with np.load(p) as z:
        names = set(z.files)
    assert ("a2ats.5.0.C" in names) == (M == 1) and ("a2ats.5.0.P0" in names) == (M > 1)
    back = Calibration.load(p)
    assert back.params == cal.params
    for kind in ("a2ats", "vq"):
        for key, a in getattr(cal, kind).items():
            b = getattr(back, kind)[key]
            assert b.M == M and b.n_centroids == 8
            np.testing.assert_array_equal(a.L, b.L)
            if M == 1:
                np.testing.assert_array_equal(a.centroids, b.centroids)
            else:
                np.testing.assert_array_equal(a.sub, b.sub)
    # and the policy reads it
    ls = layers()
    books = {(i, g): back.a2ats[(5, g)] for i in FULL for g in range(G)}
    cal2 = Calibration(params=back.params, fingerprint="", a2ats=books)
    kv = make("a2ats", ls, budget=3, calib=cal2)
    seq, _ = run(kv, data(np.random.default_rng(0), 30), 20)
    assert kv.policy.codes[seq].shape[-1] == 256


def _rewrite(path, drop=(), replace=None, params=None):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k not in drop}
    arrays.update(replace or {})
    if params is not None:
        arrays["meta.params"] = np.array(repr(sorted(params.items())))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage, needle", [
    ("missing_subspace", "missing subspace P3"),
    ("extra_subspace", "subspace P4 beyond"),
    ("bad_split", "M * dsub == head dim"),
    ("uneven_subspaces", "M * dsub == head dim"),
    ("key_space_C_in_product", "key-space C"),
    ("subspace_in_single", "subspace member P0"),
    ("codes_vs_n_centroids", "needs n_centroids=16"),
    ("codes_not_a_layout", "parameter codes="),
    ("nan_subspace", "NaN"),
    ("centroid_count", "centroids, the parameters say"),
])
def test_sidecar_refuses_layouts_the_policy_cannot_read(tmp_path, damage, needle):
    cal = _cal(1 if damage == "subspace_in_single" else 4)
    p = tmp_path / "s.a2ats"
    cal.save(p)
    params = dict(cal.params)
    P = cal.a2ats[(5, 0)].sub
    if damage == "missing_subspace":
        _rewrite(p, drop=("a2ats.5.0.P3",))
    elif damage == "extra_subspace":
        _rewrite(p, replace={"a2ats.5.0.P4": P[0]})
    elif damage == "bad_split":     # 4 subspaces of 3 dims for 16-dim keys
        _rewrite(p, replace={f"a2ats.5.0.P{m}": P[m][:, :3] for m in range(4)})
    elif damage == "uneven_subspaces":
        _rewrite(p, replace={"a2ats.5.0.P1": P[1][:, :3]})
    elif damage == "key_space_C_in_product":
        _rewrite(p, replace={"a2ats.5.0.C": np.zeros((8, D), np.float32)})
    elif damage == "subspace_in_single":
        _rewrite(p, replace={"a2ats.5.0.P0": np.zeros((8, D), np.float32)})
    elif damage == "codes_vs_n_centroids":
        _rewrite(p, params=dict(params, codes="4x4"))
    elif damage == "codes_not_a_layout":
        _rewrite(p, params=dict(params, codes="four by three"))
    elif damage == "nan_subspace":
        bad = P[2].copy()
        bad[1, 1] = np.nan
        _rewrite(p, replace={"a2ats.5.0.P2": bad})
    else:       # every subspace with 4 centroids where the parameters say 8
        _rewrite(p, replace={f"a2ats.5.0.P{m}": P[m][:4] for m in range(4)})
    with pytest.raises(SidecarError) as e:
        Calibration.load(p)
    assert str(p) in str(e.value) and needle in str(e.value), str(e.value)


def test_sidecar_refuses_more_than_65536_centroids_per_subspace(tmp_path):
    cal = _cal(2, C=8, d=4)
    p = tmp_path / "s.a2ats"
    cal.save(p)
    _rewrite(p, replace={"a2ats.5.0.P0": np.zeros((65537, 2), np.float32)})
    with pytest.raises(SidecarError, match=r"\(65537, 2\)"):     # refused from the header
        Calibration.load(p)


def test_eval_counts_bytes_per_step():
    from a2ats_lite.evaluate import SelectionMetrics
    ls = layers()
    rng = np.random.default_rng(3)
    T = 80
    qkv = data(rng, T)
    cal = _cal(2)
    books = {(i, g): cal.a2ats[(5, g)] for i in FULL for g in range(G)}
    cal2 = Calibration(params=cal.params, fingerprint="", a2ats=books)
    for r in (1, 3):
        kv = make("a2ats", ls, budget=4, sinks=2, window=4, calib=cal2, rerank=r)
        sm = SelectionMetrics(kv)
        kv.observers.append(sm)
        seq, _ = run(kv, qkv, T - 1)            # one decode step, at T = 80
        b = sm.bytes_per_step()
        lo, hi = 2, T - 4
        assert b["bytes_codes"] == len(FULL) * G * (hi - lo) * 2 * 2        # M = 2, uint16
        assert b["bytes_lut"] == len(FULL) * G * GROUP * 2 * 8 * 4
        assert b["bytes_codebook"] == len(FULL) * G * 8 * D * 4
        rows = sum(len(kv.sel[(i, seq)][g]) for i in FULL for g in range(G))
        assert b["bytes_kv_rows"] == rows * D * 4 * 2
        assert b.get("bytes_rerank_keys", 0) == kv.policy.stats["reranked_rows"] * D * 4
        assert (b.get("bytes_rerank_keys", 0) > 0) == (r > 1)
        assert b["bytes_per_step"] == sum(v for k, v in b.items()
                                          if k not in ("bytes_per_step", "bytes_codebook"))


@pytest.mark.parametrize("rerank", [1, 3])
def test_product_codes_native_path_equals_the_numpy_reference(rerank):
    from kvutil import assert_native_selects_as_numpy
    rng = np.random.default_rng(23)
    qkv = data(rng, 90)
    books = {(i, g): train_codebook(rng.standard_normal((300, D)), rng.standard_normal((200, D)),
                                    8, iters=5, n_subspaces=4) for i in FULL for g in range(G)}
    cal = Calibration(params={"b": 2048, "w": 64, "s": 8, "n_centroids": 8, "codes": "4x3"},
                      fingerprint="", a2ats=books)
    assert_native_selects_as_numpy(layers(), lambda kv: run(kv, qkv, 70), budget=5, sinks=2,
                                   window=4, calib=cal, rerank=rerank)


def test_sidecar_rerank_is_the_policy_default(tmp_path):
    cal = _cal(2)
    ls = layers()
    books = {(i, g): cal.a2ats[(5, g)] for i in FULL for g in range(G)}
    for params, explicit, want in (({}, None, 1), ({"rerank": 2}, None, 2),
                                   ({"rerank": 2}, 1, 1), ({}, 4, 4)):
        c = Calibration(params=dict(cal.params, **params), fingerprint="", a2ats=books)
        kw = {} if explicit is None else {"rerank": explicit}
        assert make("a2ats", ls, budget=3, calib=c, **kw).policy.rerank == want
    cal.params["rerank"] = 2
    p = tmp_path / "s.a2ats"
    cal.save(p)
    assert Calibration.load(p).params["rerank"] == 2
    for bad in (0, 2.5, True, 5000):
        _rewrite(p, params=dict(cal.params, rerank=bad))
        with pytest.raises(SidecarError, match="parameter rerank="):
            Calibration.load(p)


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("M,C", [(1, 64), (4, 16), (8, 32)])
def test_stacked_assignment_equals_each_codebook(monkeypatch, M, C, chunked):
    """The CPU backend assigns a layer's keys for every KV head in stacked products
    (Codebook.stack): the codes are each book's assign_codes, bit for bit, whether keys come
    one at a time (decode) or many (prefill: one stacked product, or per book)."""
    from a2ats_lite.backend.cpu import HostCodeAssigner
    from a2ats_lite.vq.codebook import StackedCodebooks
    if chunked:     # every write but single keys through each book's own assign_codes
        monkeypatch.setattr(StackedCodebooks, "ROWS", 3 * M * C)
    rng = np.random.default_rng(40 + M)
    books = [train_codebook(rng.standard_normal((400, D)), rng.standard_normal((300, D)), C,
                            iters=3, n_subspaces=M) for _ in range(3)]
    keys = rng.standard_normal((700, 3, D)).astype(np.float32)
    codes = np.zeros((3, M, 800), np.uint16)
    assign = HostCodeAssigner(books)
    assign(keys[:600], codes, 0)
    for t in range(600, 700):
        assign(keys[t:t + 1], codes, t)
    for g, book in enumerate(books):
        np.testing.assert_array_equal(codes[g, :, :700], book.assign_codes(keys[:, g]).T)
    assert not codes[:, :, 700:].any()
    with pytest.raises(ValueError, match="one layout"):
        books[0].stack([books[0], train_codebook(rng.standard_normal((100, D)), None, 8, iters=1)])


def test_stacked_assignment_keeps_a_subclass_assign_codes():
    """A codebook class with its own assign_codes (the benches' random-fill codebooks) is
    called per head, not bypassed by the stacked products."""
    from a2ats_lite.backend.cpu import HostCodeAssigner

    class Fixed(Codebook):
        def assign_codes(self, keys, dtype=np.float32):
            return np.full((len(keys), self.M), 3, np.uint16)
    rng = np.random.default_rng(5)
    books = [Fixed(None, np.eye(D, dtype=np.float32), rng.standard_normal((2, 8, D // 2)).astype(np.float32))
             for _ in range(2)]
    codes = np.zeros((2, 2, 10), np.uint16)
    HostCodeAssigner(books)(rng.standard_normal((4, 2, D)).astype(np.float32), codes, 5)
    assert (codes[:, :, 5:9] == 3).all() and not codes[:, :, :5].any() and not codes[:, :, 9:].any()


def test_short_context_selects_everything_without_scoring(monkeypatch):
    """While every candidate fits the budget (a short context), a2ats takes every position
    without building a LUT or scoring codes (test_retrieval's budget-covers-everything test
    checks that this equals dense); past that, it scores."""
    ls = layers()
    qkv = data(np.random.default_rng(8), 20)
    kv = make("a2ats", ls, budget=6, sinks=2, window=4)
    built = []
    real = kv.policy.B.build_lut
    monkeypatch.setattr(kv.policy.B, "build_lut", lambda *a, **k: built.append(1) or real(*a, **k))
    seq, _ = run(kv, qkv, 8)                  # T <= 2 + 6 + 4 while decoding to position 11
    assert kv.length(seq) == 20
    first = len(built)
    kv2 = make("a2ats", ls, budget=6, sinks=2, window=4)
    monkeypatch.setattr(kv2.policy.B, "build_lut", lambda *a, **k: built.append(1) or real(*a, **k))
    run(kv2, [tuple(x[:12] for x in layer) for layer in qkv], 8)   # never past the budget
    assert len(built) == first and first > 0
