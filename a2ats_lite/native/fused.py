"""The forward pass's small per-layer steps in a native call or two each (native/fused.c): RMS
norm, RoPE from cached cos/sin tables, the feed-forward gate around numpy's tanh, and the
decode rows' dense attention with its arguments built for a few rows at a time. Each gives the
bits of the numpy code it replaces (ops.rms_norm, rope.Rope, ops.gated_, native.attention).

These run ~150 times per decode step, so the checks are kept to what the C side cannot see
(dtypes, contiguity, which arrays go with which pointer); the C side checks every size and
index before it writes.
"""
from __future__ import annotations

import numpy as np

from ._lib import NativeError, _check, ffi, lib, n_threads_default
from .kv_quant import KV_TYPES, kv_type_of

_F32 = np.dtype(np.float32)
try:        # np.einsum without its Python dispatch layer (the same C function, the same bits)
    from numpy._core.multiarray import c_einsum as _einsum
except ImportError:     # pragma: no cover - another numpy layout
    _einsum = np.einsum
_WEIGHTS: dict = {}     # id(w) -> (w, its cdata): norm weights are few and live with the model


def _f32c(a) -> np.ndarray:
    """a as a C-contiguous float32 array (itself when it already is one)."""
    if type(a) is np.ndarray and a.dtype == _F32 and a.flags.c_contiguous:
        return a
    return np.ascontiguousarray(a, dtype=np.float32)


def _weight(w):
    """(cdata, size) of a norm weight, made once per array (the array is kept alive with it,
    so its id is not reused); a few thousand at most, then the cache starts over."""
    hit = _WEIGHTS.get(id(w))
    if hit is not None and hit[0] is w:
        return hit[1], hit[2]
    if type(w) is not np.ndarray or w.dtype != _F32 or not w.flags.c_contiguous:
        w = np.ascontiguousarray(w, dtype=np.float32)
        return ffi.from_buffer("float[]", w), w.size      # a temporary copy: not cached
    if len(_WEIGHTS) >= 4096:
        _WEIGHTS.clear()
    cd = ffi.from_buffer("float[]", w)
    _WEIGHTS[id(w)] = (w, cd, w.size)
    return cd, w.size


def rms_norm(x, w, eps: float, out=None) -> np.ndarray:
    """x (..., d) -> x / sqrt(mean(x^2) + eps) * w over the last axis (w (d,) or None): the
    bits of ops.rms_norm (its own einsum gives the sums of squares, one native call the rest).
    out: a float32 array of x's shape (x itself for in place), or None for a new one."""
    x = _f32c(x)
    if x.ndim == 0:
        raise NativeError("rms_norm: x must have at least one dimension")
    d = x.shape[-1]
    ss = _einsum("...i,...i->...", x, x, dtype=np.float32)            # (...,) as ops.rms_norm
    if out is None:
        out = np.empty(x.shape, dtype=np.float32)
    elif (type(out) is not np.ndarray or out.dtype != _F32 or out.shape != x.shape
          or not out.flags.c_contiguous or not out.flags.writeable):
        raise NativeError(f"rms_norm: out must be a writable C-contiguous float32 {x.shape}")
    wp, wl = (ffi.NULL, 0) if w is None else _weight(w)
    rc = lib.a2n_rms_norm(ffi.from_buffer("float[]", x), x.size, ss.size, d,
                          ffi.from_buffer("float[]", ss), ss.size, wp, wl, float(eps),
                          ffi.from_buffer("float[]", out, require_writable=True), out.size)
    if rc:
        _check(rc, f"rms_norm of {x.shape}")
    return out


_ACTS = {"gelu_tanh": 1, "silu": 2}       # fused.h A2N_ACT_*


def gated(gate: np.ndarray, up: np.ndarray, act: str) -> np.ndarray:
    """In place on gate: act(gate) * up (GeGLU / SwiGLU), the bits of ops.gated_ (numpy's
    tanh between two native passes). gate, up (n, n_ff) float32, gate C-contiguous."""
    kind = _ACTS.get(act)
    if kind is None:
        raise NativeError(f"gated: activation must be one of {', '.join(_ACTS)}, got {act!r}")
    if (type(gate) is not np.ndarray or gate.dtype != _F32 or not gate.flags.c_contiguous
            or not gate.flags.writeable):
        raise NativeError("gated: gate must be a writable C-contiguous float32 array")
    up = _f32c(up)
    if up.shape != gate.shape:
        raise NativeError(f"gated: gate {gate.shape} and up {up.shape} differ")
    t = np.empty(gate.shape, dtype=np.float32)
    g, tb = ffi.from_buffer("float[]", gate, require_writable=True), ffi.from_buffer("float[]", t)
    _check(lib.a2n_gate_pre(kind, g, gate.size, tb, t.size), "gated")
    np.tanh(t, out=t)
    _check(lib.a2n_gate_post(g, gate.size, tb, t.size, ffi.from_buffer("float[]", up), up.size),
           "gated")
    return gate


class RopeTables:
    """cos / sin tables (P, rot / 2) float32 of one rope.Rope for positions 0 .. P - 1, made
    by Rope.cos_sin itself (the same numbers it gives per call) and grown on demand."""
    __slots__ = ("rope", "cos", "sin", "rows", "half", "adjacent", "_c", "_s")

    def __init__(self, rope):
        self.rope, self.rows, self.half = rope, 0, rope.rot // 2
        self.adjacent = 1 if rope.pairing == "adjacent" else 0
        self.cos = self.sin = self._c = self._s = None

    def cover(self, top: int) -> None:
        """Make the tables hold positions 0 .. top (doubling: few rebuilds)."""
        if top < self.rows:
            return
        rows = max(256, 2 * self.rows, top + 1)
        cos, sin = self.rope.cos_sin(np.arange(rows, dtype=np.int64))
        self.cos, self.sin = np.ascontiguousarray(cos), np.ascontiguousarray(sin)
        self._c, self._s = ffi.from_buffer("float[]", self.cos), ffi.from_buffer("float[]", self.sin)
        self.rows = rows


def rope(x, positions, tables: RopeTables) -> np.ndarray:
    """Rotate x (n, h, d) at integer positions (n,) >= 0 -> a new (n, h, d) float32: the
    numbers of tables.rope(x, positions)."""
    x = _f32c(x)
    if x.ndim != 3:
        raise NativeError(f"rope: x must be (n, heads, head_dim), got {x.shape}")
    n, h, d = x.shape
    pos = positions if (type(positions) is np.ndarray and positions.dtype == np.int64
                        and positions.flags.c_contiguous) else \
        np.ascontiguousarray(positions, dtype=np.int64)
    if pos.shape != (n,):
        raise NativeError(f"rope: {n} rows need {n} positions, got shape {pos.shape}")
    top = int(pos[0]) if n == 1 else int(pos.max()) if n else -1
    if top >= tables.rows:
        tables.cover(top)
    out = np.empty((n, h, d), dtype=np.float32)
    rot = tables.rope.rot
    rc = lib.a2n_rope(ffi.from_buffer("float[]", x), x.size, n, h, d, rot, tables.adjacent,
                      tables._c if tables.rows else ffi.NULL, tables._s if tables.rows else ffi.NULL,
                      tables.rows * tables.half, tables.rows, ffi.from_buffer("int64_t[]", pos),
                      ffi.from_buffer("float[]", out, require_writable=True), out.size)
    if rc:
        _check(rc, f"rope of {x.shape} at positions {pos.min()}..{top}")
    return out


def _buffer(a, G: int, d: int, what: str):
    """A cache buffer (G, cap, width), C-contiguous -> (cdata, KV type id, units per head)."""
    if type(a) is not np.ndarray or a.ndim != 3 or a.shape[0] != G or not a.flags.c_contiguous:
        raise NativeError(f"{what} must be a C-contiguous ({G}, capacity, width) array, got "
                          f"{getattr(a, 'shape', type(a))}")
    return ffi.from_buffer(a), KV_TYPES[kv_type_of(a, d)], a.shape[1] * a.shape[2]


def decode_attention(q, bufs, positions, window, scale: float, n_threads=None) -> np.ndarray:
    """The dense attention of a few query rows, each over its own buffer read in place: the
    numbers of attention.attention for the same rows (one kernel, the same arguments per row).

    q (S, G, g, d) float32; bufs: per row (K, V, pos0, n), K / V C-contiguous (G, cap, width)
    cache buffers of any KV cache type whose rows [0, n) hold positions pos0..; positions (S,)
    (each row's own key cached). Row s attends max(pos0, p - window + 1) .. p. -> (S, G, g, d)"""
    q = _f32c(q)
    S, G, g, d = q.shape
    if len(bufs) != S or len(positions) != S:
        raise ValueError(f"decode_attention: {S} queries, {len(positions)} positions, "
                         f"{len(bufs)} buffers")
    kp, vp, ks, vs, rows, pos0, lo, hi, keep = [], [], [], [], [], [], [], [], []
    kt = vt = None
    for s in range(S):
        K, V, p0, n = bufs[s]
        p0, n, p = int(p0), int(n), int(positions[s])
        kc, t, kstride = _buffer(K, G, d, "decode_attention: keys")
        vc, u, vstride = _buffer(V, G, d, "decode_attention: values")
        if (kt is not None and (t, u) != (kt, vt)) or n > K.shape[1] or n > V.shape[1] or n < 0:
            raise NativeError(f"decode_attention: buffer {s} ({n} rows of {K.shape}, {V.shape}) "
                              "does not match the others' types or holds fewer rows")
        kt, vt = t, u
        first = p0 if window is None else max(p0, p - int(window) + 1)
        if not p0 <= first <= p < p0 + n:
            raise ValueError(f"attention: no keys for position {p} (cached {p0}..{p0 + n - 1})")
        kp.append(kc)
        vp.append(vc)
        keep += (K, V)
        ks.append(kstride)
        vs.append(vstride)
        rows.append(n)
        pos0.append(p0)
        lo.append(first - p0)
        hi.append(p + 1 - p0)
    out = np.empty((S, G, g, d), dtype=np.float32)
    if S == 0:
        return out
    i64 = "int64_t[]"
    rc = lib.a2n_attention(ffi.from_buffer("float[]", q), q.size, S, G * g, G, d, S,
                           ffi.new("void *[]", kp), ffi.new(i64, ks), kt,
                           ffi.new("void *[]", vp), ffi.new(i64, vs), vt,
                           ffi.new(i64, rows), ffi.new(i64, pos0), ffi.new(i64, list(range(S))),
                           ffi.new(i64, lo), ffi.new(i64, hi), float(scale),
                           ffi.from_buffer("float[]", out, require_writable=True), out.size,
                           n_threads or n_threads_default())
    del keep
    if rc:
        _check(rc, "decode_attention")
    return out


def apply_bitmask(row: np.ndarray, mask_row: np.ndarray) -> None:
    """In place: row[t] = -inf where bit t of mask_row (W,) int32 words (llguidance's token
    bitmask) is 0, and from 32 * W on. row (V,) float32, C-contiguous."""
    if type(row) is not np.ndarray or row.dtype != np.float32 or row.ndim != 1 \
            or not row.flags.c_contiguous or not row.flags.writeable:
        raise NativeError(f"apply_bitmask: row must be a writable contiguous (V,) float32 array, "
                          f"got {getattr(row, 'shape', type(row))}")
    words = np.ascontiguousarray(mask_row, dtype="<i4").reshape(-1)         # (W,)
    _check(lib.a2n_apply_bitmask(ffi.from_buffer("float[]", row, require_writable=True), row.size,
                                 ffi.cast("uint32_t *", ffi.from_buffer(words)), words.size),
           "apply_bitmask")
