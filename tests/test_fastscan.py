"""Fast-scan selection of 4-bit product codes (native/fastscan.c): the block layout against
FAISS's bbs=32 packing written out here, the 8-bit LUT quantization against numpy float32 and
float64, and the selection equal to the exact top-K of its own quantized integer scores (a
numpy reference that quantizes the same way and sorts), on fresh random inputs with odd
sizes, ties, budgets over the candidate count, several sequences and GQA groups of 1 to 8,
with the AVX2 kernels and the portable code. The policy-level fast path is in
test_fastscan_policy.py."""
import numpy as np
import pytest

from a2ats_lite import native
from a2ats_lite.backend import scoring
from a2ats_lite.errors import NativeError

from kvutil import selection_heads


def faiss_pack(codes, n_blocks):
    """FAISS's pq4_pack_codes (bbs = 32) for one KV head: codes (n, M) -> (n_blocks, M/2, 32)."""
    n, M = codes.shape
    perm0 = [0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15]
    full = np.zeros((n_blocks * 32, M), np.uint8)
    full[:n] = codes
    out = np.zeros((n_blocks, M // 2, 32), np.uint8)
    for b in range(n_blocks):
        c = full[b * 32:(b + 1) * 32]
        for sq in range(0, M, 2):
            for j in range(16):
                out[b, sq // 2, j] = c[perm0[j], sq] | (c[perm0[j] + 16, sq] << 4)
                out[b, sq // 2, j + 16] = c[perm0[j], sq + 1] | (c[perm0[j] + 16, sq + 1] << 4)
    return out


def packed(rng, G, M, caps, T=None):
    """(uint16 codes (G, M, cap) per sequence, the same packed) with random codes < 16."""
    raw = [rng.integers(0, 16, (G, M, c), dtype=np.uint16) for c in caps]
    blocks = []
    for r, c in zip(raw, caps):
        b = np.zeros((G, -(-c // 32), M // 2, 32), np.uint8)
        native.fastscan_pack(r, b, 0)
        blocks.append(b)
    return raw, blocks


def ref_select(lut, raw, T, sinks, window, K):
    """{(s, k): sorted selection} with the scores of the LUT quantized in numpy (float32)."""
    S, G, g, M, _ = lut.shape
    q = scoring.fastscan_quantize_lut(lut)[0].astype(np.int64)        # (S, G, g, M, 16)
    res = {}
    for s, k, lo, hi, t in selection_heads(S, G, T, sinks, window):
        cand = np.arange(lo, hi)
        if hi - lo <= K:
            picks = cand
        else:
            picked = set()
            for j in range(g):
                sc = sum(q[s, k, j, m, raw[s][k, m, lo:hi]] for m in range(M))
                picked.update(cand[np.lexsort((cand, -sc))[:K]].tolist())
            picks = np.array(sorted(picked), dtype=np.int64)
        res[s, k] = np.concatenate([np.arange(lo), picks, np.arange(hi, t)])
    return res


def check(idx, lens, ref):
    for (s, k), want in ref.items():
        n = int(lens[s, k])
        np.testing.assert_array_equal(idx[s, k, :n], want, err_msg=f"(s={s}, k={k})")
        assert (idx[s, k, n:] == -1).all()


# ---- layout -------------------------------------------------------------------------------
@pytest.mark.parametrize("M", [2, 4, 16, 32])
def test_pack_is_faiss_bbs32_layout(rng, M):
    G, n = 3, 77
    codes = rng.integers(0, 16, (G, M, n), dtype=np.uint16)
    blocks = np.zeros((G, 3, M // 2, 32), np.uint8)
    native.fastscan_pack(codes, blocks, 0)
    for k in range(G):
        np.testing.assert_array_equal(blocks[k], faiss_pack(codes[k].T, 3))
    np.testing.assert_array_equal(scoring.fastscan_unpack(blocks, 0, n), codes)
    mine = np.zeros_like(blocks)
    scoring.fastscan_pack(codes, mine, 0)
    np.testing.assert_array_equal(mine, blocks)


def test_pack_in_pieces_keeps_the_other_tokens(rng):
    """Tokens written one at a time or in odd chunks at odd offsets (decode appends) give the
    blocks of one write, and never touch other tokens' nibbles."""
    G, M, n = 2, 8, 101
    codes = rng.integers(0, 16, (G, M, n), dtype=np.uint16)
    whole = np.zeros((G, 4, M // 2, 32), np.uint8)
    native.fastscan_pack(codes, whole, 0)
    parts = np.full_like(whole, 0xAB)           # garbage first: every nibble is rewritten
    numpy_parts = parts.copy()
    cuts = [0, 1, 2, 17, 31, 32, 33, 60, 64, 100, 101]
    for a, b in zip(cuts, cuts[1:]):
        native.fastscan_pack(codes[:, :, a:b], parts, a)
        scoring.fastscan_pack(codes[:, :, a:b], numpy_parts, a)
    np.testing.assert_array_equal(scoring.fastscan_unpack(parts, 0, n), codes)
    np.testing.assert_array_equal(parts, numpy_parts)
    # tokens past n kept the garbage's nibbles (0xA high / 0xB low)
    rest = scoring.fastscan_unpack(parts, n, 128)
    assert set(np.unique(rest)) <= {0xA, 0xB}


def test_pack_refuses_bad_input():
    blocks = np.zeros((2, 2, 4, 32), np.uint8)
    ok = np.zeros((2, 8, 5), np.uint16)
    native.fastscan_pack(ok, blocks, 59)
    bad = ok.copy()
    bad[1, 7, 4] = 16
    with pytest.raises(NativeError, match="index"):
        native.fastscan_pack(bad, blocks, 0)
    assert not blocks.any()                      # nothing written
    with pytest.raises(NativeError, match="beyond the capacity"):
        native.fastscan_pack(ok, blocks, 60)
    with pytest.raises(NativeError, match="even number"):
        native.fastscan_pack(np.zeros((2, 3, 5), np.uint16), np.zeros((2, 2, 1, 32), np.uint8), 0)
    with pytest.raises(NativeError, match="blocks must be"):
        native.fastscan_pack(ok, np.zeros((2, 2, 8, 32), np.uint8), 0)
    with pytest.raises(NativeError, match="codes must be uint16"):
        native.fastscan_pack(ok.astype(np.int32), blocks, 0)


# ---- LUT quantization ---------------------------------------------------------------------
@pytest.mark.parametrize("M", [2, 16, 32])
def test_quantize_lut_against_float32_and_float64(rng, M):
    lut = (rng.standard_normal((5, 3, M, 16)) * rng.uniform(0.01, 10, (5, 3, M, 1))).astype(np.float32)
    lut[0, 0] = 0.25                              # a constant row: scale 0, every entry 0
    q, a, b = native.fastscan_quantize_lut(lut)
    rq, ra, rb = scoring.fastscan_quantize_lut(lut)
    np.testing.assert_array_equal(q, rq)          # the same float32 operations
    np.testing.assert_array_equal(a, ra)
    np.testing.assert_allclose(b, rb, rtol=1e-5, atol=1e-5)
    assert a[0, 0] == 0 and not q[0, 0].any() and b[0, 0] == np.float32(0.25 * M)
    # against float64 (the rows with a span): every entry within half a step (plus float32
    # rounding) of the true value
    L, q1, a1, b1 = lut.reshape(-1, M, 16)[1:].astype(np.float64), q.reshape(-1, M, 16)[1:], \
        a.reshape(-1)[1:], b.reshape(-1)[1:]
    lo = L.min(-1, keepdims=True)
    a64 = 255.0 / (L.max(-1, keepdims=True) - lo).max(-2, keepdims=True)
    np.testing.assert_allclose(a1, a64[:, 0, 0], rtol=1e-6)
    assert (np.abs(q1 / a64 + lo - L) * a64 <= 0.5 + 1e-3).all()
    # the score of a token is the integer sum: sum(q) / a + b approximates the float sum
    codes = rng.integers(0, 16, (M, 50))
    approx = sum(q1[:, m, codes[m]].astype(np.int64) for m in range(M)) / a1[:, None] + b1[:, None]
    exact = sum(L[:, m, codes[m]] for m in range(M))
    assert (np.abs(approx - exact) <= (0.5 + 1e-3) * M / a1[:, None] + 1e-5 * np.abs(exact).max()).all()
    # the largest span maps to 255 exactly, every minimum to 0
    assert (q.max(axis=(-1, -2))[a > 0] == 255).all() and (q.min(-1) == 0).all()


def test_quantize_lut_non_finite_is_deterministic():
    lut = np.zeros((2, 2, 16), np.float32)
    lut[0, 0, 3] = np.inf
    lut[1, 1, 5] = np.nan
    q, a, _ = native.fastscan_quantize_lut(lut)
    assert a[0] == 0 and not q[0].any()           # an infinite span: scale 0
    assert not q[1].any()                         # the NaN entry is skipped: spans 0 elsewhere


# ---- selection ----------------------------------------------------------------------------
@pytest.mark.parametrize("g", [1, 2, 4, 8])
@pytest.mark.parametrize("M", [2, 16, 32])
def test_select_equals_sorted_quantized_scores(kernels, rng, g, M):
    S, G = 3, 2
    caps = [301, 1024, 77]                       # capacities rounded up to whole blocks
    T = np.array([301, 999, 70])
    raw, blocks = packed(rng, G, M, caps)
    lut = rng.standard_normal((S, G, g, M, 16)).astype(np.float32)
    for K in (1, 7, 40, 1000):                   # 1000: over every candidate count
        idx, lens = native.fastscan_select(lut, blocks, T, 8, 16, K)
        check(idx, lens, ref_select(lut, raw, T, 8, 16, K))


@pytest.mark.parametrize("g", [1, 4])
def test_select_ties_take_smaller_positions(kernels, rng, g):
    """A LUT of few distinct values: most scores tie, and the K-th largest is shared by many."""
    S, G, M = 2, 3, 4
    caps, T = [257, 100], np.array([257, 100])
    raw, blocks = packed(rng, G, M, caps)
    lut = rng.integers(0, 3, (S, G, g, M, 16)).astype(np.float32)
    for K in (1, 5, 33, 90):
        idx, lens = native.fastscan_select(lut, blocks, T, 3, 5, K)
        check(idx, lens, ref_select(lut, raw, T, 3, 5, K))
    flat = np.zeros_like(lut)                    # every score equal: the first K
    idx, lens = native.fastscan_select(flat, blocks, T, 3, 5, 10)
    np.testing.assert_array_equal(idx[0, 0, :lens[0, 0]],
                                  np.concatenate([np.arange(13), np.arange(252, 257)]))


def test_select_short_and_empty_sequences(kernels, rng):
    M, G, g = 16, 2, 4
    caps = [32, 64, 96, 0]
    T = np.array([0, 9, 80, 0])                  # empty, inside sinks+window, scored, no codes
    raw, blocks = packed(rng, G, M, caps)
    lut = rng.standard_normal((4, G, g, M, 16)).astype(np.float32)
    idx, lens = native.fastscan_select(lut, blocks, T, 8, 8, 5)
    check(idx, lens, ref_select(lut, raw, T, 8, 8, 5))
    assert lens[0].tolist() == [0, 0] and lens[1].tolist() == [9, 9]


def test_simd_and_scalar_agree_on_long_sequences(rng):
    if not native.simd(True):
        pytest.skip("library compiled without AVX2")
    M, G, g = 16, 2, 4
    raw, blocks = packed(rng, G, M, [20000, 5003])
    T = np.array([19999, 5003])
    lut = rng.standard_normal((2, G, g, M, 16)).astype(np.float32)
    a = native.fastscan_select(lut, blocks, T, 8, 64, 600)
    native.simd(False)
    try:
        b = native.fastscan_select(lut, blocks, T, 8, 64, 600)
    finally:
        native.simd(True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    check(*a, ref_select(lut, raw, T, 8, 64, 600))


def test_select_threads_do_not_change_the_result(rng):
    M, G, g = 8, 8, 4
    raw, blocks = packed(rng, G, M, [3000, 2000, 1000])
    T = np.array([3000, 1999, 1000])
    lut = rng.standard_normal((3, G, g, M, 16)).astype(np.float32)
    one = native.fastscan_select(lut, blocks, T, 8, 64, 90, n_threads=1)
    many = native.fastscan_select(lut, blocks, T, 8, 64, 90, n_threads=3)
    np.testing.assert_array_equal(one[0], many[0])
    np.testing.assert_array_equal(one[1], many[1])


def test_select_refuses_bad_input(rng):
    M, G, g = 4, 2, 2
    raw, blocks = packed(rng, G, M, [64])
    lut = rng.standard_normal((1, G, g, M, 16)).astype(np.float32)
    T = np.array([60])
    with pytest.raises(NativeError, match="16 centroids"):
        native.fastscan_select(np.zeros((1, G, g, M, 8), np.float32), blocks, T, 1, 1, 3)
    with pytest.raises(NativeError, match="even number"):
        native.fastscan_select(np.zeros((1, G, g, 3, 16), np.float32), blocks, T, 1, 1, 3)
    with pytest.raises(NativeError, match="outside"):
        native.fastscan_select(lut, blocks, np.array([65]), 1, 1, 3)
    with pytest.raises(NativeError, match="shape"):
        native.fastscan_select(lut, [np.ascontiguousarray(blocks[0][:, :, :1])], T, 1, 1, 3)
    with pytest.raises(NativeError, match="K >= 1"):
        native.fastscan_select(lut, blocks, T, 1, 1, 0)
    with pytest.raises(NativeError, match="out_idx"):
        native.fastscan_select(lut, blocks, T, 1, 1, 3, out_idx=np.zeros((1, G, 3), np.int64))
    with pytest.raises(NativeError, match="float32"):
        native.fastscan_select(lut.astype(np.float64), blocks, T, 1, 1, 3)


def test_numpy_backend_path_equals_native(rng):
    """The CPU backend's numpy reference (native_retrieval=False) selects what the kernel does."""
    from a2ats_lite.backend.cpu import CPUBackend
    M, G, g = 16, 2, 4
    raw, blocks = packed(rng, G, M, [700, 300])
    T = np.array([700, 290])
    lut = rng.standard_normal((2, G, g, M, 16)).astype(np.float32)
    a = CPUBackend(native_retrieval=True).select_fastscan(lut, blocks, T, 8, 64, 25)
    b = CPUBackend(native_retrieval=False).select_fastscan(lut, blocks, T, 8, 64, 25)
    for s in range(2):
        for k in range(G):
            np.testing.assert_array_equal(a[0][s, k, :a[1][s, k]], b[0][s, k, :b[1][s, k]])
