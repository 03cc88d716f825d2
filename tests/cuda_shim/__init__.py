"""CPU execution shim for the project's CUDA kernels (see shim.py and cuda_shim.h)."""
from functools import cache

from .shim import ShimKernel, ShimModule, build, parse_kernels, sanitizer


@cache
def shim_module(name: str) -> ShimModule:
    """kernels/NAME.cu built once for the shim (sanitizer from $A2ATS_SHIM_SAN)."""
    return ShimModule(name)


@cache
def gpu_module(name: str):
    """kernels/NAME.cu through cupy.RawModule, with the shim's call shape (a GPU)."""
    from .gpu import GpuModule
    return GpuModule(name)


__all__ = ["ShimKernel", "ShimModule", "build", "gpu_module", "parse_kernels", "sanitizer",
           "shim_module"]
