"""llama.cpp's own weight product, driven through ctypes: the reference of bench_matmul.py.

The ggml libraries that llama-cpp-python ships (site-packages/llama_cpp/lib) are loaded and a
graph of `reps` MUL_MAT nodes (the same weight and input, computed one after the other with a
barrier between nodes, as in a model's graph) runs on the CPU backend with n threads. The
weight lives where llama.cpp would put it: in the CPU_REPACK buffer for the types ggml
repacks on this CPU (Q4_0 / Q4_K / IQ4_NL rows in groups of 8 with AVX2; the interleaved
layouts and kernels of ggml-cpu/repack.cpp), else in a plain CPU buffer (the vec_dot kernels,
llamafile's sgemm for prompt-sized inputs when built in). The input is float32; ggml
quantizes it to the weight type's vec_dot_type inside every node, as in a model.
"""
from __future__ import annotations

import ctypes as C
import glob
import os

import numpy as np

GGML_TYPE_IQ4_NL = 20
REPACKED_ON_AVX2 = {2, 12, GGML_TYPE_IQ4_NL}     # ggml_repack_get_optimal_repack_type, x86


class _InitParams(C.Structure):
    _fields_ = [("mem_size", C.c_size_t), ("mem_buffer", C.c_void_p), ("no_alloc", C.c_bool)]


def _lib_dir() -> str:
    import llama_cpp  # noqa: F401  (only to find its package directory)
    return os.path.join(os.path.dirname(llama_cpp.__file__), "lib")


class GGML:
    """The few ggml entry points a MUL_MAT graph needs."""

    def __init__(self):
        d = _lib_dir()
        base = C.CDLL(glob.glob(os.path.join(d, "libggml-base.so*"))[0], mode=C.RTLD_GLOBAL)
        cpu = C.CDLL(glob.glob(os.path.join(d, "libggml-cpu.so*"))[0], mode=C.RTLD_GLOBAL)
        P, I64, SZ = C.c_void_p, C.c_int64, C.c_size_t
        sig = {
            (base, "ggml_init"): (P, [_InitParams]), (base, "ggml_free"): (None, [P]),
            (base, "ggml_new_tensor_2d"): (P, [P, C.c_int, I64, I64]),
            (base, "ggml_mul_mat"): (P, [P, P, P]), (base, "ggml_new_graph_custom"): (P, [P, SZ, C.c_bool]),
            (base, "ggml_build_forward_expand"): (None, [P, P]), (base, "ggml_nbytes"): (SZ, [P]),
            (base, "ggml_tensor_overhead"): (SZ, []), (base, "ggml_graph_overhead_custom"): (SZ, [SZ, C.c_bool]),
            (base, "ggml_backend_cpu_buffer_type"): (P, []),
            (base, "ggml_backend_alloc_ctx_tensors_from_buft"): (P, [P, P]),
            (base, "ggml_backend_buffer_free"): (None, [P]),
            (base, "ggml_backend_tensor_set"): (None, [P, P, SZ, SZ]),
            (base, "ggml_backend_tensor_get"): (None, [P, P, SZ, SZ]),
            (base, "ggml_backend_graph_compute"): (C.c_int, [P, P]), (base, "ggml_backend_free"): (None, [P]),
            (base, "ggml_backend_reg_dev_get"): (P, [P, SZ]),
            (base, "ggml_backend_reg_get_proc_address"): (P, [P, C.c_char_p]),
            (base, "ggml_backend_buft_name"): (C.c_char_p, [P]),
            (cpu, "ggml_backend_cpu_init"): (P, []), (cpu, "ggml_backend_cpu_set_n_threads"): (None, [P, C.c_int]),
            (cpu, "ggml_backend_cpu_reg"): (P, []), (cpu, "ggml_cpu_has_avx2"): (C.c_int, []),
            (base, "ggml_log_set"): (None, [P, P]),
        }
        for (lib, name), (res, args) in sig.items():
            f = getattr(lib, name)
            f.restype, f.argtypes = res, args
            setattr(self, name[5:], f)      # ggml_mul_mat -> self.mul_mat
        # ggml logs every repacked tensor to stderr: a no-op logger (kept alive with self)
        self._quiet = C.CFUNCTYPE(None, C.c_int, C.c_char_p, C.c_void_p)(lambda level, text, user: None)
        self.log_set(C.cast(self._quiet, C.c_void_p), None)
        self.repack_buft = self._repack_buft()

    def _repack_buft(self):
        reg = self.backend_cpu_reg()
        addr = self.backend_reg_get_proc_address(reg, b"ggml_backend_dev_get_extra_bufts")
        if not addr:
            return None
        bufts = C.CFUNCTYPE(C.POINTER(C.c_void_p), C.c_void_p)(addr)(self.backend_reg_dev_get(reg, 0))
        i = 0
        while bufts and bufts[i]:
            if self.backend_buft_name(bufts[i]) == b"CPU_REPACK":
                return bufts[i]
            i += 1
        return None


class MulMat:
    """y (n_vec, n_out) = x (n_vec, n_in) @ W.T by ggml, W (n_out, n_in) raw GGUF blocks of
    ggml_type; run() computes it `reps` times (one graph), result() gives the last y."""

    def __init__(self, g: GGML, ggml_type: int, n_out: int, n_in: int, raw: np.ndarray, x: np.ndarray,
                 threads: int, reps: int = 1):
        self.g, self.reps, self.n_out, self.n_vec = g, reps, n_out, x.shape[0]
        repack = (g.repack_buft is not None and ggml_type in REPACKED_ON_AVX2 and n_out % 8 == 0
                  and g.cpu_has_avx2())
        self.repacked = repack
        over = g.tensor_overhead()
        self.ctx_w = g.init(_InitParams(over * 2 + 1024, None, True))
        self.ctx = g.init(_InitParams(over * (reps + 4) + g.graph_overhead_custom(reps + 8, False) + 4096,
                                      None, True))
        self.w = g.new_tensor_2d(self.ctx_w, ggml_type, n_in, n_out)
        self.x = g.new_tensor_2d(self.ctx, 0, n_in, self.n_vec)
        self.ys = [g.mul_mat(self.ctx, self.w, self.x) for _ in range(reps)]
        self.graph = g.new_graph_custom(self.ctx, reps + 8, False)
        for y in self.ys:
            g.build_forward_expand(self.graph, y)
        self.buf_w = g.backend_alloc_ctx_tensors_from_buft(
            self.ctx_w, g.repack_buft if repack else g.backend_cpu_buffer_type())
        self.buf = g.backend_alloc_ctx_tensors_from_buft(self.ctx, g.backend_cpu_buffer_type())
        raw = np.ascontiguousarray(raw).view(np.uint8)
        assert raw.nbytes == g.nbytes(self.w), (raw.nbytes, g.nbytes(self.w))
        g.backend_tensor_set(self.w, raw.ctypes.data, 0, raw.nbytes)       # repacks, when repacked
        xs = np.ascontiguousarray(x, dtype=np.float32)
        g.backend_tensor_set(self.x, xs.ctypes.data, 0, xs.nbytes)
        self.backend = g.backend_cpu_init()
        g.backend_cpu_set_n_threads(self.backend, int(threads))

    def run(self) -> None:
        if self.g.backend_graph_compute(self.backend, self.graph) != 0:
            raise RuntimeError("ggml graph compute failed")

    def result(self) -> np.ndarray:
        y = np.empty((self.n_vec, self.n_out), dtype=np.float32)
        self.g.backend_tensor_get(self.ys[-1], y.ctypes.data, 0, y.nbytes)
        return y

    def close(self) -> None:
        g = self.g
        g.backend_free(self.backend)
        g.backend_buffer_free(self.buf)
        g.backend_buffer_free(self.buf_w)
        g.free(self.ctx)
        g.free(self.ctx_w)
