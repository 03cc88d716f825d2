"""The weight products are batch-invariant by construction: a row's output bits do not depend
on the rows multiplied with it, on the thread count or on where its tile falls, with the SIMD
kernels and with the portable ones (which also agree with each other bit for bit on the int8
path). Fresh random inputs on every run (A2ATS_TEST_SEED / the seed in the message replays
one), odd sizes: n_out off the groups of 8, 1..70 rows against a float64 reference."""
import os

import numpy as np
import pytest
from gguf import quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as T

from a2ats_lite import native
from a2ats_lite.backend.cpu import QMatrix
from test_native import Q8_ACT_BLOCK, TIGHT, quantize_x, random_tensor

INT8_TYPES = list(Q8_ACT_BLOCK)
FLOAT_TYPES = [T.F32, T.F16, T.BF16, T.Q4_1, T.Q5_1, T.Q2_K, T.Q3_K]
BATCHES = (1, 2, 3, 4, 5, 7, 8, 15, 16, 17, 33, 64, 70, 200)


@pytest.fixture
def seed():
    env = os.environ.get("A2ATS_TEST_SEED")
    return int(env) if env else int(np.random.SeedSequence().entropy % 2**32)


def weight(t, rng, n_in_blocks=(1, 24)):
    """Random (n_out, n_in) blocks of type t: n_out odd-sized, n_in a random whole number of blocks."""
    block = GGML_QUANT_SIZES[t][0]
    n_out = int(rng.integers(1, 60)) * 2 + 1                      # 3..119, rarely a multiple of 8
    n_in = block * int(rng.integers(*n_in_blocks)) if block > 1 else int(rng.integers(5, 700))
    return n_out, n_in, random_tensor(t, n_out, n_in, rng)


def bits(a):
    return np.ascontiguousarray(a).view(np.uint32)


@pytest.mark.parametrize("t", INT8_TYPES, ids=lambda t: t.name)
def test_int8_product_matches_float64_reference(t, kernels, seed):
    rng = np.random.default_rng(seed)
    n_out, n_in, raw = weight(t, rng, (1, 9) if GGML_QUANT_SIZES[t][0] == 256 else (1, 40))
    w = native.repack(raw, int(t), n_out, n_in)
    w64 = quants.dequantize(raw, t).astype(np.float64)
    for n in (1, int(rng.integers(2, 17)), int(rng.integers(17, 71))):
        x = (rng.standard_normal((n, n_in)) * rng.uniform(0.01, 100)).astype(np.float32)
        got = native.matmul_packed(w, x, n_threads=int(rng.integers(1, 4)))
        ref = quantize_x(x, Q8_ACT_BLOCK[t]) @ w64.T          # the same int8 x, exact weights
        err = np.abs(got - ref).max() / np.abs(ref).max()
        assert err < TIGHT, f"seed={seed} {n_out}x{n_in} rows={n}: {err}"


@pytest.mark.parametrize("t", INT8_TYPES, ids=lambda t: t.name)
def test_simd_and_portable_int8_products_are_identical(t, seed):
    if not native.simd(True):
        pytest.skip("library compiled without AVX2")
    rng = np.random.default_rng(seed)
    n_out, n_in, raw = weight(t, rng)
    x = (rng.standard_normal((int(rng.integers(1, 71)), n_in)) * 3).astype(np.float32)
    x[0, : GGML_QUANT_SIZES[t][0]] = 0.0                            # an all-zero block: d = 0
    w = native.repack(raw, int(t), n_out, n_in)
    fast = native.matmul_packed(w, x, n_threads=2)
    try:
        native.simd(False)
        portable = native.matmul_packed(w, x, n_threads=3)
        records = native.quantize_rows(x, int(t))
    finally:
        native.simd(True)
    np.testing.assert_array_equal(bits(fast), bits(portable), err_msg=f"seed={seed}")
    # the activation records themselves: SIMD and portable quantization agree too
    np.testing.assert_array_equal(bits(native.matmul_packed(w, records)), bits(fast), err_msg=f"seed={seed}")


@pytest.mark.parametrize("t", INT8_TYPES + FLOAT_TYPES, ids=lambda t: t.name)
def test_rows_do_not_depend_on_their_batch(t, kernels, seed):
    # every row of a 200-row product equals the same row multiplied in batches of every size
    # listed, at every offset of a sweep, with 1, 2 or 3 threads
    rng = np.random.default_rng(seed)
    n_out, n_in, raw = weight(t, rng, (1, 4) if GGML_QUANT_SIZES[t][0] == 256 else (1, 20))
    x = rng.standard_normal((200, n_in)).astype(np.float32)
    m = QMatrix("w", int(t), n_out, n_in, raw) if t != T.F32 else QMatrix.from_array(
        "w", raw.view(np.float32).reshape(n_out, n_in))
    full = bits(m.apply(x))
    for b in BATCHES:
        for off in sorted({0, int(rng.integers(0, 201 - b)), 200 - b}):
            nt = int(rng.integers(1, 4))
            os.environ["A2ATS_THREADS"] = str(nt)
            native.n_threads_default.cache_clear()
            try:
                part = m.apply(x[off:off + b])
            finally:
                del os.environ["A2ATS_THREADS"]
                native.n_threads_default.cache_clear()
            np.testing.assert_array_equal(bits(part), full[off:off + b],
                                          err_msg=f"seed={seed} {t.name} {n_out}x{n_in} rows "
                                                  f"{off}:{off + b} threads={nt}")


@pytest.mark.parametrize("t", [T.Q5_0, T.Q4_K], ids=lambda t: t.name)
def test_thread_counts_and_shared_records_give_the_same_bits(t, kernels, seed):
    rng = np.random.default_rng(seed)
    n_out, n_in, raw = weight(t, rng)
    n_out = 8 * 64 + 3                               # many groups of 8: every thread gets chunks
    raw = random_tensor(t, n_out, n_in, rng)
    x = rng.standard_normal((37, n_in)).astype(np.float32)
    w = native.repack(raw, int(t), n_out, n_in)
    one = bits(native.matmul_packed(w, x, n_threads=1))
    for nt in (2, 3, 5, 16):
        np.testing.assert_array_equal(bits(native.matmul_packed(w, x, n_threads=nt)), one,
                                      err_msg=f"seed={seed} threads={nt}")
    # one QRows for several products (q/k/v, gate/up), and the raw-weight entry point
    m, other = QMatrix("a", int(t), n_out, n_in, raw), QMatrix("b", int(T.F16), 5, n_in,
                                                               random_tensor(T.F16, 5, n_in, rng))
    q = m.quantize_input(x)
    assert isinstance(q, native.QRows)
    np.testing.assert_array_equal(bits(m.apply(q)), one)
    np.testing.assert_array_equal(bits(other.apply(q)), bits(other.apply(x)))   # float path: x itself
    np.testing.assert_array_equal(bits(native.matmul_q(raw, int(t), n_out, n_in, x)), one)


@pytest.mark.parametrize("types", [(T.Q5_0, T.Q5_0, T.Q8_0), (T.Q4_K, T.Q6_K), (T.Q4_0, T.F16)],
                         ids=lambda ts: "+".join(t.name for t in ts))
def test_grouped_products_equal_the_single_ones(types, kernels, seed):
    # q/k/v and gate/up in one native call (x quantized once): the bits of separate calls
    rng = np.random.default_rng(seed)
    n_in = 512
    ms = [QMatrix(f"w{i}", int(t), n_out, n_in, random_tensor(t, n_out, n_in, rng))
          for i, (t, n_out) in enumerate(zip(types, rng.integers(1, 90, len(types))))]
    for n in (1, 6, 41):
        x = rng.standard_normal((n, n_in)).astype(np.float32)
        for got, m in zip(QMatrix.apply_group(ms, x), ms):
            np.testing.assert_array_equal(bits(got), bits(m.apply(x)), err_msg=f"seed={seed} {m}")
        q = ms[0].quantize_input(x)
        for got, m in zip(QMatrix.apply_group(ms, q), ms):
            np.testing.assert_array_equal(bits(got), bits(m.apply(x)), err_msg=f"seed={seed} {m}")


def test_a_product_past_the_kept_scratch_size_gives_the_same_bits():
    # 70000 rows of activation records (> 16 MiB): a one-off scratch buffer instead of the
    # thread's kept one; the rows equal the same rows multiplied in smaller batches
    rng = np.random.default_rng(6)
    raw = random_tensor(T.Q4_K, 9, 256, rng)
    m = QMatrix("w", int(T.Q4_K), 9, 256, raw)
    x = rng.standard_normal((70000, 256)).astype(np.float32)
    full = bits(m.apply(x))
    for lo, hi in ((0, 13), (34000, 34999), (69990, 70000)):
        np.testing.assert_array_equal(bits(m.apply(x[lo:hi])), full[lo:hi])


def test_repacked_mmap_pages_are_released_and_read_back(tmp_path):
    # a weight in a memory-mapped file: after the repack its pages are given back to the OS,
    # and the row lookup / dequantization still read the file's bytes
    import mmap
    rng = np.random.default_rng(4)
    raw = random_tensor(T.Q8_0, 300, 512, rng).reshape(-1)        # 163 KB: whole pages inside
    path = tmp_path / "w.bin"
    path.write_bytes(b"\0" * 100 + raw.tobytes())
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    view = np.frombuffer(memoryview(mm), np.uint8, count=raw.nbytes, offset=100)
    m, heap = QMatrix("w", int(T.Q8_0), 300, 512, view), QMatrix("h", int(T.Q8_0), 300, 512, raw.copy())
    x = rng.standard_normal((3, 512)).astype(np.float32)
    np.testing.assert_array_equal(bits(m.apply(x)), bits(heap.apply(x)))
    ids = np.array([299, 0, 17])
    np.testing.assert_array_equal(m.rows(ids), heap.rows(ids))
    np.testing.assert_array_equal(m.dense(), heap.dense())


def test_repack_releases_nothing_it_does_not_own_and_checks_its_input():
    rng = np.random.default_rng(3)
    raw = random_tensor(T.Q4_0, 16, 64, rng)
    copy = raw.copy()
    m = QMatrix("w", int(T.Q4_0), 16, 64, raw)
    m.apply(rng.standard_normal((2, 64)).astype(np.float32))
    np.testing.assert_array_equal(raw, copy)          # a heap array: left as it was
    assert m.read_bytes == native.repack_nbytes(int(T.Q4_0), 16, 64) == 2 * 2 * 144   # groups x blocks
    with pytest.raises(native.NativeError, match="no int8 product"):
        native.repack(raw, int(T.F16), 16, 64)
    with pytest.raises(native.NativeError, match="needs 576 bytes, got 575"):
        native.repack(raw.reshape(-1)[:-1], int(T.Q4_0), 16, 64)
    w = native.repack(raw, int(T.Q4_0), 16, 64)
    with pytest.raises(native.NativeError, match="do not fit"):
        native.matmul_packed(w, native.quantize_rows(np.ones((1, 256), np.float32), int(T.Q4_K)))
    with pytest.raises(native.NativeError, match="x must be"):
        native.matmul_packed(w, np.ones((1, 32), np.float32))
