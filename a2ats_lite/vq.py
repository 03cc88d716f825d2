"""Query-aware vector quantization of keys (A2ATS section 2) and its sidecar file.

With q~ = R_b q (the WRoPE query), E[(q~.k - q~.c)^2] = (k - c)^T H (k - c),
H = E[q~^T q~]. Factor H = L L^T; then (k - c)^T H (k - c) = |L^T k - L^T c|^2,
so plain k-means on transformed keys k' = L^T k (row form: k @ L) minimizes
the right objective. Centroids are mapped back to key space for scoring:
score(q, token j) = (R_b q) . C[code_j],  C = C' L^{-1}.

The plain-VQ ablation is the same code with L = I, trained on post-RoPE keys.

Sidecar: one .npz per model (MODEL.a2ats), written atomically, holding per
(layer, kv head) both codebooks and L, the parameters (b, w, s, n_centroids,
...) and the model file's fingerprint (sha256 over its size, first MiB and
last MiB: cheap, and any re-quantization or different model changes it).
"""
from __future__ import annotations

import ast
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SidecarError

SIDECAR_VERSION = 1
REQUIRED_PARAMS = ("b", "w", "s", "n_centroids")


# -- the metric ------------------------------------------------------------------
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


# -- k-means ---------------------------------------------------------------------
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


# -- codebooks ---------------------------------------------------------------------
@dataclass
class Codebook:
    """One (layer, KV head): centroids in key space and the metric's Cholesky factor."""
    centroids: np.ndarray        # (n_centroids, d) key space: score = q~ . C[code]
    L: np.ndarray                # (d, d) Cholesky factor of H (identity for the plain-VQ ablation)
    _ct: np.ndarray | None = field(default=None, repr=False, compare=False)
    _aug: dict = field(default_factory=dict, repr=False, compare=False)

    def transformed(self) -> np.ndarray:
        """Centroids in k' = k @ L space (cached: assignment runs every append)."""
        if self._ct is None:
            self._ct = self.centroids.astype(np.float64) @ self.L.astype(np.float64)
        return self._ct

    def assign(self, keys: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Codes (uint16) of keys (n, d): nearest centroid in the H metric, i.e. in k @ L space."""
        keys = np.asarray(keys)
        if keys.ndim != 2 or keys.shape[1] != self.centroids.shape[1]:
            raise ValueError(f"keys must be (n, {self.centroids.shape[1]}), got {keys.shape}")
        x = (keys.astype(np.float64) @ self.L.astype(np.float64)).astype(dtype)
        caT = self._aug.get(np.dtype(dtype))
        if caT is None:     # cached: decode assigns one key per step against every centroid
            caT = self._aug[np.dtype(dtype)] = augmented(self.transformed(), dtype)
        return nearest(x, None, caT=caT).astype(np.uint16)


def train_codebook(keys: np.ndarray, q_tilde: np.ndarray | None, n_centroids: int,
                   iters: int = 300, seed: int = 0, tol: float = 1e-4, dtype=np.float32,
                   progress=None) -> Codebook:
    """Query-aware codebook (q_tilde = R_b q given) or plain k-means (q_tilde None: L = I)."""
    if n_centroids > 65536:
        raise ValueError(f"codes are uint16: at most 65536 centroids, got {n_centroids}")
    keys = np.asarray(keys, dtype=np.float64)
    d = keys.shape[1]
    L = estimate_H(q_tilde)[1] if q_tilde is not None else np.eye(d)
    res = kmeans(keys @ L, n_centroids, iters=iters, tol=tol, seed=seed, dtype=dtype,
                 progress=progress)
    C = np.linalg.solve(L.T, res.centroids.T).T        # back to key space: C = C' L^{-1}
    return Codebook(C.astype(np.float32), L.astype(np.float32))


# -- the sidecar -------------------------------------------------------------------
def fingerprint(model_path) -> str:
    """Cheap identity of a model file: sha256 of its size, first MiB and last MiB."""
    p = Path(model_path)
    size = p.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(p, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()


@dataclass
class Calibration:
    """Codebooks per (layer, KV head) for A2ATS and the plain-VQ ablation, plus parameters."""
    params: dict                                    # b, w, s, n_centroids, and how it was made
    fingerprint: str                                # of the model file (fingerprint())
    a2ats: dict = field(default_factory=dict)       # (layer, kv_head) -> Codebook (pre-RoPE keys)
    vq: dict = field(default_factory=dict)          # (layer, kv_head) -> Codebook (post-RoPE, L = I)

    def save(self, path) -> None:
        """Write atomically: a temp file in the same directory, fsync, os.replace. An
        interrupted save leaves the old sidecar (or none), never half a file."""
        arrays = {"meta.version": np.array(SIDECAR_VERSION),
                  "meta.fingerprint": np.array(self.fingerprint),
                  "meta.params": np.array(repr(sorted(self.params.items())))}
        for kind, books in (("a2ats", self.a2ats), ("vq", self.vq)):
            for (layer, head), cb in books.items():
                arrays[f"{kind}.{layer}.{head}.C"] = np.asarray(cb.centroids)
                arrays[f"{kind}.{layer}.{head}.L"] = np.asarray(cb.L)
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path, model_path=None) -> "Calibration":
        """Read a sidecar; with model_path, check it was made for that model file.
        Missing, corrupted, incomplete or mismatched -> SidecarError."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            hint = f" {model_path}" if model_path is not None else " MODEL"
            raise SidecarError(f"{path}: no calibration sidecar; make one with "
                               f"`a2ats-lite calibrate{hint}`") from None
        except Exception as e:  # zip / npy format errors of a corrupted file
            raise SidecarError(f"{path}: corrupted calibration sidecar ({type(e).__name__}: {e})"
                               ) from None
        try:
            cal = cls._from_arrays(arrays)
        except SidecarError as e:
            raise SidecarError(f"{path}: {e}") from None
        except (KeyError, ValueError, IndexError, TypeError, SyntaxError) as e:
            raise SidecarError(f"{path}: corrupted calibration sidecar (missing or bad {e})"
                               ) from None
        if model_path is not None and cal.fingerprint != fingerprint(model_path):
            raise SidecarError(f"sidecar {path} was made for another model file; run "
                               f"`a2ats-lite calibrate {model_path}`")
        return cal

    @classmethod
    def _from_arrays(cls, arrays: dict) -> "Calibration":
        version = int(arrays["meta.version"])
        if version != SIDECAR_VERSION:
            raise SidecarError(f"sidecar format version {version}, this build reads "
                               f"{SIDECAR_VERSION}; recalibrate")
        items = ast.literal_eval(str(arrays["meta.params"]))   # literals only: no code runs
        if not isinstance(items, list):
            raise ValueError("meta.params")
        cal = cls(params=dict(items), fingerprint=str(arrays["meta.fingerprint"]))
        missing = [p for p in REQUIRED_PARAMS if p not in cal.params]
        if missing:
            raise SidecarError(f"corrupted calibration sidecar (no parameter {missing[0]!r})")
        for key in arrays:
            kind, *rest = key.split(".")
            if kind not in ("a2ats", "vq") or rest[-1] != "C":
                continue
            layer, head = int(rest[0]), int(rest[1])
            C, L = arrays[key], arrays[f"{kind}.{layer}.{head}.L"]
            if (C.ndim != 2 or L.shape != (C.shape[1], C.shape[1]) or C.dtype.kind != "f"
                    or L.dtype.kind != "f" or not (np.isfinite(C).all() and np.isfinite(L).all())):
                raise SidecarError(f"corrupted calibration sidecar (bad codebook {kind} "
                                   f"layer {layer} head {head}: C {C.shape}, L {L.shape})")
            (cal.a2ats if kind == "a2ats" else cal.vq)[(layer, head)] = Codebook(C, L)
        if not cal.a2ats:
            raise SidecarError("corrupted calibration sidecar (no codebooks)")
        return cal


def sidecar_path(model_path) -> Path:
    return Path(str(model_path) + ".a2ats")


def load_sidecar_for(model_path, path=None) -> Calibration:
    """The calibration at path (default: next to the model file), checked against the model."""
    return Calibration.load(path or sidecar_path(model_path), model_path=model_path)


# -- calibration -------------------------------------------------------------------
def calibrate_from_samples(layers, queries: dict, keys: dict, positions: dict, *,
                           model_fingerprint: str = "", n_centroids: int = 4096,
                           iters: int = 300, tol: float = 1e-4, b: int = 2048, w: int = 64,
                           s: int = 8, seed: int = 0, progress=None, **extra_params) -> Calibration:
    """Train both codebooks of every (full-attention layer, KV head) from recorded samples.

    layers: the model's AttnLayer list. Per full-attention layer index i:
      queries[i] (N, n_heads, d)    pre-RoPE queries
      keys[i]    (M, n_kv_heads, d) pre-RoPE keys, at positions[i] (M,)
    a2ats: H from q~ = R_b q pooled over the GQA group's query heads, k-means on
    k_pre @ L. vq (ablation): plain k-means on post-RoPE keys rope(k_pre, positions)."""
    full = [L.index for L in layers if L.window is None and L.index in keys]
    if not full:
        raise ValueError("no full-attention layer samples to calibrate")
    n_tok = int(sum(len(keys[i]) for i in full) // len(full))
    cal = Calibration(params=dict(b=int(b), w=int(w), s=int(s), n_centroids=int(n_centroids),
                                  iters=int(iters), tol=float(tol), seed=int(seed), tokens=n_tok,
                                  **extra_params),
                      fingerprint=model_fingerprint)
    jobs = [(i, g) for i in full for g in range(layers[i].n_kv_heads)]
    for i, g in progress(jobs, desc="training codebooks") if progress else jobs:
        L = layers[i]
        k_pre = np.asarray(keys[i], dtype=np.float32)                         # (M, G, d)
        q_pre = np.asarray(queries[i], dtype=np.float32)[:, g * L.group:(g + 1) * L.group]
        if len(k_pre) < n_centroids:
            raise ValueError(f"layer {i}: {len(k_pre)} calibration keys are fewer than "
                             f"{n_centroids} centroids")
        q_tilde = L.rope(q_pre, np.full(len(q_pre), b)).reshape(-1, L.head_dim)  # R_b q, pooled
        k_rot = L.rope(k_pre[:, g:g + 1], np.asarray(positions[i]))[:, 0]       # (M, d)
        cal.a2ats[(i, g)] = train_codebook(k_pre[:, g], q_tilde, n_centroids, iters, seed, tol)
        cal.vq[(i, g)] = train_codebook(k_rot, None, n_centroids, iters, seed, tol)
    return cal


def _recording_kv(layers, n_ctx, full):
    """A dense cache that also records pre-RoPE keys and queries of full-attention layers."""
    from .kv.dense import DenseKV

    class RecordingKV(DenseKV):
        name = "record"

        def __init__(self):
            super().__init__(layers, n_ctx)
            self.keys = {i: [] for i in full}      # layer -> [(n, G, d) pre-RoPE keys]
            self.pos = {i: [] for i in full}
            self.queries = {i: [] for i in full}   # layer -> [(n, H, d) pre-RoPE queries]

        def append(self, layer, seq, k, v, positions):
            if layer in self.keys:
                self.keys[layer].append(np.array(k))
                self.pos[layer].append(np.array(positions))
            return super().append(layer, seq, k, v, positions)

        def attend(self, layer, seq, q, positions):
            if layer in self.queries:
                self.queries[layer].append(np.array(q))
            return super().attend(layer, seq, q, positions)

    return RecordingKV()


def calibrate_model(model, docs: list[list[int]], model_path, n_centroids=4096, iters=300,
                    b=2048, w=64, s=8, seed=0, tol=1e-4, progress=None) -> Calibration:
    """Run the model over docs (dense prefill) recording pre-RoPE q/k of every
    full-attention layer, then calibrate_from_samples."""
    layers = model.attn_layers
    full = [L.index for L in layers if L.window is None]
    rec = _recording_kv(layers, max(len(d) for d in docs), full)
    for doc in progress(docs, desc="collecting q/k") if progress else docs:
        seq = rec.add_sequence()
        model.forward([np.asarray(doc)], [seq], rec, logits="none")
        rec.remove_sequence(seq)
    cat = lambda d: {i: np.concatenate(d[i]) for i in full}  # noqa: E731
    return calibrate_from_samples(layers, cat(rec.queries), cat(rec.keys), cat(rec.pos),
                                  model_fingerprint=fingerprint(model_path),
                                  n_centroids=n_centroids, iters=iters, tol=tol, b=b, w=w, s=s,
                                  seed=seed, progress=progress)
