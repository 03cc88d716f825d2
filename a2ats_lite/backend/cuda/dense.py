"""Weights and dense operations of the CUDA backend: weight matrices in their GGUF encoding
(CudaMatrix), products, norms, RoPE, activations, elementwise add / scale / softcap, row
gathers, greedy argmax and the embedding lookup (kernels quant_matvec.cu, quant_dequant.cu,
rmsnorm.cu, rope.cu, act.cu, elementwise.cu, argmax.cu).

Weights keep their GGUF block encoding in GPU memory (CudaMatrix). A product of n <= 16 rows
uses matvec_<type>_v{1,4,8,16} (every weight byte read once); more rows dequantize slices of
output rows to float32 tiles (dequant_<type>_f32, bit-exact with the CPU's dequantization) and
multiply with xp.matmul (cuBLAS SGEMM on the GPU). f32 tiles rather than f16: the products then
match the CPU backend's f32 BLAS (f16 tiles + an f16 GEMM would round the outputs to f16).
"""
from __future__ import annotations

import numpy as np

from ...errors import DeviceError, ModelError, TokenizerError
from ...gguf import GGML_BLOCK, GGML_F32, GGML_TYPE_IDS
from ..base import Matrix
from .common import block32, cdiv, f32, i32

# ggml type id -> the suffix of its quant_matvec / quant_dequant entry points (its name)
KERNEL_TYPES = {GGML_TYPE_IDS[n]: n.lower() for n in
                ("F32", "F16", "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K")}
# values one dequant work item (unit) decodes, by block size (quant_blocks.cuh: E)
_UNIT_VALUES = {1: 1, 32: 8, 256: 16}
# (values per block, bytes per block, dequant units per block) of each kernel type
BLOCKS = {t: (GGML_BLOCK[t][0], GGML_BLOCK[t][1], GGML_BLOCK[t][0] // _UNIT_VALUES[GGML_BLOCK[t][0]])
          for t in KERNEL_TYPES}
DECODE_ROWS = 16                    # up to this many rows a product uses the matvec kernels
NV_BUCKETS = (1, 4, 8, 16)
MV_ROWS_PER_WARP = {1: 2, 4: 2, 8: 1, 16: 1}     # R of matvec_*_v<NV> (quant_matvec.cu)
MV_BLOCK = 128
OUT_SLICE_ROWS = 16384              # output rows dequantized at once by a many-row product
ARGMAX_CHUNK = 4096


class CudaMatrix(Matrix):
    """A (n_out, n_in) weight in GPU memory in its GGUF encoding: raw is a uint8 (nbytes,)
    device array of whole-block rows, or for F32 a float32 (n_out, n_in) device array."""

    def __init__(self, name: str, ggml_type: int, n_out: int, n_in: int, raw):
        super().__init__(name, ggml_type, n_out, n_in, raw)
        self.kind = KERNEL_TYPES[self.ggml_type]
        qk, bs, units = BLOCKS[self.ggml_type]
        self.row_bytes = n_in // qk * bs
        self.units = n_in // qk * units          # dequant work items per row

    @property
    def read_bytes(self) -> int:
        return self.nbytes

    def __repr__(self):
        return f"CudaMatrix({self.name!r}, {self.kind}, {self.n_out}x{self.n_in})"


class DenseOps:
    """The CUDA backend's part that holds weights and runs the dense forward pass."""

    def _init_dense(self, max_grid_rows: int) -> None:
        self.max_grid_rows = max(1, min(65535, int(max_grid_rows)))
        self._inv_freq: dict = {}           # RopeConfig -> its inverse frequencies (device)
        self._ones: dict = {}               # d -> ones (d,): rms_norm without a weight

    def matrix(self, name, ggml_type, n_out, n_in, raw) -> CudaMatrix:
        ggml_type, n_out, n_in = int(ggml_type), int(n_out), int(n_in)
        if ggml_type not in KERNEL_TYPES:
            raise DeviceError(f"tensor {name}: ggml type {ggml_type} has no CUDA kernel here "
                              f"(supported: {', '.join(sorted(set(KERNEL_TYPES.values())))})")
        qk, bs, _ = BLOCKS[ggml_type]
        if n_in % qk:
            raise DeviceError(f"tensor {name}: {n_in} columns are not whole {qk}-value blocks")
        if ggml_type == GGML_F32:
            host = np.ascontiguousarray(np.asarray(raw).view(np.float32).reshape(n_out, n_in))
        else:
            host = np.ascontiguousarray(np.asarray(raw).reshape(-1).view(np.uint8))
            if host.nbytes != n_out * (n_in // qk) * bs:
                raise DeviceError(f"tensor {name}: {host.nbytes} bytes, expected "
                                  f"{n_out * (n_in // qk) * bs} for {n_out}x{n_in} "
                                  f"{KERNEL_TYPES[ggml_type]}")
        return CudaMatrix(name, ggml_type, n_out, n_in, self._upload(host, f"weight {name}"))

    def matrix_from_array(self, name, a) -> CudaMatrix:
        if isinstance(a, CudaMatrix):
            return a
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim != 2:
            raise ModelError(None, f"tensor {name}: expected a matrix, got shape {a.shape}")
        return self.matrix(name, GGML_F32, a.shape[0], a.shape[1], a)

    def embed(self, w: CudaMatrix, ids, scale: float):
        ids_h = np.asarray(self.to_host(ids) if not isinstance(ids, np.ndarray) else ids).reshape(-1)
        n = len(ids_h)
        out = self._new((n, w.n_in), np.float32, "embedding rows")
        if n == 0:
            return out
        if self._rec.mode is not None:   # in a graph: checked here, the flag is never read
            if ((ids_h < 0) | (ids_h >= w.n_out)).any():
                raise TokenizerError(f"token id out of range [0, {w.n_out})")
        dev_ids = self._h2d(ids_h, np.int32)
        err = self._new(1, np.int32, "an error flag")
        self._fill(err, 0)
        blk = block32(w.units)
        self._fn("quant_dequant", f"get_rows_{w.kind}")(
            (cdiv(w.units, blk), min(n, self.max_grid_rows)), (blk,),
            (w.raw, dev_ids, out, i32(n), i32(w.n_out), i32(w.n_in), err))
        if self._rec.mode is None and int(self.to_host(err)[0]):
            bad = ids_h[(ids_h < 0) | (ids_h >= w.n_out)]
            raise TokenizerError(f"token id {int(bad[0]) if bad.size else '?'} out of range "
                                 f"[0, {w.n_out})")
        if scale != 1.0:
            self._scale_into(out, out, scale)     # f32 sqrtf(n_embd), as llama.cpp scales it
        return out

    # elementwise helpers (kernels/elementwise.cu): kernels rather than CuPy expressions, so a
    # captured graph holds them (and each costs a RawKernel launch, not a CuPy elementwise one)
    def _ew_grid(self, n: int):
        return (max(1, min(cdiv(n, 256), 65535 * 16)),), (256,)

    def _fill(self, a, v) -> None:
        g, b = self._ew_grid(a.size)
        if a.dtype == np.int32:
            self._fn("elementwise", "fill_i32")(g, b, (a, np.int64(a.size), i32(v)))
        else:
            self._fn("elementwise", "fill_f32")(g, b, (a, np.int64(a.size), f32(v)))

    def _scale_into(self, x, out, s) -> None:
        if x.size:
            g, b = self._ew_grid(x.size)
            self._fn("elementwise", "scale_f32")(g, b, (x, out, np.int64(x.size), f32(s)))

    def matmul(self, w: CudaMatrix, x, bias=None):
        x = self._dev(x, np.float32)
        n = x.shape[0]
        if x.ndim != 2 or x.shape[1] != w.n_in:
            raise ValueError(f"matmul {w.name}: x has shape {x.shape}, expected (n, {w.n_in})")
        if n == 0:
            y = self._new((0, w.n_out), np.float32, f"{w.name} output")
        elif n <= DECODE_ROWS:
            nv = next(b for b in NV_BUCKETS if b >= n)
            y = self._new((n, w.n_out), np.float32, f"{w.name} output")
            rows_per_block = MV_BLOCK // 32 * MV_ROWS_PER_WARP[nv]
            self._fn("quant_matvec", f"matvec_{w.kind}_v{nv}")(
                (cdiv(w.n_out, rows_per_block),), (MV_BLOCK,),
                (w.raw, x, y, i32(w.n_out), i32(w.n_in), i32(n)))
        elif w.ggml_type == GGML_F32:
            y = self.xp.matmul(x, w.raw.T)
        else:
            y = self._new((n, w.n_out), np.float32, f"{w.name} output")
            step = min(OUT_SLICE_ROWS, w.n_out)
            tile = self._new((step, w.n_in), np.float32, f"a dequantized tile of {w.name}")
            blk = block32(w.units)
            fn = self._fn("quant_dequant", f"dequant_{w.kind}_f32")
            for r0 in range(0, w.n_out, step):
                r1 = min(w.n_out, r0 + step)
                t = tile[:r1 - r0]
                fn((cdiv(w.units, blk), min(r1 - r0, self.max_grid_rows)), (blk,),
                   (w.raw, t, i32(w.n_in), i32(r0), i32(r1)))
                y[:, r0:r1] = self.xp.matmul(x, t.T)
        if bias is not None and y.size:
            g, b = self._ew_grid(y.size)
            self._fn("elementwise", "add_rows_f32")(
                g, b, (y, self._dev(bias, np.float32), np.int64(n), i32(w.n_out)))
        return y

    def rms_norm(self, x, w, eps: float):
        x = self._dev(x, np.float32)
        d = x.shape[-1]
        rows = x.size // d if d else 0
        if w is None:
            w = self._ones.get(d)
            if w is None:
                w = self._ones[d] = self.xp.ones(d, dtype=np.float32)
        out = self._new(x.shape, np.float32, "rms_norm output")
        if rows:
            self._fn("rmsnorm", "rmsnorm_f32")((rows,), (block32(d),),
                                               (x, w, out, i32(d), f32(eps)))
        return out

    def _rope_table(self, rope):
        t = self._inv_freq.get(rope)
        if t is None:
            if rope.rot > 512 or rope.rot % 2 or rope.rot > rope.head_dim:
                raise DeviceError(f"rope: n_rot {rope.rot} must be even and <= min(512, head_dim)")
            t = self._inv_freq[rope] = self._upload(
                np.ascontiguousarray(rope.inv_freq(), dtype=np.float32), "a rope table")
        return t

    def rope(self, x, positions, rope):
        """x (N, h, d) -> a NEW rotated (N, h, d) array (x is left as it is)."""
        x = self._dev(x, np.float32)
        N, h, d = x.shape
        out = self._new(x.shape, np.float32, "rope output")
        if N == 0:
            return out
        g, b = self._ew_grid(x.size)
        self._fn("elementwise", "copy_f32")(g, b, (x, out, np.int64(x.size)))
        pos = np.asarray(self.to_host(positions) if not isinstance(positions, (np.ndarray, list, tuple))
                         else positions).reshape(-1)
        if len(pos) != N:
            raise ValueError(f"rope: {len(pos)} positions for {N} rows")
        half = rope.rot // 2
        self._fn("rope", "rope_f32")(
            (N,), (block32(h * half, 128),),
            (out, self._h2d(pos, np.int32), self._rope_table(rope), i32(h),
             i32(d), i32(h * d), i32(rope.rot), i32(0 if rope.pairing == "adjacent" else 1)))
        return out

    def gated(self, gate, up, act: str):
        """act(gate) * up, in place on gate (when gate is a contiguous f32 device array)."""
        kern = {"silu": "gated_silu_f32", "gelu_tanh": "gated_gelu_tanh_f32"}.get(act)
        if kern is None:
            raise ValueError(f"unknown activation {act!r}")
        gate = self._dev(gate, np.float32)
        up = self._dev(up, np.float32)
        n_cols = gate.shape[-1]
        n_rows = gate.size // n_cols if n_cols else 0
        total = n_rows * n_cols
        if total:
            self._fn("act", kern)((min(cdiv(total, 256), 65535 * 16),), (256,),
                                  (gate, up, gate, i32(n_rows), i32(n_cols), i32(n_cols),
                                   i32(n_cols)))
        return gate

    def softcap(self, x, cap: float):
        x = self._dev(x, np.float32)
        out = self._new(x.shape, np.float32, "softcap output")
        if x.size:
            self._fn("act", "softcap_f32")((min(cdiv(x.size, 256), 65535 * 16),), (256,),
                                           (x, out, np.int64(x.size), f32(cap)))
        return out

    def add(self, x, y):
        """x += y (x, y contiguous f32 device arrays of one size); returns x."""
        if x.size:
            g, b = self._ew_grid(x.size)
            self._fn("elementwise", "add_f32")(g, b, (x, self._dev(y, np.float32), np.int64(x.size)))
        return x

    def scale(self, x, s: float):
        x = self._dev(x, np.float32)
        out = self._new(x.shape, np.float32, "a scaled copy")
        self._scale_into(x, out, s)
        return out

    def take_rows(self, x, rows):
        idx = np.asarray(self.to_host(rows) if not isinstance(rows, (np.ndarray, list, tuple))
                         else rows, dtype=np.int64).reshape(-1)
        if len(idx) == x.shape[0] and (idx == np.arange(len(idx))).all():
            return x                         # every row (decode steps): no copy
        return x[self._h2d(idx, np.int64)]

    def argmax(self, logits) -> np.ndarray:
        """Greedy tokens: per row of (m, n_vocab) float32 logits the first maximal index
        (numpy.argmax), as a host int64 array (m,)."""
        lg = self._dev(logits, np.float32)
        if lg.ndim == 1:
            lg = lg.reshape(1, -1)
        m, V = lg.shape
        if m == 0:
            return np.zeros(0, np.int64)
        splits = cdiv(V, ARGMAX_CHUNK)
        pv = self._new((m, splits), np.float32, "argmax partials")
        pi = self._new((m, splits), np.int32, "argmax partials")
        out = self._new(m, np.int32, "argmax output")
        self._fn("argmax", "argmax_partial_f32")((splits, m), (256,),
                                                 (lg, i32(V), i32(ARGMAX_CHUNK), pv, pi))
        self._fn("argmax", "argmax_final")((m,), (block32(splits),), (pv, pi, i32(splits), out))
        h = self.to_host(out)           # (None inside a graph: graph_step returns it)
        return None if h is None else h.astype(np.int64)

    def group_matmul(self, q, W):
        """q (S, G, g, d) x W (G, d, e) -> (S, G, g, e) (cuBLAS batched on the GPU)."""
        return self.xp.matmul(self._dev(q, np.float32), W[None])

