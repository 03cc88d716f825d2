"""Native A2ATS retrieval kernels (native/retrieval.c, select.c, topk.c, rerank.c,
sparse_attention.c) against float64 numpy references on fresh random data: the query-centroid LUT, top-K selection by LUT
scores (exact, ties to the smaller position), the fused gather + online-softmax
sparse attention and the exact scores, over host stores of every KV cache type
(f32, f16, q8_0 / q4_0 blocks, K and V of different types; the references use the
values the blocks hold, decoded by ggml's formulas in float64). Numeric tests run
with the AVX2 kernels and with the portable scalar code; bad inputs are refused
with nothing written."""
import os

import numpy as np
import pytest

from a2ats_lite import native
from a2ats_lite.errors import NativeError

from kvutil import selection_heads
from test_kv_quant import decode64


# ---- references ---------------------------------------------------------------------------
def ref_lut(q, cent):
    S, G, g, d = q.shape
    _, M, C, dsub = cent.shape
    return np.einsum("skjmx,kmcx->skjmc", q.reshape(S, G, g, M, dsub).astype(np.float64),
                     cent.astype(np.float64))


def ref_select(lut, codes, T, sinks, window, K):
    """list over (s, k) of the sorted selected positions (float32 scores summed in m order)."""
    S, G, g, M, C = lut.shape
    res = {}
    for s, k, lo, hi, t in selection_heads(S, G, T, sinks, window):
        if hi - lo <= K:
            picks = np.arange(lo, hi)
        else:
            cand = np.arange(lo, hi)
            picked = set()
            for j in range(g):
                sc = lut[s, k, j, 0, codes[s][k, 0, lo:hi]].astype(np.float32)
                for m in range(1, M):
                    sc = sc + lut[s, k, j, m, codes[s][k, m, lo:hi]]
                order = np.lexsort((cand, -sc))      # score desc, then position asc
                picked.update(cand[order[:K]].tolist())
            picks = np.array(sorted(picked), dtype=np.int64)
        res[s, k] = np.concatenate([np.arange(lo), picks, np.arange(hi, t)]).astype(np.int64)
    return res


def ref_attention(q, keys, values, idx, lens, scale):
    S, G, g, d = q.shape
    out = np.zeros((S, G, g, d))
    for s in range(S):
        for k in range(G):
            sel = idx[s, k, :lens[s, k]]
            if len(sel) == 0:
                continue
            sc = scale * q[s, k].astype(np.float64) @ keys[s][k, sel].astype(np.float64).T
            p = np.exp(sc - sc.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            out[s, k] = p @ values[s][k, sel].astype(np.float64)
    return out


def random_codes(rng, G, M, C, caps):
    return [rng.integers(0, C, (G, M, c), dtype=np.uint16) for c in caps]


# ---- LUT ----------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("C", [16, 256])
@pytest.mark.parametrize("S,g", [(1, 1), (3, 4), (2, 6)])
def test_build_lut(kernels, M, C, S, g):
    rng = np.random.default_rng([M, C, S, g])
    G, d = 3, 36                                   # d not a multiple of 8 (dsub 36, 18, 9)
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    cent = rng.standard_normal((G, M, C, d // M)).astype(np.float32)
    lut = native.build_lut(q, cent, n_threads=3)
    assert lut.shape == (S, G, g, M, C) and lut.dtype == np.float32
    ref = ref_lut(q, cent)
    np.testing.assert_allclose(lut, ref, rtol=1e-5, atol=1e-5)
    out = np.full_like(lut, np.nan)
    assert native.build_lut(q, cent, out=out) is out
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_build_lut_refuses_bad_input():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 2, 4, 36)).astype(np.float32)
    cent = rng.standard_normal((2, 4, 16, 9)).astype(np.float32)
    with pytest.raises(NativeError):
        native.build_lut(q, cent[:, :, :, :8])                  # M * dsub != d
    with pytest.raises(NativeError):
        native.build_lut(q, cent[:1])                           # G mismatch
    with pytest.raises(NativeError):
        native.build_lut(q.astype(np.float64), cent)            # dtype
    with pytest.raises(NativeError):
        native.build_lut(q[0], cent)                            # ndim
    out = np.zeros((1, 2, 4, 4, 15), np.float32)
    with pytest.raises(NativeError):
        native.build_lut(q, cent, out=out)
    assert not out.any()


# ---- selection ----------------------------------------------------------------------------
def check_selection(idx, lens, ref, S, G, sinks, window, K, g, T):
    lo = np.minimum(sinks, T)
    hi = np.maximum(lo, T - window)
    kmax = int((lo + np.minimum(K * g, hi - lo) + T - hi).max())
    assert idx.shape == (S, G, kmax) and idx.dtype == np.int64
    assert lens.shape == (S, G) and lens.dtype == np.int32
    for s in range(S):
        for k in range(G):
            n = int(lens[s, k])
            np.testing.assert_array_equal(idx[s, k, :n], ref[s, k], err_msg=f"s={s} k={k}")
            assert (idx[s, k, n:] == -1).all()


@pytest.mark.parametrize("M", [1, 2, 4])
@pytest.mark.parametrize("C", [16, 256])
@pytest.mark.parametrize("S,g", [(1, 1), (1, 4), (3, 1), (3, 4), (2, 6)])
def test_select_topk_random(kernels, M, C, S, g):
    rng = np.random.default_rng([M, C, S, g, 7])
    G = 3
    caps = [1000, 2300, 700][:S]
    T = np.array([997, 1711, 650][:S])
    lut = rng.standard_normal((S, G, g, M, C)).astype(np.float32)
    codes = random_codes(rng, G, M, C, caps)
    sinks, window, K = 4, 32, 37
    idx, lens = native.select_topk(lut, codes, T, sinks, window, K, n_threads=3)
    check_selection(idx, lens, ref_select(lut, codes, T, sinks, window, K), S, G, sinks, window,
                    K, g, T)


def score_lut(rng, kind: str, shape) -> np.ndarray:
    """LUT values of one distribution (M = 1: a token's score is its LUT entry exactly)."""
    x = rng.standard_normal(shape)
    if kind == "narrow":            # every score within a few ulps of 3.0: one linear bin
        return (np.float32(3.0) + rng.integers(-4, 5, shape) * np.float32(2.0 ** -22)).astype(np.float32)
    if kind == "tiny":              # subnormal differences: the range's reciprocal overflows
        return (rng.integers(0, 4, shape) * 1e-45).astype(np.float32)
    if kind == "huge":              # max - min overflows float32
        return (np.sign(x) * 3e38).astype(np.float32) * rng.random(shape).astype(np.float32)
    if kind == "inf":               # a few infinite scores of either sign
        v = x.astype(np.float32)
        v[rng.random(shape) < 0.05] = np.inf
        v[rng.random(shape) < 0.05] = -np.inf
        return v
    if kind == "constant":
        return np.full(shape, -1.5, np.float32)
    if kind == "skewed":            # one outlier and a dense cluster: the bins hold few scores
        v = (x * 1e-3).astype(np.float32)
        v.flat[::97] = 50.0
        return v
    return x.astype(np.float32)     # "normal"


@pytest.mark.parametrize("kind", ["normal", "narrow", "tiny", "huge", "inf", "constant", "skewed"])
def test_select_topk_score_distributions(kernels, rng, kind):
    """The top-K of float scores (native/topk.c: linear bins between min and max, the boundary
    bin refined on the float bits) equals the sort of every score, whatever their spread."""
    S, G, g, C = 2, 2, 4, 4096
    caps, T = [3000, 2100], np.array([2999, 2047])
    lut = score_lut(rng, kind, (S, G, g, 1, C))
    codes = [np.broadcast_to(np.arange(c, dtype=np.uint16) % C, (G, 1, c)).copy() for c in caps]
    for k in range(G):                              # a different order per head
        for s in range(S):
            codes[s][k, 0] = rng.permutation(codes[s][k, 0])
    for K in (1, 37, 500):
        idx, lens = native.select_topk(lut, codes, T, 4, 32, K, n_threads=2)
        check_selection(idx, lens, ref_select(lut, codes, T, 4, 32, K), S, G, 4, 32, K, g, T)


@pytest.mark.parametrize("kind", ["normal", "outlier", "integer"])
@pytest.mark.parametrize("g", [4, 6])
def test_select_topk_shipped_layout(kernels, kind, g):
    """The shipped 8x8 layout at a long candidate range: four heads' scores go straight to bins
    between bounds taken from the LUT (native/select.c), loose ones too (an outlier centroid
    puts nearly every score in a few bins) and integer LUTs (ties across and within bins): the
    selection equals the sort of every float32 score."""
    rng = np.random.default_rng([g, len(kind)])
    S, G, M, C = 1, 2, 8, 256
    caps, T = [20011], np.array([20003])
    lut = rng.standard_normal((S, G, g, M, C)).astype(np.float32)
    if kind == "outlier":
        lut[..., 3, 17] = 1e4
        lut[..., 5, 200] = -1e4
    elif kind == "integer":
        lut = rng.integers(-2, 3, lut.shape).astype(np.float32)
    codes = random_codes(rng, G, M, C, caps)
    for K in (1, 97, 2400):
        idx, lens = native.select_topk(lut, codes, T, 8, 64, K, n_threads=2)
        check_selection(idx, lens, ref_select(lut, codes, T, 8, 64, K), S, G, 8, 64, K, g, T)


@pytest.mark.parametrize("M", [1, 2])
@pytest.mark.parametrize("g", [1, 4])
def test_select_topk_ties_take_smaller_positions(kernels, M, g):
    """Integer-valued LUTs: most scores tie, the smaller positions must win exactly."""
    rng = np.random.default_rng([M, g, 11])
    S, G, C = 2, 2, 16
    caps = [5000, 3001]
    T = np.array([5000, 2999])
    lut = rng.integers(-3, 4, (S, G, g, M, C)).astype(np.float32)
    lut[0, 0] = 0.0                                  # every score equal: the first K win
    lut[1, 1, :, 0, :] = -0.0                        # -0 ties +0
    lut[1, 1, :, 0, ::2] = 0.0
    codes = random_codes(rng, G, M, C, caps)
    for K in (1, 5, 100, 1234):
        idx, lens = native.select_topk(lut, codes, T, 3, 8, K)
        ref = ref_select(lut, codes, T, 3, 8, K)
        check_selection(idx, lens, ref, S, G, 3, 8, K, g, T)
        np.testing.assert_array_equal(idx[0, 0, :lens[0, 0]],
                                      np.r_[0:3 + K, 4992:5000])


def test_select_topk_budget_covers_candidates(kernels):
    rng = np.random.default_rng(3)
    S, G, g, M, C = 3, 2, 4, 2, 16
    caps = [64, 100, 40]
    T = np.array([60, 30, 0])                        # T < sinks + window, and an empty sequence
    lut = rng.standard_normal((S, G, g, M, C)).astype(np.float32)
    codes = random_codes(rng, G, M, C, caps)
    idx, lens = native.select_topk(lut, codes, T, 8, 24, 28)   # hi - lo = 28 for s = 0
    assert lens.tolist() == [[60, 60], [30, 30], [0, 0]]
    assert idx.shape == (3, 2, 60)
    np.testing.assert_array_equal(idx[0, 1], np.arange(60))
    np.testing.assert_array_equal(idx[1, 0, :30], np.arange(30))
    assert (idx[1, :, 30:] == -1).all() and (idx[2] == -1).all()
    idx2, lens2 = native.select_topk(lut, codes, T, 8, 24, 2**70)           # huge budget
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_array_equal(lens2, lens)
    idx2, lens2 = native.select_topk(lut, codes, T, 2**70, 2**70, 5)      # all sinks
    assert lens2.tolist() == [[60, 60], [30, 30], [0, 0]]
    # a K just under the candidates: one candidate per head is dropped
    idx, lens = native.select_topk(lut, codes, T, 8, 24, 27)
    check_selection(idx, lens, ref_select(lut, codes, T, 8, 24, 27), S, G, 8, 24, 27, g, T)


def test_select_topk_given_outputs_and_wide_padding():
    rng = np.random.default_rng(4)
    S, G, g, M, C = 2, 2, 2, 1, 256
    caps, T = [500, 900], np.array([500, 800])
    lut = rng.standard_normal((S, G, g, M, C)).astype(np.float32)
    codes = random_codes(rng, G, M, C, caps)
    out_idx = np.full((S, G, 400), 77, np.int64)
    out_len = np.full((S, G), 5, np.int32)
    idx, lens = native.select_topk(lut, codes, T, 2, 10, 50, out_idx=out_idx, out_len=out_len)
    assert idx is out_idx and lens is out_len
    ref = ref_select(lut, codes, T, 2, 10, 50)
    for s in range(S):
        for k in range(G):
            n = lens[s, k]
            np.testing.assert_array_equal(idx[s, k, :n], ref[s, k])
            assert (idx[s, k, n:] == -1).all()
    with pytest.raises(NativeError):                 # too few columns
        native.select_topk(lut, codes, T, 2, 10, 50, out_idx=np.empty((S, G, 100), np.int64))


def test_select_topk_unscored_codes_are_not_read():
    """A code >= C in the sinks or window is never looked up: no error."""
    rng = np.random.default_rng(5)
    lut = rng.standard_normal((1, 1, 1, 1, 16)).astype(np.float32)
    codes = random_codes(rng, 1, 1, 16, [200])
    codes[0][0, 0, :4] = 999
    codes[0][0, 0, 150:] = 65535
    idx, lens = native.select_topk(lut, codes, [150], 4, 20, 10)
    assert lens[0, 0] == 4 + 10 + 20


def test_select_topk_refuses_bad_input():
    rng = np.random.default_rng(6)
    S, G, g, M, C = 2, 2, 2, 2, 16
    caps, T = [300, 400], np.array([300, 350])
    lut = rng.standard_normal((S, G, g, M, C)).astype(np.float32)
    codes = random_codes(rng, G, M, C, caps)
    out_idx = np.full((S, G, 100), 55, np.int64)
    out_len = np.full((S, G), 9, np.int32)

    def call(lut=lut, codes=codes, T=T, K=20, **kw):
        return native.select_topk(lut, codes, T, 4, 16, K, out_idx=out_idx, out_len=out_len, **kw)

    call()                                            # valid
    out_idx[:] = 55
    out_len[:] = 9
    bad = [c.copy() for c in codes]
    bad[1][1, 1, 200] = C                             # a scored code out of range
    with pytest.raises(NativeError, match="out of range"):
        call(codes=bad)
    with pytest.raises(NativeError):
        call(T=np.array([300, 401]))                  # T > capacity
    with pytest.raises(NativeError):
        call(T=np.array([-1, 10]))
    with pytest.raises(NativeError):
        call(codes=[c.astype(np.int32) for c in codes])
    with pytest.raises(NativeError):
        call(codes=codes[:1])
    with pytest.raises(NativeError):
        call(codes=[codes[0], codes[1][:, :1]])       # wrong M
    with pytest.raises(NativeError):
        call(codes=[codes[0], codes[1][:, :, ::2]])   # not contiguous
    with pytest.raises(NativeError):
        call(lut=lut.astype(np.float64))
    with pytest.raises(NativeError):
        call(lut=lut[:1])
    with pytest.raises(NativeError):
        call(K=0)
    with pytest.raises(NativeError):
        call(T=np.array([300.0, 350.0]))
    assert (out_idx == 55).all() and (out_len == 9).all()


def test_select_topk_32k_head_is_fast():
    import time
    rng = np.random.default_rng(8)
    n = 32768
    lut = rng.standard_normal((1, 1, 1, 1, 4096)).astype(np.float32)
    codes = [rng.integers(0, 4096, (1, 1, n), dtype=np.uint16)]
    native.select_topk(lut, codes, [n], 0, 0, 1000, n_threads=1)
    best = min(_timed(lambda: native.select_topk(lut, codes, [n], 0, 0, 1000, n_threads=1), time)
               for _ in range(5))
    assert best < 2e-3, best          # typically ~0.15 ms; loose for a busy machine


def _timed(f, time):
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


# ---- sparse attention ---------------------------------------------------------------------
def make_kv(rng, G, caps, d, dtype):
    keys = [rng.standard_normal((G, c, d)).astype(dtype) for c in caps]
    values = [rng.standard_normal((G, c, d)).astype(dtype) for c in caps]
    return keys, values


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("S,g", [(1, 1), (1, 4), (3, 4), (2, 6)])
@pytest.mark.parametrize("d", [36, 64])
def test_sparse_attention(kernels, dtype, S, g, d):
    rng = np.random.default_rng([S, g, d, np.dtype(dtype).itemsize])
    G, M, C = 2, 2, 16
    caps = [1500, 900, 1200][:S]
    T = np.array([1400, 900, 1000][:S])
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    keys, values = make_kv(rng, G, caps, d, dtype)
    lut = rng.standard_normal((S, G, g, M, C)).astype(np.float32)
    idx, lens = native.select_topk(lut, random_codes(rng, G, M, C, caps), T, 4, 64, 300)
    scale = 1.3 / np.sqrt(d)
    ref = ref_attention(q, keys, values, idx, lens, scale)
    for nt in (1, 4):                                 # 4 threads on S*G <= 6 pairs: split rows
        out = native.sparse_attention(q, keys, values, idx, lens, scale, n_threads=nt)
        assert out.shape == (S, G, g, d) and out.dtype == np.float32
        np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-5)


def test_sparse_attention_long_split_and_memmap(tmp_path, kernels):
    """One pair, a long selection split over threads; keys read from memory-mapped files."""
    rng = np.random.default_rng(12)
    G, g, d, cap = 1, 4, 64, 20000
    for dtype in (np.float16, np.float32):
        k = rng.standard_normal((G, cap, d)).astype(dtype)
        v = rng.standard_normal((G, cap, d)).astype(dtype)
        k.tofile(tmp_path / "k.bin")
        v.tofile(tmp_path / "v.bin")
        km = np.memmap(tmp_path / "k.bin", dtype=dtype, mode="r", shape=(G, cap, d))
        vm = np.memmap(tmp_path / "v.bin", dtype=dtype, mode="r", shape=(G, cap, d))
        q = (3 * rng.standard_normal((1, G, g, d))).astype(np.float32)   # peaked softmax
        idx = np.sort(rng.choice(cap, 9000, replace=False)).reshape(1, 1, -1).astype(np.int64)
        lens = np.array([[9000]], np.int32)
        ref = ref_attention(q, [k], [v], idx, lens, 0.125)
        for nt in (1, 3, 8):
            out = native.sparse_attention(q, [km], [vm], idx, lens, 0.125, n_threads=nt)
            np.testing.assert_allclose(out, ref, rtol=5e-5, atol=5e-5)


def test_sparse_attention_empty_and_short_selections(kernels):
    rng = np.random.default_rng(13)
    S, G, g, d = 2, 2, 3, 20
    keys, values = make_kv(rng, G, [50, 60], d, np.float32)
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    idx = np.full((S, G, 7), -1, np.int64)
    lens = np.array([[0, 1], [7, 2]], np.int32)
    idx[0, 1, 0] = 49
    idx[1, 0] = [59, 0, 3, 3, 10, 20, 30]            # repeated rows count twice
    idx[1, 1, :2] = [5, 6]
    out = native.sparse_attention(q, keys, values, idx, lens, 0.5)
    np.testing.assert_allclose(out, ref_attention(q, keys, values, idx, lens, 0.5),
                               rtol=2e-5, atol=2e-6)
    assert not out[0, 0].any()
    np.testing.assert_allclose(out[0, 1], np.broadcast_to(values[0][1, 49], (g, d)), rtol=1e-6)


def test_sparse_attention_refuses_bad_input():
    rng = np.random.default_rng(14)
    S, G, g, d = 2, 2, 2, 24
    caps = [100, 80]
    keys, values = make_kv(rng, G, caps, d, np.float32)
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    idx = rng.integers(0, 80, (S, G, 30)).astype(np.int64)
    lens = np.full((S, G), 30, np.int32)
    out = np.full((S, G, g, d), 7.0, np.float32)

    def call(q=q, keys=keys, values=values, idx=idx, lens=lens):
        return native.sparse_attention(q, keys, values, idx, lens, 0.2, out=out)

    for bad_at, bad in (((1, 1, 29), 80), ((0, 0, 0), -1), ((1, 0, 5), 2**40)):
        b = idx.copy()
        b[bad_at] = bad
        with pytest.raises(NativeError, match="out of range"):
            call(idx=b)
    b = idx.copy()
    b[1, 1, 29] = 80
    call(idx=b, lens=np.array([[30, 30], [30, 29]], np.int32))   # past lens: not read
    out[:] = 7.0
    with pytest.raises(NativeError):
        call(lens=np.array([[30, 31], [0, 0]], np.int32))         # lens > Kmax
    with pytest.raises(NativeError):
        call(lens=np.array([[30, -1], [0, 0]], np.int32))
    with pytest.raises(NativeError):
        call(lens=lens.astype(np.int64))
    with pytest.raises(NativeError):
        call(idx=idx.astype(np.int32))
    with pytest.raises(NativeError):
        call(values=[values[0], values[1].astype(np.float16)])      # mixed dtypes
    with pytest.raises(NativeError, match="rows of 24 values"):
        call(keys=[np.zeros((G, c, 10), np.uint8) for c in caps])   # not blocks of 24 values
    with pytest.raises(NativeError):
        call(keys=[keys[0], keys[1][:, :70]])                       # capacities differ from values
    with pytest.raises(NativeError):
        call(keys=[keys[0], keys[1][:, :, :20].copy()])             # wrong d
    with pytest.raises(NativeError):
        call(keys=[keys[0], keys[1][:, ::2]])                       # not contiguous
    with pytest.raises(NativeError):
        call(keys=keys[:1])
    with pytest.raises(NativeError):
        call(q=q.astype(np.float64))
    assert (out == 7.0).all()


# ---- exact scores -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_exact_scores(kernels, dtype):
    rng = np.random.default_rng(15)
    S, G, g, d = 3, 2, 4, 36
    caps = [700, 300, 1000]
    keys, _ = make_kv(rng, G, caps, d, dtype)
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    lo, hi = np.array([4, 0, 10]), np.array([650, 300, 10])
    sc = native.exact_scores(q, keys, lo, hi, n_threads=3)
    assert sc.shape == (S, G, g, 646)
    for s in range(S):
        n = hi[s] - lo[s]
        ref = np.einsum("kjd,ktd->kjt", q[s].astype(np.float64),
                        keys[s][:, lo[s]:hi[s]].astype(np.float64))
        np.testing.assert_allclose(sc[s, :, :, :n], ref, rtol=1e-5, atol=1e-5)
        assert np.isneginf(sc[s, :, :, n:]).all()
    with pytest.raises(NativeError):
        native.exact_scores(q, keys, lo, np.array([650, 301, 10]))
    with pytest.raises(NativeError):
        native.exact_scores(q, keys, np.array([4, 5, 10]), np.array([650, 3, 10]))
    wide = np.full((S, G, g, 700), 5.0, np.float32)
    assert native.exact_scores(q, keys, lo, hi, out=wide) is wide
    np.testing.assert_array_equal(wide[:, :, :, :646], sc)
    assert np.isneginf(wide[:, :, :, 646:]).all()
    with pytest.raises(NativeError):
        native.exact_scores(q, keys, lo, hi, out=np.empty((S, G, g, 600), np.float32))
    empty = native.exact_scores(q, keys, lo, lo)
    assert empty.shape == (S, G, g, 0)


# ---- exact re-rank ------------------------------------------------------------------------
def ref_rerank(q, keys, idx, lens, T, sinks, window, K):
    """{(s, k): sorted selection}: per head the top-K of q . k (float64; exact for the integer
    inputs used) among the selected candidates, ties to the smaller position, united."""
    S, G, g, _ = q.shape
    res = {}
    for s, k, lo, hi, t in selection_heads(S, G, T, sinks, window):
        sel = idx[s, k, :lens[s, k]]
        cand = sel[(sel >= lo) & (sel < hi)]
        if len(cand) > K:
            sc = q[s, k].astype(np.float64) @ keys[s][k, cand].astype(np.float64).T
            cand = np.array(sorted({int(c) for j in range(g)
                                    for c in cand[np.lexsort((cand, -sc[j]))[:K]]}), np.int64)
        res[s, k] = np.concatenate([np.arange(lo), cand, np.arange(hi, t)])
    return res


def random_selection(rng, S, G, T, kmax):
    """Sorted random subsets of [0, T[s]) padded with -1, as the selections return them."""
    idx = np.full((S, G, kmax), -1, np.int64)
    lens = np.zeros((S, G), np.int32)
    for s in range(S):
        for k in range(G):
            pick = np.flatnonzero(rng.random(int(T[s])) < 0.4)[:kmax]
            idx[s, k, :len(pick)], lens[s, k] = pick, len(pick)
    return idx, lens


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("g", [1, 3, 4])
def test_rerank(kernels, rng, dtype, g):
    """Small integers: every dot product is exact in float32, so ties are real ties."""
    S, G, d = 3, 2, 36
    caps, T = [300, 130, 50], np.array([300, 120, 10])
    keys = [rng.integers(-3, 4, (G, c, d)).astype(dtype) for c in caps]
    q = rng.integers(-2, 3, (S, G, g, d)).astype(np.float32)
    idx_in, lens_in = random_selection(rng, S, G, T, 200)
    for K in (1, 6, 1000):
        idx, lens, ncand = native.rerank(q, keys, idx_in, lens_in, T, 5, 7, K, n_threads=3)
        ref = ref_rerank(q, keys, idx_in, lens_in, T, 5, 7, K)
        for (s, k), want in ref.items():
            n = int(lens[s, k])
            np.testing.assert_array_equal(idx[s, k, :n], want)
            assert (idx[s, k, n:] == -1).all()
            sel = idx_in[s, k, :lens_in[s, k]]
            lo, hi = min(5, int(T[s])), max(min(5, int(T[s])), int(T[s]) - 7)
            assert ncand[s, k] == ((sel >= lo) & (sel < hi)).sum()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("g", [4, 5, 8])
def test_rerank_head_dim_64(kernels, rng, dtype, g):
    """The shipped shape (d = 64: two rows scored at once by a2n_dots_rows, heads in fours and
    a remainder) with real-valued scores, against float64: the float32 dots must order the
    candidates as float64 does wherever the scores are not within rounding of each other."""
    S, G, d = 2, 3, 64
    caps, T = [2000, 900], np.array([1999, 777])
    keys = [rng.standard_normal((G, c, d)).astype(dtype) for c in caps]
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    idx_in, lens_in = random_selection(rng, S, G, T, 1200)
    for K in (3, 40):
        idx, lens, _ = native.rerank(q, keys, idx_in, lens_in, T, 4, 16, K, n_threads=2)
        ref = ref_rerank(q, keys, idx_in, lens_in, T, 4, 16, K)
        for (s, k), want in ref.items():
            got = idx[s, k, :lens[s, k]]
            if not np.array_equal(got, want):   # only a near-tie at the K-th score may differ
                sel = idx_in[s, k, :lens_in[s, k]]
                sc = q[s, k].astype(np.float64) @ keys[s][k].astype(np.float64).T   # (g, cap)
                diff = np.setxor1d(got, want)
                lo, hi = min(4, int(T[s])), max(4, int(T[s]) - 16)
                cand = sel[(sel >= lo) & (sel < hi)]
                kth = np.sort(sc[:, cand], axis=1)[:, ::-1][:, K - 1:K]             # (g, 1)
                near = np.abs(sc[:, diff] - kth) <= 1e-4 * (1 + np.abs(kth))
                assert near.any(axis=0).all(), f"s={s} k={k}: {diff} not near a head's K-th score"


def test_rerank_refuses_bad_input(rng):
    S, G, g, d = 2, 2, 2, 8
    keys = [np.zeros((G, 64, d), np.float32), np.zeros((G, 32, d), np.float32)]
    q = np.zeros((S, G, g, d), np.float32)
    T = np.array([60, 30])
    idx, lens = random_selection(rng, S, G, T, 40)
    with pytest.raises(NativeError, match="outside"):
        native.rerank(q, keys, idx, lens, np.array([60, 33]), 1, 1, 3)
    with pytest.raises(NativeError, match="dtype"):
        native.rerank(q, [keys[0], keys[1].astype(np.float16)], idx, lens, T, 1, 1, 3)
    with pytest.raises(NativeError, match="lens must be"):
        native.rerank(q, keys, idx, lens[:1], T, 1, 1, 3)
    bad = lens.copy()
    bad[1, 1] = 41                                   # longer than idx holds
    with pytest.raises(NativeError, match="rerank"):
        native.rerank(q, keys, idx, bad, T, 1, 1, 3)
    wild = idx.copy()
    wild[0, 0, 0] = 1 << 40                          # outside [lo, hi): ignored, never read
    out = native.rerank(q, keys, wild, lens, T, 1, 1, 3)
    assert (out[0] < 60).all()


# ---- SIMD vs scalar -----------------------------------------------------------------------
def test_simd_and_scalar_agree():
    if not native.simd(True):
        pytest.skip("library compiled without AVX2")
    rng = np.random.default_rng(16)
    S, G, g, d, M, C = 2, 3, 4, 44, 4, 256
    caps, T = [3000, 2000], np.array([2990, 2000])
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    cent = rng.standard_normal((G, M, C, d // M)).astype(np.float32)
    codes = random_codes(rng, G, M, C, caps)
    keys, values = make_kv(rng, G, caps, d, np.float16)
    res = {}
    try:
        for mode in (True, False):
            native.simd(mode)
            lut = native.build_lut(q, cent)
            idx, lens = native.select_topk(lut, codes, T, 4, 64, 90)
            res[mode] = (lut, idx, lens, native.sparse_attention(q, keys, values, idx, lens, 0.15),
                         native.exact_scores(q, keys, np.array([0, 0]), T))
    finally:
        native.simd(True)
    np.testing.assert_allclose(res[True][0], res[False][0], rtol=1e-5, atol=1e-5)
    # same LUT -> bit-identical scores -> identical selection
    idx_s, lens_s = native.select_topk(res[True][0], codes, T, 4, 64, 90)
    native.simd(False)
    try:
        idx_c, lens_c = native.select_topk(res[True][0], codes, T, 4, 64, 90)
    finally:
        native.simd(True)
    np.testing.assert_array_equal(idx_s, idx_c)
    np.testing.assert_array_equal(lens_s, lens_c)
    if np.array_equal(res[True][1], res[False][1]):
        np.testing.assert_allclose(res[True][3], res[False][3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(res[True][4], res[False][4], rtol=1e-5, atol=1e-5)


def test_thread_count_is_cached(monkeypatch):
    native.n_threads_default.cache_clear()
    try:
        monkeypatch.setenv("A2ATS_THREADS", "3")
        assert native.n_threads_default() == 3
        monkeypatch.setenv("A2ATS_THREADS", "5")
        assert native.n_threads_default() == 3          # read once, at first use
        native.n_threads_default.cache_clear()
        monkeypatch.setenv("A2ATS_THREADS", "many")
        with pytest.raises(NativeError, match="A2ATS_THREADS"):
            native.n_threads_default()
        monkeypatch.delenv("A2ATS_THREADS")
        assert native.n_threads_default() == (os.cpu_count() or 1)
    finally:
        native.n_threads_default.cache_clear()


def test_concurrent_calls_from_python_threads():
    """Calls from several Python threads at once (the pool serves one, the others run on
    their own thread with their own scratch) give the serial results."""
    import threading
    rng = np.random.default_rng(17)
    S, G, g, d, M, C = 2, 4, 4, 32, 1, 256
    caps, T = [4000, 3000], np.array([3900, 2500])
    lut = rng.standard_normal((S, G, g, M, C)).astype(np.float32)
    codes = random_codes(rng, G, M, C, caps)
    keys, values = make_kv(rng, G, caps, d, np.float16)
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    Ks = [50, 120, 300, 700]
    expect = []
    for K in Ks:
        idx, lens = native.select_topk(lut, codes, T, 4, 32, K, n_threads=1)
        expect.append((idx, lens, native.sparse_attention(q, keys, values, idx, lens, 0.2, n_threads=1)))
    errors = []

    def work(i):
        try:
            for _ in range(15):
                idx, lens = native.select_topk(lut, codes, T, 4, 32, Ks[i], n_threads=2)
                out = native.sparse_attention(q, keys, values, idx, lens, 0.2, n_threads=2)
                assert np.array_equal(idx, expect[i][0]) and np.array_equal(lens, expect[i][1])
                np.testing.assert_allclose(out, expect[i][2], rtol=1e-5, atol=1e-5)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(Ks))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_gather_sel(dtype):
    """The GPU path's staging copy: every (sequence, head)'s selected rows in one call, rows
    past lens untouched; a bad index or a wrong out buffer refused with nothing copied."""
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    S, G, d, kmax = 3, 2, 24, 9
    caps = (17, 40, 9)
    keys = [rng.standard_normal((G, c, d)).astype(dtype) for c in caps]
    vals = [rng.standard_normal((G, c, d)).astype(dtype) for c in caps]
    idx = np.full((S, G, kmax), -1, np.int64)
    lens = np.zeros((S, G), np.int32)
    for s in range(S):
        for k in range(G):
            n = int(rng.integers(0, min(kmax, caps[s]) + 1))
            idx[s, k, :n] = rng.choice(caps[s], n, replace=False)
            lens[s, k] = n
    ko = np.full((S, G, kmax, d), 7, dtype)
    vo = np.full((S, G, kmax, d), 7, dtype)
    native.gather_sel(keys, vals, idx, lens, ko, vo)
    for s in range(S):
        for k in range(G):
            n = lens[s, k]
            np.testing.assert_array_equal(ko[s, k, :n], keys[s][k, idx[s, k, :n]])
            np.testing.assert_array_equal(vo[s, k, :n], vals[s][k, idx[s, k, :n]])
            assert (ko[s, k, n:] == 7).all() and (vo[s, k, n:] == 7).all()
    lens[1, 0] = max(1, lens[1, 0])
    idx[1, 0, 0] = caps[1]
    ko[...] = 7
    with pytest.raises(NativeError, match="out of range"):
        native.gather_sel(keys, vals, idx, lens, ko, vo)
    assert (ko == 7).all()
    with pytest.raises(NativeError, match="kout"):
        native.gather_sel(keys, vals, idx, lens, ko[:, :, :-1], vo)


# ---- quantized host stores ----------------------------------------------------------------
QPAIRS = [("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16"), ("f32", "q4_0"), ("q4_0", "q8_0")]


def store(rng, G, cap, d, t, x=None):
    """A host store array (G, cap, width) of KV cache type t from float32 x (random when None)
    and the float64 values it holds (blocks decoded by ggml's formulas, from the layout)."""
    x = rng.standard_normal((G, cap, d)).astype(np.float32) if x is None else x
    if t in ("f32", "f16"):
        a = x.astype(np.float32 if t == "f32" else np.float16)
        return a, a.astype(np.float64)
    a = native.kv_quantize(x, t)
    return a, decode64(a.reshape(-1, a.shape[-1] // (d // 32)), t)[0].reshape(G, cap, d)


def stores(rng, G, caps, d, kt, vt):
    """Per sequence K of type kt and V of type vt: (keys, their float64 values, values, theirs)."""
    ks = [store(rng, G, c, d, kt) for c in caps]
    vs = [store(rng, G, c, d, vt) for c in caps]
    return [a for a, _ in ks], [h for _, h in ks], [a for a, _ in vs], [h for _, h in vs]


@pytest.mark.parametrize("kt,vt", QPAIRS)
@pytest.mark.parametrize("S,g,d", [(1, 4, 256), (3, 4, 64), (2, 2, 32)])
def test_sparse_attention_over_quantized_stores(kernels, rng, kt, vt, S, g, d):
    """Blocks read in place (a row decoded as it is selected): the float64 reference of the
    decoded rows, one thread and split over threads."""
    G, M, C = 2, 2, 16
    caps = [1500, 900, 1200][:S]
    T = np.array([1400, 900, 1000][:S])
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    keys, k64, values, v64 = stores(rng, G, caps, d, kt, vt)
    lut = rng.standard_normal((S, G, g, M, C)).astype(np.float32)
    idx, lens = native.select_topk(lut, random_codes(rng, G, M, C, caps), T, 4, 64, 300)
    scale = 1.3 / np.sqrt(d)
    ref = ref_attention(q, k64, v64, idx, lens, scale)
    for nt in (1, 4):
        out = native.sparse_attention(q, keys, values, idx, lens, scale, n_threads=nt)
        np.testing.assert_allclose(out, ref, rtol=3e-5, atol=3e-5)
    bad = idx.copy()
    bad[S - 1, 1, lens[S - 1, 1] - 1] = caps[S - 1]
    with pytest.raises(NativeError, match="out of range"):
        native.sparse_attention(q, keys, values, bad, lens, scale)


@pytest.mark.parametrize("t", ["q8_0", "q4_0"])
def test_exact_scores_over_quantized_stores(kernels, rng, t):
    S, G, g, d = 3, 2, 4, 64
    caps = [700, 300, 1000]
    keys, k64 = zip(*(store(rng, G, c, d, t) for c in caps))
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    lo, hi = np.array([4, 0, 10]), np.array([650, 300, 10])
    sc = native.exact_scores(q, list(keys), lo, hi, n_threads=3)
    for s in range(S):
        ref = np.einsum("kjd,ktd->kjt", q[s].astype(np.float64), k64[s][:, lo[s]:hi[s]])
        np.testing.assert_allclose(sc[s, :, :, :hi[s] - lo[s]], ref, rtol=1e-5, atol=1e-4)
        assert np.isneginf(sc[s, :, :, hi[s] - lo[s]:]).all()
    with pytest.raises(NativeError):
        native.exact_scores(q, list(keys), lo, np.array([650, 301, 10]))


def exact_block_keys(rng, G, cap, d, t):
    """Keys of small integers that a store of type t holds exactly: each 32-value block starts
    with 127/32 (q8_0: scale 1/32) or -4 (q4_0: scale 1/2), so every q . k is exact in float32
    and ties are real ties."""
    x = rng.integers(-3, 4, (G, cap, d)).astype(np.float32)
    x[..., ::32] = -4.0 if t == "q4_0" else 127 / 32
    return x


@pytest.mark.parametrize("t", ["q8_0", "q4_0"])
@pytest.mark.parametrize("g", [1, 4])
def test_rerank_over_quantized_stores(kernels, rng, t, g):
    S, G, d = 3, 2, 64
    caps, T = [300, 130, 50], np.array([300, 120, 10])
    floats = [exact_block_keys(rng, G, c, d, t) for c in caps]
    keys = []
    for x in floats:
        a, held = store(rng, G, x.shape[1], d, t, x)
        assert np.array_equal(held, x)                      # the blocks hold the integers
        keys.append(a)
    q = rng.integers(-2, 3, (S, G, g, d)).astype(np.float32)
    idx_in, lens_in = random_selection(rng, S, G, T, 200)
    for K in (1, 6, 1000):
        idx, lens, _ = native.rerank(q, keys, idx_in, lens_in, T, 5, 7, K, n_threads=3)
        for (s, k), want in ref_rerank(q, floats, idx_in, lens_in, T, 5, 7, K).items():
            np.testing.assert_array_equal(idx[s, k, :lens[s, k]], want)


@pytest.mark.parametrize("kt,vt", QPAIRS)
def test_gather_sel_over_quantized_stores(rng, kt, vt):
    """Rows as stored (blocks copied whole), or decoded to float32: exactly the values held."""
    S, G, d, kmax = 2, 2, 64, 9
    caps = (17, 40)
    keys, k64, vals, v64 = stores(rng, G, caps, d, kt, vt)
    idx, lens = random_selection(rng, S, G, np.array(caps), kmax)
    ko, vo = native.gather_sel(keys, vals, idx, lens, d=d)
    kf = np.full((S, G, kmax, d), 7, np.float32)
    vf = np.full((S, G, kmax, d), 7, np.float32)
    native.gather_sel(keys, vals, idx, lens, kf, vf, d=d, decode=True)
    assert ko.shape[-1] == native.kv_row_width(kt, d) and vo.shape[-1] == native.kv_row_width(vt, d)
    for s in range(S):
        for k in range(G):
            sel = idx[s, k, :lens[s, k]]
            assert np.array_equal(ko[s, k, :len(sel)], keys[s][k, sel])
            assert np.array_equal(vo[s, k, :len(sel)], vals[s][k, sel])
            assert np.array_equal(kf[s, k, :len(sel)], k64[s][k, sel])
            assert np.array_equal(vf[s, k, :len(sel)], v64[s][k, sel])
            assert (kf[s, k, len(sel):] == 7).all() and (vf[s, k, len(sel):] == 7).all()
    if kt in native.KV_BLOCKS:
        with pytest.raises(NativeError, match="head dim"):
            native.gather_sel(keys, vals, idx, lens)
    idx[1, 0, 0], lens[1, 0] = caps[1], max(1, lens[1, 0])
    kf[...] = 7
    with pytest.raises(NativeError, match="out of range"):
        native.gather_sel(keys, vals, idx, lens, kf, vf, d=d, decode=True)
    assert (kf == 7).all()


@pytest.mark.parametrize("t", ["f32", "f16", "q8_0", "q4_0"])
def test_kv_gather_decodes_only_the_rows_asked(rng, t):
    d = 96
    a, held = store(rng, 1, 50, d, t)
    idx = np.array([49, 0, 7, 7])
    got = native.kv_gather(a[0], idx, d)
    assert got.dtype == np.float32 and np.array_equal(got, held[0, idx])
    assert native.kv_gather(a[0], [], d).shape == (0, d)
    with pytest.raises(NativeError, match="out of range"):
        native.kv_gather(a[0], [50], d)
    with pytest.raises(NativeError):
        native.kv_gather(a[0][:, :-1], [0], d)
