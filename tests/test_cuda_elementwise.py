"""The element-wise kernels of kernels/elementwise.cu (add, bias add, scale, copy, fill), run on the CPU through tests/cuda_shim, on fresh random inputs
(seed printed; pin one with A2ATS_TEST_SEED=N). With `pytest -m gpu` the same tests run through
cupy.RawModule on a GPU (skipped where there is none).

Every output is NaN-poisoned (-1 for int32) before the launch, so an element a kernel forgets
to write fails, and everything it must not write (the tail past n) is compared bit for bit
with the poison.

Error measure: exact (bitwise) equality everywhere. The f32 kernels do one f32 operation per
element (no FMA contraction is possible), so they equal numpy's float32 arithmetic.

Sizes are odd on purpose (1, 31, 257, 1000+), and the larger ones are launched with a grid far
smaller than ceil(n / block) so the grid-stride loops run several rounds. Under `make cuda-san`
the file also runs with A2ATS_SHIM_SAN=thread and =address.
"""
from __future__ import annotations


import numpy as np
import pytest


NAN = np.float32("nan")
i32, i64, f32 = np.int32, np.int64, np.float32

def k(kmod, name):
    return kmod("elementwise").get_function(name)


def bits(a: np.ndarray) -> np.ndarray:
    """Bit patterns, so NaN poison compares equal to itself and -0.0 differs from 0.0."""
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def assert_bits_equal(got, ref):
    assert got.dtype == ref.dtype and got.shape == ref.shape
    bad = np.flatnonzero(bits(got).ravel() != bits(ref).ravel())
    assert bad.size == 0, (f"{bad.size} elements differ, first at flat index {bad[0]}: "
                           f"got {got.ravel()[bad[0]]!r}, want {ref.ravel()[bad[0]]!r}")


def rand_f32(rng, n):
    v = (rng.standard_normal(n) * np.exp2(rng.integers(-20, 20, n))).astype(np.float32)
    if n >= 4:
        v[:4] = [0.0, -0.0, np.inf, -np.inf]
    return v


def grid_for(n, block, grid):
    """grid None: the documented min(ceil(n / block), 65535 * 16); else the given (small) one."""
    return grid if grid is not None else min(-(-n // block), 65535 * 16)


# (n, block, grid): grid None = the documented launch; small grids force grid-stride rounds
SIZES = [(1, 256, None), (31, 32, None), (257, 64, 2), (1003, 128, 3), (4099, 256, 1)]
PAD = 37      # poisoned elements after the n written ones


# ---- add / add_rows / scale / copy / fill ------------------------------------------------

@pytest.mark.parametrize("n,block,grid", SIZES)
def test_add(kmod, rng, n, block, grid):
    x0, y = rand_f32(rng, n), rand_f32(rng, n)
    x = np.concatenate([x0, np.full(PAD, NAN, np.float32)])
    k(kmod, "add_f32")((grid_for(n, block, grid),), (block,), (x, y, i64(n)))
    assert_bits_equal(x[:n], x0 + y)
    assert np.isnan(x[n:]).all()


@pytest.mark.parametrize("n_rows,n_cols,block,grid", [
    (1, 1, 32, None), (3, 31, 32, None), (5, 257, 64, 3), (7, 160, 128, 2), (1, 1003, 256, 1)])
def test_add_rows(kmod, rng, n_rows, n_cols, block, grid):
    x0 = rand_f32(rng, n_rows * n_cols).reshape(n_rows, n_cols)
    b = rand_f32(rng, n_cols)
    x = np.full(n_rows * n_cols + PAD, NAN, np.float32)
    x[:n_rows * n_cols] = x0.ravel()
    k(kmod, "add_rows_f32")((grid_for(n_rows * n_cols, block, grid),), (block,),
                            (x, b, i64(n_rows), i32(n_cols)))
    assert_bits_equal(x[:n_rows * n_cols].reshape(n_rows, n_cols), x0 + b[None, :])
    assert np.isnan(x[n_rows * n_cols:]).all()


@pytest.mark.parametrize("n,block,grid", SIZES)
def test_scale(kmod, rng, n, block, grid):
    x = rand_f32(rng, n)
    s = f32(rng.standard_normal() * 3)
    out = np.full(n + PAD, NAN, np.float32)
    x_before = x.copy()
    k(kmod, "scale_f32")((grid_for(n, block, grid),), (block,), (x, out, i64(n), s))
    assert_bits_equal(out[:n], x_before * s)
    assert np.isnan(out[n:]).all()
    assert_bits_equal(x, x_before)          # input untouched


@pytest.mark.parametrize("n,block,grid", [(1, 32, None), (257, 64, 2), (1003, 128, 3)])
def test_scale_in_place(kmod, rng, n, block, grid):
    buf = np.full(n + PAD, NAN, np.float32)
    buf[:n] = rand_f32(rng, n)
    x0 = buf[:n].copy()
    s = f32(-0.3125 + rng.standard_normal())
    k(kmod, "scale_f32")((grid_for(n, block, grid),), (block,), (buf, buf, i64(n), s))
    assert_bits_equal(buf[:n], x0 * s)
    assert np.isnan(buf[n:]).all()


@pytest.mark.parametrize("n,block,grid", SIZES)
def test_copy(kmod, rng, n, block, grid):
    src = rand_f32(rng, n)
    src[-1] = NAN if n > 4 else src[-1]       # NaN payloads are copied bit for bit too
    dst = np.full(n + PAD, -7.0, np.float32)
    k(kmod, "copy_f32")((grid_for(n, block, grid),), (block,), (src, dst, i64(n)))
    assert_bits_equal(dst[:n], src)
    assert (dst[n:] == -7.0).all()


@pytest.mark.parametrize("n,block,grid", SIZES)
def test_fill(kmod, rng, n, block, grid):
    v = f32(rng.standard_normal())
    x = np.full(n + PAD, NAN, np.float32)
    k(kmod, "fill_f32")((grid_for(n, block, grid),), (block,), (x, i64(n), v))
    assert_bits_equal(x[:n], np.full(n, v, np.float32))
    assert np.isnan(x[n:]).all()

    vi = i32(rng.integers(-2**31, 2**31 - 1))
    xi = np.full(n + PAD, -1, np.int32)
    k(kmod, "fill_i32")((grid_for(n, block, grid),), (block,), (xi, i64(n), vi))
    assert (xi[:n] == vi).all()
    assert (xi[n:] == -1).all()
