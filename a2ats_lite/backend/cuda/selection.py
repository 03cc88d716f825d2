"""Selection on the CUDA backend: the VQ codes of new keys, a2ats's lookup tables and its
top-K select in GPU memory (kernels vq_assign.cu, lut.cu, select_topk.cu), and the host-side
scoring the other policies use (backend/scoring.py, over rows the store gathered).
"""
from __future__ import annotations

import numpy as np

from ... import native
from ...errors import DeviceError
from .. import scoring
from .common import allow_smem, cdiv, i32

LUT_GMAX, LUT_DMAX, LUT_BLOCK = 16, 256, 128     # lut.cu limits
VQA_DMAX, VQA_BLOCK = 256, 256                   # vq_assign.cu
SELECT_SMEM_MAX = 96 * 1024                      # select_topk.cu: LUT slice in shared memory


class CudaCodeAssigner:
    """Codes of new keys on the GPU (kernels/vq_assign.cu) for one layer's codebooks (one
    vq.Codebook per KV head), as HostCodeAssigner does on the CPU: call with keys (m, G, d),
    the (G, M, n_ctx) uint16 code buffer (device) and the first position."""

    def __init__(self, B, books):
        subs = np.stack([b.subspaces() for b in books]).astype(np.float64)    # (G, M, C, ds)
        self.B, self.G, (_, self.M, self.C, ds) = B, len(books), subs.shape
        self.d = self.M * ds
        if self.d > VQA_DMAX or self.C > 65536:
            raise DeviceError(f"codebooks of {self.d} dims / {self.C} centroids: the GPU code "
                              f"assignment takes <= {VQA_DMAX} dims and <= 65536 centroids")
        self.L = B.asarray(np.stack([b.L for b in books]).astype(np.float32))   # (G, d, d)
        self.sub = B.asarray(subs.astype(np.float32))
        self.cnorm = B.asarray(np.einsum("gmcx,gmcx->gmc", subs, subs).astype(np.float32))

    def __call__(self, keys, codes, first: int) -> None:
        x = self.B._dev(keys, np.float32)                  # (m, G, d)
        m = x.shape[0]
        if x.shape[1:] != (self.G, self.d) or codes.shape[:2] != (self.G, self.M) \
                or not 0 <= first <= codes.shape[2] - m or not codes.flags.c_contiguous:
            raise ValueError(f"code assignment: keys {x.shape}, codes {codes.shape} at {first}")
        if m:
            with self.B._phase("codes"):
                self._launch(x, codes, first)

    def _launch(self, x, codes, first: int) -> None:
        m = x.shape[0]
        self.B._fn("vq_assign", "vq_assign_f32")(
            (m, self.G), (VQA_BLOCK,),
            (x, self.L, self.sub, self.cnorm, codes, i32(m), i32(self.d), i32(self.M),
             i32(self.C), i32(codes.shape[2]), i32(first)))


class Selection:
    """The CUDA backend's part that scores and selects the rows a retrieval layer attends."""

    def _init_selection(self, select_block: int) -> None:
        self.select_block = int(select_block)

    def code_assigner(self, books):
        return CudaCodeAssigner(self, books)

    def build_lut(self, q, centroids):
        """q (S, G, g, d), centroids (G, M, C, dsub) -> lut (S, G, g, M, C) float32."""
        q = self._dev(q, np.float32)
        S, G, g, d = q.shape
        _, M, C, ds = centroids.shape
        if g > LUT_GMAX or ds > LUT_DMAX or M * ds != d:
            raise ValueError(f"build_lut: group {g} (<= {LUT_GMAX}), sub-dim {ds} (<= {LUT_DMAX}), "
                             f"M * dsub {M * ds} == d {d} needed")
        lut = self._new((S, G, g, M, C), np.float32, "a2ats lookup tables")
        if lut.size:
            with self._phase("lut"):
                self._lut(q, centroids, lut)
        return lut

    def _lut(self, q, centroids, lut) -> None:
        S, G, g, d = q.shape
        _, M, C, ds = centroids.shape
        self._fn("lut", "build_lut_f32")(
            (cdiv(C, LUT_BLOCK), M, S * G), (LUT_BLOCK,),
            (q, self._dev(centroids, np.float32), lut, i32(G), i32(g), i32(C), i32(ds)))

    def select_topk(self, lut, codes, T, sinks: int, window: int, k: int):
        with self._phase("topk"):
            return self._select_topk(lut, codes, T, sinks, window, k)

    def _select_topk(self, lut, codes, T, sinks: int, window: int, k: int):
        """As CPUBackend.select_topk, on the GPU: per (sequence, KV head) sinks + the union
        over the group's query heads of the top-k LUT scores + the window. lut (S, G, g, M, C)
        device; codes per sequence a (G, M, n_ctx) uint16 device array; T (S,) host.
        -> host (idx (S, G, Kmax) int64 padded with -1, lens (S, G) int32): the native
        gather reads them on the host."""
        S, G, g, M, C = lut.shape
        T = np.asarray(self._host(T), dtype=np.int64).reshape(-1)
        if len(T) != S or len(codes) != S:
            raise ValueError(f"select_topk: {S} LUT rows, {len(T)} lengths, {len(codes)} code buffers")
        cap = max(1, int(T.max(initial=1)))
        for s, c in enumerate(codes):
            if c.dtype != np.uint16 or c.shape[:2] != (G, M) or c.shape[2] < T[s] \
                    or not c.flags.c_contiguous:
                raise ValueError(f"select_topk: codes of sequence {s} must be contiguous uint16 "
                                 f"({G}, {M}, >= {T[s]}), got {c.dtype} {c.shape}")
        ptrs = np.array([self._ptr(c) for c in codes], dtype=np.uint64)
        strides = np.array([c.shape[2] for c in codes], dtype=np.int64)
        keys = self._new((S, G, cap), np.uint32, "top-k scratch")
        flags = self._new((S, G, cap), np.uint8, "top-k scratch")
        idx = self._new((S, G, cap), np.int32, "selection")
        lens = self._new((S, G), np.int32, "selection lengths")
        err = self.xp.zeros(1, dtype=np.int32)
        smem = M * C * 4
        fn = self._fn("select_topk", "select_topk_lut")
        use_smem = smem <= SELECT_SMEM_MAX
        if use_smem:
            allow_smem(fn, smem)
        fn((G, S), (self.select_block,),
           (self._dev(lut, np.float32), self._dev(ptrs, np.uint64), self._dev(strides, np.int64),
            self._dev(T.astype(np.int32), np.int32), i32(g), i32(M), i32(C), i32(sinks),
            i32(window), i32(k), i32(cap), i32(cap), i32(int(use_smem)), keys, flags, idx,
            lens, err), shared_mem=smem if use_smem else 0)
        del codes       # the buffers behind the pointer table outlive the launch (stream order)
        e = int(self.to_host(err)[0])
        if e:
            raise ValueError(f"select_topk: kernel error flags {e} (1: row > Kmax, 2: code >= "
                             f"{C}, 4: codes shorter than the context)")
        lens_h = self.to_host(lens)
        width = max(1, int(lens_h.max(initial=1)))
        return self.to_host(idx[:, :, :width]).astype(np.int64), lens_h

    # scoring the other policies use: small host computations over rows the store gathered
    # (oracle, wrope, quest, a2ats's exact re-rank); a2ats itself scores on the GPU
    def dot_scores(self, q, k):
        with self._phase("rerank"):
            return scoring.dot_scores(self._host(q), self._host(k))

    def lut_lookup(self, lut, codes):
        return scoring.lut_lookup(self._host(lut), self._host(codes))

    def quest_bounds(self, q, kmin, kmax):
        return scoring.quest_bounds(self._host(q), self._host(kmin), self._host(kmax))

    def topk_union(self, scores, k: int):
        return scoring.topk_union(self._host(scores), k)

    def gather(self, rows, idx):
        return native.gather_rows(rows, idx)
