"""Native library: dequantization bit-exact with gguf.quants, bounds-checked
row gather, quantized matmul against a float64 reference."""
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
def test_dequantize_bit_exact_with_gguf(t):
    rng = np.random.default_rng(int(t) + 100)
    raw = random_tensor(t, 8, 512, rng)
    expect = quants.dequantize(raw, t).astype(np.float32)
    got = native.dequantize(raw, int(t), (8, 512))
    assert got.dtype == np.float32 and got.shape == (8, 512)
    np.testing.assert_array_equal(got.view(np.uint32), expect.view(np.uint32))
    half = native.dequantize(raw, int(t), (8, 512), dtype=np.float16)
    np.testing.assert_array_equal(half.view(np.uint16), expect.astype(np.float16).view(np.uint16))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_f16_rounding_edge_cases():
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


@pytest.mark.parametrize("t", [T.F32, T.F16, T.BF16, T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K,
                               T.Q2_K, T.Q3_K, T.Q4_1, T.Q5_1], ids=lambda t: t.name)
@pytest.mark.parametrize("n_vec", [1, 3, 8, 17])
def test_matmul_q_matches_float64_reference(t, n_vec):
    rng = np.random.default_rng(int(t) * 31 + n_vec)
    n_out, n_in = 67, 512
    raw = random_tensor(t, n_out, n_in, rng)
    x = rng.standard_normal((n_vec, n_in)).astype(np.float32)
    w = quants.dequantize(raw, t).astype(np.float64)
    expect = x.astype(np.float64) @ w.T
    got = native.matmul_q(raw, int(t), n_out, n_in, x)
    err = np.abs(got - expect).max() / np.abs(expect).max()
    assert err < 1e-5, err


def test_matmul_q_checks_shapes():
    raw = np.zeros((4, 34), np.uint8)
    with pytest.raises(NativeError, match="x must be"):
        native.matmul_q(raw, int(T.Q8_0), 4, 32, np.ones((1, 16), np.float32))
    with pytest.raises(NativeError, match="needs 170 bytes, got 136"):
        native.matmul_q(raw, int(T.Q8_0), 5, 32, np.ones((1, 32), np.float32))


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


def test_gather_rows_rejects_mismatched_out():
    src = np.zeros((10, 4), np.float32)
    with pytest.raises(NativeError, match="out must be"):
        native.gather_rows(src, [1], out=np.zeros((1, 5), np.float32))
    with pytest.raises(NativeError, match="indices but out holds"):
        native.gather_rows(src, [1, 2], out=np.zeros((1, 4), np.float32))
