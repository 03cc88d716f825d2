"""Offloaded KV store: the post-RoPE K and V rows of ONE sequence, for every
full-attention layer, in one memory map. It plays the part of the paper's CPU-side
KV: rows are read only through the native, bounds-checked kernels (gather_rows /
kv_gather, and sparse attention, the exact re-rank and scores on arrays()), never
through views handed out for Python to index.

Row types (llama.cpp's --cache-type-k/-v; K and V may differ): f32 or f16 rows of d
values, or q8_0 / q4_0 rows of d / 32 ggml blocks (34 / 18 bytes each, uint8),
quantized as they are appended (native.kv_quantize, ggml's reference rounding).
Block rows are never decoded as a whole: a read decodes only the rows it selects.

Layout, per layer: K (kv head, token, width), then V (kv head, token, width), each
section starting on a 64-byte boundary: the rows of one (layer, head) are one
contiguous (capacity, width) matrix, so a head's selection is gathered without
touching the other heads' rows.

Memory. The map covers `capacity` tokens (n_ctx) up front, but only address
space: the kernel backs a page when it is first written, so an idle 128K
context costs nothing. Anonymous maps use MAP_NORESERVE (Linux), otherwise the
kernel's overcommit heuristic refuses a single map larger than RAM (a
Llama-8B-shaped 128K store is 32 GiB). Touched pages are real memory; when
that may exceed RAM, pass spill_dir.

Spill files (spill_dir=...). A temp file is created in spill_dir, mapped, and
unlinked immediately, before any row is written: the open mapping keeps the
data reachable and the directory entry is already gone, so nothing can be left
behind, not after close(), an exception, garbage collection, or even SIGKILL
(the kernel frees the blocks when the last mapping goes). Disk blocks are
reserved with posix_fallocate in chunks just ahead of the rows being written,
so a full disk is an OSError at append time, never a SIGBUS on a page write.
"""
from __future__ import annotations

import errno
import mmap
import os
import sys
import tempfile

import numpy as np

from .. import native
from ..errors import ContextOverflowError

_MAP_NORESERVE = 0x4000 if sys.platform.startswith("linux") else 0
_RESERVE_ROWS = 1024      # spill files: disk blocks reserved this many rows ahead
_ALIGN = 64               # K and V sections start on cache lines (float rows stay aligned)
_FLOAT_NAMES = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}


def row_type(t) -> str:
    """A row type as its cache type name: 'f32', 'f16', 'q8_0', 'q4_0', or a numpy float type."""
    if isinstance(t, str):
        if t not in native.KV_TYPES:
            raise ValueError(f"KV store row type must be one of {', '.join(native.KV_TYPES)}, "
                             f"got {t!r}")
        return t
    try:
        return _FLOAT_NAMES[np.dtype(t)]
    except (TypeError, KeyError):
        raise ValueError(f"KV store rows are float32, float16, q8_0 or q4_0, got {t!r}") from None


def _section(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


class KVStore:
    """K/V rows of one sequence: append per token, gather by index, close to free."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int,
                 spill_dir=None, dtype=np.float32, dtype_v=None):
        """dtype, dtype_v: the K and V row types (row_type: a numpy float type or 'f32',
        'f16', 'q8_0', 'q4_0'); dtype_v None = dtype."""
        if min(n_layers, n_kv_heads, head_dim, capacity) <= 0:
            raise ValueError(f"KVStore needs positive sizes, got layers={n_layers} "
                             f"heads={n_kv_heads} d={head_dim} capacity={capacity}")
        self._mm = None
        self._fd = -1
        self._kv = None
        self.shape = (n_layers, 2, n_kv_heads, capacity, head_dim)
        self.types = (row_type(dtype), row_type(dtype if dtype_v is None else dtype_v))
        try:     # per K|V: the last dimension (values, or bytes of blocks) and its numpy type
            self.widths = tuple(native.kv_row_width(t, head_dim) for t in self.types)
        except native.NativeError as e:
            raise ValueError(str(e)) from None
        self.dtypes = tuple(np.dtype(np.uint8) if t in native.KV_BLOCKS else
                            np.dtype(np.float32 if t == "f32" else np.float16) for t in self.types)
        self.dtype = self.dtypes[0]
        self.row_bytes = tuple(w * dt.itemsize for w, dt in zip(self.widths, self.dtypes))
        # per layer: K section (G, cap, width_k), then V section, each 64-byte aligned
        self._sections = tuple(_section(n_kv_heads * capacity * rb) for rb in self.row_bytes)
        self._layer_bytes = sum(self._sections)
        nbytes = n_layers * self._layer_bytes
        self.spill_dir = spill_dir
        if spill_dir is None:
            try:
                self._mm = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | _MAP_NORESERVE)
            except OSError as e:
                raise OSError(e.errno, f"cannot map {nbytes / 2**30:.1f} GiB for a KV store of "
                              f"{capacity} tokens ({e.strerror}); use a smaller context or a "
                              f"spill directory") from None
        else:
            fd, path = tempfile.mkstemp(prefix="a2ats-kv-", suffix=".spill", dir=spill_dir)
            os.unlink(path)                 # gone from the directory before any data exists
            try:
                os.ftruncate(fd, nbytes)    # sparse: blocks are reserved as rows arrive
                self._mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd                   # kept for posix_fallocate; closed in close()
        # (layer, bytes of its K and V sections): the whole map
        self.data = np.frombuffer(self._mm, dtype=np.uint8).reshape(n_layers, self._layer_bytes)
        # per layer (K (G, cap, width_k), V (G, cap, width_v)): views of its sections
        G, sk = n_kv_heads, self._sections[0]
        self._kv = [tuple(self.data[layer, off:off + G * capacity * rb].view(dt)
                          .reshape(G, capacity, w)
                          for off, rb, dt, w in zip((0, sk), self.row_bytes, self.dtypes, self.widths))
                    for layer in range(n_layers)]
        self.capacity = capacity
        self.n = np.zeros(n_layers, dtype=np.int64)         # tokens stored per layer
        self._reserved = np.zeros(n_layers, dtype=np.int64)  # spill: rows with disk blocks

    @property
    def n_layers(self) -> int:
        return self.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.shape[2]

    @property
    def head_dim(self) -> int:
        return self.shape[4]

    def _live(self, layer: int):
        """(K, V) (G, capacity, width) of a layer."""
        if self._kv is None:
            raise ValueError("KV store is closed")
        return self._kv[layer]

    def _reserve(self, layer: int, rows: int) -> None:
        """Spill file: allocate disk blocks for rows [reserved, rows) of every (k|v, head)."""
        if self._fd < 0 or rows <= self._reserved[layer]:
            return
        lo = int(self._reserved[layer])
        hi = min(self.capacity, max(rows, lo + _RESERVE_ROWS))
        _, _, G, cap, _ = self.shape
        try:
            for kv, rb in enumerate(self.row_bytes):
                section = layer * self._layer_bytes + kv * self._sections[0]
                for g in range(G):
                    os.posix_fallocate(self._fd, section + (g * cap + lo) * rb, (hi - lo) * rb)
        except OSError as e:
            raise OSError(e.errno or errno.ENOSPC,
                          f"KV spill directory {self.spill_dir}: cannot reserve disk for "
                          f"{hi} tokens of layer {layer} ({os.strerror(e.errno or errno.ENOSPC)})"
                          ) from None
        self._reserved[layer] = hi

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: (m, n_kv_heads, head_dim) post-RoPE rows for the next m positions of `layer`
        (float; block types quantize them here)."""
        K, V = self._live(layer)
        n0, m = int(self.n[layer]), len(k)
        if k.shape != v.shape or k.shape[1:] != (self.shape[2], self.shape[4]):
            raise ValueError(f"KV store rows must be (m, {self.shape[2]}, {self.shape[4]}), "
                             f"got k {k.shape} v {v.shape}")
        if n0 + m > self.capacity:
            raise ContextOverflowError(f"KV store full: {n0 + m} tokens > capacity {self.capacity}")
        self._reserve(layer, n0 + m)
        for dst, rows, t in ((K, k, self.types[0]), (V, v, self.types[1])):
            if t in native.KV_BLOCKS:
                rows = native.kv_quantize(rows, t)                   # (m, G, width) uint8
            dst[:, n0:n0 + m] = rows.transpose(1, 0, 2)
        self.n[layer] = n0 + m

    def truncate(self, layer: int, n: int) -> None:
        """Forget rows from n on (they are overwritten by later appends)."""
        self.n[layer] = max(0, min(int(self.n[layer]), int(n)))

    def _read(self, rows: np.ndarray, idx, t: str) -> np.ndarray:
        """Rows idx of one (n, width) matrix as floats (m, d): float rows as stored, block rows
        decoded (only those); an index outside [0, n) raises NativeError."""
        if t in native.KV_BLOCKS:
            return native.kv_gather(rows, idx, self.head_dim)
        return native.gather_rows(rows, idx)

    def gather(self, layer: int, head: int, idx) -> tuple[np.ndarray, np.ndarray]:
        """Rows idx of (layer, kv head): K (m, d), V (m, d), copied by the native gather,
        which refuses indices outside the rows stored so far (NativeError). Float rows come
        in the store's float type, block rows decoded to float32."""
        K, V = self._live(layer)
        n = int(self.n[layer])
        return self._read(K[head, :n], idx, self.types[0]), self._read(V[head, :n], idx, self.types[1])

    def gather_keys(self, layer: int, head: int, idx) -> np.ndarray:
        """Rows idx of (layer, kv head)'s keys only (m, d) (scoring needs no values)."""
        K, _ = self._live(layer)
        return self._read(K[head, :int(self.n[layer])], idx, self.types[0])

    def arrays(self, layer: int):
        """(K (n_kv_heads, capacity, width_k), V (.., width_v)): the layer's rows in place, as
        stored (float rows, or uint8 blocks), for a backend's fused kernels (they read only
        the selected rows, bounds-checked against capacity)."""
        return self._live(layer)

    def stored(self, layer: int, hi: int | None = None):
        """(K (G, hi, width_k), V (G, hi, width_v)): rows [0, hi) of every kv head as stored
        (a gathered copy, blocks kept: prefill attention reads them as they are)."""
        n = int(self.n[layer])
        hi = n if hi is None else int(hi)
        if not 0 <= hi <= n:
            raise ValueError(f"KV store layer {layer} holds {n} rows, asked for {hi}")
        G, cap = self.n_kv_heads, self.capacity
        pick = (np.arange(G)[:, None] * cap + np.arange(hi)).reshape(-1)   # (G * hi,) rows
        return tuple(native.gather_rows(a.reshape(G * cap, a.shape[2]), pick).reshape(G, hi, a.shape[2])
                     for a in self._live(layer))

    def rows(self, layer: int, head: int, lo: int = 0, hi: int | None = None):
        """K, V rows lo..hi-1 of (layer, kv head) (a gathered copy, as gather's)."""
        hi = int(self.n[layer]) if hi is None else hi
        return self.gather(layer, head, np.arange(lo, hi))

    def keys(self, layer: int) -> np.ndarray:
        """Every stored key of a layer, (T, n_kv_heads, d): a gathered copy (evaluation, oracle;
        block rows decoded)."""
        return np.stack([self.rows(layer, g)[0] for g in range(self.n_kv_heads)], axis=1)

    def values(self, layer: int) -> np.ndarray:
        return np.stack([self.rows(layer, g)[1] for g in range(self.n_kv_heads)], axis=1)

    @property
    def nbytes_used(self) -> int:
        """Bytes of rows written so far (what the store costs in RAM or on disk)."""
        return int(self.n.sum()) * self.n_kv_heads * sum(self.row_bytes)

    def close(self) -> None:
        """Free the map (and the spill file's blocks). Idempotent."""
        self.data = self._kv = None
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass    # a view made elsewhere is still alive: the map goes with it
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_mm", None) is not None or getattr(self, "_fd", -1) >= 0:
            self.close()
