"""The CPU backend: numpy (float32 BLAS) plus the native C library.

Weights keep their GGUF encoding (cpu_matrix.QMatrix: every product, one row or a prompt
chunk, through the native library along one path per weight). The per-layer elementwise
steps (RMS norm, RoPE, the feed-forward gate) and the decode rows' dense attention are a
native call or two each (native.fused, the same bits as the numpy functions of ops.py and
rope.py): a decode step makes ~150 of them, so their Python cost is kept small.
The CUDA kernels under kernels/ must match the numpy functions here (and the elementwise
ones in ops.py and the scoring in scoring.py) within their stated tolerances.
"""
from __future__ import annotations

from functools import cached_property

import numpy as np

from ..batch import pad_selection
from ..ops import gated_, softcap
from . import scoring
from .base import Caps, phase
from .cpu_matrix import QMatrix, _native
from .cpu_reference import attention_reference

__all__ = ["CPUBackend", "HostCodeAssigner", "QMatrix"]

_FAST_ROWS = 16     # decode_attention: up to this many rows build the native call row by row


class CPUBackend:
    """native_retrieval: the a2ats decode path (LUT, top-K, fused gather + sparse
    attention) in the native library (one call per layer for every sequence and KV
    head); False runs the numpy reference of each (tests, benchmarks)."""
    name = "cpu"

    def __init__(self, native_retrieval: bool = True):
        self.native_retrieval = bool(native_retrieval)
        self.profile: dict | None = None    # phase -> seconds (benchmarks): see _phase
        self._rope_tables = {}              # id(rope.Rope) -> (it, native.fused.RopeTables)

    @cached_property
    def caps(self) -> Caps:
        # (made on first use: the tensor types are the C library's, imported on first use)
        return Caps(host_memory=True, graphs=False, row_cache=0,
                    tensor_types=frozenset(_native().SUPPORTED_TYPES), f32_cache=True,
                    fast_scan=True, rerank=True, kv_types=frozenset({"f32", "f16", "q8_0", "q4_0"}))

    @property
    def host(self) -> bool:
        return self.caps.host_memory        # device arrays are host numpy arrays

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
        """First maximal logit per row; -1 for a row with NaN, +inf or only -inf (the engine
        fails that row's request alone)."""
        ids = np.argmax(logits, axis=-1).astype(np.int64)
        if logits.size:
            # the picked entry is NaN if any is (argmax stops at the first NaN), +inf if the
            # max is, -inf if every entry is: one look at it instead of a second pass
            picked = np.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]
            ids[~np.isfinite(picked)] = -1
        return ids

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
        return _native().fused.rms_norm(x, w, eps)

    def rope(self, x, positions, rope) -> np.ndarray:
        # cos / sin made once per position (Rope.cos_sin's numbers) and shared by the layers
        # (keyed by id: hashing the frozen dataclass costs more than the rotation)
        p = positions if type(positions) is np.ndarray else np.asarray(positions)
        if p.size and (p[0] < 0 if p.size == 1 else p.min() < 0):   # un-rotation (wrope's
            return rope(x, p)                                        # scoring): numpy's
        hit = self._rope_tables.get(id(rope))
        if hit is None or hit[0] is not rope:
            hit = self._rope_tables[id(rope)] = (rope, _native().fused.RopeTables(rope))
        return _native().fused.rope(x, p, hit[1])

    def gated(self, gate, up, act: str) -> np.ndarray:
        if type(gate) is np.ndarray and gate.dtype == np.float32 and gate.flags.c_contiguous:
            return _native().fused.gated(gate, up, act)      # the same bits, fewer calls
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
        """src (S, G, width): row s into sequence s's (G, cap, width) buffer dst[s] at row
        rows[s] (a block type's rows come quantized: uint8 blocks, as the buffer holds them)."""
        for s, (buf, r) in enumerate(zip(dst, rows)):
            buf[:, int(r)] = src[s]

    # -- attention --------------------------------------------------------------------
    def attention(self, q, k, v, q_pos, k_pos0: int, window, scale: float) -> np.ndarray:
        """Causal (+ sliding window) attention of one sequence's query rows.

        q (n, H, d) post-RoPE; k, v (G, T, width) the cached keys/values of positions
        k_pos0 .. k_pos0 + T - 1 (a cache buffer's view: read in place), each f32, f16 or
        q8_0 / q4_0 blocks (uint8 rows, see Caps.kv_types); q_pos (n,).
        Returns (n, H, d) float32. Natively (the default) each row's numbers are exactly
        those decode_attention gives the same row: one kernel, blocks at absolute positions."""
        q_pos = np.asarray(q_pos, dtype=np.int64).reshape(-1)
        n = q.shape[0]
        T = k.shape[1]
        lo, hi = _spans(q_pos, k_pos0, k_pos0 + T, window)
        if self.native_retrieval:
            return _native().attention(q, [k], [v], [k_pos0], np.zeros(n, np.int64), lo - k_pos0,
                                       hi - k_pos0, scale)
        return attention_reference(q, k, v, q_pos, k_pos0, window, scale)

    def decode_attention(self, q, bufs, positions, window, scale: float) -> np.ndarray:
        """Query rows over their sequences' cached rows, read in place: decode rows, and the
        rows of prefill chunks (consecutive rows of one sequence), in one native call.

        q (S, G, g, d) post-RoPE, one query row per entry; bufs: per row its sequence's
        (K, V (G, cap, width) of any Caps.kv_types, pos0, n), the rows [0, n) holding
        positions pos0..; positions
        (S,) of the queries (their own key is cached). Row s attends positions
        max(pos0, p - window + 1)..p; its numbers do not depend on the other rows.
        -> (S, G, g, d)."""
        S, G, g, d = q.shape
        positions = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(bufs) != S or len(positions) != S:
            raise ValueError(f"decode_attention: {S} queries, {len(positions)} positions, "
                             f"{len(bufs)} buffers")
        if S == 0:
            return np.empty((0, G, g, d), dtype=np.float32)
        if self.native_retrieval and S <= _FAST_ROWS and all(
                type(b[0]) is np.ndarray and b[0].flags.c_contiguous and type(b[1]) is np.ndarray
                and b[1].flags.c_contiguous for b in bufs):
            # a decode step's few rows: the same kernel and numbers, arguments built per row
            return _native().fused.decode_attention(q, bufs, positions, window, scale)
        index, uniq = {}, []                        # each sequence's buffer once
        seq = np.empty(S, dtype=np.int64)
        for r, b in enumerate(bufs):
            key = (id(b[0]), id(b[1]), int(b[2]), int(b[3]))
            if key not in index:
                index[key] = len(uniq)
                uniq.append(b)
            seq[r] = index[key]
        pos0 = np.array([int(b[2]) for b in uniq], dtype=np.int64)           # (S_u,)
        end = pos0 + np.array([int(b[3]) for b in uniq], dtype=np.int64)
        lo, hi = _spans(positions, pos0[seq], end[seq], window)
        keys = [b[0][:, :int(b[3])] for b in uniq]                          # (G, n, width) views
        values = [b[1][:, :int(b[3])] for b in uniq]
        if self.native_retrieval:
            o = _native().attention(q.reshape(S, G * g, d), keys, values, pos0, seq,
                                    lo - pos0[seq], hi - pos0[seq], scale)
            return o.reshape(S, G, g, d)
        out = np.empty((S, G, g, d), dtype=np.float32)
        r0 = 0
        while r0 < S:                               # numpy: runs of rows of one sequence
            r1 = r0 + 1
            while r1 < S and seq[r1] == seq[r0]:
                r1 += 1
            s = seq[r0]
            out[r0:r1] = self.attention(q[r0:r1].reshape(r1 - r0, G * g, d), keys[s], values[s],
                                        positions[r0:r1], pos0[s], window,
                                        scale).reshape(r1 - r0, G, g, d)
            r0 = r1
        return out

    def sparse_attention(self, q, keys, values, idx, lens, scale: float, seqs=None,
                         layer=None) -> np.ndarray:
        """Exact softmax attention of decode queries over selected host-store rows.

        q (S, G, g, d) post-RoPE; keys/values: per sequence (G, cap, width) store arrays of
        any Caps.kv_types (K and V may differ; blocks decoded row by row as they are read);
        idx (S, G, Kmax) positions (padded), lens (S, G). Returns (S, G, g, d). seqs and
        layer name row caches of device backends: here the store is read in place."""
        with self._phase("attention"):
            return self._sparse_attention(q, keys, values, idx, lens, scale)

    def _sparse_attention(self, q, keys, values, idx, lens, scale: float) -> np.ndarray:
        if self.native_retrieval:
            return _native().sparse_attention(q, keys, values, idx, lens, scale)
        S, G, g, d = q.shape
        out = np.empty((S, G, g, d), dtype=np.float32)
        gather = _native().kv_gather                # the selected rows as float32
        for s in range(S):
            for kh in range(G):
                sel = idx[s, kh, :lens[s, kh]]
                K = gather(keys[s][kh], sel, d)                                   # (m, d)
                V = gather(values[s][kh], sel, d)
                sc = (q[s, kh] * np.float32(scale)) @ K.T                        # (g, m)
                sc = np.exp(sc - sc.max(axis=1, keepdims=True))
                out[s, kh] = (sc @ V) / sc.sum(axis=1, keepdims=True)
        return out

    # -- what the backend holds per sequence: nothing (the store is read in place) -------
    def forget_rows(self, seq, n: int) -> None:
        pass

    def release(self, seq) -> None:
        pass

    def held_bytes(self, seq=None) -> int:
        return 0

    def estimate_held_bytes(self, layers, dtype) -> int:
        return 0

    # -- selection ----------------------------------------------------------------------
    def dot_scores(self, q, k) -> np.ndarray:
        with self._phase("rerank"):
            return scoring.dot_scores(q, k)

    def lut_lookup(self, lut, codes) -> np.ndarray:
        return scoring.lut_lookup(lut, codes)

    def quest_bounds(self, q, kmin, kmax) -> np.ndarray:
        return scoring.quest_bounds(q, kmin, kmax)

    def topk_union(self, scores, k: int) -> np.ndarray:
        return scoring.topk_union(scores, k)

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
        return _reference_selection(lut.shape[:2], T, sinks, window, k, lambda s, kh, lo, hi:
                                    scoring.topk_union(scoring.lut_lookup(lut[s, kh],
                                                                          codes[s][kh][:, lo:hi]), k))

    def select_fastscan(self, lut, codes, T, sinks, window, k):
        """select_topk for 4-bit codes in the fast-scan layout (codes: per sequence
        (G, n_blocks, M / 2, 32) uint8), scored by the LUT quantized to 8 bits."""
        with self._phase("topk"):
            if self.native_retrieval:
                return _native().fastscan_select(lut, codes, T, sinks, window, k)
            return _reference_selection(lut.shape[:2], T, sinks, window, k, lambda s, kh, lo, hi:
                                        scoring.fastscan_topk(lut[s, kh], codes[s][kh], lo, hi, k))

    def rerank(self, q, keys, idx, lens, T, sinks, window, k):
        """Exact re-rank of a layer's code selections (idx, lens): per (sequence, KV head) the
        selected candidates between the sinks and the window, scored by q (S, G, g, d) . their
        keys (keys: per sequence the host store's (G, cap, d), read in place); each query head
        keeps its top k, united over the group; any Caps.kv_types, block rows decoded as they
        are read). -> (idx, lens, candidates (S, G) int64)."""
        with self._phase("rerank"):
            if self.native_retrieval:
                return _native().rerank(q, keys, idx, lens, T, sinks, window, k)
            S, G = lens.shape
            ncand = np.zeros((S, G), np.int64)
            sels = []
            for s in range(S):
                t = int(T[s])
                lo = min(sinks, t)
                hi = max(lo, t - window)
                row = []
                for kh in range(G):
                    sel = idx[s, kh, :lens[s, kh]]
                    cand = sel[(sel >= lo) & (sel < hi)]
                    ncand[s, kh] = len(cand)
                    if len(cand) > k:
                        rows = _native().kv_gather(keys[s][kh], cand, q.shape[-1])   # (n, d)
                        cand = cand[scoring.topk_union(scoring.dot_scores(q[s, kh], rows), k)]
                    row.append(np.concatenate([np.arange(lo), cand, np.arange(hi, t)]))
                sels.append(row)
            return pad_selection(sels) + (ncand,)

    def fastscan_pack(self, codes, blocks, first: int) -> None:
        """codes (G, M, n) uint16 of tokens first.. into the fast-scan blocks (G, n_blocks,
        M / 2, 32) uint8 of one sequence and layer, in place."""
        if self.native_retrieval:
            _native().fastscan_pack(codes, blocks, first)
        else:
            scoring.fastscan_pack(codes, blocks, first)

    def group_matmul(self, q, W) -> np.ndarray:
        """q (S, G, g, d) x W (G, d, e) -> (S, G, g, e): one matrix per KV head."""
        return np.einsum("sgjd,gde->sgje", q, W, dtype=np.float32)

    def code_assigner(self, books):
        return HostCodeAssigner(books)

    def gather(self, rows, idx) -> np.ndarray:
        return _native().gather_rows(rows, idx)


class HostCodeAssigner:
    """Codes of new keys for one layer's codebooks (one vq.Codebook per KV head):
    assign(keys (m, G, d) pre-RoPE (a2ats) or post-RoPE (vq), codes (G, M, n_ctx), first)
    writes codes[:, :, first:first + m]."""

    def __init__(self, books):
        self.books = list(books)
        self.stacked = self.books[0].stack(self.books)   # every head in a few products

    def __call__(self, keys, codes, first: int) -> None:
        m = keys.shape[0]
        codes[:, :, first:first + m] = self.stacked(keys)


def _spans(q_pos, k_pos0, k_end, window):
    """The keys each query sees, as positions [lo, hi): lo = max(k_pos0, p - window + 1),
    hi = p + 1, checked to be cached (k_pos0 .. k_end - 1; one for all or one per query)."""
    q_pos = np.asarray(q_pos, dtype=np.int64)
    first = np.broadcast_to(np.asarray(k_pos0, dtype=np.int64), q_pos.shape)
    end = np.broadcast_to(np.asarray(k_end, dtype=np.int64), q_pos.shape)
    lo = first if window is None else np.maximum(first, q_pos - int(window) + 1)
    bad = (q_pos < lo) | (q_pos >= end)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"attention: no keys for position {int(q_pos[i])} "
                         f"(cached {int(first[i])}..{int(end[i]) - 1})")
    return lo, q_pos + 1


def _reference_selection(SG, T, sinks: int, window: int, k: int, pick):
    """The numpy path of a selection: per (sequence s, KV head kh) the sinks, then between them
    and the window every candidate when k covers them, else pick(s, kh, lo, hi) (offsets from
    lo), then the window. -> pad_selection's (idx, lens)."""
    S, G = SG
    sels = []
    for s in range(S):
        t = int(T[s])
        lo = min(sinks, t)
        hi = max(lo, t - window)
        sels.append([np.concatenate([np.arange(lo), np.arange(lo, hi) if hi - lo <= k else
                                     pick(s, kh, lo, hi) + lo, np.arange(hi, t)])
                     for kh in range(G)])
    return pad_selection(sels)
