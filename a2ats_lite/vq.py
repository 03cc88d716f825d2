"""Query-aware vector quantization of keys (A2ATS section 2) and its sidecar file.

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

Sidecar: one .npz per model (MODEL.a2ats), written atomically, holding per
(layer, kv head) both codebooks and L (KIND.LAYER.HEAD.L; M = 1: .C, key-space
centroids (C, d); M > 1: .P0 ... .P{M-1}, k'-space centroids (C, d / M) each), the
parameters (b, w, s, n_centroids, codes = "MxBITS" when calibrate recorded a layout;
sidecars without it are M = 1) and the model file's fingerprint (sha256 over its size, first MiB and
last MiB: cheap, and any re-quantization or different model changes it).
"""
from __future__ import annotations

import ast
import hashlib
import os
import re
import stat
import zipfile
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
def parse_codes(text) -> tuple[int, int]:
    """"MxBITS" -> (M, BITS): M product-quantization subspaces of 2**BITS centroids each
    (codes are uint16: 1 <= BITS <= 16; 1 <= M <= 4096). "1x12" is the paper's layout."""
    m = re.fullmatch(r"\s*(\d{1,4})\s*[xX]\s*(\d{1,2})\s*", str(text))
    if m is None or not 1 <= int(m[1]) <= 4096 or not 1 <= int(m[2]) <= 16:
        raise ValueError(f"codes must be MxBITS with 1 <= M <= 4096 subspaces and 1 <= BITS "
                         f"<= 16 bits each (e.g. 1x12, 4x8), got {text!r:.40}")
    return int(m[1]), int(m[2])


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

    def approx_keys(self, codes) -> np.ndarray:
        """(n, d) float64 key-space reconstruction of codes ((n,) or (n, M))."""
        codes = np.asarray(codes).reshape(len(codes), -1)
        kp = np.concatenate([self.subspaces()[m][codes[:, m]] for m in range(codes.shape[1])], 1)
        return np.linalg.solve(self.L.astype(np.float64).T, kp.T).T


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
                if cb.sub is None:
                    arrays[f"{kind}.{layer}.{head}.C"] = np.asarray(cb.centroids)
                else:       # product codes: one member per subspace, k' space
                    for m in range(cb.M):
                        arrays[f"{kind}.{layer}.{head}.P{m}"] = np.asarray(cb.sub[m])
                arrays[f"{kind}.{layer}.{head}.L"] = np.asarray(cb.L)
        path = Path(path)
        if not path.parent.is_dir():
            raise SidecarError(f"{path}: cannot write the sidecar: directory {path.parent} "
                               f"does not exist")
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:    # name the sidecar, not the temporary file
            raise SidecarError(f"{path}: cannot write the sidecar ({e.strerror or e})") from None
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path, model_path=None) -> "Calibration":
        """Read a sidecar; with model_path, check it was made for that model file.
        Missing, corrupted, incomplete, implausible or mismatched -> SidecarError
        naming the file. Only the expected members are read, each after its declared
        dtype and shape were checked (see SIDECAR_LIMITS); unknown members are refused."""
        path = Path(path)
        try:
            arrays = _read_sidecar(path)
        except FileNotFoundError:
            hint = f" {model_path}" if model_path is not None else " MODEL"
            raise SidecarError(f"{path}: no calibration sidecar; make one with "
                               f"`a2ats-lite calibrate{hint}`") from None
        except SidecarError as e:
            raise SidecarError(f"{path}: {e}") from None
        except OSError as e:
            if e.errno is None:  # zipfile/numpy format errors that subclass OSError
                raise SidecarError(f"{path}: corrupted calibration sidecar ({e})") from None
            raise SidecarError(f"{path}: cannot read the calibration sidecar "
                               f"({e.strerror or e})") from None
        except Exception as e:  # zip / npy format errors of a corrupted file
            raise SidecarError(f"{path}: corrupted calibration sidecar ({type(e).__name__}: {e})"
                               ) from None
        try:
            cal = cls._from_arrays(arrays)
        except SidecarError as e:
            raise SidecarError(f"{path}: {e}") from None
        except (KeyError, ValueError, IndexError, TypeError, SyntaxError, RecursionError,
                MemoryError) as e:
            raise SidecarError(f"{path}: corrupted calibration sidecar (missing or bad {e})"
                               ) from None
        if model_path is not None and cal.fingerprint != fingerprint(model_path):
            raise SidecarError(f"sidecar {path} was made for another model file; run "
                               f"`a2ats-lite calibrate {model_path}`")
        return cal

    @classmethod
    def _from_arrays(cls, arrays: dict) -> "Calibration":
        """Build and validate a Calibration from the sidecar's arrays (name -> array)."""
        def bad(what):
            return SidecarError(f"corrupted calibration sidecar ({what})")

        for key in ("meta.version", "meta.fingerprint", "meta.params"):
            if key not in arrays:
                raise bad(f"no {key}")
        v = np.asarray(arrays["meta.version"])
        if v.shape != () or v.dtype.kind not in "iu":
            raise bad(f"meta.version must be an integer, got {v.dtype} {v.shape}")
        version = int(v)
        if version != SIDECAR_VERSION:
            raise SidecarError(f"sidecar format version {version}, this build reads "
                               f"{SIDECAR_VERSION}; recalibrate")
        fp, text = np.asarray(arrays["meta.fingerprint"]), np.asarray(arrays["meta.params"])
        if fp.shape != () or fp.dtype.kind != "U" or text.shape != () or text.dtype.kind != "U":
            raise bad("meta.fingerprint and meta.params must be strings")
        text = str(text)
        if len(text) > SIDECAR_LIMITS["params_chars"]:
            raise bad(f"meta.params longer than {SIDECAR_LIMITS['params_chars']} characters")
        try:
            items = ast.literal_eval(text)   # literals only: no code runs
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
            raise bad("meta.params is not a list of (name, value) pairs") from None
        if not isinstance(items, list) or not all(
                isinstance(it, tuple) and len(it) == 2 and isinstance(it[0], str) for it in items):
            raise bad("meta.params is not a list of (name, value) pairs")
        params = dict(items)
        missing = [p for p in REQUIRED_PARAMS if p not in params]
        if missing:
            raise bad(f"no parameter {missing[0]!r}")
        for name in REQUIRED_PARAMS:
            hi = SIDECAR_LIMITS["max_centroids"] if name == "n_centroids" else SIDECAR_LIMITS["max_param"]
            val = params[name]
            if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val <= hi:
                raise bad(f"parameter {name}={val!r:.40} must be an integer in [1, {hi}]")
        if "rerank" in params:        # the re-rank factor calibrate recommends (policy default)
            val = params["rerank"]
            if isinstance(val, bool) or not isinstance(val, int) or not 1 <= val <= 1024:
                raise bad(f"parameter rerank={val!r:.40} must be an integer in [1, 1024]")
        n_centroids = params["n_centroids"]
        M = 1                         # no 'codes' parameter: the paper's layout (.C members)
        if "codes" in params:
            try:
                M, bits = parse_codes(params["codes"]) if isinstance(params["codes"], str) \
                    else (None, None)
            except ValueError:
                M = None
            if M is None:
                raise bad(f"parameter codes={params['codes']!r:.40} must be a string MxBITS")
            if 2 ** bits != n_centroids:
                raise bad(f"parameter codes={params['codes']} needs n_centroids={2 ** bits}, "
                          f"the parameters say n_centroids={n_centroids}")
        cal = cls(params=params, fingerprint=str(fp))
        found: dict = {}
        for key in arrays:
            if key.startswith("meta."):
                continue
            m = _MEMBER.fullmatch(key)
            if m is None:
                raise bad(f"unexpected member {key!r}")
            found.setdefault((m[1], int(m[2]), int(m[3])), {})[m[4]] = arrays[key]
        dims = set()
        for (kind, layer, head), pair in sorted(found.items()):
            where = f"codebook {kind} layer {layer} head {head}"
            if "L" not in pair:
                raise bad(f"{where}: missing L")
            L = pair["L"]
            subs = sorted(k for k in pair if k.startswith("P"))
            if M == 1:
                if subs:
                    raise bad(f"{where}: subspace member {subs[0]} in a 1-subspace layout")
                if "C" not in pair:
                    raise bad(f"{where}: missing C")
                C = pair["C"]
                if C.ndim != 2 or C.dtype.kind != "f" or L.dtype.kind != "f" or C.shape[1] == 0 \
                        or L.shape != (C.shape[1], C.shape[1]):
                    raise bad(f"bad {where}: C {C.dtype} {C.shape}, L {L.dtype} {L.shape}")
                n_got, blocks = C.shape[0], [C]
            else:
                if "C" in pair:
                    raise bad(f"{where}: a key-space C in a {params['codes']} product layout")
                want = [f"P{i}" for i in range(M)]
                if set(subs) != set(want):
                    gone = sorted(set(want) - set(subs), key=lambda n: int(n[1:]))
                    raise bad(f"{where}: missing subspace {gone[0]}" if gone else
                              f"{where}: subspace {sorted(set(subs) - set(want))[0]} beyond "
                              f"codes={params['codes']}")
                blocks = [pair[f"P{i}"] for i in range(M)]
                ds = blocks[0].shape[1] if blocks[0].ndim == 2 else 0
                if L.dtype.kind != "f" or L.ndim != 2 or L.shape[0] != L.shape[1] or any(
                        P.ndim != 2 or P.dtype.kind != "f" or P.shape != blocks[0].shape
                        for P in blocks) or ds == 0 or M * ds != L.shape[0]:
                    raise bad(f"bad {where}: {M} subspaces of {[P.shape for P in blocks][:4]} "
                              f"do not split L {L.dtype} {L.shape} (need M * dsub == head dim)")
                n_got = blocks[0].shape[0]
            if n_got != n_centroids:
                raise bad(f"{where}: {n_got} centroids, the parameters say n_centroids="
                          f"{n_centroids}")
            if not (all(np.isfinite(P).all() for P in blocks) and np.isfinite(L).all()):
                raise bad(f"{where}: NaN or infinite values")
            if np.triu(L, 1).any() or not np.all(np.diag(L) != 0):
                raise bad(f"{where}: L is not a lower-triangular factor with a non-zero "
                          f"diagonal")
            dims.add(L.shape[0])
            book = Codebook(pair["C"], L) if M == 1 else Codebook(None, L, np.stack(blocks))
            (cal.a2ats if kind == "a2ats" else cal.vq)[(layer, head)] = book
        if not cal.a2ats:
            raise bad("no codebooks")
        if len(dims) != 1:
            raise bad(f"codebooks of different key sizes {sorted(dims)}")
        if cal.vq and set(cal.vq) != set(cal.a2ats):
            raise bad("the vq codebooks do not cover the same (layer, head) pairs as a2ats")
        return cal


# what a sidecar may hold: anything beyond is refused before it is read
SIDECAR_LIMITS = {
    "max_param": 1 << 20,          # b, w, s
    "max_centroids": 65536,        # codes are uint16
    "max_dim": 4096,               # key (head) dimension
    "max_members": 1 << 16,        # (layers x kv heads x 2 kinds x (1 + subspaces)) + 3
    "max_bytes": 8 << 30,          # all arrays together, uncompressed
    "params_chars": 1 << 16,       # meta.params text
    "fingerprint_chars": 256,
}
_MEMBER = re.compile(r"(a2ats|vq)\.(\d{1,5})\.(\d{1,5})\.([CL]|P\d{1,4})")
_META_MEMBERS = ("meta.version", "meta.fingerprint", "meta.params")


def _check_member(name: str, shape: tuple, dtype: np.dtype) -> None:
    """Refuse an unexpected dtype or shape for a member before reading its data."""
    lim = SIDECAR_LIMITS
    if dtype.hasobject:
        raise SidecarError(f"corrupted calibration sidecar ({name} holds Python objects)")
    if name == "meta.version":
        ok = shape == () and dtype.kind in "iu" and dtype.itemsize <= 8
    elif name in ("meta.fingerprint", "meta.params"):
        n = lim["fingerprint_chars"] if name == "meta.fingerprint" else lim["params_chars"]
        ok = shape == () and dtype.kind == "U" and dtype.itemsize <= 4 * n
    else:
        m = _MEMBER.fullmatch(name)
        if m is None:
            raise SidecarError(f"corrupted calibration sidecar (unexpected member {name!r})")
        ok = (dtype.kind == "f" and dtype.itemsize in (2, 4, 8) and len(shape) == 2
              and 1 <= shape[1] <= lim["max_dim"]
              and (1 <= shape[0] <= lim["max_centroids"] if m[4] != "L" else shape[0] == shape[1]))
    if not ok:
        raise SidecarError(f"corrupted calibration sidecar ({name}: unexpected {dtype} array "
                           f"of shape {shape})")


def _read_header(fp):
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fp)
    raise SidecarError(f"corrupted calibration sidecar (unsupported .npy version {version})")


def _read_sidecar(path: Path) -> dict:
    """The sidecar's arrays by name, reading only expected, plausible members."""
    # O_NONBLOCK + fstat: a FIFO or device is refused instead of blocking the reader
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SidecarError("not a regular file, not a calibration sidecar")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with f:
        try:
            z = zipfile.ZipFile(f)
        except zipfile.BadZipFile:
            raise SidecarError("corrupted calibration sidecar: not a valid sidecar "
                               "(not an npz/zip file)") from None
        with z:
            infos = z.infolist()
            if len(infos) > SIDECAR_LIMITS["max_members"]:
                raise SidecarError(f"corrupted calibration sidecar ({len(infos)} members)")
            plan, total = {}, 0
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise SidecarError(f"corrupted calibration sidecar (unexpected member "
                                       f"{info.filename!r})")
                name = info.filename[:-4]
                if name in plan:
                    raise SidecarError(f"corrupted calibration sidecar (duplicate member {name!r})")
                if name not in _META_MEMBERS and _MEMBER.fullmatch(name) is None:
                    raise SidecarError(f"corrupted calibration sidecar (unexpected member "
                                       f"{info.filename!r})")
                with z.open(info) as fp:
                    shape, fortran, dtype = _read_header(fp)
                    _check_member(name, shape, dtype)
                    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                    if info.file_size != fp.tell() + nbytes:
                        raise SidecarError(f"corrupted calibration sidecar ({name}: member size "
                                           f"{info.file_size} does not match its {dtype} "
                                           f"{shape} header)")
                total += nbytes
                if total > SIDECAR_LIMITS["max_bytes"]:
                    raise SidecarError(f"corrupted calibration sidecar (more than "
                                       f"{SIDECAR_LIMITS['max_bytes']} bytes of arrays)")
                plan[name] = (info, shape, fortran, dtype, nbytes)
            arrays = {}
            for name, (info, shape, fortran, dtype, nbytes) in plan.items():
                with z.open(info) as fp:
                    _read_header(fp)
                    buf = bytearray(nbytes)
                    view, got = memoryview(buf), 0
                    while got < nbytes:
                        n = fp.readinto(view[got:])
                        if not n:
                            raise SidecarError(f"corrupted calibration sidecar ({name} is "
                                               f"truncated)")
                        got += n
                a = np.frombuffer(buf, dtype=dtype)
                arrays[name] = (a.reshape(shape[::-1]).T if fortran else a.reshape(shape))
            return arrays


def sidecar_path(model_path) -> Path:
    return Path(str(model_path) + ".a2ats")


def load_sidecar_for(model_path, path=None) -> Calibration:
    """The calibration at path (default: next to the model file), checked against the model."""
    return Calibration.load(path or sidecar_path(model_path), model_path=model_path)


# -- calibration -------------------------------------------------------------------
def calibrate_from_samples(layers, queries: dict, keys: dict, positions: dict, *,
                           model_fingerprint: str = "", n_centroids: int = 4096,
                           iters: int = 300, tol: float = 1e-4, b: int = 2048, w: int = 64,
                           s: int = 8, seed: int = 0, progress=None, codes: str | None = None,
                           **extra_params) -> Calibration:
    """Train both codebooks of every (full-attention layer, KV head) from recorded samples.

    layers: the model's AttnLayer list. Per full-attention layer index i:
      queries[i] (N, n_heads, d)    pre-RoPE queries
      keys[i]    (M, n_kv_heads, d) pre-RoPE keys, at positions[i] (M,)
    a2ats: H from q~ = R_b q pooled over the GQA group's query heads, k-means on
    k_pre @ L. vq (ablation): plain k-means on post-RoPE keys rope(k_pre, positions).
    codes "MxBITS" (recorded in the parameters): M subspaces of 2**BITS centroids each
    (n_centroids is then 2**BITS); None: one codebook of n_centroids (the paper's)."""
    M = 1
    if codes is not None:
        M, bits = parse_codes(codes)
        n_centroids = 2 ** bits
        extra_params["codes"] = f"{M}x{bits}"
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
        cal.a2ats[(i, g)] = train_codebook(k_pre[:, g], q_tilde, n_centroids, iters, seed, tol,
                                           n_subspaces=M)
        cal.vq[(i, g)] = train_codebook(k_rot, None, n_centroids, iters, seed, tol, n_subspaces=M)
    return cal


class QKRecorder:
    """A KV cache observer recording the pre-RoPE keys (with positions) and queries of
    the full-attention layers during dense prefills."""

    def __init__(self, full):
        self.keys = {i: [] for i in full}      # layer -> [(n, G, d) pre-RoPE keys]
        self.pos = {i: [] for i in full}
        self.queries = {i: [] for i in full}   # layer -> [(n, H, d) pre-RoPE queries]

    def on_write(self, layer, seq, positions, k_pre, v):
        if layer in self.keys:
            self.keys[layer].append(np.array(k_pre))
            self.pos[layer].append(np.array(positions))

    def on_query(self, layer, seq, positions, q_pre):
        if layer in self.queries:
            self.queries[layer].append(np.array(q_pre))


def record_samples(model, docs: list[list[int]], progress=None):
    """Dense prefills of docs recording the pre-RoPE q/k of every full-attention layer
    -> (queries, keys, positions), each layer -> array (calibrate_from_samples's input)."""
    layers = model.attn_layers
    full = [L.index for L in layers if L.window is None]
    from .kv import make_kv_cache
    kv = make_kv_cache("dense", layers, max(len(d) for d in docs), backend=model.B)
    rec = QKRecorder(full)
    kv.observers.append(rec)
    for doc in progress(docs, desc="collecting q/k") if progress else docs:
        seq = kv.add_sequence()
        try:
            model.forward([np.asarray(doc)], [seq], kv, logits="none")
        finally:
            kv.remove_sequence(seq)
    cat = lambda d: {i: np.concatenate(d[i]) for i in full}  # noqa: E731
    return cat(rec.queries), cat(rec.keys), cat(rec.pos)


def calibrate_model(model, docs: list[list[int]], model_path, n_centroids=4096, iters=300,
                    b=2048, w=64, s=8, seed=0, tol=1e-4, progress=None,
                    codes: str | None = None) -> Calibration:
    """Run the model over docs (dense prefill) recording pre-RoPE q/k of every
    full-attention layer, then calibrate_from_samples (codes: "MxBITS", see there)."""
    q, k, pos = record_samples(model, docs, progress)
    return calibrate_from_samples(model.attn_layers, q, k, pos,
                                  model_fingerprint=fingerprint(model_path),
                                  n_centroids=n_centroids, iters=iters, tol=tol, b=b, w=w, s=s,
                                  seed=seed, progress=progress, codes=codes)
