"""The CPU backend: numpy (float32 BLAS) plus the native C library.

Weights keep their GGUF encoding (QMatrix: raw bytes of the mmap) and are
multiplied one of two ways:
  * quantized (the default): decode rows go through native.matmul_q, which
    reads each quantized block once (SIMD, all cores); prefill (many rows)
    dequantizes slices to float32 tiles and uses BLAS;
  * float32 (keep_f32): dequantized once, then BLAS for every product.
The CUDA kernels under kernels/ must match the numpy functions here (and the
elementwise ones in ops.py) within their stated tolerances.
"""
from __future__ import annotations

import numpy as np

from ..batch import pad_selection
from ..errors import ModelError
from ..ops import gated_, rms_norm, softcap
from .base import phase

GGML_F32, GGML_F16 = 0, 1
DECODE_ROWS = 16            # rows one native.matmul_q pass multiplies (reads the weights once)
QUANT_ROWS = 64             # up to this many rows: matmul_q passes; above: dequantized tiles + BLAS
OUT_SLICE_ROWS = 16384      # rows dequantized at once by the sliced product
_MAX_SCORES = 1 << 24       # largest (query rows x keys) float32 scores block at once: 64 MiB


def _native():
    # imported on first use: float32-only models (tests, tiny configs) never need the C library
    from .. import native
    return native


class QMatrix:
    """A (n_out, n_in) weight in its GGUF encoding; y = x @ W^T via apply()."""

    def __init__(self, name: str, ggml_type: int, n_out: int, n_in: int, raw: np.ndarray,
                 keep_f32: bool = False):
        self.name, self.ggml_type, self.n_out, self.n_in = name, int(ggml_type), int(n_out), int(n_in)
        self.raw = raw                      # uint8 (nbytes,) zero-copy view, or f32 (n_out, n_in)
        self.keep_f32 = keep_f32            # True: dequantize once, every product on f32 BLAS
        self._f32 = raw if self.ggml_type == GGML_F32 else None

    @classmethod
    def from_array(cls, name: str, a: np.ndarray) -> "QMatrix":
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim != 2:
            raise ModelError(None, f"tensor {name}: expected a matrix, got shape {a.shape}")
        return cls(name, GGML_F32, a.shape[0], a.shape[1], a)

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_out, self.n_in)

    @property
    def f32_nbytes(self) -> int:
        return self.n_out * self.n_in * 4

    @property
    def read_bytes(self) -> int:
        """Bytes one product reads: the f32 copy or the quantized blocks."""
        return self.f32_nbytes if (self.keep_f32 or self._f32 is not None) else self.nbytes

    def _dequant(self, r0: int, r1: int) -> np.ndarray:
        if self.ggml_type == GGML_F32:
            return self.raw[r0:r1]
        rb = self.nbytes // self.n_out          # every row is whole blocks
        raw = self.raw[r0 * rb:r1 * rb]
        if self.ggml_type == GGML_F16:
            return raw.view(np.float16).reshape(r1 - r0, self.n_in).astype(np.float32)
        return _native().dequantize(raw, self.ggml_type, (r1 - r0, self.n_in), np.float32)

    def dense(self) -> np.ndarray:
        """(n_out, n_in) float32; cached when keep_f32."""
        if self._f32 is not None:
            return self._f32
        w = self._dequant(0, self.n_out)
        if self.keep_f32:
            self._f32 = w
        return w

    def drop_f32(self) -> None:
        if self.ggml_type != GGML_F32:
            self._f32 = None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ids (n,) as float32 (n, n_in): an embedding lookup reads only those rows."""
        if self._f32 is not None:
            return self._f32[ids]
        if self.ggml_type == GGML_F16:
            return self.raw.view(np.float16).reshape(self.n_out, self.n_in)[ids].astype(np.float32)
        rb = self.nbytes // self.n_out
        raw = self.raw.reshape(self.n_out, rb)[ids]           # (n, row_bytes) gathered blocks
        return _native().dequantize(raw.reshape(-1), self.ggml_type, (len(ids), self.n_in), np.float32)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x (n, n_in) float32 -> (n, n_out) float32 = x @ W^T."""
        n = x.shape[0]
        if self._f32 is not None or self.keep_f32:
            return x @ self.dense().T
        if n <= QUANT_ROWS:
            # a few passes over the quantized blocks read less than one f32 expansion writes,
            # and a row's result does not depend on the rows batched with it
            x = np.ascontiguousarray(x, dtype=np.float32)
            if n <= DECODE_ROWS:
                return _native().matmul_q(self.raw, self.ggml_type, self.n_out, self.n_in, x)
            y = np.empty((n, self.n_out), dtype=np.float32)
            for r0 in range(0, n, DECODE_ROWS):
                _native().matmul_q(self.raw, self.ggml_type, self.n_out, self.n_in,
                                   x[r0:r0 + DECODE_ROWS], out=y[r0:r0 + DECODE_ROWS])
            return y
        # not kept in f32: dequantize a slice of output rows at a time
        y = np.empty((n, self.n_out), dtype=np.float32)
        for r0 in range(0, self.n_out, OUT_SLICE_ROWS):
            r1 = min(self.n_out, r0 + OUT_SLICE_ROWS)
            y[:, r0:r1] = x @ self._dequant(r0, r1).T   # (BLAS into a strided out is slower)
        return y

    def __repr__(self):
        return f"QMatrix({self.name!r}, type={self.ggml_type}, {self.n_out}x{self.n_in})"


class CPUBackend:
    """native_retrieval: the a2ats decode path (LUT, top-K, fused gather + sparse
    attention) in the native library (one call per layer for every sequence and KV
    head); False runs the numpy reference of each (tests, benchmarks)."""
    name = "cpu"
    host = True         # device arrays are host numpy arrays
    row_cache = 0       # the store is read in place: no copies of retrieved rows

    def __init__(self, native_retrieval: bool = True):
        self.native_retrieval = bool(native_retrieval)
        self.profile: dict | None = None    # phase -> seconds (benchmarks): see _phase

    def _phase(self, name: str):
        """The time of a retrieval phase (lut, topk, attention, rerank) into self.profile."""
        return phase(self.profile, name)

    # -- buffers and weights --------------------------------------------------------
    def empty(self, shape, dtype=np.float32) -> np.ndarray:
        return np.empty(shape, dtype=dtype)

    def matrix(self, name, ggml_type, n_out, n_in, raw) -> QMatrix:
        return QMatrix(name, ggml_type, n_out, n_in, raw)

    def matrix_from_array(self, name, a) -> QMatrix:
        return a if isinstance(a, QMatrix) else QMatrix.from_array(name, a)

    def vector(self, a) -> np.ndarray:
        return np.array(a, dtype=np.float32).reshape(-1)

    def zeros(self, shape, dtype) -> np.ndarray:
        return np.zeros(shape, dtype=dtype)     # calloc: untouched pages cost nothing

    def asarray(self, a) -> np.ndarray:
        return np.ascontiguousarray(a)

    def keep_f32(self, m: QMatrix, keep: bool) -> None:
        m.keep_f32 = bool(keep)

    def to_host(self, x) -> np.ndarray:
        return x

    def memory_info(self):
        return None

    def argmax(self, logits) -> np.ndarray:
        if logits.size and not np.isfinite(logits.max(axis=-1)).all():   # NaN or +inf anywhere
            from ..sampling import SamplingError
            raise SamplingError("logits are NaN, +inf or all -inf (model produced no usable scores)")
        return np.argmax(logits, axis=-1).astype(np.int64)

    # -- the forward pass -----------------------------------------------------------
    def embed(self, w: QMatrix, ids, scale: float) -> np.ndarray:
        x = w.rows(np.asarray(ids, dtype=np.int64))              # (N, n_embd)
        if scale != 1.0:
            x *= np.float32(scale)   # f32 sqrtf(n_embd), as llama.cpp scales it
        return x

    def matmul(self, w: QMatrix, x, bias=None) -> np.ndarray:
        y = w.apply(x)
        if bias is not None:
            y += bias
        return y

    def rms_norm(self, x, w, eps: float) -> np.ndarray:
        return rms_norm(x, w, eps)

    def rope(self, x, positions, rope) -> np.ndarray:
        return rope(x, positions)

    def gated(self, gate, up, act: str) -> np.ndarray:
        return gated_(gate, up, act)

    def softcap(self, x, cap: float) -> np.ndarray:
        return softcap(x, cap)

    def add(self, x, y) -> np.ndarray:
        x += y
        return x

    def scale(self, x, s: float) -> np.ndarray:
        return x * np.float32(s)

    def take_rows(self, x, rows) -> np.ndarray:
        return x[np.asarray(rows, dtype=np.int64)]

    def append_rows(self, dst, rows, src) -> None:
        """src (S, G, d): row s into sequence s's (G, cap, d) buffer dst[s] at row rows[s]."""
        for s, (buf, r) in enumerate(zip(dst, rows)):
            buf[:, int(r)] = src[s]

    # -- attention --------------------------------------------------------------------
    def attention(self, q, k, v, q_pos, k_pos0: int, window, scale: float) -> np.ndarray:
        """Causal (+ sliding window) attention of one sequence's query rows.

        q (n, H, d) post-RoPE; k, v (G, T, d) the cached keys/values of positions
        k_pos0 .. k_pos0 + T - 1; q_pos (n,). Returns (n, H, d) float32."""
        n, H, d = q.shape
        G, T = k.shape[0], k.shape[1]
        q = q * np.float32(scale)
        q_pos = np.asarray(q_pos, dtype=np.int64)
        out = np.empty((n, H, d), dtype=np.float32)
        block = max(1, min(n, _MAX_SCORES // (max(1, T) * H)))
        if window is not None:
            # short query blocks see window + block keys instead of window + n: less masked work
            block = min(block, max(16, window // 4))
        for s in range(0, n, block):
            e = min(n, s + block)
            out[s:e] = _attend_block(q[s:e], k, v, q_pos[s:e], k_pos0, window, H // G)
        return out

    def decode_attention(self, q, bufs, positions, window, scale: float) -> np.ndarray:
        """One decode query per sequence over its cached rows, read in place.

        q (S, G, g, d) post-RoPE; bufs: per sequence (K, V (G, cap, d), pos0, n), the rows
        [0, n) holding positions pos0..; positions (S,) of the queries (their own key is
        cached). Attends positions max(pos0, p - window + 1)..p. -> (S, G, g, d)."""
        S, G = q.shape[:2]
        spans = []
        for (K, V, pos0, n), p in zip(bufs, positions):
            p = int(p)
            lo = pos0 if window is None else max(pos0, p - window + 1)
            if not pos0 <= lo <= p < pos0 + n:
                raise ValueError(f"attention: no keys for position {p} (cached {pos0}..{pos0 + n - 1})")
            spans.append((lo - pos0, p + 1 - pos0))
        if not self.native_retrieval or any(b[0].dtype != b[1].dtype for b in bufs):
            # (the fused kernel reads K and V of one type; mixed cache types take numpy)
            return np.stack([self.attention(q[s].reshape(1, -1, q.shape[-1]), K[:, a:b], V[:, a:b],
                                            [b - 1], a, None, scale)[0].reshape(q.shape[1:])
                             for s, ((K, V, _, _), (a, b)) in enumerate(zip(bufs, spans))])
        width = max(b - a for a, b in spans)
        idx = np.full((S, G, width), -1, dtype=np.int64)
        lens = np.empty((S, G), dtype=np.int32)
        for s, (a, b) in enumerate(spans):
            idx[s, :, :b - a] = np.arange(a, b)
            lens[s] = b - a
        return _native().sparse_attention(q, [b[0] for b in bufs], [b[1] for b in bufs], idx, lens, scale)

    def sparse_attention(self, q, keys, values, idx, lens, scale: float, cached=None) -> np.ndarray:
        """Exact softmax attention of decode queries over selected host-store rows.

        q (S, G, g, d) post-RoPE; keys/values: per sequence (G, cap, d) store arrays;
        idx (S, G, Kmax) positions (padded), lens (S, G). Returns (S, G, g, d). cached
        (row caches) is for device backends: here the store is read in place."""
        with self._phase("attention"):
            return self._sparse_attention(q, keys, values, idx, lens, scale)

    def _sparse_attention(self, q, keys, values, idx, lens, scale: float) -> np.ndarray:
        if self.native_retrieval:
            return _native().sparse_attention(q, keys, values, idx, lens, scale)
        S, G, g, d = q.shape
        out = np.empty((S, G, g, d), dtype=np.float32)
        gather = _native().gather_rows
        for s in range(S):
            for kh in range(G):
                sel = idx[s, kh, :lens[s, kh]]
                K = gather(keys[s][kh], sel).astype(np.float32, copy=False)       # (m, d)
                V = gather(values[s][kh], sel).astype(np.float32, copy=False)
                sc = (q[s, kh] * np.float32(scale)) @ K.T                        # (g, m)
                sc = np.exp(sc - sc.max(axis=1, keepdims=True))
                out[s, kh] = (sc @ V) / sc.sum(axis=1, keepdims=True)
        return out

    # -- selection ----------------------------------------------------------------------
    def dot_scores(self, q, k) -> np.ndarray:
        with self._phase("rerank"):
            return np.asarray(q, dtype=np.float32) @ np.asarray(k, dtype=np.float32).T

    def lut_lookup(self, lut, codes) -> np.ndarray:
        return lut_lookup(lut, codes)

    def quest_bounds(self, q, kmin, kmax) -> np.ndarray:
        return quest_bounds(q, kmin, kmax)

    def topk_union(self, scores, k: int) -> np.ndarray:
        return topk_union(scores, k)

    def build_lut(self, q, centroids) -> np.ndarray:
        """q (S, G, g, d), centroids (G, M, C, dsub) -> lut (S, G, g, M, C)."""
        with self._phase("lut"):
            return self._build_lut(q, centroids)

    def _build_lut(self, q, centroids) -> np.ndarray:
        if self.native_retrieval:
            return _native().build_lut(q, centroids)
        S, G, g, d = q.shape
        _, M, C, ds = centroids.shape
        qs = q.reshape(S, G, g, M, ds)
        return np.einsum("sgjmd,gmcd->sgjmc", qs, centroids, dtype=np.float32)

    def select_topk(self, lut, codes, T, sinks, window, k):
        """Per (sequence, KV head): sinks + union over the query heads of the top-k LUT
        scores among the candidates + the recent window, as (idx (S, G, Kmax) padded
        with -1, lens (S, G))."""
        with self._phase("topk"):
            return self._select_topk(lut, codes, T, sinks, window, k)

    def _select_topk(self, lut, codes, T, sinks, window, k):
        if self.native_retrieval:
            return _native().select_topk(lut, codes, T, sinks, window, k)
        S, G = lut.shape[:2]
        sels = []
        for s in range(S):
            t = int(T[s])
            lo = min(sinks, t)
            hi = max(lo, t - window)
            row = []
            for kh in range(G):
                if hi - lo <= k:
                    picked = np.arange(lo, hi)
                else:
                    sc = lut_lookup(lut[s, kh], codes[s][kh][:, lo:hi])
                    picked = topk_union(sc, k) + lo
                row.append(np.concatenate([np.arange(lo), picked, np.arange(hi, t)]))
            sels.append(row)
        return pad_selection(sels)

    def group_matmul(self, q, W) -> np.ndarray:
        """q (S, G, g, d) x W (G, d, e) -> (S, G, g, e): one matrix per KV head."""
        return np.einsum("sgjd,gde->sgje", q, W, dtype=np.float32)

    def code_assigner(self, books):
        return HostCodeAssigner(books)

    def gather(self, rows, idx) -> np.ndarray:
        return _native().gather_rows(rows, idx)


# host scoring, shared with the CUDA backend's host-side fallbacks
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


class HostCodeAssigner:
    """Codes of new keys for one layer's codebooks (one vq.Codebook per KV head):
    assign(keys (m, G, d) pre-RoPE (a2ats) or post-RoPE (vq), codes (G, M, n_ctx), first)
    writes codes[:, :, first:first + m]."""

    def __init__(self, books):
        self.books = list(books)

    def __call__(self, keys, codes, first: int) -> None:
        m = keys.shape[0]
        for g, book in enumerate(self.books):
            codes[g, :, first:first + m] = book.assign_codes(keys[:, g]).T


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
