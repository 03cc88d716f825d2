"""Retrieval KV policies: at each decode step, per KV head, attend only to
sinks (first s tokens) + the local window (last w tokens) + the top-K tokens a
selector picks among the rest, with EXACT attention over that set (real RoPE,
full-precision K/V gathered from the sequence's offloaded KVStore).

    a2ats   WRoPE + query-aware VQ: score_j = (R_b q) . C[code_j] / sqrt(d), codes
            assigned from PRE-RoPE keys in the H metric (vq.Codebook.assign)
    vq      ablation: plain k-means codes of POST-RoPE keys, scored with the real query
    quest   16-token pages with element-wise min/max of post-RoPE keys; page score
            sum_i max(q_i min_i, q_i max_i) (an upper bound of q.k on the page); top pages
    oracle  exact top-K of the true scores q.k: the ceiling of any selector
    wrope   ablation: a2ats's WRoPE scores (R_b q).k on the exact pre-RoPE keys, no VQ
            (separates what the WRoPE approximation costs from what quantization costs)
    window  StreamingLLM: sinks + the most recent tokens (the budget lengthens the window)

Budget: a fraction of the current context (0 < budget < 1, default 0.03) or a
token count (integer >= 1), PER QUERY HEAD; a KV head attends the union of its
query heads' picks (plus sinks and window). Quest picks floor(K/16) pages (>= 1).

Exact everywhere else: prefill chunks (n > 1 queries) attend densely over the
store (the paper retrieves at decode only), and sliding-window layers keep the
dense policy's bounded local cache (no retrieval).

Evaluation hooks: after a decode attend, last_selection[(layer, seq)] holds per
KV head the sorted positions attended; attention_recall() and
selection_overlap() turn them into metrics, oracle_select() gives the reference.

One dense prefill serves every policy (load_prefix): since prefill attention is
exact under every policy, a policy's state after a prefill depends only on the
pre-RoPE K/V the model handed to append(). Capture them once from a dense
prefill and replay them into each policy with load_prefix(kv, prefix_kv): the
result is identical to running the model's prefill under that policy, at the
cost of the appends only (RoPE, store writes, code assignment, page bounds).
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from ..errors import ContextOverflowError, SidecarError
from .base import register
from .dense import DenseKV
from .store import KVStore


class RetrievalKV(DenseKV):
    """The shared selection framework; subclasses define scores() (or pick())."""
    name = "retrieval"

    def __init__(self, layers, n_ctx, budget=0.03, sinks=8, window=64, spill_dir=None,
                 calib=None, wrope_b=None, initial=256):
        super().__init__(layers, n_ctx, initial=initial)
        if isinstance(budget, bool) or not (0 < budget < 1 or (budget >= 1 and float(budget).is_integer())):
            raise ValueError(f"budget must be a fraction in (0, 1) or a whole token count >= 1, "
                             f"got {budget!r}")
        if int(sinks) < 0 or int(window) < 0:
            raise ValueError(f"sinks and window must be >= 0, got {sinks}, {window}")
        self.budget, self.sinks, self.window = budget, int(sinks), int(window)
        self.spill_dir, self.calib = spill_dir, calib
        if wrope_b is None:   # must be the b the codebooks' metric H was estimated with
            wrope_b = calib.params.get("b", 2048) if calib is not None else 2048
        self.wrope_b = int(wrope_b)
        self.full = [L.index for L in layers if L.window is None]      # retrieval layers
        self.slot = {layer: i for i, layer in enumerate(self.full)}    # layer -> store slot
        self.stores: dict[int, KVStore] = {}
        self.last_selection: dict = {}     # (layer, seq) -> [sorted positions per KV head]

    # -- sequence lifetime -----------------------------------------------------------
    def _init_sequence(self, seq):
        super()._init_sequence(seq)
        if self.full:
            L = self.layers[self.full[0]]
            self.stores[seq] = KVStore(len(self.full), L.n_kv_heads, L.head_dim, self.n_ctx,
                                       spill_dir=self.spill_dir)
        self._init_policy(seq)

    def _free_sequence(self, seq):
        super()._free_sequence(seq)
        store = self.stores.pop(seq, None)
        if store is not None:
            store.close()
        for key in [k for k in self.last_selection if k[1] == seq]:
            del self.last_selection[key]
        self._free_policy(seq)

    def _init_policy(self, seq):
        pass

    def _free_policy(self, seq):
        pass

    def truncate(self, seq, n):
        super().truncate(seq, n)             # checks n; sliding-window layers; lengths
        store = self.stores.get(seq)
        if store is not None:
            for s in range(len(self.full)):
                store.truncate(s, n)
            self._on_truncate(seq, n)

    def _on_truncate(self, seq, n):
        pass

    # -- the contract ------------------------------------------------------------------
    def append(self, layer, seq, k, v, positions):
        if layer not in self.slot:
            return super().append(layer, seq, k, v, positions)
        positions = np.asarray(positions, dtype=np.int64)
        store, s = self._store(seq), self.slot[layer]
        n0, m = int(store.n[s]), len(positions)
        if m == 0:
            return
        if positions[0] != n0 or positions[-1] != n0 + m - 1 or (m > 1 and np.any(np.diff(positions) != 1)):
            raise ValueError(f"{self.name} kv: layer {layer} seq {seq} expects positions "
                             f"{n0}.., got {positions[0]}..{positions[-1]}")
        if n0 + m > self.n_ctx:
            raise ContextOverflowError(f"sequence {seq} would hold {n0 + m} tokens; "
                                       f"the context size is {self.n_ctx}")
        k_rot = self._rope(self.layers[layer], k, positions)             # (m, G, d)
        store.append(s, k_rot, v)
        self._on_append(layer, seq, s, n0, k, k_rot)

    def _on_append(self, layer, seq, s, n0, k_pre, k_rot):
        """Policy state for new rows n0.. of store slot s (codes, page bounds)."""

    def attend(self, layer, seq, q, positions):
        if layer not in self.slot:
            return super().attend(layer, seq, q, positions)
        L = self.layers[layer]
        positions = np.asarray(positions, dtype=np.int64)
        store, s = self._store(seq), self.slot[layer]
        if len(positions) == 0:
            return np.empty((0, L.n_heads, L.head_dim), np.float32)
        if positions[-1] >= store.n[s]:
            raise ValueError(f"{self.name} kv: layer {layer} has no keys for position "
                             f"{positions[-1]} (stored {int(store.n[s])})")
        q_rot = self._rope(L, q, positions) * np.float32(L.scale)       # (n, H, d)
        if len(positions) > 1:
            self.last_selection.pop((layer, seq), None)
            return self._exact(L, store, s, q_rot, positions)
        T = int(positions[0]) + 1        # the tokens this query may see (causal)
        sel = [self._select(L, seq, s, g, q[0], q_rot[0], T) for g in range(L.n_kv_heads)]
        self.last_selection[(layer, seq)] = sel
        return self._sparse(L, store, s, q_rot, sel)

    def _store(self, seq) -> KVStore:
        try:
            return self.stores[seq]
        except KeyError:
            raise ValueError(f"unknown sequence {seq}") from None

    # -- selection ---------------------------------------------------------------------
    def k_budget(self, T: int) -> int:
        """Tokens each query head may pick at context length T."""
        return int(self.budget) if self.budget >= 1 else max(1, math.ceil(self.budget * T))

    def candidates(self, T: int) -> tuple[int, int]:
        """[lo, hi): the scored positions, between the sinks and the local window."""
        lo = min(self.sinks, T)
        return lo, max(lo, T - self.window)

    def _select(self, L, seq, s, g, q_pre, q_rot, T) -> np.ndarray:
        """Sorted positions attended by KV head g: sinks + union of picks + local window."""
        lo, hi = self.candidates(T)
        K = self.k_budget(T)
        if hi - lo <= K:
            picked = np.arange(lo, hi)
        else:
            heads = slice(g * L.group, (g + 1) * L.group)
            picked = self.pick(L, seq, s, g, None if q_pre is None else q_pre[heads],
                               q_rot[heads], lo, hi, K)
        return np.concatenate([np.arange(lo), picked, np.arange(hi, T)])

    def pick(self, L, seq, s, g, q_pre, q_rot, lo, hi, K) -> np.ndarray:
        """Default: top-K of scores() per query head (argpartition), union, sorted."""
        cand = np.arange(lo, hi)
        sc = self.scores(L, seq, s, g, q_pre, q_rot, cand)               # (group, n_cand)
        top = np.argpartition(-sc, K - 1, axis=1)[:, :K]
        return cand[np.unique(top)]

    def scores(self, L, seq, s, g, q_pre, q_rot, cand) -> np.ndarray:
        """(group, len(cand)) selection scores of positions cand for the query heads of
        KV head g; q_pre (group, d) pre-RoPE, q_rot (group, d) post-RoPE and scaled."""
        raise NotImplementedError

    # -- attention ---------------------------------------------------------------------
    def _exact(self, L, store, s, q_rot, positions):
        """Causal attention of a query block over every stored row (prefill)."""
        hi = int(positions[-1]) + 1
        rows = [store.rows(s, g, 0, hi) for g in range(L.n_kv_heads)]
        buf = SimpleNamespace(pos0=0, end=hi, k=np.stack([r[0] for r in rows]),
                              v=np.stack([r[1] for r in rows]))                # (G, T, d)
        return self._attend_block(L, buf, q_rot, positions, L.n_kv_heads, L.group)

    def _sparse(self, L, store, s, q_rot, sel):
        """Exact softmax attention of one query over each KV head's selected rows."""
        out = np.empty_like(q_rot)                                       # (1, H, d)
        for g, idx in enumerate(sel):
            K, V = store.gather(s, g, idx)                               # (m, d) each
            heads = slice(g * L.group, (g + 1) * L.group)
            sc = q_rot[0, heads] @ K.T                                   # (group, m)
            sc = np.exp(sc - sc.max(axis=1, keepdims=True))
            out[0, heads] = (sc @ V) / sc.sum(axis=1, keepdims=True)
        return out


@register
class WindowKV(RetrievalKV):
    """Sinks + recent tokens: the budget extends the recent window (StreamingLLM)."""
    name = "window"

    def pick(self, L, seq, s, g, q_pre, q_rot, lo, hi, K):
        return np.arange(hi - K, hi)

    def scores(self, L, seq, s, g, q_pre, q_rot, cand):
        return np.broadcast_to(cand.astype(np.float32), (len(q_rot), len(cand)))


@register
class OracleKV(RetrievalKV):
    """Exact top-K of the true scores q.k (post-RoPE): the ceiling any selector can reach."""
    name = "oracle"

    def scores(self, L, seq, s, g, q_pre, q_rot, cand):
        return q_rot @ self.stores[seq].gather_keys(s, g, cand).T


@register
class WRoPEKV(RetrievalKV):
    """A2ATS without quantization: score_j = (R_b q) . k_j / sqrt(d) on exact pre-RoPE keys.
    The store holds post-RoPE keys k_rot_j = R_j k_j, so k_j = R_{-j} k_rot_j."""
    name = "wrope"

    def scores(self, L, seq, s, g, q_pre, q_rot, cand):
        k_rot = self.stores[seq].gather_keys(s, g, cand)                 # (n_cand, d)
        k_pre = L.rope(k_rot[:, None, :], -cand)[:, 0]                   # (n_cand, d)
        q = L.rope(q_pre[None], [self.wrope_b])[0] * np.float32(1.0 / math.sqrt(L.head_dim))
        return q @ k_pre.T


@register
class QuestKV(RetrievalKV):
    """Quest: per 16-token page the element-wise min/max of post-RoPE keys, kept
    incrementally at append; page score sum_i max(q_i min_i, q_i max_i) >= q.k for
    every key of the page. Picks the top floor(K/16) pages (at least one) per query head."""
    name = "quest"
    page = 16

    def __init__(self, layers, n_ctx, **kw):
        super().__init__(layers, n_ctx, **kw)
        self.pmin: dict[int, np.ndarray] = {}     # seq -> (slot, kv head, page, d)
        self.pmax: dict[int, np.ndarray] = {}

    def _init_policy(self, seq):
        if self.full:
            L = self.layers[self.full[0]]
            shape = (len(self.full), L.n_kv_heads, -(-self.n_ctx // self.page), L.head_dim)
            # np.empty: a page is written before it is read; memory is touched as pages fill
            self.pmin[seq] = np.empty(shape, np.float32)
            self.pmax[seq] = np.empty(shape, np.float32)

    def _free_policy(self, seq):
        self.pmin.pop(seq, None)
        self.pmax.pop(seq, None)

    def _on_append(self, layer, seq, s, n0, k_pre, k_rot):
        self._update_pages(seq, s, n0, k_rot.transpose(1, 0, 2), fresh=n0 % self.page == 0)

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

    def _on_truncate(self, seq, n):
        if n % self.page:   # rebuild the now partial last page from the store
            p0 = n // self.page * self.page
            store = self.stores[seq]
            for s in range(len(self.full)):
                rows = np.stack([store.rows(s, g, p0, n)[0] for g in range(store.n_kv_heads)])
                self._update_pages(seq, s, p0, rows, fresh=True)

    def page_bounds(self, seq, s, g, q_rot, p0, p1) -> np.ndarray:
        """(group, p1 - p0) upper bounds of q.k over pages p0..p1-1 of KV head g."""
        kmin, kmax = self.pmin[seq][s, g, p0:p1], self.pmax[seq][s, g, p0:p1]   # (n_pages, d)
        qq = q_rot[:, None, :]
        return np.maximum(qq * kmin[None], qq * kmax[None]).sum(-1)

    def pick(self, L, seq, s, g, q_pre, q_rot, lo, hi, K):
        P = self.page
        p0, p1 = lo // P, (hi - 1) // P + 1
        bounds = self.page_bounds(seq, s, g, q_rot, p0, p1)                      # (group, n_pages)
        n_pick = min(max(1, K // P), p1 - p0)
        top = np.argpartition(-bounds, n_pick - 1, axis=1)[:, :n_pick]
        pages = np.unique(top) + p0
        tok = (pages[:, None] * P + np.arange(P)).ravel()
        return tok[(tok >= lo) & (tok < hi)]

    def scores(self, L, seq, s, g, q_pre, q_rot, cand):
        """Each candidate token gets its page's bound."""
        pages = cand // self.page
        b = self.page_bounds(seq, s, g, q_rot, pages[0], pages[-1] + 1)
        return b[:, pages - pages[0]]


class _CodedKV(RetrievalKV):
    """Shared by a2ats and vq: a uint16 code per token and KV head, scored through a LUT."""
    book_kind = ""

    def __init__(self, layers, n_ctx, calib=None, **kw):
        if calib is None:
            raise SidecarError(f"kv policy {self.name!r} needs a calibration sidecar "
                               "(vq.Calibration); make one with `a2ats-lite calibrate MODEL`")
        super().__init__(layers, n_ctx, calib=calib, **kw)
        books = getattr(calib, self.book_kind)
        missing = [(i, g) for i in self.full for g in range(layers[i].n_kv_heads) if (i, g) not in books]
        if missing:
            raise SidecarError(f"calibration has no {self.book_kind} codebook for (layer, kv head) "
                               f"{missing[0]}; it was made for another model")
        for i in self.full:
            d = books[(i, 0)].centroids.shape[1]
            if d != layers[i].head_dim:
                raise SidecarError(f"calibration codebooks of layer {i} have dimension {d}, the "
                                   f"model's head dim is {layers[i].head_dim}: another model")
        self.books = books
        self.codes: dict[int, np.ndarray] = {}

    def _init_policy(self, seq):
        if self.full:
            L = self.layers[self.full[0]]
            # (slot, kv head, token): np.zeros is calloc, untouched pages cost nothing
            self.codes[seq] = np.zeros((len(self.full), L.n_kv_heads, self.n_ctx), np.uint16)

    def _free_policy(self, seq):
        self.codes.pop(seq, None)

    def _on_append(self, layer, seq, s, n0, k_pre, k_rot):
        keys = k_pre if self.book_kind == "a2ats" else k_rot
        for g in range(keys.shape[1]):
            self.codes[seq][s, g, n0:n0 + len(keys)] = self.books[(layer, g)].assign(keys[:, g])

    def lut(self, L, g, q_pre, q_rot) -> np.ndarray:
        """(group, n_centroids) score of each centroid for the group's query heads."""
        C = self.books[(L.index, g)].centroids                           # (n_centroids, d)
        return self.query(L, q_pre, q_rot) @ C.T

    def scores(self, L, seq, s, g, q_pre, q_rot, cand):
        return self.lut(L, g, q_pre, q_rot)[:, self.codes[seq][s, g, cand]]


@register
class A2ATSKV(_CodedKV):
    """A2ATS: LUT_h[c] = (R_b q_h) . C[c] / sqrt(d); codes of PRE-RoPE keys in the H metric."""
    name = "a2ats"
    book_kind = "a2ats"

    def query(self, L, q_pre, q_rot):
        # R_b q: the pre-RoPE query rotated as if every scored key sat b tokens back
        return L.rope(q_pre[None], [self.wrope_b])[0] * np.float32(1.0 / math.sqrt(L.head_dim))


@register
class VQKV(_CodedKV):
    """Ablation: plain k-means on post-RoPE keys, scored with the post-RoPE query."""
    name = "vq"
    book_kind = "vq"

    def query(self, L, q_pre, q_rot):
        return q_rot


# -- evaluation helpers ----------------------------------------------------------------
def attention_recall(q, k_all, selected, scale) -> float:
    """Share of the exact softmax mass that lands on `selected` (float64).

    q (d,) or (h, d) post-RoPE queries of one KV head's group, k_all (T, d) that head's
    post-RoPE keys (every position the query sees), selected: positions. With several
    query heads, the mean over heads."""
    q = np.atleast_2d(np.asarray(q, dtype=np.float64))
    s = scale * (q @ np.asarray(k_all, dtype=np.float64).T)               # (h, T)
    p = np.exp(s - s.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    idx = np.unique(np.asarray(selected, dtype=np.int64))
    return float(p[:, idx].sum(axis=1).mean())


def selection_overlap(a, b) -> float:
    """|a & b| / |b|: the share of reference selection b (e.g. the oracle's) that a also has."""
    a, b = np.unique(np.asarray(a)), np.unique(np.asarray(b))
    return 1.0 if len(b) == 0 else float(len(np.intersect1d(a, b, assume_unique=True)) / len(b))


def oracle_select(q, k_all, sinks, window, K) -> np.ndarray:
    """The oracle's positions for one KV head: sinks + window + union over the query heads
    q (h, d) (post-RoPE) of the top-K exact scores against k_all (T, d) among the rest."""
    T = len(k_all)
    lo = min(sinks, T)
    hi = max(lo, T - window)
    if hi - lo <= K:
        return np.arange(T)
    sc = np.atleast_2d(q) @ np.asarray(k_all[lo:hi]).T
    top = np.argpartition(-sc, K - 1, axis=1)[:, :K]
    return np.concatenate([np.arange(lo), np.unique(top) + lo, np.arange(hi, T)])


def load_prefix(kv, prefix_kv) -> int:
    """A new sequence in kv (any policy) holding a finished prefill, without the model.

    prefix_kv: per layer (k_pre (n, G, d), v (n, G, d)) as the model handed them to
    append() during a dense prefill (capture them by wrapping DenseKV.append).
    Returns the sequence id; its length is n. See the module docstring for why this
    equals running the prefill under the policy."""
    seq = kv.add_sequence()
    n = len(prefix_kv[0][0])
    pos = np.arange(n)
    for layer, (k, v) in enumerate(prefix_kv):
        if len(k) != n or len(v) != n:
            raise ValueError(f"prefix layer {layer} holds {len(k)} keys / {len(v)} values, "
                             f"layer 0 holds {n}")
        kv.append(layer, seq, k, v, pos)
    kv.advance(seq, n)
    kv.compact(seq)   # sliding-window layers: back to their window's size
    return seq
