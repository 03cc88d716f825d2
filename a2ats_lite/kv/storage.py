"""KV storage: where every sequence's keys and values live. No attention math.

Per sequence, per layer, one of (composed, not inherited):
  LayerBuffer  a growing K/V buffer in backend memory (amortized doubling, never n_ctx
               reserved up front); with a window (sliding-window layers) it drops keys no
               future query can see, so it stays bounded by about window + one chunk.
  KVStore      the offloaded host store (kv/store.py: memory-mapped, read through the
               native kernels) for the full-attention layers of a retrieval policy.
Keys are stored post-RoPE. Storage hands out views; the forward pass attends.

Cache types (llama.cpp's --cache-type-k/-v names, KVType): f32 and f16 buffers (G, capacity,
d); q8_0 and q4_0 buffers uint8 (G, capacity, row_bytes) of ggml's blocks (32 values per
block: f16 scale + 32 int8, or f16 scale + 16 bytes of nibbles), new rows quantized as they
are written, attention reading the blocks in place. The host store of a retrieval policy
holds the same types (K and V may differ), its readers decoding only the rows they select.
"""
from __future__ import annotations

import numpy as np

from .. import native
from ..backend.base import Backend
from ..errors import ContextOverflowError, NativeError
from .store import KVStore

KV_TYPES = ("f32", "f16", "q8_0", "q4_0")
_FLOATS = {"f32": np.float32, "f16": np.float16}


class KVType:
    """One cache type: the layout of a buffer of it and how new rows go in."""

    def __init__(self, name: str):
        if name not in KV_TYPES:
            raise ValueError(f"KV cache type must be one of {', '.join(KV_TYPES)}, got {name!r}")
        self.name = name
        self.blocks = name not in _FLOATS            # ggml blocks in uint8 rows
        self.dtype = np.dtype(np.uint8 if self.blocks else _FLOATS[name])

    def width(self, d: int) -> int:
        """The last dimension of a buffer for head dim d (values, or bytes of blocks)."""
        try:
            return native.kv_row_width(self.name, d)
        except NativeError as e:                     # d not whole blocks
            raise ValueError(str(e)) from None

    def row_bytes(self, d: int) -> int:
        return self.width(d) * self.dtype.itemsize

    def encode(self, rows):
        """rows (..., d) float32 as a buffer of this type stores them (float types: as they
        are, the buffer's assignment casts; blocks: quantized as ggml's reference does)."""
        return native.kv_quantize(rows, self.name) if self.blocks else rows

    def __repr__(self):
        return f"KVType({self.name!r})"


class LayerBuffer:
    """K/V rows of one (sequence, layer): positions pos0 .. pos0 + n - 1."""

    def __init__(self, backend: Backend, n_kv_heads: int, head_dim: int, n_ctx: int, window,
                 initial: int, type_k: KVType = KVType("f32"), type_v: KVType = KVType("f32")):
        self.B, self.window, self.n_ctx = backend, window, n_ctx
        self.type_k, self.type_v = type_k, type_v
        cap = min(initial, n_ctx)
        # (n_kv_heads, cap, width): per KV head the keys are one contiguous (T, width) matrix,
        # width = head_dim values, or the bytes of head_dim / 32 blocks
        self.k = self._alloc(type_k, n_kv_heads, cap, head_dim)
        self.v = self._alloc(type_v, n_kv_heads, cap, head_dim)
        self.G, self.d = n_kv_heads, head_dim
        self.n = 0
        self.pos0 = 0

    @property
    def end(self) -> int:
        return self.pos0 + self.n

    def write(self, k, v, first_pos: int) -> None:
        # k, v (m, n_kv_heads, d) post-RoPE for positions first_pos .. first_pos + m - 1
        m = k.shape[0]
        if not self.B.host and isinstance(k, np.ndarray):   # host rows (a replayed prefill)
            k, v = self.B.asarray(k), self.B.asarray(v)      # go to the device first
        if self.n + m > self.k.shape[1]:
            self._make_room(m, first_pos)
        self.k[:, self.n:self.n + m] = self.type_k.encode(k).transpose(1, 0, 2)
        self.v[:, self.n:self.n + m] = self.type_v.encode(v).transpose(1, 0, 2)
        self.n += m

    def _alloc(self, t: KVType, G: int, cap: int, d: int):
        return self.B.empty((G, cap, t.width(d)), t.dtype)

    def _make_room(self, m: int, first_pos: int) -> None:
        if self.window is not None:
            # keys before first_pos - window + 1 are invisible to every query from now on
            drop = min(self.n, max(0, first_pos - self.window + 1 - self.pos0))
            if drop:
                keep = self.n - drop
                self.k[:, :keep] = self.k[:, drop:self.n].copy()
                self.v[:, :keep] = self.v[:, drop:self.n].copy()
                self.n, self.pos0 = keep, self.pos0 + drop
        need = self.n + m
        cap = self.k.shape[1]
        if need > cap:
            self._resize(max(need, min(2 * cap, self.n_ctx)), 0)

    def _resize(self, cap: int, drop: int) -> None:
        keep = self.n - drop
        k = self._alloc(self.type_k, self.G, cap, self.d)
        v = self._alloc(self.type_v, self.G, cap, self.d)
        k[:, :keep], v[:, :keep] = self.k[:, drop:self.n], self.v[:, drop:self.n]
        self.k, self.v, self.n, self.pos0 = k, v, keep, self.pos0 + drop

    def compact(self) -> None:
        """Window layer: keep only the keys the next query can see, in a buffer sized for
        them (a long one-shot prefill otherwise keeps its whole capacity). Truncating
        to before the window is no longer possible afterwards."""
        if self.window is None or self.k.shape[1] <= 2 * self.window:
            return
        self._resize(2 * self.window, min(self.n, max(0, self.end - self.window + 1 - self.pos0)))

    def view(self):
        """(K (G, n, width), V (G, n, width), pos0): the cached rows (width: d values, or the
        bytes of a block type's row)."""
        return self.k[:, :self.n], self.v[:, :self.n], self.pos0

    def can_truncate(self, n: int) -> bool:
        # queries at position n onwards must still find keys back to n - window + 1
        lo = 0 if self.window is None else max(0, n - self.window + 1)
        return self.pos0 <= lo

    def truncate(self, n: int) -> None:
        self.n = max(0, min(self.n, n - self.pos0))

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)


class KVStorage:
    """Every sequence's K/V: LayerBuffers, plus one KVStore per sequence for the
    full-attention layers when offload is on (retrieval policies)."""

    def __init__(self, layers, n_ctx: int, backend: Backend, offload: bool = False, dtype="f32",
                 spill_dir=None, initial: int = 256, dtype_v=None):
        """dtype, dtype_v: the K and V cache types (KV_TYPES, llama.cpp's --cache-type-k/-v);
        dtype_v None = dtype. Buffers and the host store alike hold them."""
        if n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {n_ctx}")
        dtype_v = dtype if dtype_v is None else dtype_v
        self.type_k, self.type_v = KVType(dtype), KVType(dtype_v)
        for t in (self.type_k, self.type_v):
            if t.name not in backend.caps.kv_types:
                raise ValueError(f"KV cache type {t.name} is not supported by the {backend.name} "
                                 f"backend (it supports {', '.join(sorted(backend.caps.kv_types))})")
        self.offloaded = [L.index for L in layers if offload and L.window is None]
        self.dtype = self.type_k.dtype              # K's element type (uint8 for blocks)
        self.layers, self.n_ctx, self.B = layers, int(n_ctx), backend
        for L in layers:                            # block types: rows of whole blocks
            for t in (self.type_k, self.type_v):
                t.width(L.head_dim)
        self.spill_dir, self.initial = spill_dir, max(1, int(initial))
        # full-attention layers kept in the host store (self.offloaded), and their slot in it
        self.slot = {layer: i for i, layer in enumerate(self.offloaded)}
        self.bufs: dict[int, dict[int, LayerBuffer]] = {}
        self.stores: dict[int, KVStore] = {}

    def add(self, seq: int) -> None:
        self.bufs[seq] = {L.index: LayerBuffer(self.B, L.n_kv_heads, L.head_dim, self.n_ctx,
                                               L.window, self.initial, self.type_k, self.type_v)
                          for L in self.layers if L.index not in self.slot}
        if self.offloaded:
            L = self.layers[self.offloaded[0]]
            self.stores[seq] = KVStore(len(self.offloaded), L.n_kv_heads, L.head_dim, self.n_ctx,
                                       spill_dir=self.spill_dir, dtype=self.type_k.name,
                                       dtype_v=self.type_v.name)

    def remove(self, seq: int) -> None:
        self.bufs.pop(seq, None)
        store = self.stores.pop(seq, None)
        if store is not None:
            store.close()

    def _bufs(self, seq) -> dict:
        try:
            return self.bufs[seq]
        except KeyError:
            raise ValueError(f"unknown sequence {seq}") from None

    def store(self, seq) -> KVStore:
        try:
            return self.stores[seq]
        except KeyError:
            raise ValueError(f"unknown sequence {seq}") from None

    def layer_end(self, layer: int, seq: int) -> int:
        if layer in self.slot:
            return int(self.store(seq).n[self.slot[layer]])
        return self._bufs(seq)[layer].end

    def write(self, layer: int, seq: int, first_pos: int, k, v) -> None:
        """k, v (m, G, d) post-RoPE keys and values of positions first_pos.. (the next ones)."""
        self._check_next(layer, seq, first_pos, k.shape[0])
        if layer in self.slot:      # host memory: device rows come down first
            self.store(seq).append(self.slot[layer], self.B.to_host(k), self.B.to_host(v))
        else:
            self._bufs(seq)[layer].write(k, v, first_pos)

    def _check_next(self, layer: int, seq: int, first_pos: int, m: int) -> None:
        """m rows from first_pos must be the next ones of seq in layer, within the context."""
        end = self.layer_end(layer, seq)
        if first_pos != end:
            raise ValueError(f"kv storage: layer {layer} seq {seq} expects positions "
                             f"{end}.., got {first_pos}..")
        if end + m > self.n_ctx:
            raise ContextOverflowError(f"sequence {seq} would hold {end + m} tokens; "
                                       f"the context size is {self.n_ctx}")

    def reserve(self, seq: int, first_pos: int, m: int) -> None:
        """Make room in seq's buffers for m rows from first_pos (a decode step that must not
        reallocate while it runs: done before a CUDA graph replays)."""
        for b in self._bufs(seq).values():
            if b.n + m > b.k.shape[1]:
                b._make_room(m, first_pos)

    def write_decode(self, layer: int, seqs, positions, k, v) -> None:
        """One new row per sequence (k, v (S, G, d), positions (S,)) of a layer kept in
        backend buffers (not the host store): a decode step's rows, every sequence's buffer
        written by one backend call."""
        bufs = []
        for seq, p in zip(seqs, positions):
            p = int(p)
            self._check_next(layer, seq, p, 1)
            b = self._bufs(seq)[layer]
            if b.n + 1 > b.k.shape[1]:
                b._make_room(1, p)
            bufs.append(b)
        rows = [b.n for b in bufs]
        self.B.append_rows([b.k for b in bufs], rows, self.type_k.encode(k))   # (S, G, width)
        self.B.append_rows([b.v for b in bufs], rows, self.type_v.encode(v))
        for b in bufs:
            b.n += 1

    def view(self, layer: int, seq: int, hi: int | None = None):
        """(K (G, T, width), V (G, T, width), pos0): what the layer holds for seq (store rows
        [0, hi) are gathered as stored: prefill attention over an offloaded layer; width: d
        values, or the bytes of a block type's row)."""
        if layer in self.slot:
            return (*self.store(seq).stored(self.slot[layer], hi), 0)
        return self._bufs(seq)[layer].view()

    def buffer(self, layer: int, seq: int):
        """(K (G, cap, width), V (G, cap, width), pos0, n): a LayerBuffer whole, for a fused
        decode kernel that reads rows [0, n) (positions pos0..) in place."""
        b = self._bufs(seq)[layer]
        return b.k, b.v, b.pos0, b.n

    def can_truncate(self, seq: int, n: int) -> bool:
        return all(b.can_truncate(n) for b in self._bufs(seq).values())

    def truncate(self, seq: int, n: int) -> None:
        for b in self._bufs(seq).values():
            b.truncate(n)
        store = self.stores.get(seq)
        if store is not None:
            for s in range(len(self.offloaded)):
                store.truncate(s, n)

    def compact(self, seq: int) -> None:
        for b in self._bufs(seq).values():
            b.compact()

    def nbytes(self, seq: int | None = None, store: bool = True) -> int:
        """Bytes held: LayerBuffers at their capacity, store rows written (store=False: the
        backend's memory only)."""
        seqs = [seq] if seq is not None else list(self.bufs)
        total = sum(b.nbytes for s in seqs for b in self.bufs.get(s, {}).values())
        if not store:
            return total
        return total + sum(self.stores[s].nbytes_used for s in seqs if s in self.stores)

    def estimate_bytes(self, n_tokens: int, store: bool = True) -> int:
        """Bytes one sequence of n_tokens will hold (admission control): full layers grow
        with it, window layers stay within about two windows. store=False leaves out the
        host store's rows (a GPU engine admits by the device memory it needs)."""
        total = 0
        for L in self.layers:
            if L.index in self.slot:
                if store:
                    total += n_tokens * L.n_kv_heads * (self.type_k.row_bytes(L.head_dim)
                                                        + self.type_v.row_bytes(L.head_dim))
                continue
            rows = n_tokens if L.window is None else min(n_tokens, 2 * L.window + 512)
            total += rows * L.n_kv_heads * (self.type_k.row_bytes(L.head_dim)
                                             + self.type_v.row_bytes(L.head_dim))
        return int(total)
