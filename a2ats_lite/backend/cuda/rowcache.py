"""RowCache: GPU copies of the rows one (sequence, layer) of a retrieval policy selected at
earlier steps. The CUDA backend owns them (sparse.py): one per (sequence, layer), made on a
sequence's first retrieval step, released with the sequence.

Consecutive decode steps select mostly the same tokens, so a step fetches from the host
store only the rows its selection adds; the others are still on the GPU. The cache holds
rows and the token <-> slot maps, no math: the backend plans a step with the native
library (native.rowcache_plan: hits keep their slots, misses take slots the step does not
use, first in first out), gathers and copies up the misses, writes them into their slots
and attends through the slot lists (sparse.py; kernels kv_write.cu put_rows and
attention_gtd.cu attn_gtd_decode_idx).

Per KV head: k, v (G, n_slots, d) in the store's dtype, in backend memory;
token_at (G, n_slots) int32 the token in each slot (-1: empty); slot_of (G, n_map) int32
the slot of each token (-1: not held); hand (G,) int32 each head's eviction clock.
"""
from __future__ import annotations

import math

import numpy as np


def cache_slots(selected: int, factor: float) -> int:
    """Slots for selections of up to `selected` rows: factor x selected (factor >= 1; the
    rows beyond one selection keep tokens a later step may select again)."""
    return max(1, math.ceil(factor * selected))


class RowCache:
    def __init__(self, backend, n_kv_heads: int, head_dim: int, dtype):
        self.B, self.G, self.d, self.dtype = backend, int(n_kv_heads), int(head_dim), np.dtype(dtype)
        self.k = self.v = None
        self.token_at = np.full((self.G, 0), -1, np.int32)
        self.slot_of = np.full((self.G, 0), -1, np.int32)
        self.hand = np.zeros(self.G, np.int32)

    @property
    def n_slots(self) -> int:
        return self.token_at.shape[1]

    def nbytes(self) -> int:
        return 0 if self.k is None else int(self.k.nbytes) + int(self.v.nbytes)

    @staticmethod
    def estimate_bytes(n_kv_heads: int, head_dim: int, n_slots: int, itemsize: int) -> int:
        return 2 * n_kv_heads * n_slots * head_dim * itemsize

    def reserve(self, selected: int, factor: float, n_tokens: int) -> None:
        """Room for selections of `selected` rows among tokens < n_tokens, cache_slots of them
        (grows, keeps what is held: the rows are copied on the device, the maps extended)."""
        n_slots = cache_slots(selected, factor)
        if n_tokens > self.slot_of.shape[1]:
            grown = np.full((self.G, max(n_tokens, 2 * self.slot_of.shape[1])), -1, np.int32)
            grown[:, :self.slot_of.shape[1]] = self.slot_of
            self.slot_of = grown
        if n_slots <= self.n_slots:
            return
        n_slots = max(n_slots, self.n_slots + self.n_slots // 4)
        k = self.B.empty((self.G, n_slots, self.d), self.dtype)
        v = self.B.empty((self.G, n_slots, self.d), self.dtype)
        old = self.n_slots
        if old:
            k[:, :old], v[:, :old] = self.k, self.v
        tok = np.full((self.G, n_slots), -1, np.int32)
        tok[:, :old] = self.token_at
        self.k, self.v, self.token_at = k, v, tok

    def truncate(self, n: int) -> None:
        """Forget every token from position n on (their positions will hold other rows)."""
        gone = self.token_at >= n                                # (G, n_slots)
        if gone.any():
            self.slot_of[:, n:] = -1
            self.token_at[gone] = -1

    def maps(self):
        """(slot_of, token_at, hand): what native.rowcache_plan reads and updates."""
        return self.slot_of, self.token_at, self.hand
