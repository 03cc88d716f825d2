"""Device memory of the CUDA backend: allocation (with a clear out-of-memory error), host
inputs going up (eagerly, or through a captured graph's staging buffers), results coming
down, and the pinned staging buffers and copy stream of the sparse fetch.

Arrays here are CuPy arrays on a GPU, numpy arrays on the CPU shim (xp is numpy).
"""
from __future__ import annotations

import numpy as np

from ...errors import DeviceError
from ..base import phase
from .graphs import GraphMismatch


class DeviceMemory:
    """The CUDA backend's part that holds and moves memory."""

    def _init_memory(self, xp) -> None:
        if xp is None:
            import cupy
            xp = cupy
        self.xp = xp
        self.on_gpu = xp is not np
        self._copy_stream = None            # the fetch's host-to-device copies (a GPU)
        self._stage_bufs: list = [None, None]   # (pinned buffer, its copy's event) x 2
        self._stage_turn = 1
        self.profile: dict | None = None    # phase -> seconds (benchmarks): see _phase
        if self.on_gpu:
            import cupy
            self._oom = cupy.cuda.memory.OutOfMemoryError
        else:
            self._oom = MemoryError

    def _phase(self, name: str):
        """With self.profile a dict: the time of a retrieval phase (codes, lut, topk, gather,
        h2d, attention, rerank), the device synchronized on both sides; else nothing."""
        return phase(self.profile, name, self._sync)

    def _sync(self) -> None:
        if self.on_gpu:
            import cupy
            cupy.cuda.get_current_stream().synchronize()

    def memory_info(self):
        """(free, total) bytes of GPU memory; None in shim mode (numpy arrays)."""
        if not self.on_gpu:
            return None
        import cupy
        free, total = cupy.cuda.runtime.memGetInfo()
        return int(free), int(total)

    def _out_of_memory(self, nbytes: int, what: str) -> DeviceError:
        info = self.memory_info()
        have = "" if info is None else f" ({info[0]} of {info[1]} bytes free)"
        return DeviceError(f"GPU out of memory: {what} needs {int(nbytes)} more bytes{have}; "
                           f"lower the context size, the number of parallel sequences or the "
                           f"batch size, or use a smaller model")

    def _alloc(self, shape, dtype, what: str = "a buffer"):
        try:
            return self.xp.empty(shape, dtype=dtype)
        except self._oom:
            n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            raise self._out_of_memory(n, what) from None

    def _new(self, shape, dtype, what: str = "a buffer"):
        """A buffer of the step's computation (a captured graph keeps its own)."""
        if self._rec.mode == "replay":
            return self._rec.alloc(shape, dtype)
        a = self._alloc(shape, dtype, what)
        if self._rec.mode == "capture":
            self._rec.g.allocs.append(a)
        return a

    def _h2d(self, a, dtype):
        """A host input of the step (ids, positions, tables) as a device array. In a graph it
        goes through a staging buffer the graph copies from, rewritten at every replay."""
        a = np.ascontiguousarray(a, dtype=dtype)
        rec = self._rec
        if rec.mode is None:
            return self._upload(a, "an input") if self.on_gpu else a
        if rec.mode == "replay":
            return rec.upload(a)
        if self.on_gpu:
            import cupyx
            host = cupyx.empty_pinned(a.shape, a.dtype)
            host[...] = a
            dev = self._alloc(a.shape, a.dtype, "a graph input")
            if a.nbytes:
                import cupy
                dev.data.copy_from_host_async(host.ctypes.data, a.nbytes,
                                              cupy.cuda.get_current_stream())
        else:
            host, dev = a.copy(), np.empty_like(a)
            rec.g.ops.append(("copy", host, dev))
        rec.g.uploads.append((host, dev))
        return dev

    def _h2d_pack(self, *arrays):
        """Several small host inputs in one upload (one copy in a graph): device views of
        one byte buffer, each at an 8-byte aligned offset, in the given order."""
        offs, n = [], 0
        for a in arrays:
            offs.append(n)
            n += -(-a.nbytes // 8) * 8
        buf = np.zeros(max(8, n), np.uint8)
        for a, o in zip(arrays, offs):
            buf[o:o + a.nbytes] = np.ascontiguousarray(a).view(np.uint8).reshape(-1)
        dev = self._h2d(buf, np.uint8)
        return [dev[o:o + a.nbytes].view(a.dtype).reshape(a.shape) for a, o in zip(arrays, offs)]

    def _upload(self, a: np.ndarray, what: str):
        try:
            return self.xp.asarray(a)
        except self._oom:
            raise self._out_of_memory(a.nbytes, what) from None

    def _dev(self, a, dtype):
        """a (host or device) as a contiguous device array of dtype."""
        if self.on_gpu and isinstance(a, np.ndarray):
            a = self._upload(np.ascontiguousarray(a, dtype=dtype), "an input")
        return self.xp.ascontiguousarray(a, dtype=dtype)

    # -- buffers the forward pass and the KV storage ask for -----------------------------
    def empty(self, shape, dtype=np.float32):
        return self._alloc(shape, dtype, f"a {np.dtype(dtype).name} buffer of shape {tuple(shape)}")

    def zeros(self, shape, dtype):
        a = self._alloc(shape, dtype, f"a {np.dtype(dtype).name} buffer of shape {tuple(shape)}")
        a[...] = 0
        return a

    def asarray(self, a):
        return self._upload(np.ascontiguousarray(a), "a table")

    def vector(self, a):
        return self._upload(np.array(a, dtype=np.float32).reshape(-1), "a weight vector")

    def to_host(self, x) -> np.ndarray:
        if self._rec.mode is not None:      # a graph's output: read after the graph ran
            if self._rec.mode == "capture":
                self._rec.g.output = x
            elif x is not self._rec.g.output:
                raise GraphMismatch("the step's output is not the captured one")
            return None
        if self.on_gpu and not isinstance(x, np.ndarray):
            import cupy
            return cupy.asnumpy(x)
        return np.asarray(x)

    def _ptr(self, a) -> int:
        """The device address of a (the host address of a shim array)."""
        return int(a.data.ptr) if self.on_gpu else int(a.ctypes.data)

    def _host(self, a) -> np.ndarray:
        return a if isinstance(a, np.ndarray) else self.to_host(a)

    def _staging(self, shape, dtype):
        """A host buffer for rows going up: pinned memory on a GPU, two of them used in turn
        so the native gather of one chunk never overwrites rows still being copied (each
        waits for its previous copy's event)."""
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        slot = self._stage_turn = (self._stage_turn + 1) % 2
        buf, event = self._stage_bufs[slot] or (None, None)
        if event is not None:
            event.synchronize()
        if buf is None or buf.nbytes < n:
            if self.on_gpu:
                import cupyx
                buf = cupyx.empty_pinned(max(n, 1 << 20), dtype=np.uint8)
            else:
                buf = np.empty(max(n, 1 << 16), dtype=np.uint8)
        self._stage_bufs[slot] = (buf, None)
        return slot, buf[:n].view(dtype).reshape(shape)

    def _copy_up(self, slot: int, staged, dsts, e0: int, e1: int) -> None:
        """Entries [e0, e1) of the staged (E, ...) arrays into the device arrays dsts, on the
        copy stream (asynchronous from pinned memory); the compute stream waits for them, and
        the staging slot's next user for the copy's event."""
        rows = [np.ascontiguousarray(a).reshape(a.shape[0], -1) for a in staged]
        if not self.on_gpu:
            for dst, src in zip(dsts, rows):
                dst.reshape(src.shape)[e0:e1] = src[e0:e1]
            return
        import ctypes
        import cupy
        compute = cupy.cuda.get_current_stream()
        if self._copy_stream is None:
            self._copy_stream = cupy.cuda.Stream(non_blocking=True)
        ready = cupy.cuda.Event(disable_timing=True)
        ready.record(compute)              # dsts were allocated (and last used) on compute
        self._copy_stream.wait_event(ready)
        for dst, src in zip(dsts, rows):
            row = src.shape[1] * src.itemsize
            (dst.data + e0 * row).copy_from_host_async(
                ctypes.c_void_p(src.ctypes.data + e0 * row), (e1 - e0) * row, self._copy_stream)
        done = cupy.cuda.Event(disable_timing=True)
        done.record(self._copy_stream)
        compute.wait_event(done)
        self._stage_bufs[slot] = (self._stage_bufs[slot][0], done)
