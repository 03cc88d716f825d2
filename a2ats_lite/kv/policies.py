"""KV selection policies: which cached positions each (sequence, layer, KV head)
attends at a decode step. Selection only: they hold their own state (codes, page
bounds) and score through the backend; attention is the forward pass's.

At each decode step of a retrieval policy, for every full-attention layer and
KV head: the first `sinks` tokens, the last `window` tokens, and the top-K
candidates in between of each query head of the GQA group (their union):

    a2ats   WRoPE + query-aware VQ: score_j = (R_b q) . C[code_j] / sqrt(d), codes
            assigned from PRE-RoPE keys in the H metric (vq.Codebook.assign)
    vq      ablation: plain k-means codes of POST-RoPE keys, scored with the real query
    quest   16-token pages with element-wise min/max of post-RoPE keys; page score
            sum_i max(q_i min_i, q_i max_i) (an upper bound of q.k on the page); top pages
    oracle  exact top-K of the true scores q.k: the ceiling of any selector
    wrope   ablation: a2ats's WRoPE scores (R_b q).k on the exact pre-RoPE keys, no VQ
    window  StreamingLLM: sinks + the most recent tokens (the budget lengthens the window)
    dense   no selection: every position (the storage keeps full layers in backend buffers)

Budget: a fraction of the current context (0 < budget < 1, default 0.03) or a
whole token count (>= 1), PER QUERY HEAD. Top-K ties go to the earlier position.
Prefill chunks (several rows of a sequence) and sliding-window layers are exact
(the paper retrieves at decode only).
"""
from __future__ import annotations

import math

import numpy as np

from ..batch import pad_selection
from ..errors import SidecarError


def check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.number)) or \
            not math.isfinite(budget) or not (0 < budget < 1 or (budget >= 1 and float(budget).is_integer())):
        raise ValueError(f"budget must be a fraction in (0, 1) or a whole token count >= 1, "
                         f"got {budget!r}")


class Policy:
    """dense: selects nothing, every position is attended."""
    name = "dense"
    retrieves = False

    def bind(self, layers, n_ctx: int, backend, storage) -> None:
        self.layers, self.n_ctx, self.B, self.storage = layers, n_ctx, backend, storage

    def add_sequence(self, seq: int) -> None:
        pass

    def remove_sequence(self, seq: int) -> None:
        pass

    def on_write(self, layer: int, seq: int, first_pos: int, k_pre, k_rot) -> None:
        """State for the new rows first_pos.. of a retrieval layer (codes, page bounds)."""

    def on_truncate(self, seq: int, n: int) -> None:
        pass

    def nbytes(self, seq: int | None = None) -> int:
        return 0

    def estimate_bytes(self) -> int:
        """Bytes of one sequence's selection state (allocated for n_ctx tokens at once)."""
        return 0


class Retrieval(Policy):
    """Sinks + window + the union of per-query-head top-K picks; subclasses define
    scores() (or pick())."""
    name = "retrieval"
    retrieves = True

    def __init__(self, budget=0.03, sinks=8, window=64, calib=None, wrope_b=None):
        check_budget(budget)
        if int(sinks) < 0 or int(window) < 0:
            raise ValueError(f"sinks and window must be >= 0, got {sinks}, {window}")
        self.budget, self.sinks, self.window, self.calib = budget, int(sinks), int(window), calib
        self.seq_budget: dict = {}          # per-request budgets (set_budget)
        if wrope_b is None:   # must be the b the codebooks' metric H was estimated with
            wrope_b = calib.params.get("b", 2048) if calib is not None else 2048
        self.wrope_b = int(wrope_b)

    def bind(self, layers, n_ctx, backend, storage):
        super().bind(layers, n_ctx, backend, storage)
        self.slot = storage.slot          # full-attention layer -> store slot

    def k_budget(self, T: int, seq: int | None = None) -> int:
        """Tokens each query head may pick at context length T (seq's own budget if it has
        one: set_budget)."""
        b = self.seq_budget.get(seq, self.budget) if seq is not None else self.budget
        return int(b) if b >= 1 else max(1, math.ceil(b * T))

    def set_budget(self, seq: int, budget) -> None:
        """A request's own budget for seq (None: the policy's); n_ctx = every position."""
        if budget is None:
            self.seq_budget.pop(seq, None)
        else:
            check_budget(budget)
            self.seq_budget[seq] = budget

    def remove_sequence(self, seq):
        self.seq_budget.pop(seq, None)

    def candidates(self, T: int) -> tuple[int, int]:
        """[lo, hi): the scored positions, between the sinks and the local window."""
        lo = min(self.sinks, T)
        return lo, max(lo, T - self.window)

    def max_selected(self, T: int, group: int, seq: int | None = None) -> int:
        """The most rows one KV head's selection holds at context length T: sinks, the
        union of `group` query heads' picks, window."""
        lo, hi = self.candidates(T)
        return lo + min(hi - lo, group * self.k_budget(T, seq)) + (T - hi)

    def select(self, L, seqs, q_pre, q_rot, T):
        """q_pre (S, H, d) pre-RoPE, q_rot (S, H, d) post-RoPE and scaled, T (S,) the
        positions each query sees -> (idx (S, G, Kmax) padded with -1, lens (S, G))."""
        sels = []
        for i, seq in enumerate(seqs):
            t = int(T[i])
            lo, hi = self.candidates(t)
            K = self.k_budget(t, seq)
            row = []
            for g in range(L.n_kv_heads):
                if hi - lo <= K:
                    picked = np.arange(lo, hi)
                else:
                    heads = slice(g * L.group, (g + 1) * L.group)
                    picked = self.pick(L, seq, g, q_pre[i, heads], q_rot[i, heads], lo, hi, K)
                row.append(np.concatenate([np.arange(lo), picked, np.arange(hi, t)]))
            sels.append(row)
        return pad_selection(sels)

    def pick(self, L, seq, g, q_pre, q_rot, lo, hi, K) -> np.ndarray:
        """Default: the union over the group's query heads of the top-K of scores()."""
        cand = np.arange(lo, hi)
        return cand[self.B.topk_union(self.scores(L, seq, g, q_pre, q_rot, cand), K)]

    def scores(self, L, seq, g, q_pre, q_rot, cand) -> np.ndarray:
        """(group, len(cand)) selection scores of positions cand for the query heads of KV
        head g; q_pre (group, d) pre-RoPE, q_rot (group, d) post-RoPE and scaled."""
        raise NotImplementedError

    def keys(self, L, seq, g, cand):
        """Stored post-RoPE keys (n, d) of positions cand, through the native gather."""
        return self.storage.store(seq).gather_keys(self.slot[L.index], g, cand)


class Window(Retrieval):
    """Sinks + recent tokens: the budget extends the recent window (StreamingLLM)."""
    name = "window"

    def pick(self, L, seq, g, q_pre, q_rot, lo, hi, K):
        return np.arange(hi - K, hi)


class Oracle(Retrieval):
    """Exact top-K of the true scores q.k (post-RoPE): the ceiling any selector can reach."""
    name = "oracle"

    def scores(self, L, seq, g, q_pre, q_rot, cand):
        return self.B.dot_scores(q_rot, self.keys(L, seq, g, cand))


class WRoPE(Retrieval):
    """A2ATS without quantization: score_j = (R_b q) . k_j / sqrt(d) on exact pre-RoPE keys.
    The store holds post-RoPE keys k_rot_j = R_j k_j, so k_j = R_{-j} k_rot_j."""
    name = "wrope"

    def scores(self, L, seq, g, q_pre, q_rot, cand):
        k_pre = self.B.rope(self.keys(L, seq, g, cand)[:, None, :], -cand, L.rope)[:, 0]
        q = self.B.rope(q_pre[None], [self.wrope_b], L.rope)[0] * np.float32(1.0 / math.sqrt(L.head_dim))
        return self.B.dot_scores(q, k_pre)


class Quest(Retrieval):
    """Quest: per 16-token page the element-wise min/max of post-RoPE keys, kept
    incrementally as rows arrive; page score sum_i max(q_i min_i, q_i max_i) >= q.k for
    every key of the page. Picks the top floor(K/16) pages (at least one) per query head."""
    name = "quest"
    page = 16

    def bind(self, layers, n_ctx, backend, storage):
        super().bind(layers, n_ctx, backend, storage)
        self.pmin: dict[int, np.ndarray] = {}     # seq -> (slot, kv head, page, d)
        self.pmax: dict[int, np.ndarray] = {}

    def add_sequence(self, seq):
        if self.slot:
            L = self.layers[next(iter(self.slot))]
            shape = (len(self.slot), L.n_kv_heads, -(-self.n_ctx // self.page), L.head_dim)
            # np.empty: a page is written before it is read; memory is touched as pages fill
            self.pmin[seq] = np.empty(shape, np.float32)
            self.pmax[seq] = np.empty(shape, np.float32)

    def remove_sequence(self, seq):
        super().remove_sequence(seq)
        self.pmin.pop(seq, None)
        self.pmax.pop(seq, None)

    def estimate_bytes(self):
        if not self.slot:
            return 0
        L = self.layers[next(iter(self.slot))]
        return 2 * len(self.slot) * L.n_kv_heads * -(-self.n_ctx // self.page) * L.head_dim * 4

    def nbytes(self, seq=None):
        seqs = [seq] if seq is not None else list(self.pmin)
        return sum(int(self.pmin[s].nbytes + self.pmax[s].nbytes) for s in seqs if s in self.pmin)

    def on_write(self, layer, seq, first_pos, k_pre, k_rot):
        self._update_pages(seq, self.slot[layer], first_pos, self.B.to_host(k_rot).transpose(1, 0, 2),
                           fresh=first_pos % self.page == 0)

    def _update_pages(self, seq, s, n0, rows, fresh):
        """rows (G, m, d) at positions n0..: fold into their pages' min/max."""
        P = self.page
        G, m, d = rows.shape
        p0, p1 = n0 // P, (n0 + m - 1) // P + 1
        off = n0 - p0 * P
        lo = np.full((G, (p1 - p0) * P, d), np.inf, np.float32)
        hi = np.full((G, (p1 - p0) * P, d), -np.inf, np.float32)
        lo[:, off:off + m] = rows
        hi[:, off:off + m] = rows
        lo = lo.reshape(G, p1 - p0, P, d).min(axis=2)
        hi = hi.reshape(G, p1 - p0, P, d).max(axis=2)
        if not fresh:     # the first page already holds earlier rows
            np.minimum(lo[:, 0], self.pmin[seq][s, :, p0], out=lo[:, 0])
            np.maximum(hi[:, 0], self.pmax[seq][s, :, p0], out=hi[:, 0])
        self.pmin[seq][s, :, p0:p1] = lo
        self.pmax[seq][s, :, p0:p1] = hi

    def on_truncate(self, seq, n):
        if n % self.page and seq in self.pmin:   # rebuild the now partial last page
            p0 = n // self.page * self.page
            store = self.storage.store(seq)
            for s in range(len(self.slot)):
                rows = np.stack([store.rows(s, g, p0, n)[0] for g in range(store.n_kv_heads)])
                self._update_pages(seq, s, p0, rows, fresh=True)

    def page_bounds(self, seq, layer, g, q_rot, p0, p1) -> np.ndarray:
        """(group, p1 - p0) upper bounds of q.k over pages p0..p1-1 of KV head g."""
        s = self.slot[layer]
        return self.B.quest_bounds(q_rot, self.pmin[seq][s, g, p0:p1], self.pmax[seq][s, g, p0:p1])

    def pick(self, L, seq, g, q_pre, q_rot, lo, hi, K):
        P = self.page
        p0, p1 = lo // P, (hi - 1) // P + 1
        bounds = self.page_bounds(seq, L.index, g, q_rot, p0, p1)                 # (group, n_pages)
        pages = self.B.topk_union(bounds, min(max(1, K // P), p1 - p0)) + p0
        tok = (pages[:, None] * P + np.arange(P)).ravel()
        return tok[(tok >= lo) & (tok < hi)]

    def scores(self, L, seq, g, q_pre, q_rot, cand):
        """Each candidate token gets its page's bound."""
        pages = cand // self.page
        b = self.page_bounds(seq, L.index, g, q_rot, pages[0], pages[-1] + 1)
        return b[:, pages - pages[0]]


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
    else 1 (off)."""
    book_kind = ""

    def __init__(self, calib=None, rerank=None, **kw):
        if calib is None:
            raise SidecarError(f"kv policy {self.name!r} needs a calibration sidecar "
                               "(vq.Calibration); make one with `a2ats-lite calibrate MODEL`")
        if rerank is None:      # the sidecar's recommendation (calibrate --rerank), else off
            rerank = calib.params.get("rerank", 1) if isinstance(getattr(calib, "params", None),
                                                                 dict) else 1
        if isinstance(rerank, bool) or not isinstance(rerank, (int, np.integer)) or rerank < 1:
            raise ValueError(f"rerank must be an integer >= 1 (1 = off), got {rerank!r}")
        super().__init__(calib=calib, **kw)
        self.books = getattr(calib, self.book_kind)
        self.rerank = int(rerank)
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
        self.codes: dict = {}     # seq -> codes in backend memory

    def add_sequence(self, seq):
        if self.slot:
            L = self.layers[next(iter(self.slot))]
            # (slot, kv head, M, token); for M = 1 the M axis is dropped ((slot, kv head,
            # token), the paper's layout), in the backend's memory (the GPU scores them there)
            self.codes[seq] = self.B.zeros(self.codes_shape(L), np.uint16)

    def codes_shape(self, L) -> tuple:
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
        return int(np.prod(self.codes_shape(self.layers[next(iter(self.slot))]))) * 2
    def seq_codes(self, seq, s) -> np.ndarray:
        """(G, M, n_ctx) codes of sequence seq in store slot s (a view)."""
        c = self.codes[seq][s]
        return c if c.ndim == 3 else c[:, None, :]

    def on_write(self, layer, seq, first_pos, k_pre, k_rot):
        keys = k_pre if self.book_kind == "a2ats" else k_rot           # (m, G, d)
        self.assign[layer](keys, self.seq_codes(seq, self.slot[layer]), first_pos)

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
        codes = self.seq_codes(seq, self.slot[L.index])[g][:, cand]
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
        lut = self.B.build_lut(self.lut_query(L, q_pre, q_rot), self.centroids[L.index])
        s = self.slot[L.index]
        codes = [self.seq_codes(seq, s) for seq in seqs]                      # (G, M, n_ctx)
        idx, lens = self.B.select_topk(lut, codes, T, self.sinks, self.window,
                                       K * self.rerank)
        if self.rerank == 1:
            return idx, lens
        return self.rerank_exact(L, seqs, q_rot, T, idx, lens, K)

    def rerank_exact(self, L, seqs, q_rot, T, idx, lens, K):
        """Exact re-rank of the code-picked candidates (idx, lens from select_topk with
        r*K): per (sequence, KV head), the candidates between the sinks and the window are
        scored with the real q.k (q_rot already scaled, keys gathered from the store) and
        each query head keeps its top K; sinks and window stay."""
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
        the candidates (M * 2 bytes each), the group's LUTs (group * M * C * 4) and the
        codebook the LUTs are built from (M * C * dsub * 4 = C * d * 4)."""
        lo, hi = self.candidates(T)
        _, M, C, ds = self.centroids[L.index].shape
        return {"codes": (hi - lo) * M * 2, "lut": L.group * M * C * 4,
                "codebook": M * C * ds * 4}


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


POLICIES = {p.name: p for p in (Policy, Window, Oracle, WRoPE, Quest, A2ATS, VQ)}


def make_policy(name: str, **params) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown kv policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    if name == "dense":
        if params:
            raise ValueError(f"kv policy 'dense' takes no parameters, got {', '.join(sorted(params))}")
        return Policy()
    return POLICIES[name](**params)
