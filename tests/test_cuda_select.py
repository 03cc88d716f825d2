"""kernels/select_topk.cu (A2ATS top-K selection) on the CPU shim, against
CPUBackend(native_retrieval=False).select_topk: every row must be EXACTLY equal (same positions,
same order, same length), then -1 up to Kmax. Fresh random inputs (seed printed; pin one with
A2ATS_TEST_SEED=N); idx/lens are poisoned with 0x7fffffff and the scratch with garbage before
every launch.

Covered: M in {1, 2, 4} x C in {4096, 256, 16}; g in {1, 2, 4}; G in {1, 2}; three sequences of
different T and different code-buffer lengths in one launch; T = 0, 1, sinks, sinks + window,
candidates just below / at / above k, hundreds to ~3000 tokens; sinks 0, window 0; heavy ties
(small-integer LUTs, an all-equal LUT) for the earlier-token rule; -0.0 vs +0.0 (same score, as
in numpy) and denormals; the LUT read from shared or global memory; block sizes 32 .. 1024;
the error flag for a too small Kmax (nothing written past it), a code >= C, a too small scratch.
"""
from __future__ import annotations


import numpy as np
import pytest

from a2ats_lite.backend.cpu import CPUBackend
from cuda_shim import shim_module

SENT = 0x7FFFFFFF
i32 = np.int32
REF = CPUBackend(native_retrieval=False)
def kernel():
    return shim_module("select_topk").get_function("select_topk_lut")


def make_codes(rng, G, M, C, n_ctx):
    """One contiguous uint16 (G, M, n_ctx_s) buffer per sequence."""
    return [np.ascontiguousarray(rng.integers(0, C, (G, M, n), dtype=np.uint16)) for n in n_ctx]


def launch(lut, codes, T, sinks, window, k, *, block=256, lut_smem=True, Kmax=None, cap=None,
           guard=0):
    """Run the kernel; returns (idx (S, G, Kmax), lens (S, G), err, idx guard tail)."""
    S, G, g, M, C = lut.shape
    T = np.asarray(T, dtype=np.int32)
    Tmax = max(1, int(T.max()))
    Kmax = Tmax if Kmax is None else Kmax
    cap = Tmax if cap is None else cap
    code_ptr = np.array([c.ctypes.data for c in codes], dtype=np.uint64)
    code_stride = np.array([c.shape[2] for c in codes], dtype=np.int64)
    keys = np.full((S, G, cap), 0xDEADBEEF, dtype=np.uint32)
    flags = np.full((S, G, cap), 0xAB, dtype=np.uint8)
    buf = np.full(S * G * Kmax + guard, SENT, dtype=np.int32)     # guard: never written
    idx = buf[:S * G * Kmax].reshape(S, G, Kmax)
    lens = np.full((S, G), SENT, dtype=np.int32)
    err = np.zeros(1, dtype=np.int32)
    kernel()((G, S), (block,),
             (lut, code_ptr, code_stride, T, i32(g), i32(M), i32(C), i32(sinks), i32(window),
              i32(k), i32(Kmax), i32(cap), i32(1 if lut_smem else 0), keys, flags, idx, lens,
              err), shared_mem=M * C * 4 if lut_smem else 0)
    return idx, lens, int(err[0]), buf[S * G * Kmax:]


def check(lut, codes, T, sinks, window, k, **kw):
    """Kernel == CPU reference, row by row; returns the reference lens."""
    idx, lens, err, _ = launch(lut, codes, T, sinks, window, k, **kw)
    ref_idx, ref_lens = REF.select_topk(lut, codes, np.asarray(T), sinks, window, k)
    assert err == 0
    np.testing.assert_array_equal(lens, ref_lens)
    S, G = lens.shape
    for s in range(S):
        for kh in range(G):
            n = int(ref_lens[s, kh])
            np.testing.assert_array_equal(idx[s, kh, :n], ref_idx[s, kh, :n],
                                          err_msg=f"row s={s} kh={kh} T={T[s]}")
            assert np.all(idx[s, kh, n:] == -1), f"padding s={s} kh={kh}"
    return ref_lens


# (M, C, g, G, block, lut_smem)
SHAPES = [(1, 4096, 1, 2, 256, True), (2, 256, 2, 1, 64, True), (4, 16, 4, 2, 256, False),
          (4, 256, 4, 1, 64, True), (2, 16, 1, 2, 32, False), (2, 256, 2, 1, 1024, True)]


@pytest.mark.parametrize("M,C,g,G,block,lut_smem", SHAPES)
def test_select_random(rng, M, C, g, G, block, lut_smem):
    """Gaussian LUT (scores of both signs), 3 sequences: long, just above k, exactly k."""
    sinks, window, k = 4, 16, 32
    T = [int(rng.integers(300, 3000)), sinks + window + k + 1, sinks + window + k]
    rng.shuffle(T)
    codes = make_codes(rng, G, M, C, [t + int(rng.integers(0, 50)) for t in T])
    lut = rng.standard_normal((3, G, g, M, C)).astype(np.float32)
    lens = check(lut, codes, T, sinks, window, k, block=block, lut_smem=lut_smem)
    # g = 1: exactly k picked; g > 1: the union over the heads adds some
    assert lens.max() == sinks + window + k if g == 1 else lens.max() > sinks + window + k


@pytest.mark.parametrize("M,C,g,block", [(1, 4096, 2, 64), (2, 16, 4, 256), (4, 16, 1, 32)])
def test_select_ties(rng, M, C, g, block):
    """Small-integer LUT entries: scores collide everywhere, the earlier token must win."""
    G, k = 2, 40
    T = [int(rng.integers(200, 900)) for _ in range(3)]
    codes = make_codes(rng, G, M, C, T)
    lut = rng.integers(-2, 3, (3, G, g, M, C)).astype(np.float32)
    check(lut, codes, T, 3, 8, k, block=block)


@pytest.mark.parametrize("value", [0.0, -1.5, 2.0])
def test_select_all_equal(rng, value):
    """One score everywhere: each head picks exactly the first k candidates."""
    G, g, M, C, k, sinks, window = 2, 3, 2, 16, 50, 2, 5
    T = [400, 57, 1000]
    codes = make_codes(rng, G, M, C, T)
    lut = np.full((3, G, g, M, C), value, dtype=np.float32)
    idx, lens, err, _ = launch(lut, codes, T, sinks, window, k, block=64)
    assert err == 0
    for s, t in enumerate(T):
        want = np.arange(sinks + k).tolist() + list(range(t - window, t))
        for kh in range(G):
            assert idx[s, kh, :lens[s, kh]].tolist() == want
    check(lut, codes, T, sinks, window, k, block=64)


@pytest.mark.parametrize("M", [1, 2])
def test_select_signed_zero_and_denormals(rng, M):
    """-0.0 == +0.0 (numpy compares them equal, so ties between them go to the earlier token);
    denormal entries are ordinary distinct values."""
    G, g, C, k = 1, 2, 16, 30
    tiny = np.float32(1e-39)                                     # a denormal
    vals = np.array([0.0, -0.0, 0.0, -0.0, 1.0, -1.0, tiny, -tiny], dtype=np.float32)
    T = [700, 301, 96]
    codes = make_codes(rng, G, M, C, T)
    lut = vals[rng.integers(0, len(vals), (3, G, g, M, C))]
    check(lut, codes, T, 0, 0, k, block=64)
    # mostly zeros of both signs, k cutting through them: a sign-aware key would prefer +0.0
    lut = np.where(rng.random((3, G, g, M, C)) < 0.5, np.float32(-0.0), np.float32(0.0))
    lut[..., 0] = 1.0
    check(lut, codes, T, 1, 2, k, block=64)


def test_select_small_T_sinks_window(rng):
    """T = 1, sinks, sinks + window, k +/- 1 around the candidates, sinks 0, window 0."""
    G, g, M, C = 2, 2, 2, 16
    lut = rng.standard_normal((3, G, g, M, C)).astype(np.float32)
    for sinks, window, k in [(4, 8, 10), (0, 8, 10), (4, 0, 10), (0, 0, 5), (3, 5, 1000)]:
        Ts = [1, max(sinks, 1), sinks + window, sinks + window + k - 1, sinks + window + k,
              sinks + window + k + 1, sinks + window + 2 * k + 7, 250]
        for i in range(0, len(Ts), 3):
            T = (Ts[i:i + 3] + [1, 1])[:3]
            codes = make_codes(rng, G, M, C, [max(t, 1) + 3 for t in T])
            check(lut, codes, T, sinks, window, k, block=32)


def test_select_T_zero(rng):
    """T = 0 (never given by the runtime) must not crash: an empty row."""
    G, g, M, C = 1, 1, 1, 16
    lut = rng.standard_normal((2, G, g, M, C)).astype(np.float32)
    codes = make_codes(rng, G, M, C, [4, 40])
    idx, lens, err, _ = launch(lut, codes, [0, 30], 2, 3, 4, block=32, Kmax=30)
    assert err == 0 and lens[0, 0] == 0 and np.all(idx[0, 0] == -1)
    ref_idx, ref_lens = REF.select_topk(lut, codes, np.array([0, 30]), 2, 3, 4)
    assert lens[1, 0] == ref_lens[1, 0]
    np.testing.assert_array_equal(idx[1, 0, :lens[1, 0]], ref_idx[1, 0, :lens[1, 0]])


def test_select_kmax_too_small(rng):
    """A Kmax below a row's length: err bit 1, the row cut at Kmax, nothing written past it."""
    G, g, M, C, sinks, window, k = 2, 2, 2, 16, 4, 8, 20
    T = [500, 30, 300]
    codes = make_codes(rng, G, M, C, T)
    lut = rng.standard_normal((3, G, g, M, C)).astype(np.float32)
    ref_idx, ref_lens = REF.select_topk(lut, codes, np.array(T), sinks, window, k)
    Kmax = int(ref_lens.max()) - 3
    idx, lens, err, tail = launch(lut, codes, T, sinks, window, k, block=64, Kmax=Kmax, guard=64)
    assert err == 1
    assert np.all(tail == SENT)
    np.testing.assert_array_equal(lens, np.minimum(ref_lens, Kmax))
    for s in range(3):
        for kh in range(G):
            n = int(lens[s, kh])
            np.testing.assert_array_equal(idx[s, kh, :n], ref_idx[s, kh, :n])
            assert np.all(idx[s, kh, n:] == -1)
    # exactly the longest row: no error
    idx, lens, err, tail = launch(lut, codes, T, sinks, window, k, block=64, Kmax=Kmax + 3,
                                  guard=64)
    assert err == 0 and np.all(tail == SENT)
    np.testing.assert_array_equal(lens, ref_lens)


def test_select_caller_errors(rng):
    """A code >= C (err bit 2, the term read as 0), a scratch smaller than a row's candidates or
    a code buffer shorter than hi (err bit 4, the row left empty)."""
    G, g, M, C, k = 1, 1, 2, 16, 5
    lut = rng.standard_normal((2, G, g, M, C)).astype(np.float32)
    codes = make_codes(rng, G, M, C, [60, 60])
    codes[1][0, 1, 7] = C                                        # out of range
    idx, lens, err, _ = launch(lut, codes, [60, 60], 0, 0, k, block=32)
    assert err == 2 and lens.tolist() == [[k], [k]]
    codes = make_codes(rng, G, M, C, [60, 60])
    idx, lens, err, _ = launch(lut, codes, [60, 20], 0, 0, k, block=32, cap=40)
    assert err == 4 and lens[0, 0] == 0 and np.all(idx[0, 0] == -1) and lens[1, 0] == k
    short = make_codes(rng, G, M, C, [30, 60])
    idx, lens, err, _ = launch(lut, short, [60, 60], 0, 0, k, block=32)
    assert err == 4 and lens[0, 0] == 0 and np.all(idx[0, 0] == -1) and lens[1, 0] == k


@pytest.mark.gpu
def test_select_gpu_matches_cpu(rng):
    """The same kernel through cupy on a GPU, at a decode-sized context (pytest -m gpu)."""
    import cupy as cp
    from cuda_shim.gpu import GpuModule
    S, G, g, M, C, sinks, window, k = 3, 2, 4, 4, 256, 4, 64, 512
    T = [32768, 9000, 600]
    codes = make_codes(rng, G, M, C, [t + 17 for t in T])
    lut = rng.integers(-8, 9, (S, G, g, M, C)).astype(np.float32)    # ties too
    dcodes = [cp.asarray(c) for c in codes]
    Kmax, cap = max(T), max(T)
    d_idx = cp.full((S, G, Kmax), SENT, dtype=cp.int32)
    d_lens = cp.full((S, G), SENT, dtype=cp.int32)
    d_err = cp.zeros(1, dtype=cp.int32)
    f = GpuModule("select_topk").module.get_function("select_topk_lut")
    args = (cp.asarray(lut), cp.asarray(np.array([c.data.ptr for c in dcodes], dtype=np.uint64)),
            cp.asarray(np.array([c.shape[2] for c in codes], dtype=np.int64)),
            cp.asarray(np.array(T, dtype=np.int32)), i32(g), i32(M), i32(C), i32(sinks),
            i32(window), i32(k), i32(Kmax), i32(cap), i32(1),
            cp.empty((S, G, cap), dtype=cp.uint32), cp.empty((S, G, cap), dtype=cp.uint8),
            d_idx, d_lens, d_err)                   # held until the results are back
    f((G, S), (1024,), args, shared_mem=M * C * 4)
    idx, lens = d_idx.get(), d_lens.get()
    ref_idx, ref_lens = REF.select_topk(lut, codes, np.array(T), sinks, window, k)
    assert int(d_err.get()[0]) == 0
    np.testing.assert_array_equal(lens, ref_lens)
    for s in range(S):
        for kh in range(G):
            n = int(ref_lens[s, kh])
            np.testing.assert_array_equal(idx[s, kh, :n], ref_idx[s, kh, :n])
            assert np.all(idx[s, kh, n:] == -1)
