"""CPU execution shim for the project's CUDA kernels (see shim.py and cuda_shim.h)."""
from .shim import ShimKernel, ShimModule, build, parse_kernels, sanitizer

__all__ = ["ShimKernel", "ShimModule", "build", "parse_kernels", "sanitizer"]
