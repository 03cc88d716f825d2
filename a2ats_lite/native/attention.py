"""Attention over the KV cache read in place: causal attention of the dense layers
(native/attention.c) and attention over each (sequence, KV head)'s selected rows
(native/sparse_attention.c), for every KV cache type.
"""
from __future__ import annotations

import numpy as np

from ._lib import NativeError, _check, _f32, _ints, _out_f32, _selection, ffi, lib, n_threads_default
from .kv_quant import KV_TYPES, _kv_lists, kv_row_width, kv_type_of


def _heads(arrs, S: int, G: int, d: int, what: str):
    """S arrays (G, T_s, width) of one KV cache type (float32, float16, or uint8 q8_0 / q4_0
    blocks: kv_type_of) whose rows are contiguous (views of a cache buffer are read in place;
    anything else is copied) -> (pointer array, head strides in units int64 (S,), rows int64
    (S,), the type, arrays to keep alive)."""
    if isinstance(arrs, np.ndarray) or len(arrs) != S:
        raise NativeError(f"{what} must be a list of {S} arrays (one per sequence)")
    ptrs, strides, rows, keep, kt = [], [], [], [], None
    for s, a in enumerate(arrs):
        if not isinstance(a, np.ndarray) or a.ndim != 3 or a.shape[0] != G:
            raise NativeError(f"{what}[{s}] must be a ({G}, T, {d}) numpy array, got "
                              f"{getattr(a, 'shape', type(a))}")
        try:
            t = kv_type_of(a, d)
        except NativeError as e:
            raise NativeError(f"{what}[{s}]: {e}") from None
        if a.shape[2] != kv_row_width(t, d) or (kt is not None and t != kt):
            raise NativeError(f"{what}[{s}] is a {t} array of shape {a.shape}; expected rows of "
                              f"{d} values, float32, float16 or q8_0 / q4_0 blocks, the same "
                              "type for every sequence")
        kt = t
        T, item, w = a.shape[1], a.itemsize, a.shape[2]
        s0, s1, s2 = a.strides
        if ((w > 1 and s2 != item) or (T > 1 and s1 != w * item)
                or (G > 1 and (s0 < T * w * item or s0 % item))):
            a = np.ascontiguousarray(a)
            s0 = a.strides[0]
        keep.append(a)
        ptrs.append(ffi.cast("void *", a.ctypes.data) if a.size else ffi.NULL)
        strides.append(s0 // item if G > 1 else T * w)
        rows.append(T)
    return (ffi.new("void *[]", ptrs or [ffi.NULL]), np.array(strides, dtype=np.int64),
            np.array(rows, dtype=np.int64), kt, keep)


def attention(q, keys, values, pos0, seq, lo, hi, scale: float, out=None, n_threads=None) -> np.ndarray:
    """Causal attention of query rows over their sequences' cached rows, read in place.

    q (n, H, d) float32 post-RoPE; keys / values: lists of S arrays (G, T_s, width), each list
    of one KV cache type (K and V may differ): float32 or float16 (width d), or uint8 q8_0 /
    q4_0 blocks (kv_row_width; read in place, decoded per key block), rows contiguous (a cache
    buffer's view [:, :T] is read in place); pos0 (S,): the absolute position of each sequence's row 0;
    seq, lo, hi (n,): row i attends rows [lo[i], hi[i]) of sequence seq[i] (its causal span,
    window included). -> out (n, H, d) float32, out[i, h] = softmax(scale * q[i, h] . K[k, t])
    @ V[k, t] over its span, k = h // (H // G); zeros for an empty span.
    A row's numbers do not depend on the other rows or sequences of the call, nor on how its
    sequence's prompt was chunked (key blocks at absolute positions). Bad spans, sequence
    indices or shapes raise NativeError before anything is computed."""
    q = _f32(q, "attention: q", 3)
    n, H, d = q.shape
    S = len(keys) if not isinstance(keys, np.ndarray) else -1
    if S < 1 or isinstance(values, np.ndarray) or len(values) != S:
        raise NativeError("attention: keys and values must be lists of one array per sequence "
                          "(at least one)")
    G = keys[0].shape[0] if isinstance(keys[0], np.ndarray) and keys[0].ndim == 3 else 0
    if G < 1 or H % G:
        raise NativeError(f"attention: {H} query heads do not share {G} KV heads evenly")
    kptr, ks, krows, kdt, keep = _heads(keys, S, G, d, "attention: keys")
    vptr, vs, vrows, vdt, keep2 = _heads(values, S, G, d, "attention: values")
    if not np.array_equal(krows, vrows):
        raise NativeError(f"attention: keys hold {krows.tolist()} rows, values {vrows.tolist()}")
    pos0 = _ints(pos0, S, "attention: pos0")
    seq, lo, hi = (_ints(a, n, f"attention: {nm}") for a, nm in ((seq, "seq"), (lo, "lo"), (hi, "hi")))
    if (pos0 < 0).any():
        raise NativeError(f"attention: negative first position in pos0 {pos0.tolist()}")
    if n:
        bad = (seq < 0) | (seq >= S)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise NativeError(f"attention: row {i} names sequence {int(seq[i])} of {S}")
        bad = (lo < 0) | (lo > hi) | (hi > krows[seq])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise NativeError(f"attention: row {i} span [{int(lo[i])}, {int(hi[i])}) is outside "
                              f"the {int(krows[seq[i]])} rows of sequence {int(seq[i])}")
    out = _out_f32(out, (n, H, d), "attention")
    if n == 0:
        return out
    rc = lib.a2n_attention(ffi.from_buffer("float[]", q), q.size, n, H, G, d, S,
                           kptr, ffi.from_buffer("int64_t[]", ks), KV_TYPES[kdt],
                           vptr, ffi.from_buffer("int64_t[]", vs), KV_TYPES[vdt],
                           ffi.from_buffer("int64_t[]", krows), ffi.from_buffer("int64_t[]", pos0),
                           ffi.from_buffer("int64_t[]", seq), ffi.from_buffer("int64_t[]", lo),
                           ffi.from_buffer("int64_t[]", hi), float(scale),
                           ffi.from_buffer("float[]", out, require_writable=True), out.size,
                           n_threads or n_threads_default())
    del keep, keep2
    _check(rc, "attention")
    return out


def sparse_attention(q, keys, values, idx, lens, scale: float, out=None, n_threads=None) -> np.ndarray:
    """out (S, G, g, d) float32: out[s,k,j] = softmax(scale * q[s,k,j] . K_s[k, sel]) @ V_s[k, sel]
    with sel = idx[s, k, :lens[s, k]].

    q (S, G, g, d) float32 (post-RoPE); keys / values: lists of S C-contiguous arrays
    (G, cap_s, width), each list of one KV cache type, K and V possibly different: float32 or
    float16 rows (width d), or uint8 q8_0 / q4_0 blocks (kv_row_width; a selected row is
    decoded as it is read) (views of the host store, memory-mapped is fine); idx (S, G, Kmax)
    int64 and lens (S, G) int32 as select_topk returns them.
    One pass over the selected rows (gather fused with an online softmax), float32
    accumulation; an empty selection gives zeros. An index outside [0, cap_s) or a
    length outside [0, Kmax] raises NativeError before anything is computed."""
    q = _f32(q, "sparse_attention: q", 4)
    S, G, g, d = q.shape
    idx, lens = _selection(idx, lens, "sparse_attention", S, G)
    caps, kt, vt, kptr, vptr, keep = _kv_lists(keys, values, S, G, d, "sparse_attention")
    out = _out_f32(out, (S, G, g, d), "sparse_attention")
    if out.size == 0:
        return out
    rc = lib.a2n_sparse_attention(ffi.from_buffer("float[]", q), q.size, S, G, g, d, kptr, vptr,
                                  ffi.from_buffer("int64_t[]", caps), KV_TYPES[kt], KV_TYPES[vt],
                                  ffi.from_buffer("int64_t[]", idx), idx.shape[2],
                                  ffi.from_buffer("int32_t[]", lens), float(scale),
                                  ffi.from_buffer("float[]", out, require_writable=True), out.size,
                                  n_threads or n_threads_default())
    del keep
    _check(rc, "sparse_attention")
    return out
