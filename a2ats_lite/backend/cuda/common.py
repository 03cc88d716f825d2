"""What every part of the CUDA backend launches kernels with: kernel scalars, grid
arithmetic, the KV cache dtypes the kernels read, and the default kernel loader.

Kernel scalars are numpy.int32 / numpy.int64 / numpy.float32: a Python int would be passed
as long long, a float as double.
"""
from __future__ import annotations

import numpy as np

from .. import nvrtc

# K / V dtypes the attention and KV-write kernels read -> the suffix of their entry points
KV_TYPES = {np.dtype(np.float32): "f32", np.dtype(np.float16): "f16"}
DEFAULT_DYN_SMEM = 48 * 1024        # dynamic shared memory a launch gets without opting in


def i32(v) -> np.int32:
    return np.int32(v)


def f32(v) -> np.float32:
    return np.float32(v)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def block32(n: int, cap: int = 256) -> int:
    """Threads for a loop over n items: a multiple of 32, at most cap."""
    return max(32, min(cap, cdiv(max(1, n), 32) * 32))


def allow_smem(fn, smem: int) -> None:
    """Let kernel fn (a graphs.Kernel) take smem bytes of dynamic shared memory (beyond the
    default, a kernel must opt in)."""
    if smem > DEFAULT_DYN_SMEM and fn.max_dynamic_shared_size_bytes < smem:
        fn.max_dynamic_shared_size_bytes = smem


def cupy_loader(name: str):
    """The default loader: kernels/NAME.cu (with common.cuh) compiled by cupy.RawModule."""
    import cupy
    return cupy.RawModule(code=nvrtc.load_source(name))
