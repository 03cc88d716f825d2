"""The machine's memory bandwidth: a small STREAM-like probe, the ceiling the decode benches
compare their GB/s with.

    python bench/membw.py [--threads 2] [--mib 128] [--reps 5]

Five kernels over float32 arrays of --mib MiB each (default 4x the L3 cache, at least
64 MiB, so they stream from DRAM), split across --threads threads (default: all CPUs):
  read   s += a[i]                 (a[i] read: what a decode step does to weights and K/V)
  copy   b[i] = a[i]               scale  b[i] = q * a[i]
  add    c[i] = a[i] + b[i]        triad  a[i] = b[i] + q * c[i]
GB/s counts the bytes named in the kernel (STREAM's convention: a store's write-allocate
read is not counted), from the best of --reps repetitions. The kernels are a few lines
of C compiled with -O3 -march=native into /tmp and called through ctypes (one pthread
per thread); without a C compiler, numpy on the same arrays split across threads
(np.add.reduce, np.copyto, multiply/add with out=; its triad is two passes, counted as
the 5 array passes it makes). `read` is the ceiling column of bench_cpu/bench_long.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

KERNELS = {"read": 1, "copy": 2, "scale": 2, "add": 3, "triad": 3}    # arrays touched
C_SOURCE = r"""
#include <pthread.h>
#include <stddef.h>
typedef struct { int k; float *a, *b, *c; long n; double sum; } job_t;
static void *work(void *p) {
    job_t *j = p; float *a = j->a, *b = j->b, *c = j->c; long n = j->n; const float q = 3.0f;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
    switch (j->k) {
    case 0: for (long i = 0; i + 8 <= n; i += 8) {
                s0 += a[i]; s1 += a[i+1]; s2 += a[i+2]; s3 += a[i+3];
                s4 += a[i+4]; s5 += a[i+5]; s6 += a[i+6]; s7 += a[i+7]; }
            j->sum = s0 + s1 + s2 + s3 + s4 + s5 + s6 + s7; break;
    case 1: for (long i = 0; i < n; i++) b[i] = a[i]; break;
    case 2: for (long i = 0; i < n; i++) b[i] = q * a[i]; break;
    case 3: for (long i = 0; i < n; i++) c[i] = a[i] + b[i]; break;
    case 4: for (long i = 0; i < n; i++) a[i] = b[i] + q * c[i]; break;
    }
    return NULL;
}
double a2bw_run(int k, float *a, float *b, float *c, long n, int threads) {
    pthread_t t[64]; job_t j[64]; double s = 0;
    if (threads > 64) threads = 64;
    long per = (n / threads) & ~63L;
    for (int i = 0; i < threads; i++) {
        long off = i * per, m = i == threads - 1 ? n - off : per;
        j[i] = (job_t){k, a + off, b + off, c + off, m, 0};
        pthread_create(&t[i], NULL, work, &j[i]);
    }
    for (int i = 0; i < threads; i++) { pthread_join(t[i], NULL); s += j[i].sum; }
    return s;
}
"""
CFLAGS = ["-O3", "-march=native", "-ffast-math", "-shared", "-fPIC", "-pthread"]


def l3_bytes() -> int:
    try:
        return int(os.sysconf("SC_LEVEL3_CACHE_SIZE")) or 32 << 20
    except (ValueError, OSError):
        return 32 << 20


def c_kernels():
    """The compiled kernels (built once into /tmp), or None without a C compiler."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None
    tag = hashlib.sha256((C_SOURCE + " ".join(CFLAGS)).encode()).hexdigest()[:12]
    d = Path(f"/tmp/a2ats_membw_{os.getuid()}")
    lib = d / f"membw_{tag}.so"
    if not lib.is_file():
        d.mkdir(exist_ok=True)
        src = d / f"membw_{tag}.c"
        src.write_text(C_SOURCE)
        tmp = d / f".membw_{tag}.{os.getpid()}.so"
        if subprocess.run([cc, *CFLAGS, str(src), "-o", str(tmp)], capture_output=True).returncode:
            return None
        os.replace(tmp, lib)
    so = ctypes.CDLL(str(lib))
    fp = ctypes.POINTER(ctypes.c_float)
    so.a2bw_run.argtypes = [ctypes.c_int, fp, fp, fp, ctypes.c_long, ctypes.c_int]
    so.a2bw_run.restype = ctypes.c_double
    return so


def _numpy_kernel(name, a, b, c, threads, pool):
    q = np.float32(3.0)
    parts = np.array_split(np.arange(len(a)), threads)
    spans = [(int(p[0]), int(p[-1]) + 1) for p in parts if len(p)]

    def one(span):
        i, j = span
        if name == "read":
            return float(np.add.reduce(a[i:j]))
        if name == "copy":
            np.copyto(b[i:j], a[i:j])
        elif name == "scale":
            np.multiply(a[i:j], q, out=b[i:j])
        elif name == "add":
            np.add(a[i:j], b[i:j], out=c[i:j])
        else:
            np.multiply(c[i:j], q, out=a[i:j])
            np.add(a[i:j], b[i:j], out=a[i:j])
        return 0.0
    return sum(pool.map(one, spans))


def measure(threads: int | None = None, mib: int | None = None, reps: int = 5,
            use_c: bool = True) -> dict:
    """{"read": GB/s, "copy": ..., "scale", "add", "triad", "threads", "mib", "method"}."""
    threads = threads or os.cpu_count() or 1
    mib = mib or max(64, 4 * l3_bytes() >> 20)
    n = (mib << 20) // 4
    a = np.full(n, 1.0, np.float32)      # (n,) each; filled so every page is really mapped
    b = np.full(n, 2.0, np.float32)
    c = np.zeros(n, np.float32)
    so = c_kernels() if use_c else None
    out = dict(threads=threads, mib=mib, reps=reps,
               method="C kernels (ctypes, pthreads)" if so else "numpy (threads)")
    pool = None if so else ThreadPoolExecutor(threads)
    ptr = [x.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) for x in (a, b, c)]
    try:
        for k, (name, arrays) in enumerate(KERNELS.items()):
            best = float("inf")
            for _ in range(reps + 1):                # the first repetition is a warm-up
                t0 = time.perf_counter()
                if so:
                    so.a2bw_run(k, *ptr, n, threads)
                else:
                    _numpy_kernel(name, a, b, c, threads, pool)
                best = min(best, time.perf_counter() - t0)
            passes = 5 if (name == "triad" and not so) else arrays
            out[name] = passes * n * 4 / best / 1e9
    finally:
        if pool:
            pool.shutdown()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--mib", type=int, default=None, help="MiB per array (default: 4x L3, >= 64)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--numpy", action="store_true", help="numpy kernels instead of C")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    r = measure(a.threads, a.mib, a.reps, use_c=not a.numpy)
    if a.json:
        print(json.dumps(r))
    else:
        print(f"{r['method']}, {r['threads']} threads, {r['mib']} MiB arrays, best of {r['reps']}:")
        for name in KERNELS:
            print(f"  {name:<6} {r[name]:7.2f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
