"""The loaded C library (cffi: ffi, lib), its thread count and error check, and the argument
checks every wrapper of the package shares (numpy arrays in, C buffers out).

Every call validates shapes and dtypes in Python and the C side re-checks sizes and indices;
a refused call raises NativeError, it never writes out of bounds.
"""
from __future__ import annotations

import functools
import os

import numpy as np

from ..errors import NativeError

try:
    from .._native import ffi, lib
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError("a2ats_lite's native library is not built: install the package with "
                      "`make install` or `pip install .` (needs a C compiler)") from e


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


def _raw(raw) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raw = raw.view(np.uint8) if raw.flags.c_contiguous else np.ascontiguousarray(raw).view(np.uint8)
    return np.ascontiguousarray(raw)


def _aligned(nbytes: int) -> np.ndarray:
    """A uint8 buffer of nbytes starting on a 64-byte boundary (whole cache lines for the SIMD loads)."""
    buf = np.empty(nbytes + 64, dtype=np.uint8)
    off = -buf.ctypes.data % 64
    return buf[off:off + nbytes]


def _x2d(x, n_in: int, what: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != n_in:
        raise NativeError(f"{what}: x must be (n_vec, {n_in}), got {x.shape}")
    return x


def _out2d(out, n_vec: int, n_out: int, what: str) -> np.ndarray:
    if out is None:
        return np.empty((n_vec, n_out), dtype=np.float32)
    if (not isinstance(out, np.ndarray) or out.shape != (n_vec, n_out) or out.dtype != np.float32
            or not out.flags.c_contiguous or not out.flags.writeable):
        raise NativeError(f"{what}: out must be a writable C-contiguous float32 ({n_vec}, {n_out})")
    return out


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


def _ints(a, n: int, name: str) -> np.ndarray:
    """a (n,) integers (per-sequence lengths, spans, indices) -> contiguous int64."""
    a = np.asarray(a)
    if a.size and a.dtype.kind not in "iu":
        raise NativeError(f"{name} must be integers, got {a.dtype}")
    if a.shape != (n,):
        raise NativeError(f"{name} must have shape ({n},), got {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


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
