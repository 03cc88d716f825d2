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

Here: the base (Policy, Retrieval) and the policies scored from the keys themselves
(window, oracle, wrope, quest); the coded ones (a2ats, vq) are in coded.py, every one by
name in registry.py.
"""
from __future__ import annotations

import math

import numpy as np

from ..backend.base import Backend
from ..batch import pad_selection


def check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, float, np.number)) or \
            not math.isfinite(budget) or not (0 < budget < 1 or (budget >= 1 and float(budget).is_integer())):
        raise ValueError(f"budget must be a fraction in (0, 1) or a whole token count >= 1, "
                         f"got {budget!r}")


class Policy:
    """dense: selects nothing, every position is attended."""
    name = "dense"
    retrieves = False
    needs_calibration = False   # coded policies need a calibration sidecar (vq.Calibration)

    def bind(self, layers, n_ctx: int, backend: Backend, storage) -> None:
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
