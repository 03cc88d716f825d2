"""Python face of the native C library (native/*.c, compiled by cffi at install).

Every call validates shapes and dtypes here and the C side re-checks sizes and
indices; a refused call raises NativeError, it never writes out of bounds.
"""
from __future__ import annotations

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


def n_threads_default() -> int:
    """os.cpu_count(), or the A2ATS_THREADS environment variable when set."""
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
