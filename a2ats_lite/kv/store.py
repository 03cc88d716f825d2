"""Offloaded KV store: the full-precision post-RoPE K and V rows of ONE sequence,
for every full-attention layer, in one memory map. It plays the part of the
paper's CPU-side KV: rows are read only through the native, bounds-checked
gather (a2ats_lite.native.gather_rows), never through views handed out.

Layout (layer, k|v, kv head, token, d): the rows of one (layer, head) are one
contiguous (capacity, d) matrix, so a head's selection is gathered without
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


class KVStore:
    """K/V rows of one sequence: append per token, gather by index, close to free."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int,
                 spill_dir=None, dtype=np.float32):
        if min(n_layers, n_kv_heads, head_dim, capacity) <= 0:
            raise ValueError(f"KVStore needs positive sizes, got layers={n_layers} "
                             f"heads={n_kv_heads} d={head_dim} capacity={capacity}")
        self._mm = None
        self._fd = -1
        self.shape = (n_layers, 2, n_kv_heads, capacity, head_dim)
        self.dtype = np.dtype(dtype)
        self.row_bytes = head_dim * self.dtype.itemsize
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize
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
        # (layer, k|v, kv head, token, d)
        self.data = np.frombuffer(self._mm, dtype=self.dtype).reshape(self.shape)
        self.capacity = capacity
        self.n = np.zeros(n_layers, dtype=np.int64)         # tokens stored per layer
        self._reserved = np.zeros(n_layers, dtype=np.int64)  # spill: rows with disk blocks

    @property
    def n_layers(self) -> int:
        return self.shape[0]

    @property
    def n_kv_heads(self) -> int:
        return self.shape[2]

    def _live(self) -> np.ndarray:
        if self.data is None:
            raise ValueError("KV store is closed")
        return self.data

    def _reserve(self, layer: int, rows: int) -> None:
        """Spill file: allocate disk blocks for rows [reserved, rows) of every (k|v, head)."""
        if self._fd < 0 or rows <= self._reserved[layer]:
            return
        lo = int(self._reserved[layer])
        hi = min(self.capacity, max(rows, lo + _RESERVE_ROWS))
        _, _, G, cap, _ = self.shape
        try:
            for kv in range(2):
                for g in range(G):
                    base = (((layer * 2 + kv) * G + g) * cap + lo) * self.row_bytes
                    os.posix_fallocate(self._fd, base, (hi - lo) * self.row_bytes)
        except OSError as e:
            raise OSError(e.errno or errno.ENOSPC,
                          f"KV spill directory {self.spill_dir}: cannot reserve disk for "
                          f"{hi} tokens of layer {layer} ({os.strerror(e.errno or errno.ENOSPC)})"
                          ) from None
        self._reserved[layer] = hi

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: (m, n_kv_heads, head_dim) post-RoPE rows for the next m positions of `layer`."""
        data = self._live()
        n0, m = int(self.n[layer]), len(k)
        if k.shape != v.shape or k.shape[1:] != (self.shape[2], self.shape[4]):
            raise ValueError(f"KV store rows must be (m, {self.shape[2]}, {self.shape[4]}), "
                             f"got k {k.shape} v {v.shape}")
        if n0 + m > self.capacity:
            raise ContextOverflowError(f"KV store full: {n0 + m} tokens > capacity {self.capacity}")
        self._reserve(layer, n0 + m)
        data[layer, 0, :, n0:n0 + m] = k.transpose(1, 0, 2)
        data[layer, 1, :, n0:n0 + m] = v.transpose(1, 0, 2)
        self.n[layer] = n0 + m

    def truncate(self, layer: int, n: int) -> None:
        """Forget rows from n on (they are overwritten by later appends)."""
        self.n[layer] = max(0, min(int(self.n[layer]), int(n)))

    def gather(self, layer: int, head: int, idx) -> tuple[np.ndarray, np.ndarray]:
        """Rows idx of (layer, kv head): K (m, d), V (m, d), copied by the native gather,
        which refuses indices outside the rows stored so far (NativeError)."""
        data = self._live()
        n = int(self.n[layer])
        return (native.gather_rows(data[layer, 0, head, :n], idx),
                native.gather_rows(data[layer, 1, head, :n], idx))

    def gather_keys(self, layer: int, head: int, idx) -> np.ndarray:
        """Rows idx of (layer, kv head)'s keys only (m, d) (scoring needs no values)."""
        data = self._live()
        return native.gather_rows(data[layer, 0, head, :int(self.n[layer])], idx)

    def arrays(self, layer: int):
        """(K, V), each (n_kv_heads, capacity, d): the layer's rows in place, for a backend's
        fused gather (it reads only the selected rows, bounds-checked against capacity)."""
        data = self._live()
        return data[layer, 0], data[layer, 1]

    def rows(self, layer: int, head: int, lo: int = 0, hi: int | None = None):
        """K, V rows lo..hi-1 of (layer, kv head) (a gathered copy)."""
        hi = int(self.n[layer]) if hi is None else hi
        return self.gather(layer, head, np.arange(lo, hi))

    def keys(self, layer: int) -> np.ndarray:
        """Every stored key of a layer, (T, n_kv_heads, d): a gathered copy (evaluation, oracle)."""
        return np.stack([self.rows(layer, g)[0] for g in range(self.n_kv_heads)], axis=1)

    def values(self, layer: int) -> np.ndarray:
        return np.stack([self.rows(layer, g)[1] for g in range(self.n_kv_heads)], axis=1)

    @property
    def nbytes_used(self) -> int:
        """Bytes of rows written so far (what the store costs in RAM or on disk)."""
        return int(self.n.sum()) * 2 * self.n_kv_heads * self.row_bytes

    def close(self) -> None:
        """Free the map (and the spill file's blocks). Idempotent."""
        self.data = None
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
