"""KV cache types (f32, f16, q8_0 / q4_0 blocks): their row widths, ggml's block quantizer
(native/kv_quant.c), and the checks of the per-sequence lists of host store buffers that the
retrieval and gather kernels read in place.
"""
from __future__ import annotations

import numpy as np

from ._lib import NativeError, _check, _ptrs, ffi, lib


# KV cache types (llama.cpp's names) -> their ggml type ids; block types: (values, bytes) per block
KV_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "q4_0": 2}
KV_BLOCKS = {"q8_0": (32, 34), "q4_0": (32, 18)}


def kv_row_width(kv_type: str, d: int) -> int:
    """The last dimension of a cache buffer of kv_type for head dim d: d for f32 / f16, the
    bytes of d / 32 blocks for q8_0 / q4_0 (stored as uint8 (G, capacity, width))."""
    if kv_type not in KV_TYPES:
        raise NativeError(f"KV cache type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
    if kv_type not in KV_BLOCKS:
        return int(d)
    block, size = KV_BLOCKS[kv_type]
    if d % block:
        raise NativeError(f"KV cache type {kv_type} needs a head dim that is a multiple of "
                          f"{block}, got {d}")
    return d // block * size


def kv_type_of(a: np.ndarray, d: int) -> str:
    """The KV cache type of a buffer (G, T, width) of head dim d (its dtype, and for uint8
    blocks its width)."""
    if a.dtype == np.float32:
        return "f32"
    if a.dtype == np.float16:
        return "f16"
    if a.dtype == np.uint8 and d % 32 == 0:
        for name, (block, size) in KV_BLOCKS.items():
            if a.shape[-1] == d // block * size:
                return name
    raise NativeError(f"not a KV cache buffer of head dim {d}: dtype {a.dtype}, rows of "
                      f"{a.shape[-1] if a.ndim else '?'}")


def kv_quantize(x, kv_type: str) -> np.ndarray:
    """x (..., d) float32 -> uint8 (..., kv_row_width(kv_type, d)): ggml's q8_0 / q4_0 blocks,
    rounded exactly as its reference quantizers (quantize_row_q8_0_ref / _q4_0_ref)."""
    if kv_type not in KV_BLOCKS:
        raise NativeError(f"kv_quantize: {kv_type!r} is not a block type ({', '.join(KV_BLOCKS)})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim < 1:
        raise NativeError("kv_quantize: x must have a last dimension (the head dim)")
    out = np.empty(x.shape[:-1] + (kv_row_width(kv_type, x.shape[-1]),), dtype=np.uint8)
    rc = lib.a2n_kv_quantize(KV_TYPES[kv_type], ffi.from_buffer("float[]", x), x.size,
                             ffi.from_buffer("uint8_t[]", out, require_writable=True), out.nbytes)
    _check(rc, "kv_quantize")
    return out


def _store_rows(arrs, S: int, G: int, d: int, name: str):
    """Check a list of S C-contiguous host store arrays (G, cap_s, width) of one KV cache type
    (kv_type_of: float32 / float16 rows of d values, or uint8 rows of q8_0 / q4_0 blocks)
    -> (caps int64 (S,), the type's name)."""
    if isinstance(arrs, np.ndarray) or len(arrs) != S:
        raise NativeError(f"{name} must be a list of {S} arrays (one per sequence)")
    caps, kt = [], None
    for s, a in enumerate(arrs):
        if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
            raise NativeError(f"{name}[{s}] must be a C-contiguous numpy array")
        if a.ndim != 3 or a.shape[0] != G:
            raise NativeError(f"{name}[{s}] must have shape ({G}, cap, {d}), got {a.shape}")
        try:
            t = kv_type_of(a, d)
            if a.shape[2] != kv_row_width(t, d):
                raise NativeError(f"rows of {a.shape[2]} values")
        except NativeError as e:
            raise NativeError(f"{name}[{s}]: {e}; expected float32, float16 or q8_0 / q4_0 "
                              f"rows of {d} values") from None
        if kt is not None and t != kt:
            raise NativeError(f"{name}[{s}] has dtype {a.dtype} ({t}); expected {kt}, the same "
                              f"type for every sequence")
        kt = t
        caps.append(a.shape[1])
    return np.array(caps, dtype=np.int64), kt


def _kv_lists(keys, values, S, G, d, what):
    """Host store K (and V, unless None) lists -> (caps, K type, V type, K pointers,
    V pointers, arrays to keep alive); K and V may be of different types."""
    caps, kt = _store_rows(keys, S, G, d, f"{what}: keys")
    kptr, keep = _ptrs("void", keys)
    if values is None:
        return caps, kt, None, kptr, None, keep
    vcaps, vt = _store_rows(values, S, G, d, f"{what}: values")
    if not np.array_equal(vcaps, caps):
        raise NativeError(f"{what}: values must have the keys' capacities, got "
                          f"{vcaps.tolist()} and {caps.tolist()}")
    vptr, keep2 = _ptrs("void", values)
    return caps, kt, vt, kptr, vptr, keep + keep2
