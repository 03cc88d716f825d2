"""Backends: where the forward pass's arithmetic and buffers live.

    get_backend("cpu")   numpy + the native C library (backend/cpu.py)
    get_backend("cuda")  CuPy + RawKernels (backend/cuda/), imported only when asked for

Both implement the protocol of backend/base.py and declare their capabilities in `caps`.
"""
from __future__ import annotations

from ..errors import DeviceError
from .base import Backend


def get_backend(device: str = "cpu", **options) -> Backend:
    """options: the backend's constructor arguments (e.g. cuda: sparse="host")."""
    if device == "cpu":
        from .cpu import CPUBackend
        return CPUBackend(**options)
    if device == "cuda":
        check_cuda()
        from .cuda import CUDABackend
        return CUDABackend(**options)
    raise DeviceError(f"unknown device {device!r}; choose cpu or cuda")


def check_cuda() -> None:
    """Fail with one clear line unless CuPy and a CUDA GPU are usable (never a silent
    CPU fallback)."""
    try:
        import cupy
    except ImportError:
        raise DeviceError("device 'cuda' needs CuPy: pip install 'a2ats-lite[cuda12]' "
                          "(or [cuda13]) on a machine with an NVIDIA GPU") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # driver missing, no device, ...
        raise DeviceError(f"device 'cuda': no usable CUDA GPU ({type(e).__name__}: {e})") from None
    if n == 0:
        raise DeviceError("device 'cuda': no CUDA GPU found")
    try:
        from .cuda import CUDABackend  # noqa: F401
    except ImportError as e:
        raise DeviceError(f"device 'cuda': the CUDA backend cannot be imported ({e}); "
                          "use the CPU") from None
