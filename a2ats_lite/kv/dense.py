"""Dense KV cache: every token's post-RoPE key and value, exact attention.

Per (sequence, layer) one growing buffer (amortized doubling, never n_ctx
reserved up front). Sliding-window layers drop keys no future query can see,
so their memory stays bounded by about window + one prefill chunk whatever
the context length. Attention is computed per block of queries against the
keys that block can see (causal + window masks), softmax in float32.
"""
from __future__ import annotations

import numpy as np

from ..errors import ContextOverflowError
from .base import AttnLayer, KVCache, register

# Largest scores block (query rows x keys, float32) materialized at once: 64 MiB.
_MAX_SCORES = 1 << 24


class _LayerBuf:
    """K/V rows of one (sequence, layer): positions pos0 .. pos0 + n - 1."""

    def __init__(self, layer: AttnLayer, n_ctx: int, initial: int):
        self.window = layer.window
        self.n_ctx = n_ctx
        cap = min(initial, n_ctx)
        g, d = layer.n_kv_heads, layer.head_dim
        # (n_kv_heads, cap, head_dim): per KV head the keys are one contiguous (T, d) matrix
        self.k = np.empty((g, cap, d), dtype=np.float32)
        self.v = np.empty((g, cap, d), dtype=np.float32)
        self.n = 0
        self.pos0 = 0

    @property
    def end(self) -> int:
        return self.pos0 + self.n

    def append(self, k: np.ndarray, v: np.ndarray, first_pos: int) -> None:
        # k, v (m, n_kv_heads, d) post-RoPE for positions first_pos .. first_pos + m - 1
        m = k.shape[0]
        if self.n + m > self.k.shape[1]:
            self._make_room(m, first_pos)
        self.k[:, self.n:self.n + m] = k.transpose(1, 0, 2)
        self.v[:, self.n:self.n + m] = v.transpose(1, 0, 2)
        self.n += m

    def _make_room(self, m: int, first_pos: int) -> None:
        if self.window is not None:
            # keys before first_pos - window + 1 are invisible to every query from now on
            drop = min(self.n, max(0, first_pos - self.window + 1 - self.pos0))
            if drop:
                keep = self.n - drop
                self.k[:, :keep] = self.k[:, drop:self.n]   # numpy handles the overlap
                self.v[:, :keep] = self.v[:, drop:self.n]
                self.n, self.pos0 = keep, self.pos0 + drop
        need = self.n + m
        cap = self.k.shape[1]
        if need > cap:
            new_cap = max(need, min(2 * cap, self.n_ctx))
            g, _, d = self.k.shape
            k = np.empty((g, new_cap, d), dtype=np.float32)
            v = np.empty((g, new_cap, d), dtype=np.float32)
            k[:, :self.n] = self.k[:, :self.n]
            v[:, :self.n] = self.v[:, :self.n]
            self.k, self.v = k, v

    def compact(self) -> None:
        """Window layer: keep only the keys the next query can see, in a buffer sized for
        them (a long one-shot prefill otherwise keeps its whole capacity). Truncating
        to before the window is no longer possible afterwards."""
        if self.window is None or self.k.shape[1] <= 2 * self.window:
            return
        drop = min(self.n, max(0, self.end - self.window + 1 - self.pos0))
        g, _, d = self.k.shape
        k = np.empty((g, 2 * self.window, d), dtype=np.float32)
        v = np.empty((g, 2 * self.window, d), dtype=np.float32)
        keep = self.n - drop
        k[:, :keep], v[:, :keep] = self.k[:, drop:self.n], self.v[:, drop:self.n]
        self.k, self.v, self.n, self.pos0 = k, v, keep, self.pos0 + drop

    def can_truncate(self, n: int) -> bool:
        # queries at position n onwards must still find keys back to n - window + 1
        lo = 0 if self.window is None else max(0, n - self.window + 1)
        return self.pos0 <= lo

    def truncate(self, n: int) -> None:
        self.n = max(0, min(self.n, n - self.pos0))

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@register
class DenseKV(KVCache):
    """Exact attention over every cached token (sliding-window layers: the window)."""

    name = "dense"

    def __init__(self, layers: list[AttnLayer], n_ctx: int, initial: int = 256):
        super().__init__(layers, n_ctx)
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        self.initial = max(1, int(initial))
        self._bufs: dict[int, list[_LayerBuf]] = {}
        self._cos_sin: dict = {}   # (rope, positions bytes) -> (cos, sin); layers share ropes

    def _init_sequence(self, seq: int) -> None:
        self._bufs[seq] = [_LayerBuf(layer, self.n_ctx, self.initial) for layer in self.layers]

    def _free_sequence(self, seq: int) -> None:
        self._bufs.pop(seq, None)

    def _rope(self, layer: AttnLayer, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        key = (layer.rope, positions.tobytes())
        cs = self._cos_sin.get(key)
        if cs is None:
            if len(self._cos_sin) >= 16:
                self._cos_sin.clear()
            cs = self._cos_sin[key] = layer.rope.cos_sin(positions)
        return layer.rope.apply(x, *cs)

    def _buf(self, layer: int, seq: int) -> _LayerBuf:
        try:
            return self._bufs[seq][layer]
        except KeyError:
            raise ValueError(f"unknown sequence {seq}") from None

    def append(self, layer: int, seq: int, k: np.ndarray, v: np.ndarray,
               positions: np.ndarray) -> None:
        buf = self._buf(layer, seq)
        positions = np.asarray(positions, dtype=np.int64)
        m = len(positions)
        if m == 0:
            return
        if positions[0] != buf.end or (m > 1 and np.any(np.diff(positions) != 1)):
            raise ValueError(f"dense kv: layer {layer} seq {seq} expects positions "
                             f"{buf.end}.., got {positions[0]}..{positions[-1]}")
        if buf.end + m > self.n_ctx:
            raise ContextOverflowError(f"sequence {seq} would hold {buf.end + m} tokens; "
                                       f"the context size is {self.n_ctx}")
        buf.append(self._rope(self.layers[layer], k, positions), v, int(positions[0]))

    def attend(self, layer: int, seq: int, q: np.ndarray, positions: np.ndarray) -> np.ndarray:
        L = self.layers[layer]
        buf = self._buf(layer, seq)
        positions = np.asarray(positions, dtype=np.int64)
        n, H, d = q.shape
        G, g = L.n_kv_heads, L.group
        q = self._rope(L, q, positions)              # (n, H, d) new array
        q *= np.float32(L.scale)
        out = np.empty((n, H, d), dtype=np.float32)
        T_max = max(1, buf.n)
        block = max(1, min(n, _MAX_SCORES // (T_max * H)))
        if L.window is not None:
            # short query blocks see window + block keys instead of window + n: less masked work
            block = min(block, max(16, L.window // 4))
        for s in range(0, n, block):
            e = min(n, s + block)
            out[s:e] = self._attend_block(L, buf, q[s:e], positions[s:e], G, g)
        return out

    @staticmethod
    def _attend_block(L: AttnLayer, buf: _LayerBuf, q: np.ndarray, qpos: np.ndarray,
                      G: int, g: int) -> np.ndarray:
        n, H, d = q.shape
        # the keys this block can see: [first query - window + 1, last query], within the buffer
        lo = buf.pos0 if L.window is None else max(buf.pos0, int(qpos[0]) - L.window + 1)
        hi = int(qpos[-1]) + 1
        if hi > buf.end or lo >= hi:
            raise ValueError(f"dense kv: layer {L.index} has no keys for positions "
                             f"{qpos[0]}..{qpos[-1]} (cached {buf.pos0}..{buf.end - 1})")
        K = buf.k[:, lo - buf.pos0:hi - buf.pos0]    # (G, T, d)
        V = buf.v[:, lo - buf.pos0:hi - buf.pos0]    # (G, T, d)
        # rows ordered (query, head-in-group) so one KV head serves its g query heads
        qq = q.reshape(n, G, g, d).transpose(1, 0, 2, 3).reshape(G, n * g, d)
        scores = np.matmul(qq, K.transpose(0, 2, 1))  # (G, n*g, T)
        if n > 1 or (L.window is not None and hi - lo > L.window):
            kpos = np.arange(lo, hi)
            rel = qpos[:, None] - kpos[None, :]        # (n, T) query pos - key pos
            hidden = rel < 0
            if L.window is not None:
                hidden |= rel >= L.window
            if hidden.any():
                hidden = np.repeat(hidden, g, axis=0)   # (n*g, T)
                np.copyto(scores, np.float32(-np.inf), where=hidden[None])
        scores -= scores.max(axis=-1, keepdims=True)
        np.exp(scores, out=scores)
        denom = scores.sum(axis=-1, keepdims=True)     # (G, n*g, 1)
        o = np.matmul(scores, V)                       # (G, n*g, d)
        o /= denom
        return o.reshape(G, n, g, d).transpose(1, 0, 2, 3).reshape(n, H, d)

    def can_truncate(self, seq: int, n: int) -> bool:
        """Whether truncate(seq, n) is possible (sliding-window layers may have dropped
        keys that positions >= n would need)."""
        if seq not in self._bufs or not 0 <= n <= self.lengths[seq]:
            return False
        return all(b.can_truncate(n) for b in self._bufs[seq])

    def truncate(self, seq: int, n: int) -> None:
        bufs = self._buf_list(seq)
        if not 0 <= n <= self.lengths[seq]:
            raise ValueError(f"cannot truncate sequence {seq} of length {self.lengths[seq]} to {n}")
        if not self.can_truncate(seq, n):
            raise ValueError(f"dense kv: sequence {seq} can no longer be truncated to {n}: its "
                             f"sliding-window layers dropped the keys before that window")
        for b in bufs:
            b.truncate(n)
        self.lengths[seq] = n

    def compact(self, seq: int) -> None:
        """Shrink the sliding-window layers' buffers of seq to their window (after a long
        one-shot prefill, e.g. a replayed prefix)."""
        for b in self._buf_list(seq):
            b.compact()

    def _buf_list(self, seq: int):
        if seq not in self._bufs:
            raise ValueError(f"unknown sequence {seq}")
        return self._bufs[seq]

    def nbytes(self, seq: int | None = None) -> int:
        """Bytes held by the K/V buffers (one sequence or all)."""
        seqs = [seq] if seq is not None else list(self._bufs)
        return sum(b.nbytes for s in seqs for b in self._bufs[s])
