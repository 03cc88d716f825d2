"""Fast-scan selection of 4-bit product codes (native/fastscan.c): the 8-bit LUT, the packed
code layout, and select_topk's selection over it.
"""
from __future__ import annotations

import numpy as np

from ._lib import NativeError, _check, _f32, _per_seq, ffi, lib
from .retrieval import _run_select, _select_args


FS_BLOCK = 32        # tokens per block of packed codes
FS_MAX_M = 128       # subspaces at most (255 * M fits the kernel's 16-bit scores)


def _fs_M(M: int, what: str) -> None:
    if not (2 <= M <= FS_MAX_M and M % 2 == 0):
        raise NativeError(f"{what}: fast-scan codes need an even number of subspaces in "
                          f"[2, {FS_MAX_M}], got {M}")


def fastscan_quantize_lut(lut):
    """lut (..., M, 16) float32 -> (qlut (..., M, 16) uint8, scale (...), bias (...) float32):
    each row (query head) quantized to 8 bits as the fast-scan selection does, so that
    sum_m lut[m, c_m] ~= sum_m qlut[m, c_m] / scale + bias (a2n_fs_quantize_lut)."""
    lut = np.ascontiguousarray(lut)
    if lut.dtype != np.float32 or lut.ndim < 2 or lut.shape[-1] != 16:
        raise NativeError(f"fastscan_quantize_lut: lut must be float32 (..., M, 16), got "
                          f"{lut.dtype} {lut.shape}")
    lead, M = lut.shape[:-2], lut.shape[-2]
    rows = int(np.prod(lead))
    qlut = np.empty(lut.shape, np.uint8)
    scale, bias = np.empty(lead, np.float32), np.empty(lead, np.float32)
    if lut.size:
        _check(lib.a2n_fs_quantize_lut(ffi.from_buffer("float[]", lut), lut.size, rows, M,
                                       ffi.from_buffer("uint8_t[]", qlut, require_writable=True),
                                       qlut.size,
                                       ffi.from_buffer("float[]", scale, require_writable=True),
                                       ffi.from_buffer("float[]", bias, require_writable=True)),
               "fastscan_quantize_lut")
    return qlut, scale, bias


def fastscan_pack(codes, blocks, first: int) -> None:
    """Write codes (G, M, n) uint16 (each < 16) of tokens first .. first + n - 1 into blocks
    (G, n_blocks, M / 2, 32) uint8, the fast-scan layout (native/fastscan.c), in place; the
    other tokens' codes are kept."""
    codes = np.ascontiguousarray(codes)
    if codes.dtype != np.uint16 or codes.ndim != 3:
        raise NativeError(f"fastscan_pack: codes must be uint16 (G, M, n), got {codes.dtype} "
                          f"{codes.shape}")
    G, M, n = codes.shape
    _fs_M(M, "fastscan_pack")
    if (not isinstance(blocks, np.ndarray) or blocks.dtype != np.uint8 or blocks.ndim != 4
            or blocks.shape[0] != G or blocks.shape[2:] != (M // 2, FS_BLOCK)
            or not blocks.flags.c_contiguous or not blocks.flags.writeable):
        raise NativeError(f"fastscan_pack: blocks must be a writable C-contiguous uint8 array "
                          f"({G}, n_blocks, {M // 2}, {FS_BLOCK}), got "
                          f"{getattr(blocks, 'dtype', type(blocks))} {getattr(blocks, 'shape', '')}")
    cap = blocks.shape[1] * FS_BLOCK
    first = int(first)
    if first < 0 or first + n > cap:
        raise NativeError(f"fastscan_pack: tokens {first}..{first + n - 1} beyond the capacity "
                          f"of {cap}")
    if codes.size == 0:
        return
    _check(lib.a2n_fs_pack(ffi.from_buffer("uint16_t[]", codes), codes.size, G, M, n,
                           ffi.from_buffer("uint8_t[]", blocks, require_writable=True),
                           blocks.size, cap, first), "fastscan_pack")


def fastscan_select(lut, codes, T, sinks: int, window: int, K: int, out_idx=None,
                    out_len=None, n_threads=None):
    """select_topk's selection for 4-bit codes in the fast-scan layout -> (idx, lens).

    lut (S, G, g, M, 16) float32 (build_lut); codes: list of S uint8 arrays
    (G, n_blocks_s, M / 2, 32) (fastscan_pack), capacity 32 * n_blocks_s >= T[s]. The score
    of a token for a query head is the exact integer sum of its codes' entries in the head's
    LUT quantized to 8 bits (fastscan_quantize_lut); candidates, the top-K per head with
    ties to the smaller position, the union and idx / lens are select_topk's."""
    lut = _f32(lut, "fastscan_select: lut", 5)
    S, G, g, M, C = lut.shape
    if C != 16:
        raise NativeError(f"fastscan_select: 4-bit codes have 16 centroids, the LUT has {C}")
    _fs_M(M, "fastscan_select")
    codes, caps, _ = _per_seq(codes, S, "fastscan_select: codes", (G,), (np.uint8,),
                              (M // 2, FS_BLOCK))
    caps = caps * FS_BLOCK
    args = _select_args("fastscan_select", T, caps, G, g, sinks, window, K, out_idx, out_len)
    return _run_select("fastscan_select", lib.a2n_fs_select, lut, (S, G, g, M), "uint8_t", codes,
                       caps, *args, n_threads)
