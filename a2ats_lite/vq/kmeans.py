"""Seeded k-means (k-means++ seeding, Lloyd updates) and nearest-centroid assignment,
the clustering under the codebooks (vq/codebook.py).

Plain Euclidean distance: the query-aware H metric is applied by the caller, which
clusters the transformed keys k' = k @ L. Distances are one BLAS GEMM per chunk of
points; sums and objectives are float64.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def augmented(c: np.ndarray, dtype) -> np.ndarray:
    """(d + 1, k) [-2c, |c|^2]^T of centroids c (k, d), for nearest(): computed in float64."""
    c64 = np.asarray(c, dtype=np.float64)
    ca = np.concatenate([-2.0 * c64, np.einsum("kd,kd->k", c64, c64)[:, None]], 1)
    return np.ascontiguousarray(ca.T.astype(dtype))


def nearest(x: np.ndarray, c: np.ndarray | None, chunk: int = 4096, caT=None) -> np.ndarray:
    """Index (n,) of the nearest row of c (k, d) for each row of x (n, d), Euclidean.

    One BLAS GEMM per chunk on augmented rows: [x, 1] . [-2c, |c|^2] = |c|^2 - 2 x.c,
    which is |x - c|^2 minus the per-row constant |x|^2 (irrelevant to the argmin).
    Computed in x's dtype (float32 for speed; float64 when exactness matters).
    caT: augmented(c, x's dtype), when the caller keeps it (c is then not needed)."""
    dt = np.float64 if x.dtype == np.float64 else np.float32
    if caT is None:
        caT = augmented(c, dt)
    n, d = x.shape
    xa = np.empty((min(chunk, n), d + 1), dtype=dt)
    xa[:, d] = 1.0
    idx = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        xa[:m, :d] = x[s:s + m]
        idx[s:s + m] = np.argmin(xa[:m] @ caT, axis=1)
    return idx


def _sq_dist_to(x: np.ndarray, c: np.ndarray, idx: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """|x_i - c_idx_i|^2 in float64, computed from the differences (no cancellation)."""
    out = np.empty(len(x), dtype=np.float64)
    for s in range(0, len(x), chunk):
        diff = x[s:s + chunk].astype(np.float64) - c[idx[s:s + chunk]]
        out[s:s + chunk] = np.einsum("nd,nd->n", diff, diff)
    return out


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator,
                   sample: int | None = None) -> np.ndarray:
    """k-means++ seeding (D^2 sampling) on a random subsample of max(4k, 8192) points.
    Exact k-means++ is k sequential passes over all points; on the subsample those passes
    stay in cache (80K x 256 keys, k = 4096: ~3 s instead of minutes). Lloyd then runs
    on every point."""
    n = len(x)
    sample = min(n, sample or max(4 * k, 8192))
    pts = x if sample == n else x[rng.choice(n, sample, replace=False)]
    pts = np.ascontiguousarray(pts, dtype=np.float32 if x.dtype != np.float64 else np.float64)
    xx = np.einsum("nd,nd->n", pts, pts).astype(np.float64)
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(sample)
    d2 = np.maximum(xx - 2.0 * (pts @ pts[chosen[0]]) + xx[chosen[0]], 0.0)
    u = rng.random(k)
    for j in range(1, k):
        cs = np.cumsum(d2)
        if cs[-1] <= 0:      # fewer distinct points than k: any point not yet taken
            i = int(np.setdiff1d(np.arange(sample), chosen[:j])[0])
        else:
            i = min(int(np.searchsorted(cs, u[j] * cs[-1], side="right")), sample - 1)
        chosen[j] = i
        np.minimum(d2, np.maximum(xx - 2.0 * (pts @ pts[i]) + xx[i], 0.0), out=d2)
    return pts[chosen].astype(np.float64)


@dataclass
class KMeansResult:
    centroids: np.ndarray        # (k, d) float64, in the space k-means ran in
    objective: list[float]       # sum of squared distances to the nearest centroid: the
                                 # seeding, then after each Lloyd update (non-increasing)
    labels: np.ndarray           # (n,) nearest centroid of each point under `centroids`

    @property
    def n_iter(self) -> int:
        return len(self.objective) - 1


def kmeans(x: np.ndarray, k: int, iters: int = 300, tol: float = 1e-4, seed: int = 0,
           dtype=np.float32, chunk: int = 4096, progress=None) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding, seeded (same inputs -> same result).

    Stops after `iters` updates or when one update lowers the objective by no more than
    tol (relative); tol=0 runs to a fixed point. Distances are float32 GEMMs by default
    (dtype=np.float64 for exact small cases); centroid sums and the objective are float64.
    Empty clusters are re-seeded at the points worst served."""
    x = np.ascontiguousarray(x, dtype=dtype)
    if x.ndim != 2:
        raise ValueError(f"k-means needs (n, d) points, got shape {x.shape}")
    n = len(x)
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs at least k={k} points, got {n}")
    rng = np.random.default_rng(seed)
    c = kmeans_pp_init(x, k, rng)
    idx = nearest(x, c, chunk)
    dist = _sq_dist_to(x, c, idx)
    history = [float(dist.sum())]
    for _ in range(iters):
        c = _update(x, idx, dist, c)
        idx = nearest(x, c, chunk)
        dist = _sq_dist_to(x, c, idx)
        history.append(float(dist.sum()))
        if progress is not None:
            progress(len(history) - 1, history[-1])
        if history[-2] - history[-1] <= tol * history[-2]:
            break
    return KMeansResult(c, history, idx)


def _update(x, idx, dist, c):
    """Lloyd update: each centroid to the mean of its points (sorted segment sums)."""
    k = len(c)
    counts = np.bincount(idx, minlength=k)
    order = np.argsort(idx, kind="stable")
    nz = np.flatnonzero(counts)
    starts = (np.cumsum(counts) - counts)[nz]
    new = c.copy()
    new[nz] = np.add.reduceat(x[order], starts, axis=0, dtype=np.float64) / counts[nz, None]
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        # an empty centroid serves nobody: moving it cannot raise the objective
        new[empty] = x[np.argsort(dist)[::-1][:len(empty)]]
    return new
