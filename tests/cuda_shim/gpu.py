"""The same call shape as ShimModule, on a real GPU through cupy.RawModule (pytest -m gpu).

    mod = GpuModule("rmsnorm")             # cupy.RawModule(code=load_source("rmsnorm"))
    mod.get_function("rmsnorm_f32")(grid, block, (x, w, out, np.int32(n), np.float32(eps)))

Arguments are numpy arrays as for the shim: each array's whole base buffer is copied to the
device, the kernel gets the device pointer at the same byte offset (so views such as the up
half of a fused [gate | up] buffer keep their strides), and after the launch every buffer is
copied back into the numpy arrays. Tests written for the shim thus run unchanged on a GPU.
"""
from __future__ import annotations

import numpy as np


def _owner(a: np.ndarray) -> np.ndarray:
    b = a
    while isinstance(b.base, np.ndarray):
        b = b.base
    return b


class GpuKernel:
    def __init__(self, raw, name: str):
        self.raw, self.name = raw, name

    def __call__(self, grid, block, args, shared_mem: int = 0) -> None:
        import cupy as cp
        grid = (grid,) if isinstance(grid, int) else tuple(grid)
        block = (block,) if isinstance(block, int) else tuple(block)
        bufs: dict[int, tuple[np.ndarray, object]] = {}
        dev_args = []
        for a in args:
            if isinstance(a, np.ndarray):
                o = _owner(a)
                if not o.flags.c_contiguous:
                    raise ValueError(f"{self.name}: the owner of an argument array is not contiguous")
                key = id(o)
                if key not in bufs:
                    bufs[key] = (o, cp.asarray(o.reshape(-1).view(np.uint8)))
                off = a.__array_interface__["data"][0] - o.__array_interface__["data"][0]
                dev_args.append(bufs[key][1][off:])
            else:
                dev_args.append(a)
        if shared_mem > 48 * 1024:
            self.raw.max_dynamic_shared_size_bytes = int(shared_mem)
        self.raw(grid, block, tuple(dev_args), shared_mem=int(shared_mem))
        cp.cuda.Device().synchronize()
        for o, d in bufs.values():
            o.reshape(-1).view(np.uint8)[...] = d.get()


class GpuModule:
    """cupy.RawModule over a kernel name (kernels/common.cuh + NAME.cu) or a full text."""

    def __init__(self, source: str):
        import cupy as cp
        from a2ats_lite.backend import nvrtc
        if "\n" not in source:
            source = nvrtc.load_source(source)
        self.text = source
        self.module = cp.RawModule(code=source)      # CuPy adds -ftz=true and -arch itself

    def get_function(self, name: str) -> GpuKernel:
        return GpuKernel(self.module.get_function(name), name)
