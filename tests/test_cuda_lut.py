"""The A2ATS retrieval kernels kernels/lut.cu (build_lut_f32) and kernels/vq_assign.cu
(vq_assign_f32), run on the CPU through tests/cuda_shim (and through cupy.RawModule under
``pytest -m gpu``), on fresh random inputs (seed printed; pin one with A2ATS_TEST_SEED=N).

Outputs are poisoned before the launch (NaN for the LUT, a sentinel for the code buffer), with
a poisoned guard behind the LUT, so a missing write or a write out of place fails.

Limits:
  build_lut_f32  normwise relative error max|got - ref| / max|ref| <= TOL_LUT against a float64
                 einsum of the same f32 inputs (f32 products summed over ds <= 256 terms), and
                 the same limit against CPUBackend(native_retrieval=False).build_lut.
  vq_assign_f32  codes equal the float64 argmin (smallest index on ties) of
                 cnorm - 2 x'.c, x' = x @ L, wherever the reference's best two distances differ
                 by more than TIE_REL * (|x'_m|^2 + cnorm_best) (the magnitude of the terms the
                 f32 kernel rounds); such near ties must be rare (<= 1% of the codes). Equal to
                 vq.Codebook.assign_codes on the same keys outside the near ties.
"""
from __future__ import annotations

import ctypes
import re

import numpy as np
import pytest

from cuda_shim import shim_module
from cuda_shim.shim import sanitizer

from a2ats_lite.backend.cpu import CPUBackend
from a2ats_lite.vq import Codebook, estimate_H

NAN = np.float32("nan")
TOL_LUT = 1e-5
TIE_REL = 1e-5
SENTINEL = 0xBEEF          # > any code (C <= 4096 here)
LUT_BLOCK = 128
VQ_BLOCK = 256

i32 = np.int32


@pytest.fixture(scope="module", autouse=True)
def _blas_one_thread_under_tsan():
    """Under A2ATS_SHIM_SAN=thread, numpy's OpenBLAS runs single-threaded while this module runs:
    its worker threads synchronize by spinning, which ThreadSanitizer (preloaded into the whole
    process) reports as races in host code (estimate_H, Codebook.subspaces, the GEMMs of
    Codebook.assign_codes), not in the kernels."""
    if sanitizer() != "thread":
        yield
        return
    libs = sorted(set(re.findall(r"(/\S*openblas\S*\.so\S*)", open("/proc/self/maps").read())))
    undo = []
    for path in libs:
        lib = ctypes.CDLL(path)
        for set_name, get_name in (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                                   ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                                   ("openblas_set_num_threads", "openblas_get_num_threads")):
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                setn, getn = getattr(lib, set_name), getattr(lib, get_name)
                setn.argtypes, getn.restype = [ctypes.c_int], ctypes.c_int
                undo.append((setn, getn()))
                setn(1)
                break
    yield
    for setn, n in undo:
        setn(n)


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape
    assert np.all(np.isfinite(got)), "non-finite output (unwritten element?)"
    return float(np.max(np.abs(got - ref)) / max(np.max(np.abs(ref)), 1e-30))


# ---- build_lut ---------------------------------------------------------------------------------

def launch_lut(kmod, q, cent, block=LUT_BLOCK, guard=64):
    """lut (S, G, g, M, C) from the kernel, and the guard behind it (must stay NaN)."""
    S, G, g, d = q.shape
    _, M, C, ds = cent.shape
    buf = np.full(S * G * g * M * C + guard, NAN, np.float32)
    kmod("lut").get_function("build_lut_f32")(
        (-(-C // block), M, S * G), (block,),
        (q, cent, buf, i32(G), i32(g), i32(C), i32(ds)))
    return buf[:-guard].reshape(S, G, g, M, C), buf[-guard:]


def ref_lut(q, cent):
    S, G, g, d = q.shape
    _, M, C, ds = cent.shape
    return np.einsum("sgjmd,gmcd->sgjmc", q.astype(np.float64).reshape(S, G, g, M, ds),
                     cent.astype(np.float64))


LUT_CASES = [
    # S, G, g, M, d, C, block
    (1, 2, 1, 1, 64, 1, LUT_BLOCK),
    (3, 2, 2, 2, 80, 33, LUT_BLOCK),
    (1, 1, 4, 4, 256, 255, LUT_BLOCK),
    (1, 2, 8, 1, 256, 4096, LUT_BLOCK),
    (3, 1, 8, 4, 64, 256, LUT_BLOCK),
    (3, 2, 4, 1, 80, 255, 96),           # block not a multiple of 32 (no warp collectives)
    (1, 2, 1, 2, 256, 4096, 256),
    (1, 1, 12, 2, 64, 33, 64),           # 9..16 queries: two passes of 8
    (3, 1, 16, 4, 80, 100, LUT_BLOCK),
    (1, 1, 3, 32, 256, 256, LUT_BLOCK),  # many small subspaces (ds = 8)
]


@pytest.mark.parametrize("S,G,g,M,d,C,block", LUT_CASES)
def test_build_lut(kmod, rng, S, G, g, M, d, C, block):
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    cent = rng.standard_normal((G, M, C, d // M)).astype(np.float32)
    lut, guard = launch_lut(kmod, q, cent, block)
    assert np.all(np.isnan(guard)), "write past the end of lut"
    ref = ref_lut(q, cent)
    assert rel_err(lut, ref) <= TOL_LUT
    host = CPUBackend(native_retrieval=False).build_lut(q, cent)
    assert host.shape == lut.shape
    assert rel_err(lut, host) <= TOL_LUT


@pytest.mark.parametrize("g,ds", [(17, 16), (2, 257)])
def test_build_lut_refuses_limits(rng, g, ds):
    q = rng.standard_normal((1, 1, g, ds)).astype(np.float32)
    cent = rng.standard_normal((1, 1, 5, ds)).astype(np.float32)
    lut, guard = launch_lut(shim_module, q, cent)
    assert np.all(np.isnan(lut)) and np.all(np.isnan(guard))


# ---- vq_assign ---------------------------------------------------------------------------------

def make_books(rng, G, d, M, C):
    """One vq.Codebook per KV head: a query-aware metric L (Cholesky factor of a random H)
    and centroids (key space for M = 1, k' space for M > 1), as tests/test_pq.py builds them."""
    books = []
    for _ in range(G):
        L = estimate_H(rng.standard_normal((2 * d, d)) * rng.uniform(0.2, 3, d))[1].astype(np.float32)
        if M == 1:
            books.append(Codebook(rng.standard_normal((C, d)).astype(np.float32), L))
        else:
            books.append(Codebook(None, L, rng.standard_normal((M, C, d // M)).astype(np.float32)))
    Lmat = np.stack([b.L for b in books]).astype(np.float32)                  # (G, d, d)
    sub = np.stack([b.subspaces() for b in books]).astype(np.float32)         # (G, M, C, ds)
    cnorm = np.einsum("gmcd,gmcd->gmc", sub.astype(np.float64),
                      sub.astype(np.float64)).astype(np.float32)              # (G, M, C)
    return books, Lmat, sub, cnorm


def launch_vq(kmod, x, Lmat, sub, cnorm, codes, first, block=VQ_BLOCK, grid_n=None, **over):
    """Launch grid (n, G) [grid_n: another x], block (block); `over` replaces the scalar
    arguments n, d, M, C (tests of invalid launches)."""
    G = x.shape[1]
    _, M, C, ds = sub.shape
    a = dict(n=x.shape[0], d=M * ds, M=M, C=C) | over
    kmod("vq_assign").get_function("vq_assign_f32")(
        (grid_n or max(a["n"], 1), G), (block,),
        (x, Lmat, sub, cnorm, codes, i32(a["n"]), i32(a["d"]), i32(a["M"]), i32(a["C"]),
         i32(codes.shape[-1]), i32(first)))


def ref_vq(x, Lmat, sub, cnorm):
    """(codes (n, G, M) float64 argmin, near (n, G, M) bool: best two within TIE_REL)."""
    n, G, d = x.shape
    _, M, C, ds = sub.shape
    xp = np.einsum("ngk,gkt->ngt", x.astype(np.float64), Lmat.astype(np.float64))
    xp = xp.reshape(n, G, M, ds)
    dist = cnorm.astype(np.float64)[None] - 2 * np.einsum("ngmd,gmcd->ngmc", xp, sub.astype(np.float64))
    code = np.argmin(dist, axis=-1)
    best = np.take_along_axis(dist, code[..., None], -1)[..., 0]
    if C > 1:
        second = np.partition(dist, 1, axis=-1)[..., 1]
    else:
        second = np.full_like(best, np.inf)
    scale = np.einsum("ngmd,ngmd->ngm", xp, xp) + np.take_along_axis(
        cnorm.astype(np.float64)[None].repeat(n, 0), code[..., None], -1)[..., 0]
    return code, (second - best) <= TIE_REL * scale


VQ_CASES = [
    # G, d, M, C, n, n_ctx, first, block
    (2, 64, 1, 1, 3, 5, 1, VQ_BLOCK),
    (2, 80, 1, 33, 4, 9, 5, VQ_BLOCK),        # first + n == n_ctx
    (1, 128, 1, 4096, 3, 8, 2, VQ_BLOCK),
    (2, 128, 4, 256, 4, 7, 0, VQ_BLOCK),
    (2, 80, 2, 255, 3, 10, 4, 64),
    (1, 256, 32, 256, 2, 4, 1, VQ_BLOCK),     # ds = 8
    (2, 64, 8, 16, 5, 5, 0, 96),
]


@pytest.mark.parametrize("G,d,M,C,n,n_ctx,first,block", VQ_CASES)
def test_vq_assign(kmod, rng, G, d, M, C, n, n_ctx, first, block):
    books, Lmat, sub, cnorm = make_books(rng, G, d, M, C)
    x = rng.standard_normal((n, G, d)).astype(np.float32)
    # half the keys near a centroid (as real keys are), half arbitrary
    for kh, b in enumerate(books):
        pick = rng.integers(0, C, (n // 2, M))
        kp = np.concatenate([b.subspaces()[m][pick[:, m]] for m in range(M)], 1)
        near = np.linalg.solve(b.L.astype(np.float64).T, kp.T).T               # k = k' L^-1
        x[: n // 2, kh] = (near + 0.05 * rng.standard_normal(near.shape)).astype(np.float32)
    codes = np.full((G, M, n_ctx), SENTINEL, np.uint16)
    launch_vq(kmod, x, Lmat, sub, cnorm, codes, first, block=block)

    outside = np.ones(n_ctx, bool)
    outside[first:first + n] = False
    assert np.all(codes[:, :, outside] == SENTINEL), "a column outside [first, first + n) was written"
    got = codes[:, :, first:first + n].transpose(2, 0, 1).astype(np.int64)   # (n, G, M)
    assert np.all(got < C), "unwritten or invalid code"
    ref, near = ref_vq(x, Lmat, sub, cnorm)
    assert near.sum() <= max(1, 0.01 * near.size), f"{near.sum()} near ties of {near.size}"
    bad = (got != ref) & ~near
    assert not bad.any(), f"codes differ from the float64 argmin at {np.argwhere(bad)[:5].tolist()}"
    host = np.stack([b.assign_codes(x[:, kh]) for kh, b in enumerate(books)], 1)   # (n, G, M)
    assert host.shape == got.shape
    bad = (got != host) & ~near
    assert not bad.any(), f"codes differ from Codebook.assign_codes at {np.argwhere(bad)[:5].tolist()}"


def test_vq_assign_ties_take_smallest_index(kmod, rng):
    """Duplicated centroids (exact ties in any arithmetic): the smallest index wins, both within
    one thread's scan (a copy VQ_BLOCK further on) and across threads (the block argmin)."""
    G, d, M, C, n = 1, 64, 2, 350, 4
    _, Lmat, sub, cnorm = make_books(rng, G, d, M, C)
    for at in (5 + VQ_BLOCK, 310):              # copies of 5..44: same thread / other threads
        sub[:, :, at:at + 40] = sub[:, :, 5:45]
        cnorm[:, :, at:at + 40] = cnorm[:, :, 5:45]
    x = np.empty((n, G, d), np.float32)
    Linv = np.linalg.inv(Lmat[0].astype(np.float64))
    for i in range(n):     # keys at centroid 5 + 7 i of each subspace (k' = k L)
        kp = np.concatenate([sub[0, m, 5 + 7 * i] for m in range(M)]).astype(np.float64)
        x[i, 0] = (kp @ Linv + 1e-3 * rng.standard_normal(d)).astype(np.float32)
    codes = np.full((G, M, n), SENTINEL, np.uint16)
    launch_vq(kmod, x, Lmat, sub, cnorm, codes, 0)
    # the copies tie exactly (same f32 inputs, same arithmetic); no other centroid comes close
    ref, near = ref_vq(x, Lmat, sub[:, :, :5 + VQ_BLOCK], cnorm[:, :, :5 + VQ_BLOCK])
    assert not near.any()
    np.testing.assert_array_equal(codes.transpose(2, 0, 1), ref)


def test_vq_assign_invalid_args_write_nothing(rng):
    G, d, M, C, n, n_ctx = 2, 64, 2, 40, 3, 6
    _, Lmat, sub, cnorm = make_books(rng, G, d, M, C)
    x = rng.standard_normal((n, G, d)).astype(np.float32)
    cases = [
        dict(first=-1),
        dict(first=n_ctx - n + 1),              # first + n > n_ctx
        dict(first=2**31 - 2, n=3),             # first + n overflows int32: refused, not wrapped
        dict(first=0, n=0),
        dict(first=0, M=3),                     # d % M != 0
        dict(first=0, d=257),
        dict(first=0, C=0),
        dict(first=0, C=65537),
    ]
    for kw in cases:
        codes = np.full((G, M, n_ctx), SENTINEL, np.uint16)
        first = kw.pop("first")
        launch_vq(shim_module, x, Lmat, sub, cnorm, codes, first, grid_n=n, **kw)
        assert np.all(codes == SENTINEL), f"invalid launch {kw}, first={first} wrote codes"


def test_vq_assign_extra_blocks_write_nothing(rng):
    """Blocks with blockIdx.x >= n (a grid rounded up by the caller) leave the buffer alone."""
    G, d, M, C, n, n_ctx = 1, 64, 4, 20, 2, 6
    _, Lmat, sub, cnorm = make_books(rng, G, d, M, C)
    x = rng.standard_normal((n + 2, G, d)).astype(np.float32)     # rows n, n+1 exist but are not keys
    codes = np.full((G, M, n_ctx), SENTINEL, np.uint16)
    launch_vq(shim_module, x, Lmat, sub, cnorm, codes, 1, n=n, grid_n=n + 2)
    assert np.all(codes[:, :, :1] == SENTINEL) and np.all(codes[:, :, 1 + n:] == SENTINEL)
    ref, near = ref_vq(x[:n], Lmat, sub, cnorm)
    got = codes[:, :, 1:1 + n].transpose(2, 0, 1)
    assert np.all((got == ref) | near)
