"""GGUF weight types in the C library: dequantization, the product with a GGUF weight, and
the int8 path (weights repacked once at load, activations quantized once per step).
(native/quants*.c, matmul.c, repack.c, gemm_*.c)
"""
from __future__ import annotations

import numpy as np

from ..gguf import GGML_BLOCK, GGML_TYPE_NAMES
from ._lib import (NativeError, _aligned, _check, _out2d, _raw, _x2d, ffi, lib,
                   n_threads_default)


# the types the C library decodes (ids of gguf.GGMLQuantizationType)
SUPPORTED_TYPES = (0, 1, 2, 3, 6, 7, 8, 10, 11, 12, 13, 14, 30)
# id -> (name, elements per block, bytes per block)
GGML_TYPES = {t: (GGML_TYPE_NAMES[t],) + tuple(GGML_BLOCK[t]) for t in SUPPORTED_TYPES}
# types with the int8 product (repacked weights, int8 activations) -> the activation record
# kind their products read: 1 = blocks of 32 (Q4_0, Q5_0, Q8_0), 2 = blocks of 256 (K types);
# the other types multiply float32 x with a decoded row piece
ACT_KINDS = {2: 1, 6: 1, 8: 1, 12: 2, 13: 2, 14: 2}


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


def matmul_q(w_raw, ggml_type: int, n_out: int, n_in: int, x, out=None, n_threads=None) -> np.ndarray:
    """y (n_vec, n_out) = x (n_vec, n_in) @ W.T, W (n_out, n_in) in GGUF blocks. The int8 types
    are repacked for this call alone (a model keeps a repack() copy and calls matmul_packed);
    the result is the same bits as that path."""
    _type(ggml_type)
    if n_out <= 0 or n_in <= 0:
        raise NativeError(f"matmul_q: weight shape ({n_out}, {n_in}) must be positive")
    w = _raw(w_raw)
    x = _x2d(x, n_in, "matmul_q")
    need = type_nbytes(ggml_type, n_out * n_in)
    if w.nbytes != need:
        raise NativeError(f"matmul_q: weight ({n_out}, {n_in}) {GGML_TYPE_NAMES[ggml_type]} needs "
                          f"{need} bytes, got {w.nbytes}")
    out = _out2d(out, x.shape[0], n_out, "matmul_q")
    if x.shape[0] == 0:
        return out
    rc = lib.a2n_matmul_q(ggml_type, ffi.from_buffer("uint8_t[]", w), w.nbytes, n_out, n_in,
                          ffi.from_buffer("float[]", x), x.shape[0],
                          ffi.from_buffer("float[]", out, require_writable=True),
                          n_threads or n_threads_default())
    _check(rc, "matmul_q")
    return out


class Packed:
    """A (n_out, n_in) weight of an int8 type repacked for matmul_packed: groups of 8
    interleaved rows, about the size of the GGUF blocks (native/repack.c)."""
    __slots__ = ("ggml_type", "kind", "n_out", "n_in", "buf", "cbuf")

    def __init__(self, ggml_type: int, n_out: int, n_in: int, buf: np.ndarray):
        self.ggml_type, self.kind, self.n_out, self.n_in = ggml_type, ACT_KINDS[ggml_type], n_out, n_in
        self.buf, self.cbuf = buf, ffi.from_buffer("uint8_t[]", buf)    # (made once: every product)

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes)


class QRows:
    """Vectors x (n_vec, n_in) quantized to int8 records of one kind (per block d = amax / 127):
    made once and read by every product of x with weights of that kind (q/k/v, gate/up).
    x is kept for the products of other kinds and types."""
    __slots__ = ("kind", "n_vec", "n_in", "buf", "x")

    def __init__(self, kind: int, x: np.ndarray, buf: np.ndarray):
        self.kind, self.n_vec, self.n_in, self.buf, self.x = kind, x.shape[0], x.shape[1], buf, x


def repack_nbytes(ggml_type: int, n_out: int, n_in: int) -> int:
    """Bytes of the repacked copy of a (n_out, n_in) weight of an int8 type."""
    n = int(lib.a2n_repack_nbytes(ggml_type, n_out, n_in))
    _check(min(n, 0), f"repack {GGML_TYPE_NAMES.get(ggml_type, ggml_type)} ({n_out}, {n_in})")
    return n


def repack(w_raw, ggml_type: int, n_out: int, n_in: int, n_threads=None) -> Packed:
    """The repacked copy of a weight of an int8 type (ACT_KINDS), made once at load."""
    if ggml_type not in ACT_KINDS:
        raise NativeError(f"repack: {GGML_TYPE_NAMES.get(ggml_type, ggml_type)} has no int8 product; "
                          "types: " + ", ".join(GGML_TYPE_NAMES[t] for t in ACT_KINDS))
    w = _raw(w_raw)
    need = type_nbytes(ggml_type, n_out * n_in) if n_out > 0 and n_in > 0 else -1
    if w.nbytes != need:
        raise NativeError(f"repack: weight ({n_out}, {n_in}) {GGML_TYPE_NAMES[ggml_type]} needs "
                          f"{need} bytes, got {w.nbytes}")
    buf = _aligned(repack_nbytes(ggml_type, n_out, n_in))
    rc = lib.a2n_repack(ggml_type, ffi.from_buffer("uint8_t[]", w), w.nbytes, n_out, n_in,
                        ffi.from_buffer("uint8_t[]", buf, require_writable=True), buf.nbytes,
                        n_threads or n_threads_default())
    _check(rc, "repack")
    return Packed(ggml_type, n_out, n_in, buf)


def quantize_rows(x, ggml_type: int, n_threads=None) -> QRows:
    """x (n_vec, n_in) float32 -> the int8 records the products with ggml_type weights read
    (the same records serve every type of the same ACT_KINDS kind)."""
    if ggml_type not in ACT_KINDS:
        raise NativeError(f"quantize_rows: {GGML_TYPE_NAMES.get(ggml_type, ggml_type)} has no int8 product")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise NativeError(f"quantize_rows: x must be (n_vec >= 1, n_in), got {x.shape}")
    kind = ACT_KINDS[ggml_type]
    n = int(lib.a2n_act_nbytes(kind, x.shape[0], x.shape[1]))
    _check(min(n, 0), f"quantize_rows: x {x.shape} for {GGML_TYPE_NAMES[ggml_type]}")
    buf = _aligned(n)
    rc = lib.a2n_quantize_act(kind, ffi.from_buffer("float[]", x), x.shape[0], x.shape[1],
                              ffi.from_buffer("uint8_t[]", buf, require_writable=True), n,
                              n_threads or n_threads_default())
    _check(rc, "quantize_rows")
    return QRows(kind, x, buf)


def matmul_packed(w: Packed, x, out=None, n_threads=None) -> np.ndarray:
    """y (n_vec, n_out) = x @ W.T for a repacked W; x float32 (n_vec, n_in) (quantized inside)
    or QRows of W's kind. A vector's result is the same bits whatever vectors share the call
    and whatever n_threads. (The decode hot path: checks kept to what the C side cannot see.)"""
    nt = n_threads or n_threads_default()
    if isinstance(x, QRows):
        if x.kind != w.kind or x.n_in != w.n_in:
            raise NativeError(f"matmul_packed: records of kind {x.kind} for n_in {x.n_in} do not fit "
                              f"a {GGML_TYPE_NAMES[w.ggml_type]} weight of n_in {w.n_in}")
        out = _out2d(out, x.n_vec, w.n_out, "matmul_packed")
        rc = lib.a2n_matmul_packed(w.ggml_type, w.cbuf, w.buf.nbytes, w.n_out, w.n_in,
                                   ffi.from_buffer("uint8_t[]", x.buf), x.buf.nbytes, x.n_vec,
                                   ffi.from_buffer("float[]", out, require_writable=True), nt)
        _check(rc, "matmul_packed")
        return out
    if not (type(x) is np.ndarray and x.dtype == np.float32 and x.ndim == 2 and x.flags.c_contiguous
            and x.shape[1] == w.n_in):
        x = _x2d(x, w.n_in, "matmul_packed")
    n = x.shape[0]
    out = np.empty((n, w.n_out), dtype=np.float32) if out is None else _out2d(out, n, w.n_out, "matmul_packed")
    if n:
        rc = lib.a2n_matmul_packed_f32(w.ggml_type, w.cbuf, w.buf.nbytes, w.n_out, w.n_in,
                                       ffi.from_buffer("float[]", x), n,
                                       ffi.from_buffer("float[]", out, require_writable=True), nt)
        _check(rc, "matmul_packed")
    return out


class PackedGroup:
    """Repacked weights of one activation kind and n_in that multiply the same x (q/k/v,
    gate/up): matmul_packed_group runs them as one native call (one quantization of x, one
    split of all their rows across the threads)."""
    __slots__ = ("ws", "kind", "n_in", "_types", "_ptrs", "_sizes", "_n_outs")

    def __init__(self, ws):
        ws = list(ws)
        if not 1 <= len(ws) <= 8 or any(not isinstance(w, Packed) for w in ws):
            raise NativeError("PackedGroup: 1 to 8 Packed weights")
        if len({(w.kind, w.n_in) for w in ws}) != 1:
            raise NativeError("PackedGroup: the weights must share the activation kind and n_in, got "
                              + ", ".join(f"{GGML_TYPE_NAMES[w.ggml_type]} n_in={w.n_in}" for w in ws))
        self.ws, self.kind, self.n_in = ws, ws[0].kind, ws[0].n_in
        self._types = ffi.new("int[]", [w.ggml_type for w in ws])
        self._ptrs = ffi.new("void *[]", [w.cbuf for w in ws])
        self._sizes = ffi.new("int64_t[]", [w.buf.nbytes for w in ws])
        self._n_outs = ffi.new("int64_t[]", [w.n_out for w in ws])


def matmul_packed_group(group: PackedGroup, x, n_threads=None) -> list:
    """[matmul_packed(w, x) for w in group.ws], the same bits, in one native call; x float32
    (n_vec, n_in) or QRows of the group's kind."""
    if not isinstance(x, QRows):
        x = quantize_rows(_x2d(x, group.n_in, "matmul_packed_group"), group.ws[0].ggml_type, n_threads)
    if x.kind != group.kind or x.n_in != group.n_in:
        raise NativeError(f"matmul_packed_group: records of kind {x.kind} for n_in {x.n_in} do not fit "
                          f"weights of kind {group.kind}, n_in {group.n_in}")
    outs = [np.empty((x.n_vec, w.n_out), dtype=np.float32) for w in group.ws]
    ys = ffi.new("float *[]", [ffi.from_buffer("float[]", y, require_writable=True) for y in outs])
    rc = lib.a2n_matmul_packed_n(len(outs), group._types, group._ptrs, group._sizes, group._n_outs,
                                 group.n_in, ffi.from_buffer("uint8_t[]", x.buf), x.buf.nbytes, x.n_vec,
                                 ys, n_threads or n_threads_default())
    _check(rc, "matmul_packed_group")
    return outs
