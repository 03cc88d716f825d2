"""cffi (API mode) build of a2ats_lite._native from the C sources beside this file.

Run by the package build (setup.py: cffi_modules). A missing compiler or a
failed compile stops the installation with a readable message: there is no
pure-Python fallback, because it would be ~100x slower.
"""
import os
import shutil
import sysconfig

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["quants.c", "quants_avx2.c", "matmul.c", "repack.c", "gemm_avx2.c", "gemm_ref.c", "ops.c", "retrieval.c", "select.c", "dots.c", "sparse_attention.c", "fastscan.c", "rerank.c", "topk.c", "attention.c",
           "attention_kernels.c", "kv_quant.c", "fused.c"]


def _rel(path):
    # setuptools refuses absolute source paths; build from the repo root
    return os.path.relpath(path, os.getcwd())


def _check_compiler():
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    if not shutil.which(cc):
        raise SystemExit(
            f"a2ats-lite: no C compiler found ({cc!r}). The native library (dequantization, "
            "KV gather) must be compiled: install gcc (e.g. `apt-get install gcc`) and retry.")


def _cdef():
    # the headers minus preprocessor lines are valid cdef text
    lines = []
    for name in ("a2ats_native.h", "retrieval.h", "attention.h", "fused.h"):
        with open(os.path.join(HERE, name)) as f:
            lines += [ln for ln in f if not ln.lstrip().startswith("#")]
    return "".join(lines)


_check_compiler()
ffibuilder = FFI()
ffibuilder.cdef(_cdef() + """
#define A2N_OK 0
#define A2N_E_TYPE -1
#define A2N_E_SIZE -2
#define A2N_E_INDEX -3
#define A2N_E_ARG -4
#define A2N_E_THREAD -5
#define A2N_E_NOMEM -6
""")
ffibuilder.set_source(
    "a2ats_lite._native",
    '#include "a2ats_native.h"\n#include "retrieval.h"\n#include "attention.h"\n#include "fused.h"',
    sources=[_rel(os.path.join(HERE, s)) for s in SOURCES],
    include_dirs=[_rel(HERE)],
    # -march=native: the library is compiled on the machine that runs it, like llama.cpp's GGML_NATIVE
    # (A2ATS_MARCH=-march=x86-64-v3 for a portable AVX2 build, =-march=x86-64 for no SIMD)
    # -ffp-contract=off: no fused multiply-adds in dequantization, it must round like gguf-py
    extra_compile_args=["-O3", os.environ.get("A2ATS_MARCH", "-march=native"), "-pthread",
                        "-fno-strict-aliasing", "-ffp-contract=off", "-std=c11"],
    extra_link_args=["-pthread"],
    libraries=["m", "pthread"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
