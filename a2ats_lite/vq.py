"""Query-aware vector quantization of keys (A2ATS section 2) and its sidecar file.

With q~ = R_b q (the WRoPE query), E[(q~.k - q~.c)^2] = (k - c)^T H (k - c),
H = E[q~^T q~]. Factor H = L L^T; then (k - c)^T H (k - c) = |L^T k - L^T c|^2,
so plain k-means on transformed keys k' = L^T k (row form: k @ L) minimizes
the right objective. Centroids are mapped back to key space for scoring:
score(q, token j) = (R_b q) . C[code_j].
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import SidecarError

SIDECAR_VERSION = 1


def estimate_H(q_tilde: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """q_tilde (n, d) WRoPE queries of one GQA group -> (H, L) with H = L L^T.

    H is normalized by the RMS of its entries and gets 1e-6 I, as the reference
    code does, so the Cholesky factor exists even for rank-deficient samples."""
    q = np.asarray(q_tilde, dtype=np.float64)
    H = q.T @ q / max(1, len(q))                       # (d, d)
    H /= np.sqrt(np.mean(H * H)) or 1.0
    H += 1e-6 * np.eye(H.shape[0])
    return H, np.linalg.cholesky(H)


def _sq_dists_argmin(x: np.ndarray, c: np.ndarray, chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row of x (n, d) among c (k, d): (index (n,), squared distance (n,))."""
    cc = np.einsum("kd,kd->k", c, c)
    idx = np.empty(len(x), dtype=np.int64)
    dist = np.empty(len(x), dtype=np.float64)
    for s in range(0, len(x), chunk):
        xs = x[s:s + chunk]
        d2 = cc[None, :] - 2.0 * (xs @ c.T)            # (chunk, k) up to the |x|^2 term
        i = np.argmin(d2, axis=1)
        idx[s:s + chunk] = i
        dist[s:s + chunk] = np.maximum(0.0, d2[np.arange(len(xs)), i] + np.einsum("nd,nd->n", xs, xs))
    return idx, dist


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator, sample: int = 8192) -> np.ndarray:
    """k-means++ seeding on a random subsample (full k-means++ is O(n k d) sequential work)."""
    pts = x if len(x) <= sample else x[rng.choice(len(x), sample, replace=False)]
    centers = [pts[rng.integers(len(pts))]]
    d2 = np.einsum("nd,nd->n", pts - centers[0], pts - centers[0])
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else None
        c = pts[rng.choice(len(pts), p=p)]
        centers.append(c)
        d2 = np.minimum(d2, np.einsum("nd,nd->n", pts - c, pts - c))
    return np.array(centers)


@dataclass
class KMeansResult:
    centroids: np.ndarray        # (k, d) in the space k-means ran in
    objective: list[float]       # sum of squared distances after each assignment


def kmeans(x: np.ndarray, k: int, iters: int = 300, tol: float = 1e-4, seed: int = 0) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding; stops when the objective improves < tol (relative)."""
    x = np.asarray(x, dtype=np.float64)
    if k > len(x):
        raise ValueError(f"k-means needs at least k={k} points, got {len(x)}")
    rng = np.random.default_rng(seed)
    c = kmeans_pp_init(x, k, rng)
    history: list[float] = []
    for _ in range(iters):
        idx, dist = _sq_dists_argmin(x, c)
        history.append(float(dist.sum()))
        if len(history) > 1 and history[-2] - history[-1] <= tol * history[-2]:
            break
        counts = np.bincount(idx, minlength=k)
        sums = np.zeros_like(c)
        np.add.at(sums, idx, x)
        empty = counts == 0
        c = np.where(empty[:, None], c, sums / np.maximum(counts, 1)[:, None])
        if empty.any():  # re-seed empty clusters at the worst-served points
            c[empty] = x[np.argsort(dist)[-int(empty.sum()):]]
    return KMeansResult(c, history)


@dataclass
class Codebook:
    """One (layer, KV head): centroids in key space and the metric's factor."""
    centroids: np.ndarray        # (n_centroids, d) key space: score = q~ . C[code]
    L: np.ndarray                # (d, d) Cholesky factor of H (identity for the plain-VQ ablation)

    def assign(self, keys: np.ndarray) -> np.ndarray:
        """Codes (uint16) of keys (n, d): nearest centroid in the H metric, i.e. in k @ L space."""
        idx, _ = _sq_dists_argmin(np.asarray(keys, np.float64) @ self.L,
                                  self.centroids.astype(np.float64) @ self.L)
        return idx.astype(np.uint16)


def train_codebook(keys: np.ndarray, q_tilde: np.ndarray | None, n_centroids: int,
                   iters: int = 300, seed: int = 0) -> Codebook:
    """Query-aware codebook (q_tilde given) or plain k-means (q_tilde None: identity metric)."""
    keys = np.asarray(keys, dtype=np.float64)
    L = estimate_H(q_tilde)[1] if q_tilde is not None else np.eye(keys.shape[1])
    res = kmeans(keys @ L, n_centroids, iters=iters, seed=seed)
    # back to key space: C = C' L^{-1} (row form)
    C = np.linalg.solve(L.T, res.centroids.T).T
    return Codebook(C.astype(np.float32), L.astype(np.float32))


def fingerprint(model_path) -> str:
    """Cheap identity of a model file: sha256 of its size, first and last MiB."""
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
    params: dict                                    # b, w, s, n_centroids, tokens, ...
    fingerprint: str
    a2ats: dict = field(default_factory=dict)       # (layer, kv_head) -> Codebook
    vq: dict = field(default_factory=dict)          # (layer, kv_head) -> Codebook (identity L)

    def save(self, path) -> None:
        """Write atomically (temp file + rename): an interrupted save leaves no half file."""
        arrays = {"meta.version": np.array(SIDECAR_VERSION),
                  "meta.fingerprint": np.array(self.fingerprint),
                  "meta.params": np.array(repr(sorted(self.params.items())))}
        for kind, books in (("a2ats", self.a2ats), ("vq", self.vq)):
            for (layer, head), cb in books.items():
                arrays[f"{kind}.{layer}.{head}.C"] = cb.centroids
                arrays[f"{kind}.{layer}.{head}.L"] = cb.L
        path = Path(path)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path, model_path=None) -> "Calibration":
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except FileNotFoundError:
            hint = f" {model_path}" if model_path is not None else ""
            raise SidecarError(f"{path}: no calibration sidecar; make one with "
                               f"`a2ats-lite calibrate{hint}`") from None
        except Exception as e:  # zip / npy format errors of a corrupted file
            raise SidecarError(f"{path}: corrupted calibration sidecar ({e})") from None
        try:
            if int(arrays["meta.version"]) != SIDECAR_VERSION:
                raise SidecarError(f"{path}: sidecar version {int(arrays['meta.version'])}, "
                                   f"expected {SIDECAR_VERSION}")
            cal = cls(params=dict(_literal_items(str(arrays["meta.params"]))),
                      fingerprint=str(arrays["meta.fingerprint"]))
            for key in arrays:
                kind, *rest = key.split(".")
                if kind in ("a2ats", "vq") and rest[-1] == "C":
                    layer, head = int(rest[0]), int(rest[1])
                    books = cal.a2ats if kind == "a2ats" else cal.vq
                    books[(layer, head)] = Codebook(arrays[key], arrays[f"{kind}.{layer}.{head}.L"])
        except SidecarError:
            raise
        except (KeyError, ValueError, IndexError) as e:
            raise SidecarError(f"{path}: corrupted calibration sidecar (missing or bad {e})") from None
        if model_path is not None and cal.fingerprint != fingerprint(model_path):
            raise SidecarError(f"{path}: sidecar was made for another model file; run "
                               f"`a2ats-lite calibrate {model_path}`")
        return cal


def _literal_items(text: str):
    import ast
    items = ast.literal_eval(text)  # literals only: a sidecar cannot run code
    if not isinstance(items, list):
        raise ValueError("meta.params")
    return items


def sidecar_path(model_path) -> Path:
    return Path(str(model_path) + ".a2ats")


def load_sidecar_for(model_path) -> Calibration:
    """The calibration next to a model file, checked against that file."""
    return Calibration.load(sidecar_path(model_path), model_path=model_path)


# -- calibration over a model ---------------------------------------------------
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
                    b=2048, w=64, s=8, seed=0, progress=None) -> Calibration:
    """Run the model over docs (dense prefill), collect pre-RoPE q/k of every
    full-attention layer, and train the a2ats and vq codebooks per (layer, KV head)."""
    layers = model.attn_layers
    full = [L.index for L in layers if L.window is None]
    rec = _recording_kv(layers, max(len(d) for d in docs), full)
    for doc in progress(docs, desc="collecting q/k") if progress else docs:
        seq = rec.add_sequence()
        model.forward([np.asarray(doc)], [seq], rec, logits="none")
        rec.remove_sequence(seq)
    cal = Calibration(params=dict(b=b, w=w, s=s, n_centroids=n_centroids, iters=iters,
                                  tokens=int(sum(len(d) for d in docs))),
                      fingerprint=fingerprint(model_path))
    jobs = [(i, g) for i in full for g in range(layers[i].n_kv_heads)]
    for i, g in progress(jobs, desc="training codebooks") if progress else jobs:
        L = layers[i]
        k_pre = np.concatenate(rec.keys[i])                        # (N, G, d)
        pos = np.concatenate(rec.pos[i])
        q_pre = np.concatenate(rec.queries[i])[:, g * L.group:(g + 1) * L.group]  # (N, group, d)
        q_tilde = L.rope(q_pre, np.full(len(q_pre), b)).reshape(-1, L.head_dim)   # R_b q, pooled
        k_rot = L.rope(k_pre, pos)
        cal.a2ats[(i, g)] = train_codebook(k_pre[:, g], q_tilde, n_centroids, iters, seed)
        cal.vq[(i, g)] = train_codebook(k_rot[:, g], None, n_centroids, iters, seed)
    return cal
