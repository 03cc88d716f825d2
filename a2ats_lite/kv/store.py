"""Offloaded KV store: full-precision K and V rows of one sequence, in
memory-mapped arrays read only through the native gather.

Anonymous memory by default. With spill_dir, a file in that directory is
created, mapped and unlinked at once: the mapping keeps the data reachable,
and nothing can be left behind, not even after a crash or SIGKILL. The
mapping reserves address space for `capacity` rows, but the kernel backs
only the pages that are touched, so a long n_ctx costs nothing up front.
"""
from __future__ import annotations

import mmap
import os
import tempfile

import numpy as np

from .. import native
from ..errors import ContextOverflowError


class KVStore:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int,
                 spill_dir=None, dtype=np.float32):
        self.shape = (n_layers, 2, capacity, n_kv_heads, head_dim)
        nbytes = int(np.prod(self.shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if spill_dir is None:
            self._mm = mmap.mmap(-1, nbytes)
        else:
            fd, path = tempfile.mkstemp(prefix="a2ats-kv-", suffix=".spill", dir=spill_dir)
            try:
                os.unlink(path)             # unlinked before use: never left behind
                os.ftruncate(fd, nbytes)
                self._mm = mmap.mmap(fd, nbytes)
            finally:
                os.close(fd)
        # (layer, k|v, token, kv head, d): rows of one layer are contiguous for the gather
        self.data = np.frombuffer(self._mm, dtype=dtype).reshape(self.shape)
        self.capacity = capacity
        self.n = np.zeros(n_layers, dtype=np.int64)     # tokens stored per layer

    def append(self, layer: int, k: np.ndarray, v: np.ndarray) -> None:
        """k, v: (n, n_kv_heads, head_dim) rows for the next positions of `layer`."""
        n0, m = int(self.n[layer]), len(k)
        if n0 + m > self.capacity:
            raise ContextOverflowError(f"KV store full: {n0 + m} tokens > capacity {self.capacity}")
        self.data[layer, 0, n0:n0 + m] = k
        self.data[layer, 1, n0:n0 + m] = v
        self.n[layer] = n0 + m

    def truncate(self, layer: int, n: int) -> None:
        self.n[layer] = min(int(self.n[layer]), n)

    def keys(self, layer: int) -> np.ndarray:
        """All stored keys of a layer as a view (exact prefill attention, baselines)."""
        return self.data[layer, 0, : self.n[layer]]

    def values(self, layer: int) -> np.ndarray:
        return self.data[layer, 1, : self.n[layer]]

    def gather(self, layer: int, idx) -> tuple[np.ndarray, np.ndarray]:
        """Rows idx of a layer's K and V, copied by the native (bounds-checked) gather."""
        n = int(self.n[layer])
        return (native.gather_rows(self.data[layer, 0, :n], idx),
                native.gather_rows(self.data[layer, 1, :n], idx))

    def close(self) -> None:
        if self._mm is not None:
            self.data = None
            try:
                self._mm.close()
            except BufferError:
                pass  # views still alive elsewhere: freed with them
            self._mm = None

    def __del__(self):
        self.close()
