"""The CUDA backend: CuPy arrays + the project's RawKernels (backend/kernels/*.cu), one GPU.

    B = CUDABackend()                                # cupy + cupy.RawModule(code=load_source(name))
    B = CUDABackend(xp=numpy, loader=ShimModule)     # tests: the same .cu text on the CPU shim

Everything here goes through two injected objects: ``xp`` (the array module: cupy, or numpy
in shim mode) and ``loader(name)`` (a module with ``get_function(kernel)`` returning a callable
of CuPy's RawKernel shape ``k(grid, block, args, shared_mem=0)``). The shim runs the unmodified
kernel sources on the CPU with numpy arrays as device pointers, so the code paths below (grids,
argument types, strides, buffer layouts) are exercised without a GPU. Kernel scalars are
numpy.int32 / numpy.int64 / numpy.float32 (a Python int would be passed as long long, a float
as double).

Weights keep their GGUF block encoding in GPU memory (CudaMatrix). A product of n <= 16 rows
uses matvec_<type>_v{1,4,8,16} (every weight byte read once); more rows dequantize slices of
output rows to float32 tiles (dequant_<type>_f32, bit-exact with the CPU's dequantization) and
multiply with xp.matmul (cuBLAS SGEMM on the GPU). f32 tiles rather than f16: the products then
match the CPU backend's f32 BLAS (f16 tiles + an f16 GEMM would round the outputs to f16).

Attention reads the LayerBuffer views (G, T, d) of the dense KV cache in place (f32 or f16 K and
V, independently) with kernels/attention_gtd.cu: flash decoding (split + combine) for one query
row, a tiled causal/window kernel for more. Only the dense KV policy runs here: the retrieval
methods of the protocol raise DeviceError.

Decode steps of the dense policy run as CUDA graphs (graph_step, backend/cuda_graph.py): every
per-step value the kernels need (token ids, positions, KV rows, cache addresses and spans) is
data uploaded from staging buffers, so one graph per batch size replays every step.

Not here yet: bf16, tuning (block sizes and split lengths are reasoned defaults, never timed).
"""
from __future__ import annotations

import math
import statistics
import time

import numpy as np

from ..errors import DeviceError, TokenizerError
from . import cpu, nvrtc
from .base import phase
from .cuda_graph import GraphMismatch, Recorder, StepGraph, arg_signature

GGML_F32, GGML_F16 = 0, 1
# ggml type id -> the suffix of its quant_matvec / quant_dequant entry points
KERNEL_TYPES = {0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 6: "q5_0", 8: "q8_0",
                12: "q4_k", 13: "q5_k", 14: "q6_k"}
# (values per block, bytes per block, dequant units per block) of each type
BLOCKS = {0: (1, 4, 1), 1: (1, 2, 1), 2: (32, 18, 4), 3: (32, 20, 4), 6: (32, 22, 4),
          8: (32, 34, 4), 12: (256, 144, 16), 13: (256, 176, 16), 14: (256, 210, 16)}
DECODE_ROWS = 16                    # up to this many rows a product uses the matvec kernels
NV_BUCKETS = (1, 4, 8, 16)
MV_ROWS_PER_WARP = {1: 2, 4: 2, 8: 1, 16: 1}     # R of matvec_*_v<NV> (quant_matvec.cu)
MV_BLOCK = 128
OUT_SLICE_ROWS = 16384              # output rows dequantized at once by a many-row product
ARGMAX_CHUNK = 4096
GTD_DMAX = 256                      # attention_gtd.cu limits
GTD_PF_ROWS, GTD_PF_KEYS = 8, 32
DEFAULT_DYN_SMEM = 48 * 1024
LUT_GMAX, LUT_DMAX, LUT_BLOCK = 16, 256, 128     # lut.cu limits
VQA_DMAX, VQA_BLOCK = 256, 256                   # vq_assign.cu
SELECT_SMEM_MAX = 96 * 1024                      # select_topk.cu: LUT slice in shared memory
KV_TYPES = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}
PUT_ROWS = 8                                     # kv_write.cu put_rows: rows per block


def _i32(v) -> np.int32:
    return np.int32(v)


def _f32(v) -> np.float32:
    return np.float32(v)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _block32(n: int, cap: int = 256) -> int:
    """Threads for a loop over n items: a multiple of 32, at most cap."""
    return max(32, min(cap, _ceil(max(1, n), 32) * 32))


def _cupy_loader(name: str):
    import cupy
    return cupy.RawModule(code=nvrtc.load_source(name))


class CudaMatrix:
    """A (n_out, n_in) weight in GPU memory in its GGUF encoding: raw is a uint8 (nbytes,)
    device array of whole-block rows, or for F32 a float32 (n_out, n_in) device array."""

    def __init__(self, name: str, ggml_type: int, n_out: int, n_in: int, raw):
        self.name, self.ggml_type, self.n_out, self.n_in = name, int(ggml_type), int(n_out), int(n_in)
        self.raw = raw
        self.kind = KERNEL_TYPES[self.ggml_type]
        qk, bs, units = BLOCKS[self.ggml_type]
        self.row_bytes = n_in // qk * bs
        self.units = n_in // qk * units          # dequant work items per row

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_out, self.n_in)

    @property
    def f32_nbytes(self) -> int:
        return self.n_out * self.n_in * 4

    @property
    def read_bytes(self) -> int:
        return self.nbytes

    def drop_f32(self) -> None:      # no float32 copies are kept on the GPU
        pass

    def __repr__(self):
        return f"CudaMatrix({self.name!r}, {self.kind}, {self.n_out}x{self.n_in})"


class _Kernel:
    """A RawKernel (or shim kernel) behind the backend's graph recorder: launched eagerly,
    captured into a graph, or (replay pass) checked against the captured launch."""

    def __init__(self, B, name: str, fn):
        self.B, self.name, self.fn = B, name, fn

    @property
    def max_dynamic_shared_size_bytes(self):
        return getattr(self.fn, "max_dynamic_shared_size_bytes", 0)

    @max_dynamic_shared_size_bytes.setter
    def max_dynamic_shared_size_bytes(self, v):
        self.fn.max_dynamic_shared_size_bytes = v

    def __call__(self, grid, block, args, shared_mem: int = 0):
        rec = self.B._rec
        if rec.mode is None:
            return self.fn(grid, block, args, shared_mem=shared_mem)
        ptr = self.B._ptr
        sig = (self.name, grid, block, shared_mem, tuple(arg_signature(a, ptr) for a in args))
        if rec.mode == "replay":
            rec.kernel(sig)                   # the graph launches it
            return None
        rec.g.sigs.append(sig)
        if self.B.on_gpu:
            return self.fn(grid, block, args, shared_mem=shared_mem)   # into the stream's graph
        rec.g.ops.append(("k", self.fn, grid, block, args, shared_mem))


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
            (x, self.L, self.sub, self.cnorm, codes, _i32(m), _i32(self.d), _i32(self.M),
             _i32(self.C), _i32(codes.shape[2]), _i32(first)))


def fetch_chunks(rows: np.ndarray, most: int, least: int) -> list[tuple[int, int]]:
    """[e0, e1) ranges of entries cutting sum(rows) into up to `most` chunks of about equal
    rows, each at least `least` rows (except a lone one); entries with rows fall in one."""
    total = int(rows.sum())
    n = max(1, min(most, total // max(1, least)))
    if total == 0:
        return []
    cum = np.cumsum(rows)
    cuts = np.searchsorted(cum, [total * i / n for i in range(1, n)], side="left") + 1
    edges = [0] + sorted({int(c) for c in cuts if 0 < c < len(rows)}) + [len(rows)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if rows[a:b].sum()]


class PathChooser:
    """sparse="auto": where a retrieval layer's decode attention runs, by measurement. Per
    kind of call (batch size and mean selected rows per (sequence, KV head), each rounded
    up to a power of two): one untimed call of the GPU path (it fills the row caches), then
    `trials` timed calls of it, `trials` of the host path, and from then on the path with
    the lower median time (choice: kind -> path)."""
    PATHS = ("gpu", "host")

    def __init__(self, trials: int = 3):
        self.trials = int(trials)
        self.times: dict = {}
        self.choice: dict = {}

    @staticmethod
    def key(S: int, lens: np.ndarray) -> tuple[int, int]:
        rows = float(lens.mean()) if lens.size else 0.0
        return 1 << max(0, S - 1).bit_length(), 1 << max(0, math.ceil(rows) - 1).bit_length()

    def next(self, key) -> tuple[str, bool]:
        """(path, whether to time it) for the next call of this kind."""
        if key in self.choice:
            return self.choice[key], False
        t = self.times.get(key)
        if t is None:
            self.times[key] = {p: [] for p in self.PATHS}
            return "gpu", False
        return ("gpu" if len(t["gpu"]) < self.trials else "host"), True

    def record(self, key, path: str, seconds: float) -> None:
        t = self.times[key]
        t[path].append(seconds)
        if all(len(v) >= self.trials for v in t.values()):
            self.choice[key] = min(self.PATHS, key=lambda p: statistics.median(t[p]))


class CUDABackend:
    """The backend protocol (backend/base.py) on one GPU, every KV policy.

    xp: array module (default cupy); loader: kernel source name -> module (default
    cupy.RawModule(code=nvrtc.load_source(name))). decode_split_len: keys per flash-decoding
    split (None: max(64, ceil(keys / 128))). max_grid_rows: cap of the row dimension of the
    dequant / get_rows grids (the kernels grid-stride over rows; the shim tests lower it).
    select_block: threads of the top-K select's blocks (one block per sequence and KV head).
    sparse: where a retrieval layer's decode attention runs: "gpu" (selected rows gathered
    to staging and copied up), "host" (the native kernel attends them in host memory and
    only the (S, H, d) output is copied up) or "auto" (both timed on the first calls of
    each kind, then the faster: PathChooser). graphs: replay decode steps as CUDA graphs.
    row_cache: with sparse "gpu", slots of the GPU cache of retrieved rows (kv/rowcache.py)
    per selected row of a (sequence, layer, KV head): a step fetches only the rows its
    selection adds (0: no cache, every selected row is fetched every step).
    fetch_chunks / chunk_rows: the rows a step fetches go up in up to fetch_chunks chunks
    of at least chunk_rows rows, the gather of one overlapping the copy of the last."""
    name = "cuda"
    host = False            # device arrays are not host numpy arrays (on a GPU)

    def __init__(self, xp=None, loader=None, decode_split_len: int | None = None,
                 max_grid_rows: int = 65535, select_block: int = 512, sparse: str = "auto",
                 graphs: bool = True, row_cache: float = 1.5, fetch_chunks: int = 4,
                 chunk_rows: int = 2048):
        if xp is None:
            import cupy
            xp = cupy
        self.xp = xp
        self.on_gpu = xp is not np
        self.loader = loader if loader is not None else _cupy_loader
        self.decode_split_len = decode_split_len
        self.max_grid_rows = max(1, min(65535, int(max_grid_rows)))
        self.select_block = int(select_block)
        if sparse not in ("auto", "gpu", "host"):
            raise ValueError(f"sparse must be 'auto', 'gpu' or 'host', got {sparse!r}")
        self.sparse = sparse
        row_cache = float(row_cache)
        if not (row_cache == 0 or 1 <= row_cache < math.inf):
            raise ValueError(f"row_cache must be 0 (off) or >= 1 slots per selected row, got {row_cache}")
        self.row_cache = row_cache if sparse != "host" else 0.0
        self.chooser = PathChooser()        # sparse="auto": the path per kind of call
        self._clock = time.perf_counter
        self.fetch_stats = {"selected": 0, "fetched": 0}    # rows over (sequence, layer, head)
        self._row_err = None                # device error word of the row-cache kernels
        if int(fetch_chunks) < 1 or int(chunk_rows) < 1:
            raise ValueError(f"fetch_chunks and chunk_rows must be >= 1, got {fetch_chunks}, {chunk_rows}")
        self.fetch_chunks, self.chunk_rows = int(fetch_chunks), int(chunk_rows)
        self._copy_stream = None            # the fetch's host-to-device copies (a GPU)
        self._mods: dict = {}
        self._fns: dict = {}
        self._rec = Recorder()
        self._graphs: dict = {}             # key -> StepGraph
        self._warm: set = set()             # keys run eagerly once (kernels compiled, tables built)
        self.graphs = bool(graphs)
        self._stage_bufs: list = [None, None]   # (pinned buffer, its copy's event) x 2
        self._stage_turn = 1
        self.profile: dict | None = None    # phase -> seconds (benchmarks): see _phase
        self._inv_freq: dict = {}
        self._ones: dict = {}
        if self.on_gpu:
            import cupy
            self._oom = cupy.cuda.memory.OutOfMemoryError
        else:
            self._oom = MemoryError

    # -- kernels and memory --------------------------------------------------------------
    def _fn(self, module: str, kernel: str):
        key = (module, kernel)
        f = self._fns.get(key)
        if f is None:
            if module not in self._mods:
                self._mods[module] = self.loader(module)
            f = self._fns[key] = _Kernel(self, f"{module}.{kernel}",
                                         self._mods[module].get_function(kernel))
        return f

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
                           f"lower the context size (-c), the number of parallel sequences "
                           f"(--parallel) or the batch size (-b), or use a smaller model")

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

    # -- buffers and weights --------------------------------------------------------
    def empty(self, shape, dtype=np.float32):
        return self._alloc(shape, dtype, f"a {np.dtype(dtype).name} buffer of shape {tuple(shape)}")

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
            from ..errors import ModelError
            raise ModelError(None, f"tensor {name}: expected a matrix, got shape {a.shape}")
        return self.matrix(name, GGML_F32, a.shape[0], a.shape[1], a)

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

    # -- the forward pass -----------------------------------------------------------
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
        blk = _block32(w.units)
        self._fn("quant_dequant", f"get_rows_{w.kind}")(
            (_ceil(w.units, blk), min(n, self.max_grid_rows)), (blk,),
            (w.raw, dev_ids, out, _i32(n), _i32(w.n_out), _i32(w.n_in), err))
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
        return (max(1, min(_ceil(n, 256), 65535 * 16)),), (256,)

    def _fill(self, a, v) -> None:
        g, b = self._ew_grid(a.size)
        if a.dtype == np.int32:
            self._fn("elementwise", "fill_i32")(g, b, (a, np.int64(a.size), _i32(v)))
        else:
            self._fn("elementwise", "fill_f32")(g, b, (a, np.int64(a.size), _f32(v)))

    def _scale_into(self, x, out, s) -> None:
        if x.size:
            g, b = self._ew_grid(x.size)
            self._fn("elementwise", "scale_f32")(g, b, (x, out, np.int64(x.size), _f32(s)))

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
                (_ceil(w.n_out, rows_per_block),), (MV_BLOCK,),
                (w.raw, x, y, _i32(w.n_out), _i32(w.n_in), _i32(n)))
        elif w.ggml_type == GGML_F32:
            y = self.xp.matmul(x, w.raw.T)
        else:
            y = self._new((n, w.n_out), np.float32, f"{w.name} output")
            step = min(OUT_SLICE_ROWS, w.n_out)
            tile = self._new((step, w.n_in), np.float32, f"a dequantized tile of {w.name}")
            blk = _block32(w.units)
            fn = self._fn("quant_dequant", f"dequant_{w.kind}_f32")
            for r0 in range(0, w.n_out, step):
                r1 = min(w.n_out, r0 + step)
                t = tile[:r1 - r0]
                fn((_ceil(w.units, blk), min(r1 - r0, self.max_grid_rows)), (blk,),
                   (w.raw, t, _i32(w.n_in), _i32(r0), _i32(r1)))
                y[:, r0:r1] = self.xp.matmul(x, t.T)
        if bias is not None and y.size:
            g, b = self._ew_grid(y.size)
            self._fn("elementwise", "add_rows_f32")(
                g, b, (y, self._dev(bias, np.float32), np.int64(n), _i32(w.n_out)))
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
            self._fn("rmsnorm", "rmsnorm_f32")((rows,), (_block32(d),),
                                               (x, w, out, _i32(d), _f32(eps)))
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
            (N,), (_block32(h * half, 128),),
            (out, self._h2d(pos, np.int32), self._rope_table(rope), _i32(h),
             _i32(d), _i32(h * d), _i32(rope.rot), _i32(0 if rope.pairing == "adjacent" else 1)))
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
            self._fn("act", kern)((min(_ceil(total, 256), 65535 * 16),), (256,),
                                  (gate, up, gate, _i32(n_rows), _i32(n_cols), _i32(n_cols),
                                   _i32(n_cols)))
        return gate

    def softcap(self, x, cap: float):
        x = self._dev(x, np.float32)
        out = self._new(x.shape, np.float32, "softcap output")
        if x.size:
            self._fn("act", "softcap_f32")((min(_ceil(x.size, 256), 65535 * 16),), (256,),
                                           (x, out, np.int64(x.size), _f32(cap)))
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
        splits = _ceil(V, ARGMAX_CHUNK)
        pv = self._new((m, splits), np.float32, "argmax partials")
        pi = self._new((m, splits), np.int32, "argmax partials")
        out = self._new(m, np.int32, "argmax output")
        self._fn("argmax", "argmax_partial_f32")((splits, m), (256,),
                                                 (lg, _i32(V), _i32(ARGMAX_CHUNK), pv, pi))
        self._fn("argmax", "argmax_final")((m,), (_block32(splits),), (pv, pi, _i32(splits), out))
        h = self.to_host(out)           # (None inside a graph: graph_step returns it)
        return None if h is None else h.astype(np.int64)

    # -- the KV append of decode rows ------------------------------------------------------
    def append_rows(self, dst, rows, src) -> None:
        """src (S, G, d) float32: row s into sequence s's (G, cap, d) buffer dst[s] at row
        rows[s], every sequence in one launch (kernels/kv_write.cu) through a table of
        addresses, head strides, capacities and rows (data, so a graph replays it)."""
        src = self._dev(src, np.float32)
        S, G, d = src.shape
        kinds = {np.dtype(b.dtype) for b in dst}
        if len(kinds) != 1 or next(iter(kinds)) not in KV_TYPES:
            raise ValueError(f"append_rows: buffers of one f16/f32 type needed, got {kinds}")
        dt = kinds.pop()
        for b in dst:
            if b.shape[0] != G or b.shape[2] != d or b.strides[1] != d * dt.itemsize \
                    or b.strides[2] != dt.itemsize:
                raise ValueError(f"append_rows: buffer {b.shape} does not take rows ({G}, {d})")
        rows = np.asarray(rows, dtype=np.int64)
        caps = np.array([b.shape[1] for b in dst], np.int32)
        if (rows < 0).any() or (rows >= caps).any():
            raise ValueError(f"append_rows: rows {rows.tolist()} outside buffers of {caps.tolist()}")
        ptr, hs, cap, row = self._h2d_pack(
            np.array([self._ptr(b) for b in dst], np.uint64),
            np.array([b.strides[0] // dt.itemsize for b in dst], np.int64), caps,
            rows.astype(np.int32))
        self._fn("kv_write", f"write_rows_tab_{KV_TYPES[dt]}")(
            (S, G), (_block32(d),), (ptr, hs, cap, row, src, _i32(G), _i32(d)))

    # -- CUDA graphs of decode steps (backend/cuda_graph.py) --------------------------------
    def graph_step(self, key, run, max_keys: int, rollback=None):
        """run() (a decode step's forward pass, returning to_host(logits)) as a CUDA graph:
        eagerly the first time a key is seen (kernels compiled, constant tables made), captured
        the second, replayed after. max_keys: the longest context any sequence can reach (the
        flash-decoding grid). rollback(): undo the host bookkeeping of an aborted replay pass
        (the step then runs eagerly). Returns the host logits."""
        if not self.graphs:
            return run()
        g = self._graphs.get(key)
        if g is None:
            if key not in self._warm:
                self._warm.add(key)
                return run()
            return self._capture(key, run, max_keys)
        self._rec.begin("replay", g, max_keys)
        try:
            run()
            self._rec.end()
        except GraphMismatch:
            self._rec.mode = None
            del self._graphs[key]
            if rollback is not None:
                rollback()
            return run()
        except BaseException:
            self._rec.mode = None
            raise
        self._launch(g)
        g.replays += 1
        return self.to_host(g.output)

    def _capture(self, key, run, max_keys: int):
        g = StepGraph(key)
        self._rec.begin("capture", g, max_keys)
        try:
            if self.on_gpu:
                import cupy
                g.pool, g.stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream()
                with cupy.cuda.using_allocator(g.pool.malloc), g.stream:
                    g.stream.begin_capture()
                    try:
                        run()
                    finally:
                        g.graph = g.stream.end_capture()
            else:
                run()
        finally:
            self._rec.mode, self._rec.g = None, None
        self._graphs[key] = g
        self._launch(g)
        return self.to_host(g.output)

    def _launch(self, g: StepGraph) -> None:
        if self.on_gpu:
            g.graph.launch(g.stream)
            return
        for op in g.ops:        # the shim's graph: the recorded copies and launches, in order
            if op[0] == "copy":
                op[2][...] = op[1]
            else:
                op[1](op[2], op[3], op[4], shared_mem=op[5])

    def drop_graphs(self) -> None:
        """Forget every captured graph (their buffers go with them)."""
        self._graphs.clear()
        self._warm.clear()

    # -- attention --------------------------------------------------------------------
    def _kv_arg(self, a, what: str):
        """A cache view (G, T, d) as the kernel reads it: (array, head stride in elements)."""
        if self.on_gpu and isinstance(a, np.ndarray):   # host store rows (prefill of a
            a = self._upload(np.ascontiguousarray(a), what)   # retrieval layer): copied up
        dt = np.dtype(a.dtype)
        if dt not in KV_TYPES:
            a = self.xp.ascontiguousarray(a, dtype=np.float32)
            dt = np.dtype(np.float32)
        G, T, d = a.shape
        item = dt.itemsize
        s0, s1, s2 = a.strides
        if (s2 != item or s1 != d * item or s0 % item) and T > 0:
            a = self.xp.ascontiguousarray(a)
            s0 = a.strides[0]
        return a, s0 // item, KV_TYPES[dt]

    def attention(self, q, k, v, q_pos, k_pos0: int, window, scale: float):
        """Causal (+ sliding window) attention of one sequence's query rows over its cached
        K/V view, as CPUBackend.attention: q (n, H, d) post-RoPE; k, v (G, T, d) of positions
        k_pos0 .. k_pos0 + T - 1 (f32 or f16 each); q_pos (n,). Returns (n, H, d) float32."""
        q = self._dev(q, np.float32)
        n, H, d = q.shape
        G, T = k.shape[0], k.shape[1]
        if H % G or d > GTD_DMAX or tuple(v.shape[:2]) != (G, T) or k.shape[2] != d:
            raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape}: need H % G == 0, "
                             f"matching K/V and head_dim <= {GTD_DMAX}")
        pos = np.asarray(self.to_host(q_pos) if not isinstance(q_pos, (np.ndarray, list, tuple))
                         else q_pos, dtype=np.int64).reshape(-1)
        out = self._new((n, H, d), np.float32, "attention output")
        if n == 0:
            return out
        if len(pos) != n:
            raise ValueError(f"attention: {len(pos)} positions for {n} query rows")
        k_pos0 = int(k_pos0)
        lo = k_pos0 if window is None else max(k_pos0, int(pos.min()) - int(window) + 1)
        hi = int(pos.max()) + 1
        if hi > k_pos0 + T or k_pos0 >= hi or lo >= hi:
            raise ValueError(f"attention: no keys for positions {int(pos.min())}..{int(pos.max())} "
                             f"(cached {k_pos0}..{k_pos0 + T - 1})")
        kk, ks, kt = self._kv_arg(k, "K")
        vv, vs, vt = self._kv_arg(v, "V")
        suffix = f"k{kt}_v{vt}"
        win = 0 if window is None else int(window)
        if n == 1:
            return self._decode(q, [(kk, ks, vv, vs, lo - k_pos0, hi - k_pos0)], suffix,
                                scale).reshape(1, H, d)
        smem = self._prefill_smem(d, kk.dtype.itemsize, vv.dtype.itemsize)
        fn = self._fn("attention_gtd", f"attn_gtd_prefill_{suffix}")
        if smem > DEFAULT_DYN_SMEM and getattr(fn, "max_dynamic_shared_size_bytes", 0) < smem:
            fn.max_dynamic_shared_size_bytes = smem
        fn((_ceil(n, GTD_PF_ROWS), H), (128,),
           (q, kk, vv, self._h2d(pos, np.int32), out, _i32(n), _i32(H), _i32(G),
            _i32(d), np.int64(ks), np.int64(vs), _i32(T), _i32(k_pos0), _i32(win), _f32(scale)),
           shared_mem=smem)
        return out

    def decode_attention(self, q, bufs, positions, window, scale: float):
        """One decode query per sequence over its cached rows, read in place (as
        CPUBackend.decode_attention): q (S, G, g, d) post-RoPE; bufs per sequence
        (K, V (G, cap, d), pos0, n); positions (S,). -> (S, G, g, d) float32.
        One flash-decoding launch (+ combine) for every sequence: a device table of each
        sequence's K/V buffer address and head stride."""
        q = self._dev(q, np.float32)
        S, G, g, d = q.shape
        pos = np.asarray(self.to_host(positions) if not isinstance(positions, (np.ndarray, list, tuple))
                         else positions, dtype=np.int64).reshape(-1)
        if len(pos) != S or len(bufs) != S:
            raise ValueError(f"decode_attention: {S} queries, {len(pos)} positions, {len(bufs)} buffers")
        entries, suffix = [], None
        for (K, V, pos0, n), p in zip(bufs, pos):
            p, pos0, n = int(p), int(pos0), int(n)
            lo = pos0 if window is None else max(pos0, p - int(window) + 1)
            if not pos0 <= lo <= p < pos0 + n:
                raise ValueError(f"attention: no keys for position {p} (cached {pos0}..{pos0 + n - 1})")
            kk, ks, kt = self._kv_arg(K[:, :n], "K")
            vv, vs, vt = self._kv_arg(V[:, :n], "V")
            if suffix not in (None, f"k{kt}_v{vt}"):
                raise ValueError("decode_attention: every sequence's cache must have one K/V type")
            suffix = f"k{kt}_v{vt}"
            entries.append((kk, ks, vv, vs, lo - pos0, p + 1 - pos0))
        if not entries:
            return self._new((0, G, g, d), np.float32, "attention output")
        return self._decode(q.reshape(S, G * g, d), entries, suffix, scale).reshape(S, G, g, d)

    def _ptr(self, a) -> int:
        return int(a.data.ptr) if self.on_gpu else int(a.ctypes.data)

    def _decode(self, q, entries, suffix: str, scale: float):
        """Flash decoding of one query row per sequence: q (S, H, d) contiguous; entries per
        sequence (K view, K head stride, V view, V head stride, j_lo, j_hi): the visible keys
        [j_lo, j_hi) of the view. -> (S, H, d) float32."""
        table = np.array([[self._ptr(e[0]), self._ptr(e[2])] for e in entries], dtype=np.uint64)
        strides = np.array([[e[1], e[3]] for e in entries], dtype=np.int64)
        spans = np.array([[e[4], e[5]] for e in entries], dtype=np.int32)
        out = self._decode_table(q, table, strides, spans, entries[0][0].shape[0], suffix, scale)
        # the views behind the pointer table must outlive the launches (numpy: synchronous;
        # cupy: the stream orders the frees after the kernels)
        del entries
        return out

    def _decode_table(self, q, table, strides, spans, G: int, suffix: str, scale: float,
                      rows=None):
        """The flash-decoding launch (+ combine) for one query row per sequence: q (S, H, d);
        per sequence its K and V device addresses table (S, 2) uint64, head strides (S, 2)
        int64 (elements) and visible keys spans (S, 2) int32 [j_lo, j_hi) of G KV heads.
        rows: (list (S, W) int32, n_rows (S,) int32): key j is row list[s, j] of the view
        (attn_gtd_decode_idx: the row cache's slots)."""
        S, H, d = q.shape
        nk = int((spans[:, 1] - spans[:, 0]).max())
        if self._rec.mode is not None:
            # a graph's grid cannot follow the context: splits cover the longest possible one
            # (the splits past a sequence's keys write empty partials)
            nk = max(nk, self._rec.max_keys)
        if nk <= 0:        # nothing visible anywhere (empty selections): zeros, as on the CPU
            out = self._new((S, H, d), np.float32, "attention output")
            self._fill(out, 0)
            return out
        split = int(self.decode_split_len or max(64, _ceil(nk, 128)))
        n_splits = _ceil(nk, split)
        # per-sequence device pointers, strides and spans (one upload): one launch for all
        k_ptr, v_ptr, k_hs, v_hs, j_lo, j_hi = self._h2d_pack(
            np.ascontiguousarray(table[:, 0], np.uint64), np.ascontiguousarray(table[:, 1], np.uint64),
            np.ascontiguousarray(strides[:, 0], np.int64), np.ascontiguousarray(strides[:, 1], np.int64),
            np.ascontiguousarray(spans[:, 0], np.int32), np.ascontiguousarray(spans[:, 1], np.int32))
        pm = self._new((S, H, n_splits), np.float32, "attention partials")
        pl = self._new((S, H, n_splits), np.float32, "attention partials")
        po = self._new((S, H, n_splits, d), np.float32, "attention partials")
        out = self._new((S, H, d), np.float32, "attention output")
        args = (q, k_ptr, v_ptr, k_hs, v_hs, j_lo, j_hi, pm, pl, po, _i32(H), _i32(G), _i32(d),
                _i32(split), _f32(scale))
        name = f"attn_gtd_decode_{suffix}"
        if rows is not None:
            lst, n_rows = rows
            if lst.shape[0] != S or lst.shape[1] < int(spans[:, 1].max()):
                raise ValueError(f"decode attention: row lists {lst.shape} for {S} sequences "
                                 f"of up to {int(spans[:, 1].max())} keys")
            lst_d, n_d = self._h2d_pack(np.ascontiguousarray(lst, np.int32),
                                        np.ascontiguousarray(n_rows, np.int32))
            args += (lst_d, np.int64(lst.shape[1]), n_d, self._row_err_word())
            name = f"attn_gtd_decode_idx_{suffix}"
        self._fn("attention_gtd", name)((n_splits, H, S), (128,), args)
        self._fn("attention_gtd", "attn_gtd_combine")(
            (H, S), (_block32(d),), (pm, pl, po, out, _i32(d), _i32(n_splits)))
        return out

    @staticmethod
    def _prefill_smem(d: int, k_item: int, v_item: int) -> int:
        """Dynamic shared memory of attn_gtd_prefill_* (see attention_gtd.cu)."""
        kbytes = GTD_PF_KEYS * (d + 1) * k_item
        kbytes = (kbytes + 3) & ~3
        total = 4 * GTD_PF_ROWS * d + kbytes + GTD_PF_KEYS * d * v_item
        return (total + 15) & ~15

    # -- retrieval: the full KV in the host store, selection state in GPU memory -------------
    def zeros(self, shape, dtype):
        a = self._alloc(shape, dtype, f"a {np.dtype(dtype).name} buffer of shape {tuple(shape)}")
        a[...] = 0
        return a

    def asarray(self, a):
        return self._upload(np.ascontiguousarray(a), "a table")

    def group_matmul(self, q, W):
        """q (S, G, g, d) x W (G, d, e) -> (S, G, g, e) (cuBLAS batched on the GPU)."""
        return self.xp.matmul(self._dev(q, np.float32), W[None])

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

    def sparse_attention(self, q, keys, values, idx, lens, scale: float, cached=None):
        """Decode queries over their selected rows of the host store (as CPUBackend's):
        q (S, G, g, d) post-RoPE; keys/values per sequence (G, cap, d) store arrays; idx
        (S, G, Kmax), lens (S, G). The native library gathers the selected rows into a
        (pinned) staging buffer on several threads, one copy takes them to the GPU, and
        the flash-decoding kernel attends each (sequence, KV head)'s rows as one short
        sequence. cached: a RowCache per sequence (kv/rowcache.py): only the rows they do
        not hold are gathered and copied, and attention reads the cache. -> (S, G, g, d)
        float32."""
        idx = np.ascontiguousarray(self._host(idx), dtype=np.int64)
        lens = np.ascontiguousarray(self._host(lens), dtype=np.int32)
        from .. import native
        path, key, timed = self.sparse, None, False
        if path == "auto":
            key = self.chooser.key(idx.shape[0], lens)
            path, timed = self.chooser.next(key)
        t0 = self._clock()
        self.fetch_stats["selected"] += int(lens.sum())
        if path == "host":          # only queries down and outputs up cross the bus
            with self._phase("attention"):
                out = native.sparse_attention(np.ascontiguousarray(self._host(q), dtype=np.float32),
                                              keys, values, idx, lens, scale)
                out = self._upload(out, "attention output")
        else:
            dt = np.dtype(keys[0].dtype)
            if dt not in KV_TYPES:
                raise ValueError(f"sparse_attention: store rows of type {dt}; expected f16 or f32")
            q = self._dev(q, np.float32)
            if cached is not None and self.row_cache:
                out = self._sparse_cached(q, keys, values, idx, lens, cached, dt, scale)
            else:
                out = self._sparse_gathered(q, keys, values, idx, lens, dt, scale)
        if timed:
            self._sync()
            self.chooser.record(key, path, self._clock() - t0)
        return out

    def _sparse_gathered(self, q, keys, values, idx, lens, dt, scale: float):
        """sparse_attention without a row cache: every selected row fetched, attended from
        the gathered copy. q (S, G, g, d) on the device."""
        S, G, g, d = q.shape
        kmax = idx.shape[2]
        kd, vd = self._fetch(keys, values, idx, lens, d, dt)
        rows = np.arange(S * G, dtype=np.uint64) * np.uint64(kmax * d * dt.itemsize)
        out = self._attend_entries(q, np.uint64(self._ptr(kd)) + rows,
                                   np.uint64(self._ptr(vd)) + rows, lens, dt, scale)
        del kd, vd          # (stream-ordered frees, after the kernels)
        return out

    def _attend_entries(self, q, k_tab, v_tab, lens, dt, scale: float, rows=None):
        """Flash decoding with every (sequence, KV head) as one "sequence" of one KV head:
        q (S, G, g, d); k_tab / v_tab (S*G,) device addresses of each entry's K / V rows,
        lens (S, G) rows each; rows: (slot lists, slots per entry) to read them through
        (the row cache). -> (S, G, g, d) float32."""
        S, G, g, d = q.shape
        table = np.stack([k_tab, v_tab], 1)
        strides = np.zeros((S * G, 2), dtype=np.int64)      # one KV head per entry
        spans = np.stack([np.zeros(S * G, np.int32), lens.reshape(-1)], 1)
        with self._phase("attention"):
            out = self._decode_table(q.reshape(S * G, g, d), table, strides, spans, 1,
                                     f"k{KV_TYPES[dt]}_v{KV_TYPES[dt]}", scale, rows=rows)
        return out.reshape(S, G, g, d)

    def _fetch(self, keys, values, idx, lens, d: int, dt):
        """Rows idx[s, k, :lens[s, k]] of the host store -> device (S, G, Kmax, d) K and V of
        the store's dtype. In chunks of (sequence, KV head) entries: the native library
        gathers a chunk into pinned staging while the copy stream takes the previous chunk
        up (two staging buffers in turn)."""
        from .. import native
        S, G, kmax = idx.shape
        flat = lens.reshape(-1)
        self.fetch_stats["fetched"] += int(flat.sum())
        kd = self._new((S, G, kmax, d), dt, "gathered keys")
        vd = self._new((S, G, kmax, d), dt, "gathered values")
        for e0, e1 in fetch_chunks(flat, self.fetch_chunks, self.chunk_rows):
            part = np.zeros_like(flat)
            part[e0:e1] = flat[e0:e1]
            slot, st = self._staging((2, S * G, kmax, d), dt)
            with self._phase("gather"):
                native.gather_sel(keys, values, idx, part.reshape(S, G),
                                  st[0].reshape(S, G, kmax, d), st[1].reshape(S, G, kmax, d))
            with self._phase("h2d"):
                self._copy_up(slot, st, (kd, vd), e0, e1)
        return kd, vd

    def _sparse_cached(self, q, keys, values, idx, lens, caches, dt, scale: float):
        """sparse_attention through the row caches: plan (hits keep their slots, misses
        take free ones), fetch the misses, write them into their slots (put_rows), then
        flash decoding over each (sequence, KV head)'s slot list in selection order (the
        same sums as over a gathered copy). q (S, G, g, d) on the device."""
        from .. import native
        S, G, g, d = q.shape
        if len(caches) != S or len({id(c) for c in caches}) != S:
            raise ValueError(f"sparse_attention: {len(caches)} row caches for {S} sequences "
                             "(one per sequence, each once)")
        self._check_row_err()
        with self._phase("plan"):
            for s, c in enumerate(caches):
                if c.dtype != dt or c.G != G or c.d != d:
                    raise ValueError(f"sparse_attention: row cache {s} holds ({c.G}, {c.d}) "
                                     f"{c.dtype} rows, the store ({G}, {d}) {dt}")
                c.reserve(int(lens[s].max(initial=0)), self.row_cache, keys[s].shape[1])
            slots, miss_idx, miss_slot, miss_n = native.rowcache_plan(
                idx, lens, *[list(m) for m in zip(*(c.maps() for c in caches))])
        item = dt.itemsize
        heads = np.array([[c.n_slots * d * item * k for k in range(G)] for c in caches], np.uint64)
        k_tab = (np.array([self._ptr(c.k) for c in caches], np.uint64)[:, None] + heads).reshape(-1)
        v_tab = (np.array([self._ptr(c.v) for c in caches], np.uint64)[:, None] + heads).reshape(-1)
        caps = np.repeat(np.array([c.n_slots for c in caches], np.int32), G)
        m = int(miss_n.max(initial=0))
        if m:
            kd, vd = self._fetch(keys, values, np.ascontiguousarray(miss_idx[:, :, :m]), miss_n, d, dt)
            with self._phase("h2d"):
                kt, vt, cap_d, slot_d, n_d = self._h2d_pack(
                    k_tab, v_tab, caps, np.ascontiguousarray(miss_slot[:, :, :m]).reshape(-1),
                    miss_n.reshape(-1))
                self._fn("kv_write", f"put_rows_{KV_TYPES[dt]}")(
                    (S * G, _ceil(m, PUT_ROWS)), (128,),
                    (kd, vd, kt, vt, cap_d, slot_d, n_d, _i32(m), _i32(d), self._row_err_word()))
            del kd, vd
        out = self._attend_entries(q, k_tab, v_tab, lens, dt, scale,
                                   rows=(slots.reshape(S * G, -1), caps))
        del caches          # (the buffers behind the tables outlive the kernels: stream order)
        return out

    def _row_err_word(self):
        if self._row_err is None:
            self._row_err = self.xp.zeros(1, dtype=np.int32)
        return self._row_err

    def _check_row_err(self) -> None:
        """Raise if a row-cache kernel met an index it had to skip (a bookkeeping bug: the
        plan is checked on the host); read when the stream is idle anyway (after a select)."""
        if self._row_err is not None:
            e = int(self.to_host(self._row_err)[0])
            if e:
                self._row_err[...] = 0
                raise RuntimeError(f"row cache: kernel error flags {e} (1: attention slot, "
                                   "2: fill slot or count out of range)")

    # a2ats / vq: codes, LUTs and the top-K select in GPU memory (kernels/lut.cu,
    # vq_assign.cu, select_topk.cu)
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
            (_ceil(C, LUT_BLOCK), M, S * G), (LUT_BLOCK,),
            (q, self._dev(centroids, np.float32), lut, _i32(G), _i32(g), _i32(C), _i32(ds)))

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
        if use_smem and smem > DEFAULT_DYN_SMEM and getattr(fn, "max_dynamic_shared_size_bytes", 0) < smem:
            fn.max_dynamic_shared_size_bytes = smem
        fn((G, S), (self.select_block,),
           (self._dev(lut, np.float32), self._dev(ptrs, np.uint64), self._dev(strides, np.int64),
            self._dev(T.astype(np.int32), np.int32), _i32(g), _i32(M), _i32(C), _i32(sinks),
            _i32(window), _i32(k), _i32(cap), _i32(cap), _i32(int(use_smem)), keys, flags, idx,
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
            return np.asarray(self._host(q), dtype=np.float32) @ np.asarray(self._host(k), dtype=np.float32).T

    def lut_lookup(self, lut, codes):
        return cpu.lut_lookup(self._host(lut), self._host(codes))

    def quest_bounds(self, q, kmin, kmax):
        return cpu.quest_bounds(self._host(q), self._host(kmin), self._host(kmax))

    def topk_union(self, scores, k: int):
        return cpu.topk_union(self._host(scores), k)

    def gather(self, rows, idx):
        from .. import native
        return native.gather_rows(rows, idx)


__all__ = ["CUDABackend", "CudaMatrix", "KERNEL_TYPES"]
