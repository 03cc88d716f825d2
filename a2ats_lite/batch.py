"""One step's Batch: which sequences run, their rows, positions and logit rows.

The forward pass takes it explicitly (no global context): the rows of every
sequence are stacked, sequence i owning rows offsets[i]:offsets[i + 1], and
only the rows listed in logit_rows get logits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Batch:
    seq_ids: tuple            # (S,) KV sequence ids, distinct
    tokens: np.ndarray        # (N,) int64 token ids, the sequences' rows stacked
    positions: np.ndarray     # (N,) int64 position of each row in its sequence
    offsets: np.ndarray       # (S + 1,) int64 row offsets: sequence i owns offsets[i]:offsets[i+1]
    logit_rows: np.ndarray    # (m,) int64 rows whose logits the step returns, in this order

    @classmethod
    def make(cls, seq_ids, tokens, starts, logit_rows=None) -> "Batch":
        """tokens: one 1-D id array per sequence; starts: the position of each one's
        first row (the tokens its KV already holds); logit_rows: per sequence the
        indices (into its tokens) that need logits, or None for its last row."""
        toks = [np.asarray(t, dtype=np.int64).reshape(-1) for t in tokens]
        if len(toks) != len(seq_ids) or len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a batch needs one token array per sequence and distinct sequences")
        if any(t.size == 0 for t in toks):
            raise ValueError("every sequence of a batch needs at least one row")
        sizes = np.array([t.size for t in toks], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        positions = np.concatenate([np.arange(int(p), int(p) + n, dtype=np.int64)
                                    for p, n in zip(starts, sizes)])
        if logit_rows is None:
            rows = offsets[1:] - 1
        else:
            rows = np.concatenate([np.asarray(r, dtype=np.int64).reshape(-1) + offsets[i]
                                   for i, r in enumerate(logit_rows)] + [np.zeros(0, np.int64)])
        return cls(tuple(int(s) for s in seq_ids), np.concatenate(toks), positions, offsets,
                   rows.astype(np.int64))

    @property
    def n_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def decode_only(self) -> bool:
        """Every sequence runs one row (a decode step) and every row gets logits."""
        return self.n_rows == self.n_seqs and len(self.logit_rows) == self.n_rows

    @property
    def n_seqs(self) -> int:
        return len(self.seq_ids)

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def n_tokens(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def start(self, i: int) -> int:
        """Position of sequence i's first row (= the tokens its KV held before the step)."""
        return int(self.positions[self.offsets[i]])


def pad_selection(sels) -> tuple[np.ndarray, np.ndarray]:
    """[[positions per KV head] per sequence] -> (idx (S, G, Kmax) padded with -1, lens (S, G))."""
    S, G = len(sels), len(sels[0]) if sels else 0
    lens = np.array([[len(x) for x in row] for row in sels], dtype=np.int32).reshape(S, G)
    idx = np.full((S, G, max(1, int(lens.max(initial=1)))), -1, dtype=np.int64)
    for s, row in enumerate(sels):
        for kh, x in enumerate(row):
            idx[s, kh, :len(x)] = x
    return idx, lens
