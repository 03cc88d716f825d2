"""The coded retrieval policies, a2ats and its vq ablation: keys kept as product-quantization
codes (kv/policies.py's Retrieval does the sinks + window + top-K union), scored through a
LUT per query head, optionally re-ranked exactly. See policies.py for the family."""
from __future__ import annotations

import math

import numpy as np

from ..backend import scoring
from ..batch import pad_selection
from ..errors import SidecarError
from ..vq.codebook import FAST_SCAN_MAX_M, fast_scan_layout
from .policies import Retrieval


class _Coded(Retrieval):
    """Shared by a2ats and vq: M uint16 codes per token and KV head (M product-quantization
    subspaces; M = 1 is the paper's single codebook), scored through a LUT: one backend
    call per layer serves every sequence and head (build_lut + select_topk).

    Layouts (vq.Codebook): M = 1 keeps key-space centroids and scores them with the
    scoring query q~ (as the paper). M > 1 keeps the subspace centroids in k' = k @ L
    space, so the query is transformed once per step: q' = q~ @ L^{-T} (one (d x d)
    product per query head), and score_j = sum_m q'_m . C'_m[code_jm] = q~ . k^_j, the
    key reconstructed from its codes.

    rerank r > 1: the codes pick r*K candidates per query head; only those are scored
    exactly (q.k over their stored post-RoPE keys, through the store's gather) and each
    query head keeps its top K (union over the group). r large enough = the oracle.
    None: the calibration's parameter 'rerank' (calibrate records its recommendation),
    else 1 (off).

    scan "fast" (4-bit codes, M even: vq.fast_scan_layout), on a backend with
    caps.fast_scan: codes are kept packed in blocks of 32 tokens, (slot, KV head, block,
    M / 2, 32) uint8, and select_fastscan scores them with each query head's LUT quantized
    to 8 bits (native/fastscan.c); elsewhere (the GPU) the same codes are scored exactly.
    "exact": one uint16 per subspace, float LUT sums. None: the calibration's parameter
    'scan', else "exact"."""
    book_kind = ""
    needs_calibration = True

    def __init__(self, calib=None, rerank=None, scan=None, **kw):
        if calib is None:
            raise SidecarError(f"kv policy {self.name!r} needs a calibration sidecar "
                               "(vq.Calibration); make one with `a2ats-lite calibrate MODEL`")
        params = calib.params if isinstance(getattr(calib, "params", None), dict) else {}
        if rerank is None:      # the sidecar's recommendation (calibrate --rerank), else off
            rerank = params.get("rerank", 1)
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 1:
            raise ValueError(f"rerank must be an integer >= 1 (1 = off), got {rerank!r}")
        scan = params.get("scan", "exact") if scan is None else scan
        if scan not in ("exact", "fast"):
            raise ValueError(f"scan must be 'exact' or 'fast', got {scan!r}")
        super().__init__(calib=calib, **kw)
        self.books = getattr(calib, self.book_kind)
        self.rerank, self.scan = int(rerank), scan
        self.stats = {"reranked_rows": 0}   # exact re-rank keys gathered (for eval's bytes)

    def bind(self, layers, n_ctx, backend, storage):
        super().bind(layers, n_ctx, backend, storage)
        missing = [(i, g) for i in self.slot for g in range(layers[i].n_kv_heads)
                   if (i, g) not in self.books]
        if missing:
            raise SidecarError(f"calibration has no {self.book_kind} codebook for (layer, kv head) "
                               f"{missing[0]}; it was made for another model")
        self.centroids, self.qtrans, self.assign = {}, {}, {}
        for i in self.slot:
            books = [self.books[(i, g)] for g in range(layers[i].n_kv_heads)]
            d = books[0].dim
            if d != layers[i].head_dim:
                raise SidecarError(f"calibration codebooks of layer {i} have dimension {d}, the "
                                   f"model's head dim is {layers[i].head_dim}: another model")
            if len({(b.M, b.n_centroids, b.sub is None) for b in books}) != 1:
                raise SidecarError(f"calibration codebooks of layer {i} mix code layouts")
            if books[0].sub is None:
                # (G, M=1, C, d) key space: the layout the backend's LUT kernel reads
                cent = np.stack([b.centroids for b in books])[:, None]
            else:
                # (G, M, C, dsub) in k' space; queries go through W = L^{-T} per KV head
                cent = np.stack([b.sub for b in books])
                W = np.stack([b.query_transform() for b in books])           # (G, d, d)
                if not all(np.array_equal(b.L, np.eye(d)) for b in books):   # vq: L = I
                    self.qtrans[i] = backend.asarray(W.astype(np.float32))
            self.centroids[i] = backend.asarray(cent.astype(np.float32))
            self.assign[i] = backend.code_assigner(books)   # codes of new keys, where they live
        self.M = int(next(iter(self.centroids.values())).shape[1]) if self.centroids else 1
        C = int(next(iter(self.centroids.values())).shape[2]) if self.centroids else 0
        if self.scan == "fast" and self.centroids and not fast_scan_layout(self.M, C):
            raise SidecarError(f"scan='fast' needs 4-bit codes (16 centroids) in an even number "
                               f"of at most {FAST_SCAN_MAX_M} subspaces; the calibration has "
                               f"{self.M} subspaces of {C} centroids")
        self.fast = self.scan == "fast" and backend.caps.fast_scan
        self.codes: dict = {}     # seq -> codes in backend memory

    def add_sequence(self, seq):
        if self.slot:
            L = self.layers[next(iter(self.slot))]
            # (slot, kv head, M, token); for M = 1 the M axis is dropped ((slot, kv head,
            # token), the paper's layout), in the backend's memory (the GPU scores them there);
            # fast-scan: (slot, kv head, block of 32 tokens, M / 2, 32) packed nibbles
            self.codes[seq] = self.B.zeros(self.codes_shape(L), np.uint8 if self.fast else np.uint16)

    def codes_shape(self, L) -> tuple:
        if self.fast:
            return (len(self.slot), L.n_kv_heads, -(-self.n_ctx // 32), self.M // 2, 32)
        return (len(self.slot), L.n_kv_heads) + ((self.M,) if self.M > 1 else ()) + (self.n_ctx,)

    def remove_sequence(self, seq):
        super().remove_sequence(seq)
        self.codes.pop(seq, None)

    def nbytes(self, seq=None):
        seqs = [seq] if seq is not None else list(self.codes)
        return sum(int(self.codes[s].nbytes) for s in seqs if s in self.codes)

    def estimate_bytes(self) -> int:
        """Bytes of one sequence's codes (allocated for n_ctx tokens at once)."""
        if not self.slot:
            return 0
        return int(np.prod(self.codes_shape(self.layers[next(iter(self.slot))]))) * \
            (1 if self.fast else 2)

    def seq_codes(self, seq, s) -> np.ndarray:
        """(G, M, n_ctx) codes of sequence seq in store slot s (a view); fast-scan: the
        packed blocks (G, n_blocks, M / 2, 32)."""
        c = self.codes[seq][s]
        return c if c.ndim != 2 else c[:, None, :]

    def cand_codes(self, seq, s, g, cand) -> np.ndarray:
        """(M, len(cand)) uint16 codes of KV head g at positions cand."""
        if not self.fast:
            return self.seq_codes(seq, s)[g][:, cand]
        if len(cand) == 0:
            return np.zeros((self.M, 0), np.uint16)
        lo = int(np.min(cand))
        span = scoring.fastscan_unpack(self.seq_codes(seq, s)[g:g + 1], lo, int(np.max(cand)) + 1)
        return span[0][:, np.asarray(cand) - lo]

    def on_write(self, layer, seq, first_pos, k_pre, k_rot):
        keys = k_pre if self.book_kind == "a2ats" else k_rot           # (m, G, d)
        if not self.fast:
            self.assign[layer](keys, self.seq_codes(seq, self.slot[layer]), first_pos)
            return
        codes = np.empty((keys.shape[1], self.M, keys.shape[0]), np.uint16)   # (G, M, m)
        self.assign[layer](keys, codes, 0)
        self.B.fastscan_pack(codes, self.seq_codes(seq, self.slot[layer]), first_pos)

    def query(self, L, q_pre, q_rot):
        """(n, h, d) scoring queries from q_pre, q_rot (n, h, d)."""
        raise NotImplementedError

    def lut_query(self, L, q_pre, q_rot) -> np.ndarray:
        """(S, G, group, d) queries the LUT is built from: query() grouped by KV head, and
        for product codes moved to k' space (q' = q~ @ L^{-T} per KV head)."""
        S = q_pre.shape[0]
        q = self.query(L, q_pre, q_rot).reshape(S, L.n_kv_heads, L.group, L.head_dim)
        W = self.qtrans.get(L.index)
        if W is not None:
            q = self.B.group_matmul(q, W)
        return q

    def lut(self, L, g, q_pre, q_rot) -> np.ndarray:
        """(group, M, n_centroids) score of each subspace centroid for the group's query
        heads (q_pre, q_rot (group, d)); a token's score is the sum over m of its codes'."""
        heads = slice(g * L.group, (g + 1) * L.group)
        qa = np.zeros((1, L.n_heads, L.head_dim), np.float32)
        qr = np.zeros_like(qa)
        qa[0, heads], qr[0, heads] = q_pre, q_rot
        q = self.lut_query(L, qa, qr)[:, g:g + 1]
        return self.B.build_lut(q, np.ascontiguousarray(self.centroids[L.index][g:g + 1]))[0, 0]

    def scores(self, L, seq, g, q_pre, q_rot, cand):
        codes = self.cand_codes(seq, self.slot[L.index], g, cand)
        return self.B.lut_lookup(self.lut(L, g, q_pre, q_rot), codes)

    def select(self, L, seqs, q_pre, q_rot, T):
        T = np.asarray(T, dtype=np.int64)
        budgets = {self.k_budget(int(t), seq) for t, seq in zip(T, seqs)}
        if len(budgets) != 1:       # fraction budgets over different lengths: per sequence
            outs = [self.select(L, [seq], q_pre[i:i + 1], q_rot[i:i + 1], T[i:i + 1])
                    for i, seq in enumerate(seqs)]
            return pad_selection([[idx[0, g, :lens[0, g]] for g in range(L.n_kv_heads)]
                                  for idx, lens in outs])
        K = budgets.pop()
        if all(hi - lo <= K for lo, hi in (self.candidates(int(t)) for t in T)):
            # every candidate is picked (a short context): no LUT, no scoring, no re-rank
            return pad_selection([[np.arange(int(t))] * L.n_kv_heads for t in T])
        lut = self.B.build_lut(self.lut_query(L, q_pre, q_rot), self.centroids[L.index])
        s = self.slot[L.index]
        codes = [self.seq_codes(seq, s) for seq in seqs]                      # (G, M, n_ctx)
        pick = self.B.select_fastscan if self.fast else self.B.select_topk
        idx, lens = pick(lut, codes, T, self.sinks, self.window, K * self.rerank)
        if self.rerank == 1:
            return idx, lens
        return self.rerank_exact(L, seqs, q_rot, T, idx, lens, K)

    def rerank_exact(self, L, seqs, q_rot, T, idx, lens, K):
        """Exact re-rank of the code-picked candidates (idx, lens from select_topk with
        r*K): per (sequence, KV head), the candidates between the sinks and the window are
        scored with the real q.k (q_rot already scaled, keys read from the store) and
        each query head keeps its top K; sinks and window stay. A backend with caps.rerank
        does the whole layer in one call on the store in place (float or block keys); else per
        (sequence, head) on gathered keys."""
        keys = [self.storage.store(seq).arrays(self.slot[L.index])[0] for seq in seqs] \
            if self.B.caps.rerank else []
        if keys and all(k.dtype in (np.float16, np.float32, np.uint8) for k in keys):
            S = len(seqs)
            q = np.ascontiguousarray(q_rot, dtype=np.float32).reshape(
                S, L.n_kv_heads, L.group, L.head_dim)
            idx, lens, ncand = self.B.rerank(q, keys, idx, lens, T, self.sinks, self.window, K)
            self.stats["reranked_rows"] += int(ncand[ncand > K].sum())
            return idx, lens
        sels = []
        for i, seq in enumerate(seqs):
            t = int(T[i])
            lo, hi = self.candidates(t)
            row = []
            for g in range(L.n_kv_heads):
                sel = idx[i, g, :lens[i, g]]
                cand = sel[(sel >= lo) & (sel < hi)]
                if len(cand) > K:
                    heads = slice(g * L.group, (g + 1) * L.group)
                    self.stats["reranked_rows"] += len(cand)
                    exact = self.B.dot_scores(q_rot[i, heads], self.keys(L, seq, g, cand))
                    cand = cand[self.B.topk_union(exact, K)]
                row.append(np.concatenate([np.arange(lo), cand, np.arange(hi, t)]))
            sels.append(row)
        return pad_selection(sels)

    def step_bytes(self, L, T: int) -> dict:
        """What one decode step of one KV head reads to choose its tokens at context T
        (selection only; the gathered K/V rows are counted by the caller): the codes of
        the candidates (M * 2 bytes each; fast-scan: M / 2 bytes per token of the blocks of 32
        that hold them), the group's LUTs (group * M * C * 4) and the codebook the LUTs are
        built from (M * C * dsub * 4 = C * d * 4)."""
        lo, hi = self.candidates(T)
        _, M, C, ds = self.centroids[L.index].shape
        codes = (hi - lo) * M * 2 if not self.fast else \
            ((hi + 31) // 32 - lo // 32) * 32 * M // 2 if hi > lo else 0
        return {"codes": codes, "lut": L.group * M * C * 4, "codebook": M * C * ds * 4}


class A2ATS(_Coded):
    """A2ATS: LUT_h[c] = (R_b q_h) . C[c] / sqrt(d); codes of PRE-RoPE keys in the H metric
    (product codes: q' = (R_b q_h) L^{-T} / sqrt(d) against k'-space subspace centroids)."""
    name = "a2ats"
    book_kind = "a2ats"

    def query(self, L, q_pre, q_rot):
        # R_b q (q_pre (n, h, d)): the pre-RoPE query rotated as if every scored key sat
        # b tokens back
        n = q_pre.shape[0]
        return self.B.rope(q_pre, np.full(n, self.wrope_b), L.rope) * np.float32(1.0 / math.sqrt(L.head_dim))


class VQ(_Coded):
    """Ablation: plain k-means on post-RoPE keys, scored with the post-RoPE query."""
    name = "vq"
    book_kind = "vq"

    def query(self, L, q_pre, q_rot):
        return q_rot
