"""Python face of the native C library (native/*.c, compiled by cffi at install).

Every call validates shapes and dtypes here and the C side re-checks sizes and
indices; a refused call raises NativeError, it never writes out of bounds.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from .errors import NativeError
from .gguf import GGML_BLOCK, GGML_TYPE_NAMES

try:
    from ._native import ffi, lib
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError("a2ats_lite's native library is not built: install the package with "
                      "`make install` or `pip install .` (needs a C compiler)") from e

# the types the C library decodes (ids of gguf.GGMLQuantizationType)
SUPPORTED_TYPES = (0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30)
# id -> (name, elements per block, bytes per block)
GGML_TYPES = {t: (GGML_TYPE_NAMES[t],) + tuple(GGML_BLOCK[t]) for t in SUPPORTED_TYPES}
# types with a fused AVX2 matmul_q kernel (the rest decode to a scratch row first)
FAST_MATMUL_TYPES = (2, 6, 8, 12, 13, 14)


@functools.cache
def n_threads_default() -> int:
    """os.cpu_count(), or the A2ATS_THREADS environment variable when set. Read once, at
    first use, and cached (it is asked on every native call); n_threads_default.cache_clear()
    makes the next call read them again."""
    env = os.environ.get("A2ATS_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise NativeError(f"A2ATS_THREADS={env!r} is not an integer") from None
        if n >= 1:
            return n
    return os.cpu_count() or 1


def simd(enabled: bool | None = None) -> bool:
    """Whether the AVX2 kernels are in use; enabled=False forces the portable
    scalar code (tests compare both). Not to be switched during another call."""
    return bool(lib.a2n_simd(-1 if enabled is None else int(bool(enabled))))


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise NativeError(f"{what}: {ffi.string(lib.a2n_strerror(rc)).decode()}")


def _type(ggml_type: int) -> None:
    if ggml_type not in SUPPORTED_TYPES:
        name = GGML_TYPE_NAMES.get(ggml_type, str(ggml_type))
        raise NativeError(f"ggml type {name} is not supported; supported: "
                          + ", ".join(GGML_TYPE_NAMES[t] for t in SUPPORTED_TYPES))


def type_nbytes(ggml_type: int, n_elems: int) -> int:
    _type(ggml_type)
    block, size = GGML_BLOCK[ggml_type]
    if n_elems % block:
        raise NativeError(f"{n_elems} elements is not a whole number of "
                          f"{GGML_TYPE_NAMES[ggml_type]} blocks of {block}")
    return n_elems // block * size


def _raw(raw) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8) if raw.flags.c_contiguous else np.ascontiguousarray(raw).view(np.uint8)
    return np.ascontiguousarray(raw)


def dequantize(raw, ggml_type: int, shape, dtype=np.float32, n_threads=None) -> np.ndarray:
    """Raw GGUF bytes of `shape` (numpy order) -> a C-contiguous float32/float16 array."""
    _type(ggml_type)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape, dtype=np.int64))
    raw = _raw(raw)
    need = type_nbytes(ggml_type, n)
    if raw.nbytes != need:
        raise NativeError(f"{GGML_TYPE_NAMES[ggml_type]} data of shape {shape} needs {need} "
                          f"bytes, got {raw.nbytes}")
    dtype = np.dtype(dtype)
    out = np.empty(shape, dtype=dtype)
    src = ffi.from_buffer("uint8_t[]", raw)
    nt = n_threads or n_threads_default()
    if dtype == np.float32:
        rc = lib.a2n_dequantize_f32(ggml_type, src, raw.nbytes, ffi.from_buffer("float[]", out), n, nt)
    elif dtype == np.float16:
        rc = lib.a2n_dequantize_f16(ggml_type, src, raw.nbytes, ffi.from_buffer("uint16_t[]", out), n, nt)
    else:
        raise NativeError(f"dequantize to {dtype} is not supported (float32 or float16)")
    _check(rc, "dequantize")
    return out


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


def matmul_q(w_raw, ggml_type: int, n_out: int, n_in: int, x, out=None, n_threads=None) -> np.ndarray:
    """y (n_vec, n_out) = x (n_vec, n_in) @ W.T, W (n_out, n_in) in GGUF blocks, read once."""
    _type(ggml_type)
    if n_out <= 0 or n_in <= 0:
        raise NativeError(f"matmul_q: weight shape ({n_out}, {n_in}) must be positive")
    w = _raw(w_raw)
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != n_in:
        raise NativeError(f"matmul_q: x must be (n_vec, {n_in}), got {x.shape}")
    need = type_nbytes(ggml_type, n_out * n_in)
    if w.nbytes != need:
        raise NativeError(f"matmul_q: weight ({n_out}, {n_in}) {GGML_TYPE_NAMES[ggml_type]} needs "
                          f"{need} bytes, got {w.nbytes}")
    if out is None:
        out = np.empty((x.shape[0], n_out), dtype=np.float32)
    elif out.shape != (x.shape[0], n_out) or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise NativeError(f"matmul_q: out must be float32 ({x.shape[0]}, {n_out})")
    if x.shape[0] == 0:
        return out
    rc = lib.a2n_matmul_q(ggml_type, ffi.from_buffer("uint8_t[]", w), w.nbytes, n_out, n_in,
                          ffi.from_buffer("float[]", x), x.shape[0],
                          ffi.from_buffer("float[]", out, require_writable=True),
                          n_threads or n_threads_default())
    _check(rc, "matmul_q")
    return out


# ---- A2ATS retrieval kernels (native/retrieval.c) -----------------------------------------
def _f32(a, name: str, ndim: int) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.float32:
        raise NativeError(f"{name} must be float32, got {a.dtype}")
    if a.ndim != ndim:
        raise NativeError(f"{name} must have {ndim} dimensions, got shape {a.shape}")
    return np.ascontiguousarray(a)


def _out_f32(out, shape, name: str) -> np.ndarray:
    if out is None:
        return np.empty(shape, dtype=np.float32)
    if (not isinstance(out, np.ndarray) or out.dtype != np.float32 or out.shape != tuple(shape)
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise NativeError(f"{name}: out must be a writable C-contiguous float32 array of shape "
                          f"{tuple(shape)}, got {getattr(out, 'dtype', type(out))} "
                          f"{getattr(out, 'shape', '')}")
    return out


def _per_seq(arrs, S: int, name: str, lead: tuple, dtypes, tail: tuple):
    """Check a list of S C-contiguous arrays (*lead, cap_s, *tail) of one dtype among
    dtypes -> (arrays, caps int64 (S,), dtype)."""
    if isinstance(arrs, np.ndarray) or len(arrs) != S:
        raise NativeError(f"{name} must be a list of {S} arrays (one per sequence)")
    nl, nd = len(lead), len(lead) + 1 + len(tail)
    caps, dt = [], None
    for s, a in enumerate(arrs):
        if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
            raise NativeError(f"{name}[{s}] must be a C-contiguous numpy array")
        if dt is None:
            dt = a.dtype
            if dt not in dtypes:
                dt = None
        if a.dtype != dt:
            raise NativeError(f"{name}[{s}] has dtype {a.dtype}; expected "
                              + " or ".join(str(np.dtype(d)) for d in dtypes)
                              + ", the same for every sequence")
        shape = a.shape
        if len(shape) != nd or shape[:nl] != lead or shape[nl + 1:] != tail:
            raise NativeError(f"{name}[{s}] must have shape {lead + ('cap',) + tail}, got {shape}")
        caps.append(shape[nl])
    return arrs, np.array(caps, dtype=np.int64), dt


def _ptrs(ctype: str, arrs):
    """(pointer array, keep-alive list) of numpy arrays for a C `T *const *` argument
    (ctype "void" for untyped rows)."""
    if ctype == "void":
        bufs = [ffi.from_buffer(a) for a in arrs]
    else:
        bufs = [ffi.from_buffer(ctype + "[]", a) for a in arrs]
    return ffi.new(ctype + " *[]", bufs or [ffi.NULL]), bufs


def _seq_lens(T, S: int, name: str) -> np.ndarray:
    T = np.asarray(T)
    if T.size and T.dtype.kind not in "iu":
        raise NativeError(f"{name} must be integers, got {T.dtype}")
    if T.shape != (S,):
        raise NativeError(f"{name} must have shape ({S},), got {T.shape}")
    return np.ascontiguousarray(T, dtype=np.int64)


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
    T = _seq_lens(T, S, "select_topk: T")
    sinks, window, K = int(sinks), int(window), int(K)
    if sinks < 0 or window < 0 or K < 1:
        raise NativeError(f"select_topk: need sinks >= 0, window >= 0, K >= 1; got "
                          f"{sinks}, {window}, {K}")
    big = 1 << 62                    # beyond any capacity: same result, fits int64
    sinks, window, K = min(sinks, big), min(window, big), min(K, big)
    if S and ((T < 0).any() or (T > caps).any()):
        s = int(np.flatnonzero((T < 0) | (T > caps))[0])
        raise NativeError(f"select_topk: T[{s}] = {int(T[s])} outside [0, {int(caps[s])}] "
                          "(the sequence's code capacity)")
    lo = np.minimum(sinks, T)
    hi = np.maximum(lo, T - window)
    need = int((lo + np.minimum(min(K * g, big), hi - lo) + T - hi).max()) if S else 0
    if out_idx is None:
        out_idx = np.empty((S, G, need), dtype=np.int64)
    elif (not isinstance(out_idx, np.ndarray) or out_idx.dtype != np.int64 or out_idx.ndim != 3
          or out_idx.shape[:2] != (S, G) or out_idx.shape[2] < need
          or not out_idx.flags.c_contiguous or not out_idx.flags.writeable):
        raise NativeError(f"select_topk: out_idx must be a writable C-contiguous int64 array "
                          f"({S}, {G}, >= {need})")
    if out_len is None:
        out_len = np.empty((S, G), dtype=np.int32)
    elif (not isinstance(out_len, np.ndarray) or out_len.dtype != np.int32
          or out_len.shape != (S, G) or not out_len.flags.c_contiguous
          or not out_len.flags.writeable):
        raise NativeError(f"select_topk: out_len must be a writable C-contiguous int32 "
                          f"array ({S}, {G})")
    if S * G == 0:
        return out_idx, out_len
    cptr, keep = _ptrs("uint16_t", codes)
    rc = lib.a2n_select_topk(ffi.from_buffer("float[]", lut), lut.size, S, G, g, M, C, cptr,
                             ffi.from_buffer("int64_t[]", caps), ffi.from_buffer("int64_t[]", T),
                             sinks, window, K,
                             ffi.from_buffer("int64_t[]", out_idx, require_writable=True),
                             out_idx.shape[2],
                             ffi.from_buffer("int32_t[]", out_len, require_writable=True),
                             n_threads or n_threads_default())
    del keep
    _check(rc, "select_topk")
    return out_idx, out_len


def _kv_lists(keys, values, S, G, d, what):
    keys, caps, dt = _per_seq(keys, S, f"{what}: keys", (G,), (np.float32, np.float16), (d,))
    kptr, keep = _ptrs("void", keys)
    if values is None:
        return caps, dt, kptr, None, keep
    values, vcaps, vdt = _per_seq(values, S, f"{what}: values", (G,), (np.float32, np.float16), (d,))
    if vdt != dt or not np.array_equal(vcaps, caps):
        raise NativeError(f"{what}: values must have the keys' dtype and shapes")
    vptr, keep2 = _ptrs("void", values)
    return caps, dt, kptr, vptr, keep + keep2


def _selection(idx, lens, what: str, S: int | None = None, G: int | None = None):
    """Check a step's selections: idx (S, G, Kmax) int64 and lens (S, G) int32 (S and G those
    given, if any) -> contiguous (idx, lens)."""
    idx, lens = np.asarray(idx), np.asarray(lens)
    if idx.dtype != np.int64 or idx.ndim != 3 or (S is not None and idx.shape[:2] != (S, G)):
        want = "(S, G, Kmax)" if S is None else f"({S}, {G}, Kmax)"
        raise NativeError(f"{what}: idx must be int64 {want}, got {idx.dtype} {idx.shape}")
    S, G = idx.shape[:2]
    if lens.dtype != np.int32 or lens.shape != (S, G):
        raise NativeError(f"{what}: lens must be int32 ({S}, {G}), got {lens.dtype} {lens.shape}")
    return np.ascontiguousarray(idx), np.ascontiguousarray(lens)


def sparse_attention(q, keys, values, idx, lens, scale: float, out=None, n_threads=None) -> np.ndarray:
    """out (S, G, g, d) float32: out[s,k,j] = softmax(scale * q[s,k,j] . K_s[k, sel]) @ V_s[k, sel]
    with sel = idx[s, k, :lens[s, k]].

    q (S, G, g, d) float32 (post-RoPE); keys / values: lists of S C-contiguous arrays
    (G, cap_s, d), all float32 or all float16 (views of the host store, memory-mapped
    is fine); idx (S, G, Kmax) int64 and lens (S, G) int32 as select_topk returns them.
    One pass over the selected rows (gather fused with an online softmax), float32
    accumulation; an empty selection gives zeros. An index outside [0, cap_s) or a
    length outside [0, Kmax] raises NativeError before anything is computed."""
    q = _f32(q, "sparse_attention: q", 4)
    S, G, g, d = q.shape
    idx, lens = _selection(idx, lens, "sparse_attention", S, G)
    caps, dt, kptr, vptr, keep = _kv_lists(keys, values, S, G, d, "sparse_attention")
    out = _out_f32(out, (S, G, g, d), "sparse_attention")
    if out.size == 0:
        return out
    rc = lib.a2n_sparse_attention(ffi.from_buffer("float[]", q), q.size, S, G, g, d, kptr, vptr,
                                  ffi.from_buffer("int64_t[]", caps), int(dt == np.float16),
                                  ffi.from_buffer("int64_t[]", idx), idx.shape[2],
                                  ffi.from_buffer("int32_t[]", lens), float(scale),
                                  ffi.from_buffer("float[]", out, require_writable=True), out.size,
                                  n_threads or n_threads_default())
    del keep
    _check(rc, "sparse_attention")
    return out


def gather_sel(keys, values, idx, lens, kout=None, vout=None, n_threads=None):
    """The selected rows of every (sequence, KV head) in one call: kout[s,k,i] =
    K_s[k, idx[s,k,i]], vout likewise, for i < lens[s,k] (rows past lens untouched).

    keys / values: lists of S C-contiguous (G, cap_s, d) arrays, all float32 or all float16
    (the host store); idx (S, G, Kmax) int64, lens (S, G) int32; kout / vout (S, G, Kmax, d)
    of the store's dtype (e.g. pinned staging buffers), made when None. Threads split the
    (sequence, head, K|V) copies. A bad index or length raises before anything is copied."""
    idx, lens = _selection(idx, lens, "gather_sel")
    S, G, kmax = idx.shape
    if S == 0:
        raise NativeError("gather_sel: no sequences")
    d = keys[0].shape[-1] if len(keys) and isinstance(keys[0], np.ndarray) else 0
    caps, dt, kptr, vptr, keep = _kv_lists(keys, values, S, G, d, "gather_sel")
    outs = []
    for name, o in (("kout", kout), ("vout", vout)):
        if o is None:
            o = np.empty((S, G, kmax, d), dtype=dt)
        elif (not isinstance(o, np.ndarray) or o.dtype != dt or o.shape != (S, G, kmax, d)
              or not o.flags.c_contiguous or not o.flags.writeable):
            raise NativeError(f"gather_sel: {name} must be a writable C-contiguous {dt} array "
                              f"({S}, {G}, {kmax}, {d}), got {getattr(o, 'dtype', type(o))} "
                              f"{getattr(o, 'shape', '')}")
        outs.append(o)
    rc = lib.a2n_gather_sel(S, G, d, kptr, vptr, ffi.from_buffer("int64_t[]", caps),
                            int(dt == np.float16), ffi.from_buffer("int64_t[]", idx), kmax,
                            ffi.from_buffer("int32_t[]", lens),
                            ffi.from_buffer("uint8_t[]", outs[0].reshape(-1).view(np.uint8),
                                            require_writable=True),
                            ffi.from_buffer("uint8_t[]", outs[1].reshape(-1).view(np.uint8),
                                            require_writable=True),
                            S * G * kmax, n_threads or n_threads_default())
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


def exact_scores(q, keys, lo, hi, out=None, n_threads=None) -> np.ndarray:
    """scores (S, G, g, W) float32, W = max(hi - lo): scores[s,k,j,t] = q[s,k,j] . K_s[k, lo[s] + t]
    for t < hi[s] - lo[s], -inf after.

    q (S, G, g, d) float32; keys: list of S C-contiguous (G, cap_s, d) float32 / float16
    arrays; lo, hi (S,) int with 0 <= lo <= hi <= cap_s (out may have more columns)."""
    q = _f32(q, "exact_scores: q", 4)
    S, G, g, d = q.shape
    lo = _seq_lens(lo, S, "exact_scores: lo")
    hi = _seq_lens(hi, S, "exact_scores: hi")
    caps, dt, kptr, _, keep = _kv_lists(keys, None, S, G, d, "exact_scores")
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
                              ffi.from_buffer("int64_t[]", caps), int(dt == np.float16),
                              ffi.from_buffer("int64_t[]", lo), ffi.from_buffer("int64_t[]", hi),
                              ffi.from_buffer("float[]", out, require_writable=True), out.shape[3],
                              n_threads or n_threads_default())
    del keep
    _check(rc, "exact_scores")
    return out
