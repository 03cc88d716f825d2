"""The native causal attention of the dense layers (native/attention.c, native.attention):
against a float64 reference on fresh random inputs (f16 / f32 / mixed caches, odd head dims,
GQA 1/2/4/8, windows, caches starting at pos0 > 0, 1 to ~3000 keys), in the SIMD and the
portable scalar paths; every row bit-identical alone, batched with other rows and sequences,
in any chunking, thread count or cache start; the CPU backend's prefill and decode entry
points through it; bad spans and arguments refused before anything is written."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from a2ats_lite import native
from a2ats_lite.backend.cpu import CPUBackend
from a2ats_lite.errors import NativeError

from kvutil import (assert_cache_start_keeps_rows, assert_rows_bit_identical,
                    backend_prefill_and_decode, chunk_and_decode_rows)
from kvutil import one_cache_attention as run
from kvutil import reference_attention as reference
from kvutil import spans

ROOT = Path(__file__).resolve().parent.parent


def cache(rng, G, T, d, kt, vt, cap=None):
    """K, V (G, T, d) as a cache hands them out: views of (G, cap, d) buffers whose unused
    rows hold NaN (a kernel that reads them poisons its output)."""
    cap = cap or T + 7
    K = np.full((G, cap, d), np.nan, dtype=kt)
    V = np.full((G, cap, d), np.nan, dtype=vt)
    K[:, :T] = rng.standard_normal((G, T, d))
    V[:, :T] = rng.standard_normal((G, T, d))
    return K[:, :T], V[:, :T]


@pytest.mark.parametrize("H,G,d,kt,vt,window,pos0,T", [
    (4, 1, 256, np.float16, np.float16, None, 0, 300),       # the default model's full layers
    (4, 1, 256, np.float32, np.float32, 512, 0, 1100),       # ... and its window layers
    (8, 2, 80, np.float32, np.float32, 100, 37, 700),        # g 4, odd-sized head dim
    (8, 8, 64, np.float16, np.float32, None, 0, 3000),       # g 1, mixed K/V types, long
    (4, 4, 33, np.float32, np.float16, 7, 5, 130),           # d off the 8-wide step
    (16, 2, 128, np.float16, np.float16, 300, 1000, 1500),   # g 8, cache starting late
    (2, 1, 16, np.float32, np.float32, None, 3, 1),          # one key
])
def test_matches_float64_reference(rng, kernels, H, G, d, kt, vt, window, pos0, T):
    K, V = cache(rng, G, T, d, kt, vt)
    q, lo, hi, scale = chunk_and_decode_rows(rng, H, d, window, pos0, T)
    got = run(q, K, V, pos0, lo, hi, scale)
    np.testing.assert_allclose(got, reference(q, K, V, lo, hi, scale), rtol=1e-4, atol=3e-5)


def test_long_span_and_every_thread_count(rng, kernels):
    # one decode row over 3000 keys: its chunks split over threads (or not) give one result
    K, V = cache(rng, 2, 3000, 64, np.float16, np.float16)
    q = rng.standard_normal((1, 8, 64)).astype(np.float32)
    lo, hi = np.array([0]), np.array([3000])
    outs = [run(q, K, V, 0, lo, hi, 0.125, n_threads=t) for t in (1, 2, 3, 8)]
    np.testing.assert_allclose(outs[0], reference(q, K, V, lo, hi, 0.125), rtol=1e-4, atol=3e-5)
    for o in outs[1:]:
        assert np.array_equal(o, outs[0])


@pytest.mark.parametrize("G,g,d,kt,vt,window", [
    (1, 4, 256, np.float16, np.float16, None),
    (1, 4, 256, np.float16, np.float16, 512),
    (8, 4, 64, np.float32, np.float16, None),
    (2, 1, 40, np.float32, np.float32, 33),
])
def test_rows_bit_identical_however_batched(rng, kernels, G, g, d, kt, vt, window):
    """A prompt's rows computed in one call, in random chunks (the cache holding only what a
    chunk's step would see), one by one, interleaved with other sequences' rows, with any
    number of threads: the same bits."""
    H, T, scale = G * g, 700, d ** -0.5
    K, V = cache(rng, G, T, d, kt, vt)
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    pos = np.arange(T)
    lo, hi = spans(pos, 0, window)
    whole = run(q, K, V, 0, lo, hi, scale)
    np.testing.assert_allclose(whole[::37], reference(q[::37], K, V, lo[::37], hi[::37], scale),
                               rtol=1e-4, atol=3e-5)
    assert_rows_bit_identical(rng, q, K, V, window, scale, whole,
                              lambda n: cache(rng, G, n, d, kt, vt), n_alone=12, n_mine=50)


@pytest.mark.parametrize("window", [None, 100])
def test_cache_start_does_not_change_a_row(rng, kernels, window):
    # a window buffer that dropped its first rows (pos0 > 0) gives its rows the same numbers
    G, g, d, T, drop = 1, 4, 256, 600, 70
    K, V = cache(rng, G, T, d, np.float16, np.float16)
    assert_cache_start_keeps_rows(rng, K, V, g, d, window, drop)


@pytest.mark.parametrize("kt,vt", [(np.float16, np.float16), (np.float32, np.float16)])
@pytest.mark.parametrize("window", [None, 9])
def test_cpu_backend_prefill_and_decode_agree(rng, kt, vt, window):
    """CPUBackend.attention (a prefill chunk) and decode_attention (rows of several
    sequences, read in place from whole buffers) give a row the same bits."""
    B = CPUBackend()
    G, g, d, pos0 = 2, 2, 48, 3
    bufs, qs, pos, pre, rows, dec = backend_prefill_and_decode(
        B, rng, lambda T, cap: cache(rng, G, T, d, kt, vt, cap=cap), G, g, d, pos0, window)
    assert np.array_equal(dec.reshape(-1, G * g, d), np.concatenate(pre))
    ref = CPUBackend(native_retrieval=False)
    np.testing.assert_allclose(pre[0], ref.attention(qs[0], bufs[0][0][:, :40], bufs[0][1][:, :40],
                                                     pos[0], pos0, window, 0.2), atol=3e-5)
    with pytest.raises(ValueError, match="no keys"):
        B.attention(qs[0][:2], bufs[0][0][:, :4], bufs[0][1][:, :4], [pos0 + 3, pos0 + 4], pos0,
                    window, 0.2)


def test_empty_span_is_zero(rng):
    K, V = cache(rng, 1, 10, 8, np.float32, np.float32)
    q = rng.standard_normal((2, 2, 8)).astype(np.float32)
    out = run(q, K, V, 0, np.array([4, 0]), np.array([4, 3]), 1.0)
    assert not out[0].any() and out[1].any()


def test_bad_arguments_refused(rng):
    K, V = cache(rng, 2, 10, 8, np.float32, np.float32)
    q = rng.standard_normal((3, 4, 8)).astype(np.float32)
    seq, lo, hi = np.zeros(3, np.int64), np.array([0, 1, 2]), np.array([3, 4, 5])
    ok = native.attention(q, [K], [V], [0], seq, lo, hi, 1.0)
    bad = [
        dict(seq=np.array([0, 1, 0])),                       # no sequence 1
        dict(seq=np.array([0, -1, 0])),
        dict(lo=np.array([0, 5, 2])),                        # lo > hi
        dict(lo=np.array([-1, 1, 2])),
        dict(hi=np.array([3, 4, 11])),                       # past the cached rows
        dict(pos0=[-2]),
        dict(values=[V[:, :9]]),                             # K and V rows differ
        dict(q=q[:, :3]),                                    # 3 heads over 2 KV heads
        dict(q=q.astype(np.float64)),
        dict(keys=[K.astype(np.int32)]),
        dict(keys=K),                                        # not a list
    ]
    base = dict(q=q, keys=[K], values=[V], pos0=[0], seq=seq, lo=lo, hi=hi)
    for change in bad:
        args = {**base, **change}
        out = np.full((3, 4, 8), 7.0, np.float32)
        with pytest.raises(NativeError):
            native.attention(args["q"], args["keys"], args["values"], args["pos0"], args["seq"],
                             args["lo"], args["hi"], 1.0, out=out)
        assert (out == 7.0).all(), change
    assert ok.shape == (3, 4, 8)


def test_c_entry_point_checks_spans_itself(rng):
    """The C side refuses bad spans and arguments even when called past the Python checks,
    with the output untouched."""
    from a2ats_lite.native import ffi, lib
    K = rng.standard_normal((1, 10, 8)).astype(np.float32)
    q = rng.standard_normal((2, 2, 8)).astype(np.float32)
    out = np.full((2, 2, 8), 7.0, np.float32)
    kp = ffi.new("void *[]", [ffi.cast("void *", K.ctypes.data)])

    def call(seq, lo, hi, rows=10, pos0=0, H=2, G=1, kf16=0, stride=80):
        a = [np.array(x, np.int64) for x in (seq, lo, hi, [rows], [pos0], [stride])]
        p = [ffi.from_buffer("int64_t[]", x) for x in a]
        return lib.a2n_attention(ffi.from_buffer("float[]", q), q.size, 2, H, G, 8, 1, kp, p[5],
                                 kf16, kp, p[5], 0, p[3], p[4], p[0], p[1], p[2], 1.0,
                                 ffi.from_buffer("float[]", out, require_writable=True), out.size, 2)

    assert call([0, 0], [0, 1], [3, 10]) == 0
    out[:] = 7.0
    E_SIZE, E_INDEX, E_ARG = -2, -3, -4
    assert call([0, 1], [0, 1], [3, 4]) == E_INDEX           # sequence 1 of 1
    assert call([0, 0], [0, 1], [3, 11]) == E_INDEX          # past the rows
    assert call([0, 0], [2, 1], [1, 4]) == E_INDEX           # lo > hi
    assert call([0, 0], [0, 1], [3, 4], rows=-1) == E_ARG
    assert call([0, 0], [0, 1], [3, 4], pos0=-1) == E_ARG
    assert call([0, 0], [0, 1], [3, 4], stride=-8) == E_ARG
    assert call([0, 0], [0, 1], [3, 4], H=3, G=2) == E_ARG
    assert call([0, 0], [0, 1], [3, 4], kf16=2) == E_ARG
    assert (out == 7.0).all()
    assert lib.a2n_attention(ffi.NULL, 5, 2, 2, 1, 8, 1, kp, ffi.NULL, 0, kp, ffi.NULL, 0, ffi.NULL,
                             ffi.NULL, ffi.NULL, ffi.NULL, ffi.NULL, 1.0, ffi.NULL, 5, 1) == E_SIZE


class RowProducts(CPUBackend):
    """Every weight product one row at a time: row-invariant by construction, so that a
    model-level comparison isolates the attention's invariance."""

    def matmul(self, w, x, bias=None):
        return np.concatenate([super(RowProducts, self).matmul(w, x[i:i + 1], bias)
                               for i in range(x.shape[0])])


def test_model_logits_do_not_depend_on_chunking_or_batch(default_model, rng):
    """The default model (sliding-window and full layers): a 100-token prompt prefilled in one
    chunk, in chunks of other sizes (more and fewer rows than the former 64-row switch
    between the numpy and the native paths), and beside another prompt in the same steps: the
    last rows' logits are the same bits."""
    from a2ats_lite.gguf import GGUFFile
    from a2ats_lite.kv import make_kv_cache
    from a2ats_lite.model import Model
    m = Model.from_gguf(GGUFFile(default_model), n_batch=512, f32_layers=False,
                        backend=RowProducts())
    toks, other = rng.integers(100, 20000, 100), rng.integers(100, 20000, 70)
    last = np.arange(96, 100)

    def run(cuts, beside=False):
        kv = make_kv_cache("dense", m.attn_layers, 128)
        s = kv.add_sequence()
        o = kv.add_sequence() if beside else None
        for a, b in zip(cuts[:-1], cuts[1:]):
            want = [r - a for r in last if a <= r < b]
            if beside and a == 0:
                got = m.forward([toks[a:b], other], [s, o], kv, logits=[np.array(want), np.array([0])])[0]
            else:
                got = m.forward([toks[a:b]], [s], kv, logits=[np.array(want, dtype=np.int64)])[0]
        return got

    one = run([0, 100])
    assert np.array_equal(run([0, 70, 100]), one)
    assert np.array_equal(run([0, 30, 96, 100]), one)
    assert np.array_equal(run([0, 100], beside=True), one)


def test_bench_runs_at_toy_scale(tmp_path):
    out = tmp_path / "attention.json"
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_attention.py"), "--toy",
                        "--repeat", "1", "--out", str(out)], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(out.read_text())
    assert got["toy_scale"] and "TOY scale" in r.stdout
    cases = {(x["shape"], x["phase"], x["T"]) for x in got["results"]}
    assert len(cases) == 10 and ("llama-3.2-1b", "decode", 32768 // 16) in cases
    assert all(x["native_s"][0] > 0 and x["numpy_s"][0] > 0 for x in got["results"])
