"""A2ATS retrieval kernels (native/retrieval.c, select.c, topk.c, rerank.c): the query x centroid LUT, the
top-K selection over product codes, the exact re-rank of a selection and exact scores over
a span of cached keys. The fast-scan variant of the selection is fastscan.py.
"""
from __future__ import annotations

import numpy as np

from ._lib import (NativeError, _check, _f32, _ints, _out_f32, _per_seq, _ptrs, _selection, ffi,
                   lib, n_threads_default)
from .kv_quant import KV_TYPES, _kv_lists


def build_lut(q, centroids, out=None, n_threads=None) -> np.ndarray:
    """lut (S, G, g, M, C) float32: lut[s,k,j,m,c] = q[s,k,j, m*dsub:(m+1)*dsub] . centroids[k,m,c].

    q (S, G, g, d) float32 (S sequences, G KV heads, g query heads per KV head);
    centroids (G, M, C, dsub) float32 with M * dsub == d (M product-quantization
    subspaces; M = 1 is plain VQ)."""
    q = _f32(q, "build_lut: q", 4)
    centroids = _f32(centroids, "build_lut: centroids", 4)
    S, G, g, d = q.shape
    Gc, M, C, dsub = centroids.shape
    if Gc != G or M * dsub != d or M < 1 or C < 1:
        raise NativeError(f"build_lut: centroids {centroids.shape} do not fit q {q.shape} "
                          f"(need (G={G}, M, C, dsub) with M * dsub = {d})")
    out = _out_f32(out, (S, G, g, M, C), "build_lut")
    if out.size == 0:
        return out
    rc = lib.a2n_build_lut(ffi.from_buffer("float[]", q), q.size,
                           ffi.from_buffer("float[]", centroids), centroids.size,
                           S, G, g, d, M, C, ffi.from_buffer("float[]", out, require_writable=True),
                           out.size, n_threads or n_threads_default())
    _check(rc, "build_lut")
    return out


def _select_args(what, T, caps, G: int, g: int, sinks, window, K, out_idx, out_len):
    """The checks shared by the selections: T (S,) within the code capacities caps (S,),
    sinks, window >= 0, K >= 1 (clamped to what int64 holds) and the outputs idx
    (S, G, >= Kmax) int64 and lens (S, G) int32 (made when None)."""
    S = len(caps)
    T = _ints(T, S, f"{what}: T")
    sinks, window, K = int(sinks), int(window), int(K)
    if sinks < 0 or window < 0 or K < 1:
        raise NativeError(f"{what}: need sinks >= 0, window >= 0, K >= 1; got "
                          f"{sinks}, {window}, {K}")
    big = 1 << 62                    # beyond any capacity: same result, fits int64
    sinks, window, K = min(sinks, big), min(window, big), min(K, big)
    if S and ((T < 0).any() or (T > caps).any()):
        s = int(np.flatnonzero((T < 0) | (T > caps))[0])
        raise NativeError(f"{what}: T[{s}] = {int(T[s])} outside [0, {int(caps[s])}] "
                          "(the sequence's code capacity)")
    lo = np.minimum(sinks, T)
    hi = np.maximum(lo, T - window)
    need = int((lo + np.minimum(min(K * g, big), hi - lo) + T - hi).max()) if S else 0
    if out_idx is None:
        out_idx = np.empty((S, G, need), dtype=np.int64)
    elif (not isinstance(out_idx, np.ndarray) or out_idx.dtype != np.int64 or out_idx.ndim != 3
          or out_idx.shape[:2] != (S, G) or out_idx.shape[2] < need
          or not out_idx.flags.c_contiguous or not out_idx.flags.writeable):
        raise NativeError(f"{what}: out_idx must be a writable C-contiguous int64 array "
                          f"({S}, {G}, >= {need})")
    if out_len is None:
        out_len = np.empty((S, G), dtype=np.int32)
    elif (not isinstance(out_len, np.ndarray) or out_len.dtype != np.int32
          or out_len.shape != (S, G) or not out_len.flags.c_contiguous
          or not out_len.flags.writeable):
        raise NativeError(f"{what}: out_len must be a writable C-contiguous int32 "
                          f"array ({S}, {G})")
    return T, sinks, window, K, out_idx, out_len


def _run_select(what, fn, lut, dims, ctype, codes, caps, T, sinks, window, K, out_idx, out_len,
                n_threads):
    """Call a selection kernel fn(lut, lut_len, *dims, codes, caps, T, sinks, window, K, idx,
    kmax, lens, n_threads) on arguments _select_args checked -> (out_idx, out_len), written."""
    if out_len.size == 0:                      # (S, G): no sequence or no KV head
        return out_idx, out_len
    cptr, keep = _ptrs(ctype, codes)
    rc = fn(ffi.from_buffer("float[]", lut), lut.size, *dims, cptr,
            ffi.from_buffer("int64_t[]", caps), ffi.from_buffer("int64_t[]", T), sinks, window, K,
            ffi.from_buffer("int64_t[]", out_idx, require_writable=True), out_idx.shape[2],
            ffi.from_buffer("int32_t[]", out_len, require_writable=True),
            n_threads or n_threads_default())
    del keep
    _check(rc, what)
    return out_idx, out_len


def select_topk(lut, codes, T, sinks: int, window: int, K: int, out_idx=None, out_len=None,
                n_threads=None):
    """A2ATS selection for every (sequence s, KV head k) -> (idx, lens).

    lut (S, G, g, M, C) float32 (build_lut); codes: list of S uint16 arrays (G, M, cap_s),
    C-contiguous, cap_s >= T[s]; T (S,) int: tokens sequence s's query may see; sinks,
    window >= 0, K >= 1. Candidates of (s, k) are [lo, hi), lo = min(sinks, T),
    hi = max(lo, T - window). If hi - lo <= K all are taken; else score[j, t] =
    sum_m lut[s,k,j,m,codes[k,m,t]] (float32, in m order), each query head j takes its
    top-K positions (ties: smaller position first) and the g heads' picks are united.
    idx (S, G, Kmax) int64: sorted positions [0, lo) + picks + [hi, T), then -1;
    Kmax = max over s of lo + min(K*g, hi - lo) + T - hi (out_idx may have more columns);
    lens (S, G) int32. A code >= C among the scored candidates raises NativeError with
    nothing written."""
    lut = _f32(lut, "select_topk: lut", 5)
    S, G, g, M, C = lut.shape
    if C > 65536:
        raise NativeError(f"select_topk: {C} centroids, codes are uint16 (at most 65536)")
    codes, caps, _ = _per_seq(codes, S, "select_topk: codes", (G, M), (np.uint16,), ())
    args = _select_args("select_topk", T, caps, G, g, sinks, window, K, out_idx, out_len)
    return _run_select("select_topk", lib.a2n_select_topk, lut, (S, G, g, M, C), "uint16_t",
                       codes, caps, *args, n_threads)


def rerank(q, keys, idx, lens, T, sinks: int, window: int, K: int, n_threads=None):
    """Exact re-rank of selections (idx (S, G, Kmax) int64, lens (S, G) int32, as select_topk
    / fastscan_select return them) -> (idx, lens, ncand (S, G) int64).

    q (S, G, g, d) float32 (post-RoPE, scaled); keys: list of S arrays (G, cap_s, width) of one
    KV cache type (float32 / float16, or uint8 q8_0 / q4_0 blocks: the host store, read in
    place), cap_s >= T[s]. Per (s, k) the selected
    positions in [lo, hi) (select_topk's candidates) are counted in ncand; when more than K,
    each query head keeps its top K by q . k (float32, ties to the smaller position) and the
    g heads' picks are united. The result is select_topk's layout: [0, lo) + picks + [hi, T)."""
    q = _f32(q, "rerank: q", 4)
    S, G, g, d = q.shape
    idx, lens = _selection(idx, lens, "rerank", S, G)
    caps, kt, _, kptr, _, keep = _kv_lists(keys, None, S, G, d, "rerank")
    T, sinks, window, K, out_idx, out_len = _select_args("rerank", T, caps, G, g, sinks, window,
                                                         K, None, None)
    ncand = np.zeros((S, G), np.int64)
    if S * G == 0:
        return out_idx, out_len, ncand
    rc = lib.a2n_rerank(ffi.from_buffer("float[]", q), q.size, S, G, g, d, kptr,
                        ffi.from_buffer("int64_t[]", caps), KV_TYPES[kt],
                        ffi.from_buffer("int64_t[]", idx), idx.shape[2],
                        ffi.from_buffer("int32_t[]", lens), ffi.from_buffer("int64_t[]", T),
                        sinks, window, K,
                        ffi.from_buffer("int64_t[]", out_idx, require_writable=True),
                        out_idx.shape[2],
                        ffi.from_buffer("int32_t[]", out_len, require_writable=True),
                        ffi.from_buffer("int64_t[]", ncand, require_writable=True),
                        n_threads or n_threads_default())
    del keep
    _check(rc, "rerank")
    return out_idx, out_len, ncand


def exact_scores(q, keys, lo, hi, out=None, n_threads=None) -> np.ndarray:
    """scores (S, G, g, W) float32, W = max(hi - lo): scores[s,k,j,t] = q[s,k,j] . K_s[k, lo[s] + t]
    for t < hi[s] - lo[s], -inf after.

    q (S, G, g, d) float32; keys: list of S C-contiguous (G, cap_s, width) arrays of one KV
    cache type (float32 / float16 rows, or uint8 q8_0 / q4_0 blocks, decoded as they are
    read); lo, hi (S,) int with 0 <= lo <= hi <= cap_s (out may have more columns)."""
    q = _f32(q, "exact_scores: q", 4)
    S, G, g, d = q.shape
    lo = _ints(lo, S, "exact_scores: lo")
    hi = _ints(hi, S, "exact_scores: hi")
    caps, kt, _, kptr, _, keep = _kv_lists(keys, None, S, G, d, "exact_scores")
    if S and ((lo < 0).any() or (hi < lo).any() or (hi > caps).any()):
        raise NativeError(f"exact_scores: need 0 <= lo <= hi <= capacity, got lo={lo.tolist()}, "
                          f"hi={hi.tolist()}, capacities {caps.tolist()}")
    W = int((hi - lo).max()) if S else 0
    if out is None:
        out = np.empty((S, G, g, W), dtype=np.float32)
    elif (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.ndim != 4
          or out.shape[:3] != (S, G, g) or out.shape[3] < W or not out.flags.c_contiguous
          or not out.flags.writeable):
        raise NativeError(f"exact_scores: out must be a writable C-contiguous float32 array "
                          f"({S}, {G}, {g}, >= {W})")
    if out.size == 0:
        return out
    rc = lib.a2n_exact_scores(ffi.from_buffer("float[]", q), q.size, S, G, g, d, kptr,
                              ffi.from_buffer("int64_t[]", caps), KV_TYPES[kt],
                              ffi.from_buffer("int64_t[]", lo), ffi.from_buffer("int64_t[]", hi),
                              ffi.from_buffer("float[]", out, require_writable=True), out.shape[3],
                              n_threads or n_threads_default())
    del keep
    _check(rc, "exact_scores")
    return out
