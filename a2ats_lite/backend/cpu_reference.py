"""The CPU backend's numpy reference of dense attention (native_retrieval=False): scores by
BLAS per block of query rows, cache blocks decoded to float32 first. Tests and benchmarks
compare the native kernel against it.
"""
from __future__ import annotations

import numpy as np

from .cpu_matrix import _native

_MAX_SCORES = 1 << 24       # largest (query rows x keys) float32 scores block at once: 64 MiB


def attention_reference(q, k, v, q_pos, k_pos0: int, window, scale: float) -> np.ndarray:
    """CPUBackend.attention in numpy: q (n, H, d) post-RoPE, k / v (G, T, width) cache views
    of positions k_pos0.., q_pos (n,) int64 (spans already checked) -> (n, H, d) float32."""
    n, H, d = q.shape
    T = k.shape[1]
    k, v = _floats(k, d), _floats(v, d)
    q = q * np.float32(scale)
    out = np.empty(q.shape, dtype=np.float32)
    block = max(1, min(n, _MAX_SCORES // (max(1, T) * H)))
    if window is not None:
        # short query blocks see window + block keys instead of window + n: less masked work
        block = min(block, max(16, window // 4))
    for s in range(0, n, block):
        e = min(n, s + block)
        out[s:e] = _attend_block(q[s:e], k, v, q_pos[s:e], k_pos0, window, H // k.shape[0])
    return out


def _floats(a, d: int):
    """A cache view (G, T, width) as the numpy reference reads it: f32 / f16 as it is, q8_0 /
    q4_0 blocks decoded to float32 (G, T, d) (the native kernel reads them in place)."""
    if a.dtype != np.uint8:
        return a
    nat = _native()
    return nat.dequantize(np.ascontiguousarray(a), nat.KV_TYPES[nat.kv_type_of(a, d)],
                          a.shape[:2] + (d,))


def _attend_block(q, k, v, q_pos, k_pos0, window, g) -> np.ndarray:
    """Attention of a block of query rows q (n, H, d), already scaled, over k, v (G, T, d)."""
    n, H, d = q.shape
    G, T = k.shape[0], k.shape[1]
    # the keys this block can see: [first query - window + 1, last query], within the cache
    lo = k_pos0 if window is None else max(k_pos0, int(q_pos[0]) - window + 1)
    hi = int(q_pos[-1]) + 1
    if hi > k_pos0 + T or lo >= hi:
        raise ValueError(f"attention: no keys for positions {q_pos[0]}..{q_pos[-1]} "
                         f"(cached {k_pos0}..{k_pos0 + T - 1})")
    K = k[:, lo - k_pos0:hi - k_pos0]                  # (G, T', d)
    V = v[:, lo - k_pos0:hi - k_pos0]
    if K.dtype != np.float32:          # f16 cache: widened per block, f32 accumulation
        K = K.astype(np.float32)
    if V.dtype != np.float32:
        V = V.astype(np.float32)
    # rows ordered (query, head-in-group) so one KV head serves its g query heads
    qq = q.reshape(n, G, g, d).transpose(1, 0, 2, 3).reshape(G, n * g, d)
    scores = np.matmul(qq, K.transpose(0, 2, 1))       # (G, n*g, T')
    if n > 1 or (window is not None and hi - lo > window):
        rel = q_pos[:, None] - np.arange(lo, hi)[None, :]   # (n, T') query pos - key pos
        hidden = rel < 0
        if window is not None:
            hidden |= rel >= window
        if hidden.any():
            hidden = np.repeat(hidden, g, axis=0)          # (n*g, T')
            np.copyto(scores, np.float32(-np.inf), where=hidden[None])
    scores -= scores.max(axis=-1, keepdims=True)
    np.exp(scores, out=scores)
    denom = scores.sum(axis=-1, keepdims=True)         # (G, n*g, 1)
    o = np.matmul(scores, V)                           # (G, n*g, d)
    o /= denom
    return o.reshape(G, n, g, d).transpose(1, 0, 2, 3).reshape(n, H, d)
