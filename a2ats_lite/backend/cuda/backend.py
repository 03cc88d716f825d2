"""CUDABackend: the backend protocol (backend/base.py) on one GPU, every KV policy, made of
one part per role (each file of this package):

    memory.DeviceMemory    allocation, host inputs up, results down, pinned staging
    dense.DenseOps         weights (CudaMatrix), products, norms, RoPE, activations, argmax
    attention.Attention    dense prefill / decode attention, the KV append
    sparse.Sparse          retrieval attention over selected host-store rows, the row caches
    selection.Selection    VQ codes, lookup tables, top-K, host scoring
    graphs.Graphs          kernel loading and launches, CUDA graphs of decode steps
"""
from __future__ import annotations

from ..base import Caps
from .attention import Attention
from .common import cupy_loader
from .dense import KERNEL_TYPES, DenseOps
from .graphs import Graphs
from .memory import DeviceMemory
from .selection import Selection
from .sparse import Sparse


class CUDABackend(DeviceMemory, DenseOps, Attention, Sparse, Selection, Graphs):
    """The backend protocol on one GPU (or, with xp=numpy, on the CPU shim).

    xp: array module (default cupy); loader: kernel source name -> module (default
    cupy.RawModule(code=nvrtc.load_source(name))). decode_split_len: keys per flash-decoding
    split (None: max(64, ceil(keys / 128))). max_grid_rows: cap of the row dimension of the
    dequant / get_rows grids (the kernels grid-stride over rows; the shim tests lower it).
    select_block: threads of the top-K select's blocks (one block per sequence and KV head).
    sparse: where a retrieval layer's decode attention runs: "gpu" (selected rows gathered
    to staging and copied up), "host" (the native kernel attends them in host memory and
    only the (S, H, d) output is copied up) or "auto" (both timed on the first calls of
    each kind, then the faster: PathChooser). graphs: replay decode steps as CUDA graphs.
    row_cache: with sparse "gpu", slots of the GPU cache of retrieved rows (rowcache.py)
    per selected row of a (sequence, layer, KV head): a step fetches only the rows its
    selection adds (0: no cache, every selected row is fetched every step).
    fetch_chunks / chunk_rows: the rows a step fetches go up in up to fetch_chunks chunks
    of at least chunk_rows rows, the gather of one overlapping the copy of the last."""
    name = "cuda"

    def __init__(self, xp=None, loader=None, decode_split_len: int | None = None,
                 max_grid_rows: int = 65535, select_block: int = 512, sparse: str = "auto",
                 graphs: bool = True, row_cache: float = 1.5, fetch_chunks: int = 4,
                 chunk_rows: int = 2048):
        self._init_memory(xp)
        self._init_graphs(loader if loader is not None else cupy_loader, graphs)
        self._init_dense(max_grid_rows)
        self._init_attention(decode_split_len)
        self._init_sparse(sparse, row_cache, fetch_chunks, chunk_rows)
        self._init_selection(select_block)
        # host_memory False: device arrays are not host numpy arrays on a GPU (the shim's
        # numpy arrays stand for device arrays)
        self.caps = Caps(host_memory=False, graphs=self.graphs, row_cache=self.row_cache,
                         tensor_types=frozenset(KERNEL_TYPES), f32_cache=False)

    @property
    def host(self) -> bool:
        return self.caps.host_memory


__all__ = ["CUDABackend"]
