"""Row gathers: rows of any C-contiguous array by index, KV cache rows decoded to float32,
every sequence's selected rows in one call, and the bookkeeping of the GPU cache of
retrieved rows (native/ops.c, retrieval.c).
"""
from __future__ import annotations

import numpy as np

from ._lib import NativeError, _check, _per_seq, _ptrs, _selection, ffi, lib, n_threads_default
from .kv_quant import KV_BLOCKS, KV_TYPES, _kv_lists, kv_row_width, kv_type_of
from .quant import dequantize


def gather_rows(src: np.ndarray, idx, out: np.ndarray | None = None, n_threads=None) -> np.ndarray:
    """out[i] = src[idx[i]] for rows of src (n_rows, ...), e.g. a memory-mapped KV store."""
    if not isinstance(src, np.ndarray) or src.ndim < 1 or not src.flags.c_contiguous:
        raise NativeError("gather_rows: src must be a C-contiguous numpy array")
    idx = np.asarray(idx)
    if idx.size and idx.dtype.kind not in "iu":
        raise NativeError(f"gather_rows: indices must be integers, got {idx.dtype}")
    if idx.ndim > 1:
        raise NativeError(f"gather_rows: indices must be 1-D, got shape {idx.shape}")
    idx = np.ascontiguousarray(idx, dtype=np.int64).reshape(-1)
    row_shape = src.shape[1:]
    row_bytes = src.dtype.itemsize * int(np.prod(row_shape, dtype=np.int64))
    if out is None:
        out = np.empty((len(idx),) + row_shape, dtype=src.dtype)
    elif (out.dtype != src.dtype or out.shape[1:] != row_shape or not out.flags.c_contiguous
          or not out.flags.writeable):
        raise NativeError(f"gather_rows: out must be a writable C-contiguous {src.dtype} array "
                          f"of rows {row_shape}, got {out.dtype} {out.shape}")
    if len(idx) == 0:
        return out
    if len(idx) > out.shape[0]:
        raise NativeError(f"gather_rows: {len(idx)} indices but out holds {out.shape[0]} rows")
    bad = idx[(idx < 0) | (idx >= src.shape[0])]
    if bad.size:
        raise NativeError(f"gather_rows: row index {int(bad[0])} out of range "
                          f"[0, {src.shape[0]})")
    if row_bytes == 0:
        return out
    rc = lib.a2n_gather_rows(ffi.from_buffer("uint8_t[]", src.reshape(-1).view(np.uint8)),
                             src.shape[0], row_bytes, ffi.from_buffer("int64_t[]", idx), len(idx),
                             ffi.from_buffer("uint8_t[]", out.reshape(-1).view(np.uint8),
                                             require_writable=True),
                             out.shape[0], n_threads or n_threads_default())
    _check(rc, "gather_rows")
    return out


def kv_gather(src, idx, d: int, n_threads=None) -> np.ndarray:
    """Rows idx of src (n, width), rows of d values of one KV cache type (kv_type_of), as
    float32 (len(idx), d): gathered by gather_rows (an index outside [0, n) raises before
    anything is copied), then f16 widened / q8_0 / q4_0 blocks decoded (only those rows)."""
    if not isinstance(src, np.ndarray) or src.ndim != 2:
        raise NativeError("kv_gather: src must be a 2-D numpy array of cache rows")
    t = kv_type_of(src, d)
    if src.shape[1] != kv_row_width(t, d):
        raise NativeError(f"kv_gather: rows of {src.shape[1]} are not {t} rows of {d} values")
    rows = gather_rows(src, idx, n_threads=n_threads)              # (m, width) as stored
    if t not in KV_BLOCKS:
        return rows.astype(np.float32, copy=False)
    if len(rows) == 0:
        return np.empty((0, d), np.float32)
    return dequantize(rows, KV_TYPES[t], (len(rows), d), n_threads=n_threads)


def gather_sel(keys, values, idx, lens, kout=None, vout=None, n_threads=None, d=None,
               decode=False):
    """The selected rows of every (sequence, KV head) in one call: kout[s,k,i] =
    K_s[k, idx[s,k,i]], vout likewise, for i < lens[s,k] (rows past lens untouched).

    keys / values: lists of S C-contiguous (G, cap_s, width) arrays of the host store, each
    list of one KV cache type (float32 / float16 rows, or uint8 q8_0 / q4_0 blocks; K and V
    may differ); d: the head dim (needed for block rows; float rows: their width);
    idx (S, G, Kmax) int64, lens (S, G) int32. kout / vout (made when None): decode=False
    (S, G, Kmax, width) rows as stored (e.g. pinned staging buffers), decode=True
    (S, G, Kmax, d) float32, the rows decoded. Threads split the (sequence, head, K|V) copies.
    A bad index or length raises before anything is copied."""
    idx, lens = _selection(idx, lens, "gather_sel")
    S, G, kmax = idx.shape
    if S == 0:
        raise NativeError("gather_sel: no sequences")
    if d is None:
        first = keys[0] if len(keys) and isinstance(keys[0], np.ndarray) else None
        if first is not None and first.dtype == np.uint8:
            raise NativeError("gather_sel: block rows (uint8) need the head dim d")
        d = first.shape[-1] if first is not None else 0
    caps, kt, vt, kptr, vptr, keep = _kv_lists(keys, values, S, G, int(d), "gather_sel")
    outs = []
    for name, o, arr, t in (("kout", kout, keys[0], kt), ("vout", vout, values[0], vt)):
        dt, w = (np.dtype(np.float32), d) if decode else (arr.dtype, kv_row_width(t, d))
        if o is None:
            o = np.empty((S, G, kmax, w), dtype=dt)
        elif (not isinstance(o, np.ndarray) or o.dtype != dt or o.shape != (S, G, kmax, w)
              or not o.flags.c_contiguous or not o.flags.writeable):
            raise NativeError(f"gather_sel: {name} must be a writable C-contiguous {dt} array "
                              f"({S}, {G}, {kmax}, {w}), got {getattr(o, 'dtype', type(o))} "
                              f"{getattr(o, 'shape', '')}")
        outs.append(o)
    rc = lib.a2n_gather_sel(S, G, d, kptr, vptr, ffi.from_buffer("int64_t[]", caps),
                            KV_TYPES[kt], KV_TYPES[vt], ffi.from_buffer("int64_t[]", idx), kmax,
                            ffi.from_buffer("int32_t[]", lens),
                            ffi.from_buffer("uint8_t[]", outs[0].reshape(-1).view(np.uint8),
                                            require_writable=True),
                            ffi.from_buffer("uint8_t[]", outs[1].reshape(-1).view(np.uint8),
                                            require_writable=True),
                            S * G * kmax, int(bool(decode)), n_threads or n_threads_default())
    del keep
    _check(rc, "gather_sel")
    return outs[0], outs[1]


def rowcache_plan(idx, lens, slot_of, token_at, hand, n_threads=None):
    """One step's bookkeeping of the GPU cache of retrieved rows (a2n_rowcache_plan).

    idx (S, G, Kmax) int64 / lens (S, G) int32: the step's selections; per sequence s (lists of
    S writable C-contiguous int32 arrays, updated in place): slot_of[s] (G, n_map) the slot of
    each token or -1, token_at[s] (G, n_slots) the token of each slot or -1, hand[s] (G,) the
    eviction clock. -> (slots (S, G, Kmax) int32: the slot of each selected token, miss_idx
    (S, G, Kmax) int64 / miss_slot (S, G, Kmax) int32: the tokens to fetch and where they go,
    miss_n (S, G) int32). A token >= n_map or a selection longer than n_slots raises before
    any map changes."""
    idx, lens = _selection(idx, lens, "rowcache_plan")
    S, G, kmax = idx.shape
    maps, map_caps, _ = _per_seq(slot_of, S, "rowcache_plan: slot_of", (G,), (np.int32,), ())
    toks, slot_caps, _ = _per_seq(token_at, S, "rowcache_plan: token_at", (G,), (np.int32,), ())
    hands, _, _ = _per_seq(hand, S, "rowcache_plan: hand", (), (np.int32,), ())
    for a in (*maps, *toks, *hands):
        if not a.flags.writeable:
            raise NativeError("rowcache_plan: the cache maps must be writable")
    if any(h.shape != (G,) for h in hands):
        raise NativeError(f"rowcache_plan: hand[s] must have shape ({G},)")
    slots = np.empty((S, G, kmax), np.int32)
    miss_idx = np.empty((S, G, kmax), np.int64)
    miss_slot = np.empty((S, G, kmax), np.int32)
    miss_n = np.zeros((S, G), np.int32)
    mptr, k1 = _ptrs("int32_t", maps)
    tptr, k2 = _ptrs("int32_t", toks)
    hptr, k3 = _ptrs("int32_t", hands)
    rc = lib.a2n_rowcache_plan(S, G, ffi.from_buffer("int64_t[]", idx), kmax,
                               ffi.from_buffer("int32_t[]", lens), mptr,
                               ffi.from_buffer("int64_t[]", map_caps), tptr,
                               ffi.from_buffer("int64_t[]", slot_caps), hptr,
                               ffi.from_buffer("int32_t[]", slots, require_writable=True),
                               ffi.from_buffer("int64_t[]", miss_idx, require_writable=True),
                               ffi.from_buffer("int32_t[]", miss_slot, require_writable=True),
                               ffi.from_buffer("int32_t[]", miss_n, require_writable=True),
                               n_threads or n_threads_default())
    del k1, k2, k3
    _check(rc, "rowcache_plan")
    return slots, miss_idx, miss_slot, miss_n
