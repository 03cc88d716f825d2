"""Retrieval KV policies: per decode step and KV head, attend only sinks + a
recent window + the top-K tokens a selector picks, with EXACT attention over
them (real RoPE, full-precision K/V gathered from the offloaded store).

    a2ats   WRoPE (R_b q).k scored through query-aware VQ codes of pre-RoPE keys
    vq      plain k-means codes of post-RoPE keys, scored with the real query (ablation)
    quest   16-token pages, element-wise key min/max bounds
    oracle  exact top-K of the true scores (the ceiling)
    window  the most recent tokens only (StreamingLLM-style)

Sliding-window layers, and prefill chunks (n > 1 queries), use exact
attention; retrieval is a decode-time selection, as in the paper.
Budget: a fraction of the current context (< 1) or a token count, per query
head; the set for a KV head is the union over its query heads.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from ..errors import SidecarError
from .base import register
from .dense import DenseKV
from .store import KVStore


class RetrievalKV(DenseKV):
    name = "retrieval"

    def __init__(self, layers, n_ctx, budget=0.03, sinks=8, window=64, spill_dir=None,
                 calib=None, wrope_b=2048):
        super().__init__(layers, n_ctx)
        if not (0 < budget < 1 or (budget >= 1 and float(budget).is_integer())):
            raise ValueError(f"budget must be a fraction in (0, 1) or a token count, got {budget}")
        self.budget, self.sinks, self.window = budget, int(sinks), int(window)
        self.spill_dir, self.calib, self.wrope_b = spill_dir, calib, int(wrope_b)
        self.full = [L.index for L in layers if L.window is None]      # retrieval layers
        self.slot = {layer: i for i, layer in enumerate(self.full)}
        self.stores: dict[int, KVStore] = {}
        self.last_selection: dict = {}     # (layer, seq) -> [positions per KV head]

    # -- sequence lifetime -------------------------------------------------
    def _init_sequence(self, seq):
        super()._init_sequence(seq)
        L = self.layers[0]
        self.stores[seq] = KVStore(len(self.full), L.n_kv_heads, L.head_dim, self.n_ctx,
                                   spill_dir=self.spill_dir)
        self._init_policy(seq)

    def _free_sequence(self, seq):
        super()._free_sequence(seq)
        store = self.stores.pop(seq, None)
        if store is not None:
            store.close()

    def _init_policy(self, seq):
        pass

    def truncate(self, seq, n):
        raise NotImplementedError(f"kv policy {self.name!r} cannot truncate")

    # -- the contract ---------------------------------------------------------
    def append(self, layer, seq, k, v, positions):
        if layer not in self.slot:
            return super().append(layer, seq, k, v, positions)
        positions = np.asarray(positions, dtype=np.int64)
        k_rot = self._rope(self.layers[layer], k, positions)
        self.stores[seq].append(self.slot[layer], k_rot, v)
        self._on_append(layer, seq, k, k_rot)

    def _on_append(self, layer, seq, k_pre, k_rot):
        pass

    def attend(self, layer, seq, q, positions):
        if layer not in self.slot:
            return super().attend(layer, seq, q, positions)
        L = self.layers[layer]
        positions = np.asarray(positions, dtype=np.int64)
        store, s = self.stores[seq], self.slot[layer]
        q_rot = self._rope(L, q, positions) * np.float32(L.scale)     # (n, H, d)
        T = int(store.n[s])
        if len(positions) > 1 or T <= self.sinks + self.window + self.k_budget(T):
            return self._exact(L, store, s, q_rot, positions)
        sel = [self._select(L, seq, s, g, q[0], q_rot[0], T) for g in range(L.n_kv_heads)]
        self.last_selection[(layer, seq)] = sel
        return self._sparse(L, store, s, q_rot, sel)

    # -- selection ----------------------------------------------------------------
    def k_budget(self, T: int) -> int:
        return int(self.budget) if self.budget >= 1 else max(1, math.ceil(self.budget * T))

    def _select(self, L, seq, s, g, q_pre, q_rot, T):
        """Positions attended by KV head g: sinks + recent window + union of per-head top-K."""
        lo, hi = min(self.sinks, T), max(self.sinks, T - self.window)
        cand = np.arange(lo, hi)
        heads = slice(g * L.group, (g + 1) * L.group)
        k = min(self.k_budget(T), len(cand))
        scores = self.scores(L, seq, s, g, q_pre[heads], q_rot[heads], cand)   # (group, n_cand)
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < len(cand) else None
        picked = cand if top is None else cand[np.unique(top)]
        return np.concatenate([np.arange(lo), picked, np.arange(hi, T)])

    def scores(self, L, seq, s, g, q_pre, q_rot, cand) -> np.ndarray:
        raise NotImplementedError

    # -- attention --------------------------------------------------------------
    def _exact(self, L, store, s, q_rot, positions):
        T = int(store.n[s])
        buf = SimpleNamespace(pos0=0, end=T, k=store.keys(s).transpose(1, 0, 2),
                              v=store.values(s).transpose(1, 0, 2))
        return self._attend_block(L, buf, q_rot, positions, L.n_kv_heads, L.group)

    def _sparse(self, L, store, s, q_rot, sel):
        out = np.empty_like(q_rot)                                       # (1, H, d)
        for g, idx in enumerate(sel):
            K, V = store.gather(s, idx)                                  # (m, G, d)
            heads = slice(g * L.group, (g + 1) * L.group)
            sc = q_rot[0, heads] @ K[:, g].T                             # (group, m)
            sc = np.exp(sc - sc.max(axis=1, keepdims=True))
            out[0, heads] = (sc @ V[:, g]) / sc.sum(axis=1, keepdims=True)
        return out


@register
class WindowKV(RetrievalKV):
    """Sinks + recent tokens: the budget extends the recent window."""
    name = "window"

    def scores(self, L, seq, s, g, q_pre, q_rot, cand):
        return np.broadcast_to(cand.astype(np.float32), (len(q_pre), len(cand)))


@register
class OracleKV(RetrievalKV):
    """Exact top-K of the true scores q.k: the ceiling any selector can reach."""
    name = "oracle"

    def scores(self, L, seq, s, g, q_pre, q_rot, cand):
        return q_rot @ self.stores[seq].keys(s)[cand, g].T


@register
class QuestKV(RetrievalKV):
    """Quest: per 16-token page, element-wise key min/max; page score bounds q.k.
    Page bounds are computed from the store here (exact, not incremental)."""
    name = "quest"
    page = 16

    def scores(self, L, seq, s, g, q_pre, q_rot, cand):
        keys = self.stores[seq].keys(s)[:, g]                             # (T, d)
        pages = cand // self.page
        first = pages[0]
        n_pages = pages[-1] - first + 1
        padded = np.full((n_pages * self.page, keys.shape[1]), np.nan, np.float32)
        padded[cand - first * self.page] = keys[cand]
        blocks = padded.reshape(n_pages, self.page, -1)
        kmin, kmax = np.nanmin(blocks, axis=1), np.nanmax(blocks, axis=1)  # (n_pages, d)
        bound = np.maximum(q_rot[:, None, :] * kmin[None], q_rot[:, None, :] * kmax[None]).sum(-1)
        return bound[:, pages - first]                                    # every token gets its page's bound


class _CodedKV(RetrievalKV):
    """Shared by a2ats and vq: a uint16 code per token and KV head, scored through a LUT."""
    book_kind = ""

    def __init__(self, layers, n_ctx, calib=None, **kw):
        if calib is None:
            raise SidecarError(f"kv policy {self.name!r} needs a calibration sidecar "
                               "(vq.Calibration); none was given")
        super().__init__(layers, n_ctx, calib=calib, **kw)
        books = getattr(calib, self.book_kind)
        missing = [(i, g) for i in self.full for g in range(layers[i].n_kv_heads) if (i, g) not in books]
        if missing:
            raise SidecarError(f"calibration has no {self.book_kind} codebook for (layer, kv head) "
                               f"{missing[0]}; it was made for another model")
        self.books = books
        self.codes: dict[int, np.ndarray] = {}

    def _init_policy(self, seq):
        L = self.layers[0]
        self.codes[seq] = np.zeros((len(self.full), self.n_ctx, L.n_kv_heads), np.uint16)

    def _free_sequence(self, seq):
        super()._free_sequence(seq)
        self.codes.pop(seq, None)

    def _on_append(self, layer, seq, k_pre, k_rot):
        s = self.slot[layer]
        n1 = int(self.stores[seq].n[s])
        keys = k_pre if self.book_kind == "a2ats" else k_rot
        for g in range(keys.shape[1]):
            self.codes[seq][s, n1 - len(keys):n1, g] = self.books[(layer, g)].assign(keys[:, g])

    def scores(self, L, seq, s, g, q_pre, q_rot, cand):
        C = self.books[(L.index, g)].centroids                             # (n_centroids, d)
        lut = self.query(L, q_pre, q_rot) @ C.T                           # (group, n_centroids)
        return lut[:, self.codes[seq][s, cand, g]]


@register
class A2ATSKV(_CodedKV):
    """A2ATS: LUT_h[c] = (R_b q_h) . C[c] with pre-RoPE codes (scale is irrelevant to top-K)."""
    name = "a2ats"
    book_kind = "a2ats"

    def query(self, L, q_pre, q_rot):
        return L.rope(q_pre[None], [self.wrope_b])[0]                     # (group, d) = R_b q


@register
class VQKV(_CodedKV):
    """Ablation: plain k-means on post-RoPE keys, scored with the post-RoPE query."""
    name = "vq"
    book_kind = "vq"

    def query(self, L, q_pre, q_rot):
        return q_rot
