"""The CUDA backend: CuPy arrays + the project's RawKernels (backend/kernels/*.cu), one GPU.

    B = CUDABackend()                                # cupy + cupy.RawModule(code=load_source(name))
    B = CUDABackend(xp=numpy, loader=ShimModule)     # tests: the same .cu text on the CPU shim

Everything here goes through two injected objects: ``xp`` (the array module: cupy, or numpy
in shim mode) and ``loader(name)`` (a module with ``get_function(kernel)`` returning a callable
of CuPy's RawKernel shape ``k(grid, block, args, shared_mem=0)``). The shim runs the unmodified
kernel sources on the CPU with numpy arrays as device pointers, so the code paths of this
package (grids, argument types, strides, buffer layouts) are exercised without a GPU.

Every KV policy runs here. The dense policy's KV cache lives in GPU buffers, attended in
place (attention.py), and its decode steps replay as CUDA graphs (graphs.py). A retrieval
policy keeps the full KV in the host store and its selection state (codes, lookup tables)
in GPU memory (selection.py); its decode rows attend the selected rows on the host or on the
GPU through the row caches, as sparse.py chooses.

Files: backend.py (CUDABackend, composed of one part per file), memory.py, dense.py,
attention.py, sparse.py (with rowcache.py), selection.py, graphs.py, common.py.

Not here yet: bf16, tuning (block sizes and split lengths are reasoned defaults, never timed).
"""
from .backend import CUDABackend
from .dense import KERNEL_TYPES, CudaMatrix

__all__ = ["CUDABackend", "CudaMatrix", "KERNEL_TYPES"]
