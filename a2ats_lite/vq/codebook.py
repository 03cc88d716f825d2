"""Query-aware vector quantization of keys (A2ATS section 2): the metric, the code
layouts and the codebooks the retrieval policies score with at run time.

With q~ = R_b q (the WRoPE query), E[(q~.k - q~.c)^2] = (k - c)^T H (k - c),
H = E[q~^T q~]. Factor H = L L^T; then (k - c)^T H (k - c) = |L^T k - L^T c|^2,
so plain k-means on transformed keys k' = L^T k (row form: k @ L) minimizes
the right objective. Centroids are mapped back to key space for scoring:
score(q, token j) = (R_b q) . C[code_j],  C = C' L^{-1}.

The plain-VQ ablation is the same code with L = I, trained on post-RoPE keys.

Code layouts "MxBITS" (`calibrate --codes`): M = 1 is the paper's single codebook of
2**BITS centroids per whole key. M > 1 is query-aware product quantization: k' = k @ L
is split into M contiguous blocks of d / M dims, each with its own k-means codebook of
2**BITS centroids (in k' space the H-metric error is plain squared error, so it is the
sum of the blocks' errors). Scoring keeps the centroids in k' space and moves the query
instead: q~ . k = (q~ L^{-T}) . (k L), so score = sum_m (q~ L^{-T})_m . C'_m[code_m],
a sum of M LUT entries.

Layouts of 4-bit codes ("Mx4", M even) may be scored by fast-scan (`scan = "fast"` in the
sidecar, which calibrate records for them): the codes are kept packed in blocks of 32 tokens
and scored with the LUT quantized to 8 bits per query head (native/fastscan.c), the exact
re-rank after it; the other layouts keep one uint16 per subspace and the float LUT.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .kmeans import augmented, kmeans, nearest


def estimate_H(q_tilde: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q_tilde (n, d) WRoPE queries (R_b q) of one GQA group, all its query heads pooled
    -> (H, L), H (d, d) = E[q~^T q~] / rms(entries) + 1e-6 I, and its Cholesky factor
    L (H = L L^T). The normalization and the ridge are the reference code's; the ridge
    makes the factor exist even for rank-deficient samples."""
    q = np.asarray(q_tilde, dtype=np.float64)
    if q.ndim != 2 or len(q) == 0:
        raise ValueError(f"estimate_H needs (n, d) queries with n > 0, got shape {q.shape}")
    H = q.T @ q / len(q)                               # (d, d)
    H /= np.sqrt(np.mean(H * H)) or 1.0
    H += 1e-6 * np.eye(H.shape[0])
    return H, np.linalg.cholesky(H)


def parse_codes(text) -> tuple[int, int]:
    """"MxBITS" -> (M, BITS): M product-quantization subspaces of 2**BITS centroids each
    (codes are uint16: 1 <= BITS <= 16; 1 <= M <= 4096). "1x12" is the paper's layout."""
    m = re.fullmatch(r"\s*(\d{1,4})\s*[xX]\s*(\d{1,2})\s*", str(text))
    if m is None or not 1 <= int(m[1]) <= 4096 or not 1 <= int(m[2]) <= 16:
        raise ValueError(f"codes must be MxBITS with 1 <= M <= 4096 subspaces and 1 <= BITS "
                         f"<= 16 bits each (e.g. 1x12, 4x8), got {text!r:.40}")
    return int(m[1]), int(m[2])


FAST_SCAN_MAX_M = 128     # the fast-scan kernel's 16-bit scores hold 255 * M


def fast_scan_layout(M: int, n_centroids: int) -> bool:
    """Whether codes of M subspaces of n_centroids can be scored by fast-scan (native/fastscan.c):
    4-bit codes (16 centroids), an even M up to FAST_SCAN_MAX_M (two subspaces per 32-byte
    group of a block of 32 tokens)."""
    return n_centroids == 16 and M % 2 == 0 and 2 <= M <= FAST_SCAN_MAX_M


@dataclass
class Codebook:
    """One (layer, KV head): the metric's Cholesky factor L and the codebook, in one of two
    layouts:
      M = 1 (the paper's): `centroids` (C, d) in key space, score = q~ . C[code];
      M > 1 (query-aware product quantization): `sub` (M, C, dsub) in k' = k @ L space,
        k' split into M contiguous blocks of dsub = d / M dims with a codebook each;
        score = sum_m q'_m . sub[m, code_m] with q' = q~ @ L^{-T} (exact for a key whose
        every block is one of its centroids, since q~ . k = (q~ L^{-T}) . (k L))."""
    centroids: np.ndarray | None  # (C, d) key space (M = 1); None for product codes
    L: np.ndarray                 # (d, d) Cholesky factor of H (identity for the plain-VQ ablation)
    sub: np.ndarray | None = None  # (M, C, dsub) subspace centroids in k' space (M > 1)
    _ct: np.ndarray | None = field(default=None, repr=False, compare=False)
    _aug: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def M(self) -> int:
        return 1 if self.sub is None else int(self.sub.shape[0])

    @property
    def n_centroids(self) -> int:
        return int((self.centroids if self.sub is None else self.sub[0]).shape[0])

    @property
    def dim(self) -> int:
        return int(self.L.shape[0])

    def transformed(self) -> np.ndarray:
        """Centroids in k' = k @ L space (cached: assignment runs every append): (C, d) for
        M = 1, (M, C, dsub) for product codes."""
        if self._ct is None:
            self._ct = (self.centroids.astype(np.float64) @ self.L.astype(np.float64)
                        if self.sub is None else self.sub.astype(np.float64))
        return self._ct

    def subspaces(self) -> np.ndarray:
        """(M, C, dsub) centroids in k' space (M = 1: the transformed key-space centroids)."""
        t = self.transformed()
        return t[None] if self.sub is None else t

    def query_transform(self) -> np.ndarray:
        """(d, d) W = L^{-T}: q' = q~ @ W scores k'-space centroids (q~ . k = q' . (k @ L))."""
        L = self.L.astype(np.float64)
        return np.linalg.solve(L, np.eye(len(L))).T

    def assign_codes(self, keys: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Codes (n, M) uint16 of keys (n, d): per subspace the nearest centroid of the
        block of k' = k @ L (for M = 1, the nearest centroid in the H metric)."""
        keys = np.asarray(keys)
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be (n, {self.dim}), got {keys.shape}")
        x = (keys.astype(np.float64) @ self.L.astype(np.float64)).astype(dtype)
        subs = self.subspaces()
        ds = subs.shape[2]
        caTs = self._aug.get(np.dtype(dtype))
        if caTs is None:    # cached: decode assigns one key per step against every centroid
            caTs = self._aug[np.dtype(dtype)] = [augmented(c, dtype) for c in subs]
        out = np.empty((len(x), len(subs)), dtype=np.uint16)
        for m, caT in enumerate(caTs):
            out[:, m] = nearest(np.ascontiguousarray(x[:, m * ds:(m + 1) * ds]), None, caT=caT)
        return out

    def assign(self, keys: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Codes of keys (n, d): (n,) uint16 for M = 1, (n, M) for product codes."""
        codes = self.assign_codes(keys, dtype)
        return codes[:, 0] if self.sub is None else codes

    @staticmethod
    def stack(books, dtype=np.float32):
        """One layer's codebooks (one per KV head, one layout) as one assigner: keys (n, G, d)
        -> codes (G, M, n) uint16. StackedCodebooks (stacked products) unless a book's class
        assigns codes its own way, whose assign_codes then runs per head."""
        books = list(books)
        if all(type(b).assign_codes is Codebook.assign_codes for b in books):
            return StackedCodebooks(books, dtype)
        return lambda keys: np.stack([b.assign_codes(np.asarray(keys)[:, g], dtype).T
                                      for g, b in enumerate(books)])

    def approx_keys(self, codes) -> np.ndarray:
        """(n, d) float64 key-space reconstruction of codes ((n,) or (n, M))."""
        codes = np.asarray(codes).reshape(len(codes), -1)
        kp = np.concatenate([self.subspaces()[m][codes[:, m]] for m in range(codes.shape[1])], 1)
        return np.linalg.solve(self.L.astype(np.float64).T, kp.T).T


class StackedCodebooks:
    """Codes of one layer's keys for all its KV heads at once: stacked(keys (n, G, d)) ->
    (G, M, n) uint16, codes[g] = books[g].assign_codes(keys[:, g]).T. A few rows (a decode
    step's one key per head) go through one stacked product over heads and subspaces (each
    slice the same BLAS product on the same operands as assign_codes, so the same codes) for
    a few calls instead of G * (M + 1); many rows (a prefill) through each book's
    assign_codes, whose larger products are faster there."""

    ROWS = 1 << 21       # distance entries of one stacked product (an 8 MB temporary)

    def __init__(self, books, dtype=np.float32):
        self.books = list(books)
        if len({(b.M, b.n_centroids, b.dim) for b in self.books}) != 1:
            raise ValueError("stacked codebooks must share one layout")
        self.dtype = np.dtype(dtype)
        self.L = np.stack([b.L.astype(np.float64) for b in self.books])          # (G, d, d)
        self.caT = np.stack([[augmented(c, dtype) for c in b.subspaces()]
                             for b in self.books])                              # (G, M, ds+1, C)

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        G, M, ds1, C = self.caT.shape
        keys = np.asarray(keys)
        if keys.ndim != 3 or keys.shape[1:] != (G, self.L.shape[1]):
            raise ValueError(f"keys must be (n, {G}, {self.L.shape[1]}), got {keys.shape}")
        n = keys.shape[0]
        if n * G * M * C > self.ROWS:
            return np.stack([b.assign_codes(keys[:, g], self.dtype).T
                             for g, b in enumerate(self.books)]).astype(np.uint16)
        x = np.ascontiguousarray(keys.transpose(1, 0, 2), dtype=np.float64)     # (G, n, d)
        x = (x @ self.L).astype(self.dtype)
        xa = np.empty((G, M, n, ds1), self.dtype)
        xa[..., -1] = 1.0
        xa[..., :-1] = x.reshape(G, n, M, ds1 - 1).transpose(0, 2, 1, 3)
        return np.argmin(xa @ self.caT, axis=-1).astype(np.uint16)


def train_codebook(keys: np.ndarray, q_tilde: np.ndarray | None, n_centroids: int,
                   iters: int = 300, seed: int = 0, tol: float = 1e-4, dtype=np.float32,
                   progress=None, n_subspaces: int = 1) -> Codebook:
    """Query-aware codebook (q_tilde = R_b q given) or plain k-means (q_tilde None: L = I).
    n_subspaces M > 1: product quantization of k' = k @ L in M contiguous blocks, a
    k-means codebook of n_centroids per block (the H-metric error is the sum of the
    blocks' squared errors, so each block's k-means minimizes its share)."""
    if n_centroids > 65536:
        raise ValueError(f"codes are uint16: at most 65536 centroids, got {n_centroids}")
    keys = np.asarray(keys, dtype=np.float64)
    d = keys.shape[1]
    M = int(n_subspaces)
    if M < 1 or d % M:
        raise ValueError(f"{M} subspaces do not split the key dimension {d} evenly")
    L = estimate_H(q_tilde)[1] if q_tilde is not None else np.eye(d)
    x = keys @ L
    if M == 1:
        res = kmeans(x, n_centroids, iters=iters, tol=tol, seed=seed, dtype=dtype,
                     progress=progress)
        C = np.linalg.solve(L.T, res.centroids.T).T        # back to key space: C = C' L^{-1}
        return Codebook(C.astype(np.float32), L.astype(np.float32))
    ds = d // M
    sub = np.stack([kmeans(x[:, m * ds:(m + 1) * ds], n_centroids, iters=iters, tol=tol,
                           seed=seed + m, dtype=dtype, progress=progress).centroids
                    for m in range(M)])
    return Codebook(None, L.astype(np.float32), sub.astype(np.float32))
