"""The CPU backend's weights: QMatrix, a GGUF-encoded matrix and its products through the
native library, one path per weight, so that a row's result does not depend on the rows
multiplied with it:
  * the int8 types (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K): repacked once into interleaved
    groups of rows, activations quantized to int8 (native.matmul_packed);
  * the others, and float32 copies (keep_f32): float32 products (native.matmul_q).
"""
from __future__ import annotations

import mmap
import threading

import numpy as np

from ..errors import ModelError
from ..gguf import GGML_F16, GGML_F32
from .base import Matrix

_NATIVE = None


def _native():
    # imported on first use (the backend module loads without the C library), then kept:
    # the decode hot path asks for it on every product
    global _NATIVE
    if _NATIVE is None:
        from .. import native
        _NATIVE = native
    return _NATIVE


class QMatrix(Matrix):
    """A (n_out, n_in) weight in its GGUF encoding; y = x @ W^T via apply().

    The int8 types are repacked on first use (native.repack, about the size of the blocks);
    the copy then serves every product and the mmap'd pages of the blocks are given back to
    the OS (rows() and dense() fault back the few pages they read)."""

    def __init__(self, name: str, ggml_type: int, n_out: int, n_in: int, raw: np.ndarray,
                 keep_f32: bool = False):
        # raw: uint8 (nbytes,) zero-copy view, or f32 (n_out, n_in)
        super().__init__(name, ggml_type, n_out, n_in, raw)
        self.keep_f32 = keep_f32            # True: dequantize once, float32 products
        self._f32 = raw if self.ggml_type == GGML_F32 else None
        self._packed = None                 # native.Packed, made by packed()
        self._groups = {}                   # apply_group: the other matrices' Packed -> PackedGroup
        self._lock = threading.Lock()

    @classmethod
    def from_array(cls, name: str, a: np.ndarray) -> "QMatrix":
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim != 2:
            raise ModelError(None, f"tensor {name}: expected a matrix, got shape {a.shape}")
        return cls(name, GGML_F32, a.shape[0], a.shape[1], a)

    @property
    def int8(self) -> bool:
        """Whether the products take the int8 path (repacked weights, int8 activations)."""
        return not (self.keep_f32 or self._f32 is not None) and self.ggml_type in _native().ACT_KINDS

    @property
    def read_bytes(self) -> int:
        """Bytes one product reads: the f32 copy, the repacked copy or the quantized blocks."""
        if self.keep_f32 or self._f32 is not None:
            return self.f32_nbytes
        if self.int8:
            return _native().repack_nbytes(self.ggml_type, self.n_out, self.n_in)
        return self.nbytes

    def _dequant(self, r0: int, r1: int) -> np.ndarray:
        if self.ggml_type == GGML_F32:
            return self.raw[r0:r1]
        rb = self.nbytes // self.n_out          # every row is whole blocks
        raw = self.raw[r0 * rb:r1 * rb]
        if self.ggml_type == GGML_F16:
            return raw.view(np.float16).reshape(r1 - r0, self.n_in).astype(np.float32)
        return _native().dequantize(raw, self.ggml_type, (r1 - r0, self.n_in), np.float32)

    def dense(self) -> np.ndarray:
        """(n_out, n_in) float32; cached when keep_f32."""
        if self._f32 is not None:
            return self._f32
        w = self._dequant(0, self.n_out)
        if self.keep_f32:
            self._f32 = w
        return w

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ids (n,) as float32 (n, n_in): an embedding lookup reads only those rows."""
        if self._f32 is not None:
            return self._f32[ids]
        if self.ggml_type == GGML_F16:
            return self.raw.view(np.float16).reshape(self.n_out, self.n_in)[ids].astype(np.float32)
        rb = self.nbytes // self.n_out
        raw = self.raw.reshape(self.n_out, rb)[ids]           # (n, row_bytes) gathered blocks
        return _native().dequantize(raw.reshape(-1), self.ggml_type, (len(ids), self.n_in), np.float32)

    def packed(self):
        """The repacked copy of an int8-type weight, made once (threads share it)."""
        if self._packed is None:
            with self._lock:
                if self._packed is None:
                    self._packed = _native().repack(self.raw, self.ggml_type, self.n_out, self.n_in)
                    self._release_pages(self.raw)
        return self._packed

    @staticmethod
    def _release_pages(raw: np.ndarray) -> None:
        """Give the pages of an mmap'd tensor back to the OS (MADV_DONTNEED on a read-only file
        mapping drops them from this process; a later read faults them back from the file):
        the repacked copy replaces them. Arrays not backed by an mmap are left alone."""
        base = raw.base
        mm = getattr(base, "obj", None) if isinstance(base, memoryview) else None
        if not isinstance(mm, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = raw.ctypes.data - np.frombuffer(base, np.uint8, count=1).ctypes.data
        lo = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE                 # whole pages inside
        hi = (start + raw.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def quantize_input(self, x):
        """x (n, n_in) as this matrix's products read it: for the int8 types the quantized
        records (native.QRows), which apply() of every matrix of the same activation kind
        reading the same x accepts (q/k/v, gate/up: quantize once, multiply several times);
        else x itself."""
        return _native().quantize_rows(x, self.ggml_type) if self.int8 else x

    def apply(self, x) -> np.ndarray:
        """x (n, n_in) float32, or quantize_input()'s result -> (n, n_out) float32 = x @ W^T.
        A row's result is the same bits whatever rows share the call."""
        nat = _native()
        p = self._packed
        if p is None or self.keep_f32:
            p = self.packed() if self.int8 else None
        if isinstance(x, nat.QRows) and (p is None or x.kind != p.kind):
            x = x.x                        # records of another kind: the float32 rows
        if p is not None:
            return nat.matmul_packed(p, x)
        if self._f32 is not None or self.keep_f32:
            return nat.matmul_q(self.dense(), GGML_F32, self.n_out, self.n_in, x)
        return nat.matmul_q(self.raw, self.ggml_type, self.n_out, self.n_in, x)

    @staticmethod
    def apply_group(ms, x) -> list:
        """[m.apply(x) for m in ms] (the same bits) with x quantized once and the int8 matrices
        of x's activation kind multiplied in one native call (q/k/v, gate/up)."""
        nat = _native()
        kinds = {nat.ACT_KINDS[m.ggml_type] for m in ms if m.int8}
        if len(ms) < 2 or len(kinds) != 1 or not all(m.int8 for m in ms):
            q = ms[0].quantize_input(x) if ms and not isinstance(x, nat.QRows) else x
            return [m.apply(q) for m in ms]
        if isinstance(x, nat.QRows) and x.kind not in kinds:
            x = x.x
        ps = tuple(m.packed() for m in ms)
        group = ms[0]._groups.get(ps[1:])
        if group is None:                   # (made once per tuple; it keeps the copies alive)
            group = ms[0]._groups[ps[1:]] = nat.PackedGroup(ps)
        return nat.matmul_packed_group(group, x)

    def __repr__(self):
        return f"QMatrix({self.name!r}, type={self.ggml_type}, {self.n_out}x{self.n_in})"

