"""Host scoring both backends use: small numpy computations over rows a KV policy gathered
from the host store (oracle, wrope, quest, a2ats's exact re-rank, and the numpy reference of
the CPU's native top-K). Neither backend owns them: the CPU backend scores with them, the
CUDA backend copies its inputs down and calls the same functions.
"""
from __future__ import annotations

import numpy as np


def dot_scores(q, k) -> np.ndarray:
    """q (g, d) x k (n, d) -> (g, n) float32 dot products."""
    return np.asarray(q, dtype=np.float32) @ np.asarray(k, dtype=np.float32).T


def lut_lookup(lut, codes) -> np.ndarray:
    """lut (g, M, C), codes (M, n) -> (g, n): the sum over subspaces of LUT entries."""
    out = lut[:, 0, codes[0]]
    for m in range(1, lut.shape[1]):
        out = out + lut[:, m, codes[m]]
    return out


def quest_bounds(q, kmin, kmax) -> np.ndarray:
    """q (g, d) x page bounds (P, d) -> (g, P) upper bounds of q.k on each page."""
    qq = q[:, None, :]
    return np.maximum(qq * kmin[None], qq * kmax[None]).sum(-1)


def topk_union(scores, k: int) -> np.ndarray:
    """Sorted union over rows of each row's top-k columns; ties go to the smaller column."""
    g, n = scores.shape
    if k >= n:
        return np.arange(n)
    kth = np.partition(scores, n - k, axis=1)[:, n - k]                       # (g,)
    picks = []
    for j in range(g):
        above = np.flatnonzero(scores[j] > kth[j])
        picks.append(above)
        picks.append(np.flatnonzero(scores[j] == kth[j])[:k - len(above)])
    return np.unique(np.concatenate(picks))


# ---- fast-scan: 4-bit codes in blocks of 32 tokens (numpy reference of native/fastscan.c) ----
FS_BLOCK = 32
# byte j of a subspace's 16 holds token FS_PERM[j] (low nibble) and FS_PERM[j] + 16 (high)
FS_PERM = np.array([0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15])
_FS_BYTE = np.argsort(FS_PERM)          # token (mod 16) -> its byte


def fastscan_quantize_lut(lut):
    """lut (..., M, 16) float32 -> (qlut uint8, scale (...), bias (...)): per row the
    entries shifted by their subspace's minimum and scaled by 255 / the largest span, rounded
    half up, float32 arithmetic (native.fastscan_quantize_lut's; bias summed in another order)."""
    lut = np.asarray(lut, dtype=np.float32)
    lo = lut.min(-1)                                                        # (..., M)
    span = (lut.max(-1) - lo).max(-1)                                       # (...)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where((span > 0) & np.isfinite(span), np.float32(255) / span, 0).astype(np.float32)
        q = np.floor((lut - lo[..., None]) * a[..., None, None] + np.float32(0.5))
    return np.clip(np.nan_to_num(q, nan=0.0), 0, 255).astype(np.uint8), a, lo.sum(-1)


def fastscan_pack(codes, blocks, first: int) -> None:
    """codes (G, M, n) (< 16) of tokens first.. into blocks (G, n_blocks, M / 2, 32) uint8."""
    G, M, n = codes.shape
    t = np.arange(first, first + n)
    view = blocks.reshape(G, -1, M, 16)          # pair p's 32 bytes = subspaces 2p, 2p + 1
    byte, high = _FS_BYTE[t % 16], (t % FS_BLOCK) >= 16
    for hi_half in (False, True):                # one nibble per byte per pass: no collisions
        sel = high == hi_half
        cur = view[:, t[sel] // FS_BLOCK, :, byte[sel]]                     # (n', G, M)
        c = np.asarray(codes)[:, :, sel].transpose(2, 0, 1).astype(np.uint8)
        cur = (cur & 0x0F) | (c << 4) if hi_half else (cur & 0xF0) | c
        view[:, t[sel] // FS_BLOCK, :, byte[sel]] = cur


def fastscan_unpack(blocks, lo: int, hi: int) -> np.ndarray:
    """(G, M, hi - lo) uint16 codes of tokens lo..hi-1 from blocks (G, n_blocks, M / 2, 32)."""
    G, _, P, _ = blocks.shape
    t = np.arange(lo, hi)
    v = blocks.reshape(G, -1, 2 * P, 16)[:, t // FS_BLOCK, :, _FS_BYTE[t % 16]]   # (n, G, M)
    v = np.where(((t % FS_BLOCK) >= 16)[:, None, None], v >> 4, v & 0x0F)
    return v.transpose(1, 2, 0).astype(np.uint16)


def fastscan_topk(lut, blocks, lo: int, hi: int, k: int) -> np.ndarray:
    """lut (g, M, 16) float32, blocks of one KV head (n_blocks, M / 2, 32) -> the sorted union of
    the g heads' top-k candidates in [lo, hi) (relative to lo) by the integer scores of the
    quantized LUT, ties to the smaller position."""
    q = fastscan_quantize_lut(lut)[0].astype(np.int32)
    codes = fastscan_unpack(blocks[None], lo, hi)[0]                       # (M, n)
    return topk_union(lut_lookup(q, codes), k)
