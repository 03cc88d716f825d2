"""The quantized KV cache (llama.cpp's --cache-type-k/-v q8_0 and q4_0): ggml's block layouts
written as its reference quantizers round (native.kv_quantize, against an operation-for-
operation float32 emulation and float64 bounds, fresh random inputs, zero blocks, ties, odd
row counts); the attention kernel reading the blocks in place, for every K/V type pair, against
a float64 reference of the decoded values, bit-identical to a float32 cache of those values and
whatever the batching or chunking, in the SIMD and the portable paths; the storage (windows,
growth, decode appends, memory, a retrieval policy's host store); the backend's and runtime's
checks; the model with block caches (its llama.cpp comparison with q8_0 / q4_0 K/V is in
test_model.py), every retrieval policy decoding over a q8_0 host store; the bench at toy
scale. (The store's own round trips: test_store.py; its kernels: test_native_retrieval.py.)"""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from a2ats_lite import native
from a2ats_lite.backend.base import Caps
from a2ats_lite.backend.cpu import CPUBackend
from a2ats_lite.config import AttnLayer
from a2ats_lite.errors import NativeError
from a2ats_lite.kv import make_kv_cache
from a2ats_lite.rope import Rope

from kvutil import append, attend, spans
from kvutil import (assert_cache_start_keeps_rows, assert_rows_bit_identical,
                    backend_prefill_and_decode, chunk_and_decode_rows)
from kvutil import one_cache_attention as run
from test_attention import RowProducts
from kvutil import reference_attention as reference

TYPES = ["f32", "f16", "q8_0", "q4_0"]
BLOCK_TYPES = ["q8_0", "q4_0"]


# ---------------------------------------------------------------- ggml's reference quantizers
def _roundf(v):
    """C's roundf (halves away from zero) on float32."""
    t = np.trunc(v)
    return t + np.sign(v) * (np.abs(v - t) >= 0.5)


def _inverse(d):
    with np.errstate(divide="ignore"):
        return np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)


def ggml_q8_0(x):
    """quantize_row_q8_0_ref, operation for operation in float32: x (n, 32) -> (n, 34) bytes."""
    d = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32)
    q = _roundf(x * _inverse(d)[:, None]).astype(np.int8)
    return np.concatenate([d.astype(np.float16)[:, None].view(np.uint8), q.view(np.uint8)], axis=1)


def ggml_q4_0(x):
    """quantize_row_q4_0_ref: d = (the value of largest magnitude, the first on ties) / -8,
    q = min(15, trunc(x / d + 8.5)); byte j = q[j] | q[j + 16] << 4."""
    mx = x[np.arange(len(x)), np.abs(x).argmax(axis=1)]
    d = (mx / np.float32(-8)).astype(np.float32)
    q = np.minimum(15, np.trunc(x * _inverse(d)[:, None] + np.float32(8.5))).astype(np.uint8)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([d.astype(np.float16)[:, None].view(np.uint8), qs], axis=1)


REFERENCE = {"q8_0": ggml_q8_0, "q4_0": ggml_q4_0}


def decode64(blocks, t):
    """(n, bytes) blocks -> (n, 32) float64 values and scales, written from the layout."""
    d = blocks[:, :2].copy().view(np.float16)[:, 0].astype(np.float64)
    if t == "q8_0":
        return blocks[:, 2:].view(np.int8).astype(np.float64) * d[:, None], d
    q = np.concatenate([blocks[:, 2:] & 15, blocks[:, 2:] >> 4], axis=1).astype(np.float64)
    return (q - 8) * d[:, None], d


def values(rng, shape):
    """Random rows whose 32-value blocks have magnitudes from 1e-2 to 1e2, some all zero."""
    x = rng.standard_normal(shape).astype(np.float32)
    blocks = x.reshape(-1, 32)
    blocks *= (10.0 ** rng.uniform(-2, 2, (len(blocks), 1))).astype(np.float32)
    blocks[rng.random(len(blocks)) < 0.1] = 0.0
    return x


@pytest.mark.parametrize("t", BLOCK_TYPES)
@pytest.mark.parametrize("shape", [(1, 32), (7, 3, 64), (5, 1, 256), (13, 96)])
def test_quantize_matches_ggml_reference(rng, t, shape):
    x = values(rng, shape)
    got = native.kv_quantize(x, t)
    assert got.dtype == np.uint8 and got.shape == shape[:-1] + (native.kv_row_width(t, shape[-1]),)
    blocks = got.reshape(-1, 34 if t == "q8_0" else 18)
    xb = x.reshape(-1, 32)
    assert np.array_equal(blocks, REFERENCE[t](xb))
    # float64: each value within half a step of its input (q4_0's clipped top level: a step),
    # the scale the float16 of ggml's formula
    deq, d = decode64(blocks, t)
    amax = np.abs(xb.astype(np.float64)).max(axis=1)
    want_d = amax / 127 if t == "q8_0" else -xb[np.arange(len(xb)), np.abs(xb).argmax(1)] / 8.0
    assert np.all(np.abs(d - want_d) <= 2.0 ** -11 * np.abs(want_d))
    d32 = np.abs(want_d)                   # (the step the quantizer divides by, to f16 rounding)
    slack = (127 if t == "q8_0" else 8) * np.abs(np.abs(d) - d32)[:, None] + 1e-6 * d32[:, None]
    err = np.abs(deq - xb)
    half = 0.5 * d32[:, None] * (1 + 1e-5)
    if t == "q4_0":
        top = np.concatenate([blocks[:, 2:] & 15, blocks[:, 2:] >> 4], axis=1) == 15
        half = np.where(top, 2 * half, half)
    assert np.all(err <= half + slack)
    zero = ~xb.any(axis=1)
    assert not deq[zero].any()             # all-zero blocks decode to zeros


def test_quantize_rounding_edges():
    # q8_0 with d = 1 exactly: halves round away from zero (C's roundf, not numpy's even)
    x = np.zeros((1, 32), np.float32)
    x[0, 0] = 127.0
    x[0, 1:] = np.arange(-15, 16, dtype=np.float32) + 0.5
    q = native.kv_quantize(x, "q8_0")[0, 2:].view(np.int8)
    assert q[0] == 127 and list(q[1:4]) == [-15, -14, -13] and list(q[-3:]) == [14, 15, 16]
    assert np.array_equal(native.kv_quantize(x, "q8_0"), ggml_q8_0(x))
    # q4_0: +a and -a tie for the largest magnitude: the first one sets the sign of d
    for first in (3.0, -3.0):
        y = np.linspace(-1, 1, 32, dtype=np.float32)[None].copy()
        y[0, 4], y[0, 20] = first, -first
        b = native.kv_quantize(y, "q4_0")
        assert np.array_equal(b, ggml_q4_0(y))
        assert b[0, :2].view(np.float16)[0] == np.float16(first / -8)


@pytest.mark.parametrize("t", BLOCK_TYPES)
def test_quantize_agrees_with_gguf_py(rng, t):
    quants = pytest.importorskip("gguf.quants")
    from gguf.constants import GGMLQuantizationType as Q
    x = values(rng, (9, 128))
    ref = quants.quantize(x, Q.Q8_0 if t == "q8_0" else Q.Q4_0)
    assert np.array_equal(native.kv_quantize(x, t), ref)


@pytest.mark.parametrize("t", BLOCK_TYPES)
def test_dequantize_is_exact(rng, t):
    x = values(rng, (11, 64))
    blocks = native.kv_quantize(x, t)
    deq = native.dequantize(blocks, native.KV_TYPES[t], x.shape)
    assert np.array_equal(deq.astype(np.float64).reshape(-1, 32),
                          decode64(blocks.reshape(-1, 34 if t == "q8_0" else 18), t)[0])


def test_quantize_refuses_bad_input():
    with pytest.raises(NativeError, match="multiple of 32"):
        native.kv_quantize(np.zeros((2, 40), np.float32), "q8_0")
    with pytest.raises(NativeError, match="block type"):
        native.kv_quantize(np.zeros((2, 32), np.float32), "f16")
    with pytest.raises(NativeError, match="one of"):
        native.kv_row_width("q5_0", 64)


# ---------------------------------------------------------------- attention over the blocks
def encode(a, t):
    """float32 (G, T, d) -> a cache buffer of type t."""
    if t in ("f32", "f16"):
        return a.astype(np.float32 if t == "f32" else np.float16)
    return native.kv_quantize(a, t)


def decoded(a, d):
    """A cache buffer's values as float32 (G, T, d)."""
    t = native.kv_type_of(a, d)
    if t in ("f32", "f16"):
        return a.astype(np.float32)
    return native.dequantize(np.ascontiguousarray(a), native.KV_TYPES[t], a.shape[:2] + (d,))


def cache(rng, G, T, d, kt, vt, cap=None):
    """K, V (G, T, width) of types kt, vt: views of (G, cap, width) buffers whose unused rows
    hold garbage (0xff blocks decode to NaN scales: a kernel reading them poisons its output)."""
    cap = cap or T + 7
    out = []
    for t in (kt, vt):
        full = encode(rng.standard_normal((G, cap, d)).astype(np.float32), t)
        full[:, T:] = np.nan if full.dtype != np.uint8 else 0xFF
        out.append(full[:, :T])
    return out


SHAPES = [  # (H, G, d, window, pos0, T)
    (4, 1, 256, None, 0, 300),       # the default model's full layers
    (4, 1, 256, 512, 0, 1100),       # ... and its window layers
    (8, 2, 64, 100, 37, 700),        # GQA 4, a window buffer starting late
    (16, 2, 128, None, 1000, 900),   # GQA 8
]


@pytest.mark.parametrize("kt", TYPES)
@pytest.mark.parametrize("vt", TYPES)
def test_every_type_pair_matches_float64_reference(rng, kernels, kt, vt):
    H, G, d, window, pos0, T = SHAPES[(TYPES.index(kt) + 3 * TYPES.index(vt)) % len(SHAPES)]
    K, V = cache(rng, G, T, d, kt, vt)
    q, lo, hi, scale = chunk_and_decode_rows(rng, H, d, window, pos0, T)
    got = run(q, K, V, pos0, lo, hi, scale)
    Kf, Vf = decoded(K, d), decoded(V, d)
    np.testing.assert_allclose(got, reference(q, Kf, Vf, lo, hi, scale), rtol=1e-4, atol=3e-5)
    # the blocks decoded per key block: the bits of a float32 cache of the decoded values
    assert np.array_equal(got, run(q, Kf, Vf, pos0, lo, hi, scale))


@pytest.mark.parametrize("G,g,d,kt,vt,window", [
    (1, 4, 256, "q8_0", "q8_0", None),
    (1, 4, 256, "q4_0", "q8_0", 512),
    (4, 2, 64, "f16", "q4_0", 33),
    (2, 1, 32, "q8_0", "f32", None),
])
def test_rows_bit_identical_however_batched(rng, kernels, G, g, d, kt, vt, window):
    """A prompt's rows in one call, in random chunks (the cache holding what a chunk's step
    sees), one by one, beside other sequences' rows, with any thread count: the same bits."""
    H, T, scale = G * g, 700, d ** -0.5
    K, V = cache(rng, G, T, d, kt, vt)
    q = rng.standard_normal((T, H, d)).astype(np.float32)
    lo, hi = spans(np.arange(T), 0, window)
    whole = run(q, K, V, 0, lo, hi, scale)
    assert_rows_bit_identical(rng, q, K, V, window, scale, whole,
                              lambda n: cache(rng, G, n, d, kt, vt), n_alone=10, n_mine=40)


def test_cache_start_does_not_change_a_row(rng, kernels):
    # a window buffer that dropped its first rows (pos0 > 0): the same numbers
    G, g, d, T, drop, window = 1, 4, 256, 600, 70, 100
    K, V = cache(rng, G, T, d, "q8_0", "q4_0")
    assert_cache_start_keeps_rows(rng, K, V, g, d, window, drop)


@pytest.mark.parametrize("kt,vt", [("q8_0", "q8_0"), ("q4_0", "f16")])
@pytest.mark.parametrize("window", [None, 9])
def test_cpu_backend_prefill_decode_and_numpy_agree(rng, kt, vt, window):
    B = CPUBackend()
    G, g, d, pos0 = 2, 2, 64, 3
    bufs, qs, pos, pre, rows, dec = backend_prefill_and_decode(
        B, rng, lambda T, cap: cache(rng, G, T, d, kt, vt, cap=cap), G, g, d, pos0, window)
    assert np.array_equal(dec.reshape(-1, G * g, d), np.concatenate(pre))
    ref = CPUBackend(native_retrieval=False)        # the numpy path decodes the blocks
    np.testing.assert_allclose(pre[0], ref.attention(qs[0], bufs[0][0][:, :40], bufs[0][1][:, :40],
                                                     pos[0], pos0, window, 0.2), atol=3e-5)
    np.testing.assert_allclose(dec, ref.decode_attention(rows, [bufs[0]] * 40 + [bufs[1]] * 25,
                                                         np.concatenate(pos), window, 0.2), atol=3e-5)


def test_bad_block_arguments_refused(rng):
    K, V = cache(rng, 2, 10, 64, "q8_0", "q4_0")
    q = rng.standard_normal((2, 4, 64)).astype(np.float32)
    seq, lo, hi = np.zeros(2, np.int64), np.array([0, 1]), np.array([3, 4])
    K16, _ = cache(rng, 2, 10, 64, "f16", "f16")
    for keys, values in ([K[:, :, :-1]], [V]), ([K], [np.zeros((2, 10, 50), np.uint8)]), \
                        ([K, K16], [V, V]):
        with pytest.raises(NativeError):
            native.attention(q, keys, values, [0] * len(keys), seq, lo, hi, 1.0)
    # the C side: a block type needs whole blocks per row; an unknown type is refused
    from a2ats_lite.native import ffi, lib
    out = np.full((2, 4, 64), 7.0, np.float32)
    kp = ffi.new("void *[]", [ffi.cast("void *", K.ctypes.data)])
    vp = ffi.new("void *[]", [ffi.cast("void *", V.ctypes.data)])
    a = [np.array(x, np.int64) for x in (seq, lo, hi, [10], [0], [K.strides[0]], [V.strides[0]])]
    p = [ffi.from_buffer("int64_t[]", x) for x in a]

    def call(d, kt, vt):
        return lib.a2n_attention(ffi.from_buffer("float[]", q), 2 * 4 * d, 2, 4, 2, d, 1, kp, p[5], kt, vp,
                                 p[6], vt, p[3], p[4], p[0], p[1], p[2], 1.0,
                                 ffi.from_buffer("float[]", out, require_writable=True), 2 * 4 * d, 1)
    E_ARG = -4
    assert call(64, 8, 2) == 0
    out[:] = 7.0
    assert call(48, 8, 2) == E_ARG and call(64, 5, 2) == E_ARG and call(64, 8, 3) == E_ARG
    assert (out == 7.0).all()


# ---------------------------------------------------------------- storage
def layers(window=6, G=2, H=4, d=64, n=2):
    """Layer 0 slides over `window` positions, layer 1 attends everything."""
    return [AttnLayer(index=i, n_heads=H, n_kv_heads=G, head_dim=d, scale=d ** -0.5,
                      window=window if i % 2 == 0 else None, rope=Rope(d, base=10000.0))
            for i in range(n)]


@pytest.mark.parametrize("kt,vt", [("q8_0", "q8_0"), ("q4_0", "q8_0"), ("f16", "q4_0")])
def test_storage_holds_the_quantized_rows(rng, kt, vt):
    """Prefill chunks, then decode rows, through a small initial capacity (growth) and a
    window (rows dropped): every held row is the blocks of what was written, and attention
    over the cache matches the float64 reference of the decoded rows."""
    Ls = layers()
    kv = make_kv_cache("dense", Ls, 300, cache_type=kt, cache_type_v=vt, initial=8)
    s = kv.add_sequence()
    G, d = 2, 64
    ks, vs = [], []
    pos = 0
    for m in (20, 1, 1, 13, 1, 1, 1):
        k = rng.standard_normal((m, G, d)).astype(np.float32)
        v = rng.standard_normal((m, G, d)).astype(np.float32)
        positions = np.arange(pos, pos + m)
        for li in range(2):
            append(kv, li, s, k, v, positions)
        q = rng.standard_normal((m, 4, d)).astype(np.float32)
        for li in range(2):
            out = attend(kv, li, s, q, positions)
            K, V, pos0 = kv.view(li, s)
            lo, hi = spans(positions, pos0, Ls[li].window)
            qr = Ls[li].rope(q, positions)
            np.testing.assert_allclose(out, reference(qr, decoded(K, d), decoded(V, d), lo, hi,
                                                      Ls[li].scale), rtol=1e-4, atol=3e-5)
        kv.advance(s, m)
        ks.append(k)
        vs.append(v)
        pos += m
    k_all, v_all = np.concatenate(ks), np.concatenate(vs)
    for li in range(2):
        K, V, pos0 = kv.view(li, s)
        assert (pos0 > 0) == (Ls[li].window is not None)
        rot = Ls[li].rope(k_all[pos0:], np.arange(pos0, pos))       # keys are stored post-RoPE
        assert np.array_equal(K, encode(rot.transpose(1, 0, 2), kt))
        assert np.array_equal(V, encode(v_all[pos0:].transpose(1, 0, 2), vt))
    kv.compact(s)
    K, V, pos0 = kv.view(0, s)
    assert np.array_equal(V, encode(v_all[pos0:].transpose(1, 0, 2), vt))


@pytest.mark.parametrize("d", [64, 256])
def test_memory_of_block_caches(d):
    """q8_0 holds 34 bytes per 32 values (f16: 64): nbytes and the admission estimate."""
    got = {}
    for t in ("f16", "q8_0", "q4_0"):
        kv = make_kv_cache("dense", layers(window=None, d=d), 512, cache_type=t, initial=512)
        s = kv.add_sequence()
        got[t] = (kv.storage.nbytes(s), kv.storage.estimate_bytes(400))
    for t, per_block in (("q8_0", 34), ("q4_0", 18)):
        assert got[t][0] * 64 == got["f16"][0] * per_block
        assert got[t][1] * 64 == got["f16"][1] * per_block


def test_retrieval_policy_store_holds_the_block_types(rng):
    """A retrieval policy under q8_0 K / q4_0 V: the host store holds those blocks (the full
    layers), as the window layers' buffers do; prefill reads the blocks as stored."""
    Ls = layers()
    kv = make_kv_cache("window", Ls, 200, cache_type="q8_0", cache_type_v="q4_0")
    s = kv.add_sequence()
    store = kv.storage.store(s)
    assert store.types == ("q8_0", "q4_0")
    k = rng.standard_normal((30, 2, 64)).astype(np.float32)
    v = rng.standard_normal((30, 2, 64)).astype(np.float32)
    for li in range(2):
        append(kv, li, s, k, v, np.arange(30))
    for li in range(2):                                 # window layer 0, stored layer 1
        K, V, pos0 = kv.view(li, s)
        assert K.dtype == V.dtype == np.uint8 and K.shape[-1] == 68 and V.shape[-1] == 36
        rot = Ls[li].rope(k[pos0:], np.arange(pos0, 30))
        assert np.array_equal(K, encode(rot.transpose(1, 0, 2), "q8_0"))
        assert np.array_equal(V, encode(v[pos0:].transpose(1, 0, 2), "q4_0"))
    K, V = kv.store_arrays(1, s)
    assert K.shape == (2, 200, 68) and V.shape == (2, 200, 36)
    assert kv.storage.nbytes(s, store=True) - kv.storage.nbytes(s, store=False) == 30 * 2 * (68 + 36)


class FloatOnly(CPUBackend):
    """A backend declaring float caches only (as the CUDA backend does)."""

    @property
    def caps(self):
        return Caps(host_memory=True, graphs=False, row_cache=0, tensor_types=frozenset({0}),
                    f32_cache=True)


def test_types_a_backend_does_not_declare_are_refused():
    from a2ats_lite.runtime import check_cache_types
    assert "q8_0" in CPUBackend().caps.kv_types and "q8_0" not in FloatOnly().caps.kv_types
    with pytest.raises(ValueError, match="q4_0.*not supported by the cpu backend; choose one of f16, f32"):
        check_cache_types(FloatOnly(), "f16", "q4_0")
    check_cache_types(CPUBackend(), "q8_0", None)
    with pytest.raises(ValueError, match="not supported"):
        make_kv_cache("dense", layers(), 64, backend=FloatOnly(), cache_type="q8_0")
    with pytest.raises(ValueError, match="one of f32, f16, q8_0, q4_0"):
        make_kv_cache("dense", layers(), 64, cache_type="q5_1")
    with pytest.raises(ValueError, match="multiple of 32"):
        make_kv_cache("dense", layers(d=48), 64, cache_type="f16", cache_type_v="q8_0")


# ---------------------------------------------------------------- the model
def test_runtime_and_cli_take_block_types(default_model, tmp_path):
    from a2ats_lite.cli import main
    from a2ats_lite.runtime import Runtime
    with Runtime(default_model, n_ctx=128, cache_type_k="q8_0", cache_type_v="q4_0") as rt:
        assert (rt.kv.storage.type_k.name, rt.kv.storage.type_v.name) == ("q8_0", "q4_0")
        assert rt.generate("The capital of France is", max_tokens=4, temperature=0)
    r = CliRunner().invoke(main, ["generate", str(default_model), "-p", "Hello", "-n", "3",
                                  "--temp", "0", "-c", "64", "--cache-type-k", "q4_0",
                                  "--cache-type-v", "q8_0"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(main, ["generate", str(default_model), "-p", "Hello", "--cache-type-k", "q5_1"])
    assert r.exit_code == 2 and "q5_1" in r.output


def test_model_logits_do_not_depend_on_chunking_with_block_caches(default_model, rng):
    """The default model with q8_0 K and q4_0 V: a prompt prefilled in one chunk, in other
    chunkings, and token by token at its end: the last rows' logits are the same bits."""
    from a2ats_lite.gguf import GGUFFile
    from a2ats_lite.model import Model
    m = Model.from_gguf(GGUFFile(default_model), n_batch=512, f32_layers=False, backend=RowProducts())
    toks = rng.integers(100, 20000, 80)
    last = np.arange(76, 80)

    def run_cuts(cuts):
        kv = make_kv_cache("dense", m.attn_layers, 96, cache_type="q8_0", cache_type_v="q4_0")
        s = kv.add_sequence()
        rows = []
        for a, b in zip(cuts[:-1], cuts[1:]):
            want = np.array([r - a for r in last if a <= r < b], dtype=np.int64)
            got = m.forward([toks[a:b]], [s], kv, logits=[want])[0]
            rows += list(got)
        return np.stack(rows)

    one = run_cuts([0, 80])
    assert np.array_equal(run_cuts([0, 33, 78, 80]), one)
    assert np.array_equal(run_cuts([0, 76, 77, 78, 79, 80]), one)


def test_bench_runs_at_toy_scale(default_model, tmp_path):
    out = tmp_path / "kv_types.json"
    bench = Path(__file__).resolve().parent.parent / "bench" / "bench_kv_types.py"
    r = subprocess.run([sys.executable, str(bench), "--toy", "--out", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    got = json.loads(out.read_text())
    assert got["toy_scale"] and "TOY scale" in r.stdout
    res = {x["type"]: x for x in got["results"]}
    assert set(res) == {"f16", "q8_0", "q4_0"} and all(x["tok_s"] > 0 for x in res.values())
    assert res["q8_0"]["kv_bytes"] < res["f16"]["kv_bytes"]


# ---------------------------------------------------------------- retrieval policies, the model
RETRIEVAL = ["a2ats", "vq", "quest", "oracle", "wrope", "window"]


@pytest.fixture(scope="module")
def qrt(default_model):
    from a2ats_lite.runtime import Runtime
    with Runtime(default_model, n_ctx=160, cache_type_k="q8_0", cache_type_v="q8_0") as r:
        yield r


@pytest.mark.parametrize("policy", RETRIEVAL)
def test_every_retrieval_policy_decodes_over_a_q8_0_store(qrt, policy):
    """Each retrieval policy on the default model with q8_0 K/V: the host store holds q8_0
    blocks, and decoding selects among them (codes + the native exact re-rank, exact scores,
    page bounds, recency) and attends the selected blocks."""
    from a2ats_lite.engine import Engine
    from a2ats_lite.sampling import SamplingParams
    from kvutil import Selections
    from test_engine import random_calibration
    params = dict(budget=4, sinks=2, window=8)
    if policy in ("a2ats", "vq"):
        params.update(calib=random_calibration(qrt), rerank=3)
    kv = make_kv_cache(policy, qrt.model.attn_layers, qrt.n_ctx, cache_type="q8_0",
                       cache_type_v="q8_0", **params)
    sel = Selections(kv)
    eng = Engine(qrt.model, kv, qrt.tokenizer)
    ids = qrt.tokenize("The history of the river begins in the mountains, where snow melts "
                       "each spring and the water runs down to the sea")
    rid = eng.add_request(ids, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    out, stores = [], set()
    while eng.has_unfinished():
        out += [o.token for o in eng.step() if o.rid == rid]
        stores |= {(st.types, st.arrays(0)[0].shape[-1]) for st in kv.storage.stores.values()}
    assert len(out) == 4 and stores == {(("q8_0", "q8_0"), 256 // 32 * 34)}
    chosen = [len(h) for h in sel.last.values() for h in h]
    assert chosen and max(chosen) < len(ids) + 3          # proper subsets were attended
    if policy in ("a2ats", "vq"):
        assert kv.policy.stats["reranked_rows"] > 0
    eng.close()


@pytest.mark.parametrize("kt,vt", [("q8_0", "q8_0"), ("q4_0", "f16")])
def test_retrieval_store_holds_what_dense_buffers_hold(qrt, rng, kt, vt):
    """The default model under oracle (host store of kt / vt) and dense (backend buffers) on the
    same tokens, prefill then decode: the store rows are byte for byte dense's buffer rows
    (every full layer's prefill rows; the decode rows of the first full layer, the only ones
    computed before any sparse attention), and the prefill, which reads the store's blocks
    as stored, gives the same logits bit for bit. (Later decode rows and logits are not
    compared: the sparse and the causal kernels round differently, and the int8 activations
    of the weight products can turn that into visibly different numbers.)"""
    m = qrt.model
    toks = rng.integers(100, 20000, 40)
    full = [L.index for L in m.attn_layers if L.window is None]
    held, first = {}, {}
    for policy, params in (("dense", {}), ("oracle", {"budget": 10**6})):
        kv = make_kv_cache(policy, m.attn_layers, 64, cache_type=kt, cache_type_v=vt, **params)
        s = kv.add_sequence()
        first[policy] = m.forward([toks[:37]], [s], kv)[0]
        for t in toks[37:]:
            m.forward([np.array([t])], [s], kv)
        if policy == "dense":
            held[policy] = [kv.buffer(i, s)[:2] for i in full]
        else:
            held[policy] = [kv.store_arrays(i, s) for i in full]
        held[policy] = [(K[:, :40].copy(), V[:, :40].copy()) for K, V in held[policy]]
        kv.close()
    assert np.array_equal(first["oracle"], first["dense"])
    for j, ((K, V), (Kd, Vd)) in enumerate(zip(held["oracle"], held["dense"])):
        n = 40 if j == 0 else 37
        assert K.dtype == Kd.dtype and K.shape[-1] == native.kv_row_width(kt, 256)
        assert np.array_equal(K[:, :n], Kd[:, :n]) and np.array_equal(V[:, :n], Vd[:, :n])


def test_eval_takes_cache_types(default_model, tmp_path):
    """`eval --cache-type-k/-v`: every policy's cache (buffers and host store) holds the types,
    and the bytes per step count their rows as stored (q8_0: 34 bytes per 32 values)."""
    from a2ats_lite.cli import main
    got = {}
    for t in ("f32", "q8_0"):
        out = tmp_path / f"{t}.json"
        r = CliRunner().invoke(main, ["eval", str(default_model), "--kv", "dense,oracle",
                                      "--ctx", "160", "--budget", "8", "--steps", "3",
                                      "--tasks", "recall", "--cache-type-k", t, "--json", str(out)])
        assert r.exit_code == 0, r.output
        doc = json.loads(out.read_text())
        assert (doc["meta"]["cache_type_k"], doc["meta"]["cache_type_v"]) == (t, t)
        got[t] = {x["policy"]: x["metrics"] for x in doc["records"] if x["task"] == "recall"}
    # dense reads every row: exactly the ratio; the oracle's selections differ a little
    assert got["q8_0"]["dense"]["bytes_kv_rows"] * 128 == got["f32"]["dense"]["bytes_kv_rows"] * 34
    ratio = got["q8_0"]["oracle"]["bytes_kv_rows"] / got["f32"]["oracle"]["bytes_kv_rows"]
    assert ratio == pytest.approx(34 / 128, rel=0.05)
    for p in ("dense", "oracle"):
        assert 0 < got["q8_0"][p]["attention_recall"] <= 1.0 and got["q8_0"][p]["ppl"] > 1
    r = CliRunner().invoke(main, ["eval", str(default_model), "--cache-type-v", "q5_1"])
    assert r.exit_code == 2 and "q5_1" in r.output


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_quantized_store_in_the_offload_dir(default_model, tmp_path):
    """Runtime(kv_offload_dir=...) with q8_0 K / q4_0 V: the store's blocks live in an unlinked
    file of the directory while generating, and nothing is left after close."""
    from a2ats_lite.runtime import Runtime
    with Runtime(default_model, n_ctx=256, kv="quest", kv_params={"budget": 16},
                 cache_type_k="q8_0", cache_type_v="q4_0", kv_offload_dir=tmp_path) as rt:
        assert rt.generate("Once upon a time", max_tokens=4, temperature=0)
        assert rt.generate("Once upon a time there", max_tokens=3, temperature=0)
        st = rt.kv.storage
        assert (st.type_k.name, st.type_v.name) == ("q8_0", "q4_0") and st.offloaded
        maps = [ln for ln in Path("/proc/self/maps").read_text().splitlines() if str(tmp_path) in ln]
        assert maps and all("(deleted)" in ln for ln in maps)
        assert list(tmp_path.iterdir()) == []
    assert list(tmp_path.iterdir()) == []
