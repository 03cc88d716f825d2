"""Native library: dequantization bit-exact with gguf.quants, bounds-checked
row gather, quantized matmul against a float64 reference. The numeric tests
run twice: with the AVX2 kernels and with the portable scalar code."""
import os

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from a2ats_lite import native
from a2ats_lite.errors import NativeError

# byte offsets of the f16 scale fields in each block (random bytes there give NaN/Inf)
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
              T.Q2_K: [80, 82], T.Q3_K: [108], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
QUANT_TYPES = list(F16_FIELDS)


def random_blocks(t, n_blocks, rng):
    """Random block bytes with finite, sane f16 scales."""
    _, size = GGML_QUANT_SIZES[t]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    for off in F16_FIELDS[t]:
        d = (rng.uniform(0.001, 0.1, n_blocks) * rng.choice([-1, 1], n_blocks)).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(n_blocks, 2)
    return raw


def random_tensor(t, n_rows, n_cols, rng):
    """Raw bytes of a (n_rows, n_cols) tensor of type t."""
    if t == T.F32:
        return rng.standard_normal((n_rows, n_cols)).astype(np.float32).view(np.uint8)
    if t == T.F16:
        return rng.standard_normal((n_rows, n_cols)).astype(np.float16).view(np.uint8)
    if t == T.BF16:
        f = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    block, _ = GGML_QUANT_SIZES[t]
    return random_blocks(t, n_rows * n_cols // block, rng).reshape(n_rows, -1)


ALL_TYPES = [T.F32, T.F16, T.BF16] + QUANT_TYPES


@pytest.mark.parametrize("t", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact_with_gguf(t, kernels):
    rng = np.random.default_rng(int(t) + 100)
    raw = random_tensor(t, 24, 1024, rng)   # 96 K-blocks / 768 small blocks: several threads
    expect = quants.dequantize(raw, t).astype(np.float32)
    got = native.dequantize(raw, int(t), (24, 1024), n_threads=3)
    assert got.dtype == np.float32 and got.shape == (24, 1024) and got.flags.c_contiguous
    np.testing.assert_array_equal(got.view(np.uint32), expect.view(np.uint32))
    half = native.dequantize(raw, int(t), (24, 1024), dtype=np.float16, n_threads=3)
    np.testing.assert_array_equal(half.view(np.uint16), expect.astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("t", [T.F16, T.BF16, T.F32], ids=lambda t: t.name)
def test_dequantize_unblocked_odd_length(t, kernels):
    # lengths that are not a multiple of the 8-wide SIMD step
    rng = np.random.default_rng(11)
    raw = random_tensor(t, 1, 37, rng)
    expect = quants.dequantize(raw, t).astype(np.float32)
    np.testing.assert_array_equal(native.dequantize(raw, int(t), (37,)).view(np.uint32),
                                  expect.reshape(-1).view(np.uint32))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_f16_rounding_edge_cases(kernels):
    # subnormals, overflow, ties: the f32 -> f16 path must round like numpy
    rng = np.random.default_rng(7)
    vals = np.concatenate([rng.standard_normal(4000) * s for s in (1e-8, 1e-6, 1e-5, 1, 6e4, 7e4)])
    vals = np.concatenate([vals, [0.0, -0.0, np.inf, -np.inf, 65504, 65520, 65519.99, 2**-25, 2**-24]])
    raw = vals.astype(np.float32).view(np.uint8)
    got = native.dequantize(raw, int(T.F32), (len(vals),), dtype=np.float16)
    np.testing.assert_array_equal(got.view(np.uint16), vals.astype(np.float32).astype(np.float16).view(np.uint16))


def test_dequantize_rejects_bad_input():
    raw = np.zeros(34 * 4, np.uint8)
    with pytest.raises(NativeError, match="needs 136 bytes"):
        native.dequantize(raw[:-1], int(T.Q8_0), (4, 32))
    with pytest.raises(NativeError, match="not supported"):
        native.dequantize(raw, int(T.IQ2_XXS), (1, 256))
    with pytest.raises(NativeError, match="whole number"):
        native.dequantize(raw, int(T.Q8_0), (4, 31))


# Types whose products take the int8 path (repacked weights, SIMD and portable kernels alike):
# x is quantized to int8 per block of 32 (Q4_0, Q5_0, Q8_0) or 256 (K types) first, like
# llama.cpp; the other types multiply float32 x.
Q8_ACT_BLOCK = {T.Q4_0: 32, T.Q5_0: 32, T.Q8_0: 32, T.Q4_K: 256, T.Q5_K: 256, T.Q6_K: 256}
TIGHT, LOOSE = 2e-6, 3e-2   # relative to max |y|: float rounding / the int8 activation error


def int_path(t):
    return t in Q8_ACT_BLOCK


def quantize_x(x, block):
    """x as the native int8 path sees it: per block d = amax / 127 (f32),
    q = rint(x * (1 / d)) (half to even, f32), returned dequantized as float64."""
    n_vec, n_in = x.shape
    xb = x.astype(np.float32).reshape(n_vec, n_in // block, block)
    d = np.abs(xb).max(axis=2, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    q = np.rint(xb * inv)
    assert np.abs(q).max() <= 127
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(n_vec, n_in)


def check_matmul(got, x, w64, t, what=""):
    """got vs float64: exact-x reference to 1e-5 on the float path; on the int8 path the
    reference with the same int8 x to TIGHT, the exact-x one to LOOSE."""
    x = np.atleast_2d(x)
    expect = x.astype(np.float64) @ w64.T
    scale = np.abs(expect).max()
    err = np.abs(got - expect).max() / scale
    if int_path(t):
        err_q = np.abs(got - quantize_x(x, Q8_ACT_BLOCK[t]) @ w64.T).max() / scale
        assert err_q < TIGHT, (what, err_q)
        assert err < LOOSE, (what, err)
    else:
        assert err < 1e-5, (what, err)


@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16, T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K,
                               T.Q2_K, T.Q3_K, T.Q4_1, T.Q5_1], ids=lambda t: t.name)
@pytest.mark.parametrize("n_vec", [1, 3, 8, 16, 17])
def test_matmul_q_matches_float64_reference(t, n_vec, kernels):
    rng = np.random.default_rng(int(t) * 31 + n_vec)
    n_out, n_in = 67, 512
    raw = random_tensor(t, n_out, n_in, rng)
    x = rng.standard_normal((n_vec, n_in)).astype(np.float32)
    x[0, :256] = 0.0          # all-zero activation blocks: d = 0
    x[-1, 256:288] *= 1e4     # one block far larger than the rest
    w = quants.dequantize(raw, t).astype(np.float64)
    got = native.matmul_q(raw, int(t), n_out, n_in, x, n_threads=2)
    assert got.shape == (n_vec, n_out) and got.dtype == np.float32
    check_matmul(got, x, w, t)


@pytest.mark.parametrize("t", [T.Q8_0, T.Q5_0, T.Q4_K, T.Q6_K, T.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("n_vec", [1, 8, 16])
def test_matmul_q_wide_rows(t, n_vec, kernels):
    # n_in = 2304: rows wider than the kernels' L1 share, several weight blocks per thread chunk
    rng = np.random.default_rng(int(t) + 7 * n_vec)
    n_out, n_in = 45, 2304
    raw = random_tensor(t, n_out, n_in, rng)
    x = rng.standard_normal((n_vec, n_in)).astype(np.float32)
    got = native.matmul_q(raw, int(t), n_out, n_in, x, n_threads=3)
    check_matmul(got, x, quants.dequantize(raw, t).astype(np.float64), t)


@pytest.mark.parametrize("t", [T.Q4_0, T.Q5_0, T.Q8_0], ids=lambda t: t.name)
@pytest.mark.parametrize("n_vec", [1, 2, 5, 16])
def test_matmul_q_odd_block_count(t, n_vec, kernels):
    # 17 and 73 blocks per row, 1..7 rows in the last group of 8, a single block
    for n_out, n_in in ((37, 17 * 32), (6, 73 * 32), (1, 32)):
        rng = np.random.default_rng(int(t) * 7 + n_vec + n_in)
        raw = random_tensor(t, n_out, n_in, rng)
        x = rng.standard_normal((n_vec, n_in)).astype(np.float32)
        got = native.matmul_q(raw, int(t), n_out, n_in, x, n_threads=2)
        check_matmul(got, x, quants.dequantize(raw, t).astype(np.float64), t, (n_out, n_in))


@pytest.mark.parametrize("t", list(Q8_ACT_BLOCK), ids=lambda t: t.name)
def test_matmul_q_fresh_inputs_simd_equals_portable(t):
    # new random weights, x and shapes on every run (the seed is in the message): the SIMD
    # kernels and the portable ones compute the same int8 products bit for bit
    seed = int(np.random.SeedSequence().entropy % 2**32)
    rng = np.random.default_rng(seed)
    block = GGML_QUANT_SIZES[t][0]
    n_out = int(rng.integers(1, 200)) * 2 + 1
    n_in = block * int(rng.integers(1, 4096 // block + 1))
    n_vec = int(rng.integers(1, 17))
    raw = random_tensor(t, n_out, n_in, rng)
    x = (rng.standard_normal((n_vec, n_in)) * rng.uniform(0.01, 100)).astype(np.float32)
    w = quants.dequantize(raw, t).astype(np.float64)
    before = native.simd()
    try:
        native.simd(False)
        portable = native.matmul_q(raw, int(t), n_out, n_in, x, n_threads=2)
        check_matmul(portable, x, w, t, f"portable seed={seed}")
        if native.simd(True):
            fast = native.matmul_q(raw, int(t), n_out, n_in, x, n_threads=2)
            np.testing.assert_array_equal(fast.view(np.uint32), portable.view(np.uint32),
                                          err_msg=f"seed={seed}")
    finally:
        native.simd(before)


def test_bench_matmul_runs_at_toy_scale(tmp_path):
    # bench/bench_matmul.py end to end on two small shapes (llama.cpp's product beside ours
    # when llama-cpp-python is installed): the JSON holds every case with sane figures
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "matmul.json"
    r = subprocess.run([sys.executable, str(root / "bench" / "bench_matmul.py"), "--toy", "--repeat", "1",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    assert len(res["results"]) == 4 and all(c["ours_gflops"] > 0 for c in res["results"])
    if res["llama_cpp"]:
        assert all(c["rel_diff"] < 5e-2 and c["llama_gflops"] > 0 for c in res["results"])


def test_matmul_q_vector_input_and_out():
    rng = np.random.default_rng(5)
    raw = random_tensor(T.Q4_K, 16, 256, rng)
    x = rng.standard_normal(256).astype(np.float32)
    out = np.full((1, 16), np.nan, np.float32)
    got = native.matmul_q(raw, int(T.Q4_K), 16, 256, x, out=out)
    assert got is out
    check_matmul(out, x, quants.dequantize(raw, T.Q4_K).astype(np.float64), T.Q4_K)


def test_matmul_q_checks_shapes():
    raw = np.zeros((4, 34), np.uint8)
    with pytest.raises(NativeError, match="x must be"):
        native.matmul_q(raw, int(T.Q8_0), 4, 32, np.ones((1, 16), np.float32))
    with pytest.raises(NativeError, match="needs 170 bytes, got 136"):
        native.matmul_q(raw, int(T.Q8_0), 5, 32, np.ones((1, 32), np.float32))
    with pytest.raises(NativeError, match="must be positive"):
        native.matmul_q(raw, int(T.Q8_0), 0, 32, np.ones((1, 32), np.float32))
    with pytest.raises(NativeError, match="out must be a writable C-contiguous float32"):
        native.matmul_q(raw, int(T.Q8_0), 4, 32, np.ones((1, 32), np.float32), out=np.zeros((1, 4)))


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_gather_rows_exact(dtype):
    rng = np.random.default_rng(3)
    src = rng.standard_normal((1000, 3, 7)).astype(dtype)
    idx = rng.integers(0, 1000, 321)
    np.testing.assert_array_equal(native.gather_rows(src, idx), src[idx])


def test_gather_rows_from_file_backed_memmap(tmp_path):
    rng = np.random.default_rng(4)
    src = np.lib.format.open_memmap(tmp_path / "kv.npy", mode="w+", dtype=np.float16, shape=(5000, 256))
    src[:] = rng.standard_normal((5000, 256))
    idx = rng.permutation(5000)[:4000]  # large enough to use several threads
    out = np.empty((4096, 256), np.float16)
    native.gather_rows(src, idx, out=out, n_threads=2)
    np.testing.assert_array_equal(out[:4000], np.asarray(src)[idx])
    del src


@pytest.mark.parametrize("bad", [-1, 1000, 2**40])
def test_gather_rows_out_of_range_leaves_dst_untouched(bad):
    src = np.arange(1000 * 8, dtype=np.float32).reshape(1000, 8)
    out = np.full((4, 8), 7.0, np.float32)
    with pytest.raises(NativeError, match=f"row index {bad} out of range"):
        native.gather_rows(src, [1, 2, bad, 3], out=out)
    assert (out == 7.0).all()


def test_gather_rows_c_side_checks_indices_too():
    # bypass the Python checks: the C routine must refuse on its own
    from a2ats_lite._native import ffi, lib
    src = np.zeros((10, 4), np.float32)
    dst = np.full((2, 4), 5.0, np.float32)
    idx = np.array([3, 10], np.int64)
    rc = lib.a2n_gather_rows(ffi.from_buffer("uint8_t[]", src.view(np.uint8).reshape(-1)), 10, 16,
                             ffi.from_buffer("int64_t[]", idx), 2,
                             ffi.from_buffer("uint8_t[]", dst.view(np.uint8).reshape(-1)), 2, 1)
    assert rc == lib.A2N_E_INDEX and (dst == 5.0).all()
    rc = lib.a2n_gather_rows(ffi.from_buffer("uint8_t[]", src.view(np.uint8).reshape(-1)), 10, 16,
                             ffi.from_buffer("int64_t[]", np.array([1, 2, 3], np.int64)), 3,
                             ffi.from_buffer("uint8_t[]", dst.view(np.uint8).reshape(-1)), 2, 1)
    assert rc == lib.A2N_E_SIZE


def test_gather_rows_rejects_non_integer_or_nested_indices():
    src = np.zeros((10, 4), np.float32)
    with pytest.raises(NativeError, match="must be integers"):
        native.gather_rows(src, [1.5])
    with pytest.raises(NativeError, match="must be 1-D"):
        native.gather_rows(src, [[1, 2], [3, 4]])
    assert native.gather_rows(src, []).shape == (0, 4)


def test_gather_rows_rejects_mismatched_out():
    src = np.zeros((10, 4), np.float32)
    with pytest.raises(NativeError, match="out must be"):
        native.gather_rows(src, [1], out=np.zeros((1, 5), np.float32))
    with pytest.raises(NativeError, match="indices but out holds"):
        native.gather_rows(src, [1, 2], out=np.zeros((1, 4), np.float32))


def test_concurrent_calls_from_python_threads():
    # one call holds the worker pool; the others must fall back to their own threads
    from concurrent.futures import ThreadPoolExecutor
    rng = np.random.default_rng(9)
    raw = random_tensor(T.Q8_0, 512, 1024, rng)
    xs = [rng.standard_normal((2, 1024)).astype(np.float32) for _ in range(8)]
    w = quants.dequantize(raw, T.Q8_0).astype(np.float64)
    with ThreadPoolExecutor(4) as ex:
        outs = list(ex.map(lambda x: native.matmul_q(raw, int(T.Q8_0), 512, 1024, x, n_threads=2), xs))
    for x, got in zip(xs, outs):
        check_matmul(got, x, w, T.Q8_0)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_worker_pool_survives_fork():
    rng = np.random.default_rng(10)
    raw = random_tensor(T.Q4_K, 64, 1024, rng)
    expect = quants.dequantize(raw, T.Q4_K).astype(np.float32)
    native.dequantize(raw, int(T.Q4_K), (64, 1024), n_threads=2)   # the parent's pool is running
    pid = os.fork()
    if pid == 0:  # child: the pool threads did not survive the fork, a new pool must start
        ok = np.array_equal(native.dequantize(raw, int(T.Q4_K), (64, 1024), n_threads=2), expect)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_thread_count_from_environment(monkeypatch):
    # read once and cached (asked on every native call); cache_clear() re-reads
    monkeypatch.setenv("A2ATS_THREADS", "3")
    native.n_threads_default.cache_clear()
    assert native.n_threads_default() == 3
    monkeypatch.setenv("A2ATS_THREADS", "many")
    native.n_threads_default.cache_clear()
    with pytest.raises(NativeError, match="A2ATS_THREADS"):
        native.n_threads_default()
    monkeypatch.delenv("A2ATS_THREADS")
    native.n_threads_default.cache_clear()
    assert native.n_threads_default() == (os.cpu_count() or 1)


def test_type_table_and_nbytes():
    assert native.GGML_TYPES[int(T.Q4_K)] == ("Q4_K", 256, 144)
    assert native.type_nbytes(int(T.Q8_0), 64) == 68
    with pytest.raises(NativeError, match="whole number"):
        native.type_nbytes(int(T.Q4_K), 100)
    from a2ats_lite._native import lib
    for t in native.SUPPORTED_TYPES:
        block, size = GGML_QUANT_SIZES[T(t)]
        assert lib.a2n_type_nbytes(t, 4 * block) == 4 * size
    assert lib.a2n_type_nbytes(int(T.IQ2_XXS), 256) == lib.A2N_E_TYPE
