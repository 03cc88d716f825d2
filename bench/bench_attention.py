"""Dense-layer attention on the CPU, one layer: the native kernel (native.attention, what
CPUBackend.attention / decode_attention run) against the paths it replaced.

    python bench/bench_attention.py [--repeat 3] [--chunk 512] [--threads N] [--toy | --full]

Shapes (f16 K/V, the Runtime's default cache type):
  gemma3-270m    H=4  G=1 d=256, full attention and a sliding window of 512
  llama-3.2-1b   H=32 G=8 d=64,  full attention
prefill: a T-token prompt's attention in chunks of --chunk rows (the engine's n_batch), each
  chunk over the cache up to its own end; T = 2048 and 8192. Old path: numpy (scores by BLAS
  per block of query rows, f16 K/V widened per block: CPUBackend(native_retrieval=False)).
decode: one query row over T cached keys; T = 8192 and 32768. Old paths: numpy (as above) and
  the former native decode path (native.sparse_attention over arange index arrays).
Minimum and median of --repeat runs after a warm-up. Full scale runs only when the 1-minute
load average is < 2 (the machine is shared; --full: whatever the load), else toy scale
(T / 16), said in the output and the JSON. Writes bench/results/attention.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from a2ats_lite import native  # noqa: E402
from a2ats_lite.backend.cpu import CPUBackend  # noqa: E402
from timing import min_median  # noqa: E402

SHAPES = {                       # name: (H, G, d, window)
    "gemma3-270m full": (4, 1, 256, None),
    "gemma3-270m window 512": (4, 1, 256, 512),
    "llama-3.2-1b": (32, 8, 64, None),
}
PREFILL_T = (2048, 8192)
DECODE_T = (8192, 32768)
NUMPY = CPUBackend(native_retrieval=False)


def spans(pos, window):
    lo = np.zeros_like(pos) if window is None else np.maximum(0, pos - window + 1)
    return lo, pos + 1


def prefill_native(q, K, V, window, chunk, scale, threads):
    for c0 in range(0, len(q), chunk):
        c1 = min(len(q), c0 + chunk)
        lo, hi = spans(np.arange(c0, c1), window)
        native.attention(q[c0:c1], [K[:, :c1]], [V[:, :c1]], [0], np.zeros(c1 - c0, np.int64),
                         lo, hi, scale, n_threads=threads)


def prefill_numpy(q, K, V, window, chunk, scale):
    for c0 in range(0, len(q), chunk):
        c1 = min(len(q), c0 + chunk)
        NUMPY.attention(q[c0:c1], K[:, :c1], V[:, :c1], np.arange(c0, c1), 0, window, scale)


def bench_shape(name, H, G, d, window, scale_div, a, rng):
    rows = []
    scale = d ** -0.5
    for T in (t // scale_div for t in PREFILL_T):
        K = rng.standard_normal((G, T, d)).astype(np.float16)
        V = rng.standard_normal((G, T, d)).astype(np.float16)
        q = rng.standard_normal((T, H, d)).astype(np.float32)
        old = min_median(lambda: prefill_numpy(q, K, V, window, a.chunk, scale), a.repeat)
        new = min_median(lambda: prefill_native(q, K, V, window, a.chunk, scale, a.threads), a.repeat)
        rows.append(dict(shape=name, phase="prefill", T=T, numpy_s=old, native_s=new,
                         native_tok_s=T / new[0], speedup=old[0] / new[0]))
        print(f"{name:24s} prefill {T:6d}  numpy {old[0] * 1e3:9.1f} ms  native {new[0] * 1e3:8.1f} ms"
              f"  ({T / new[0]:8.0f} tok/s of attention)  x{old[0] / new[0]:.2f}", flush=True)
    if window is not None:       # decode over a window is a fixed 512 keys: not a long-context case
        return rows
    g = H // G
    for T in (t // scale_div for t in DECODE_T):
        K = rng.standard_normal((G, T, d)).astype(np.float16)
        V = rng.standard_normal((G, T, d)).astype(np.float16)
        q = rng.standard_normal((1, G, g, d)).astype(np.float32)
        buf = [(K, V, 0, T)]
        idx = np.broadcast_to(np.arange(T), (1, G, T)).copy()
        lens = np.full((1, G), T, np.int32)
        old = min_median(lambda: NUMPY.decode_attention(q, buf, [T - 1], None, scale), a.repeat)
        sparse = min_median(lambda: native.sparse_attention(q, [K], [V], idx, lens, scale,
                                                       n_threads=a.threads), a.repeat)
        new = min_median(lambda: native.attention(q.reshape(1, H, d), [K], [V], [0], [0], [0], [T], scale,
                                             n_threads=a.threads), a.repeat)
        rows.append(dict(shape=name, phase="decode", T=T, numpy_s=old, sparse_s=sparse, native_s=new,
                         speedup=old[0] / new[0], speedup_vs_sparse=sparse[0] / new[0]))
        print(f"{name:24s} decode  {T:6d}  numpy {old[0] * 1e3:9.2f} ms  sparse {sparse[0] * 1e3:7.2f} ms"
              f"  native {new[0] * 1e3:7.2f} ms  x{old[0] / new[0]:.2f} / x{sparse[0] / new[0]:.2f}",
              flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=512, help="prefill rows per step (n_batch)")
    ap.add_argument("--threads", type=int, default=None, help="native threads (default: all)")
    ap.add_argument("--toy", action="store_true", help="toy scale whatever the load")
    ap.add_argument("--full", action="store_true", help="full scale whatever the load")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "attention.json"))
    a = ap.parse_args()
    load = os.getloadavg()[0]
    toy = a.toy or (load >= 2 and not a.full)
    scale_div = 16 if toy else 1
    print(f"load average {load:.2f}: {'TOY scale (T / 16)' if toy else 'full scale'}; "
          f"native threads {a.threads or native.n_threads_default()}, simd {native.simd()}")
    rng = np.random.default_rng(0)
    rows = []
    for name, (H, G, d, window) in SHAPES.items():
        rows += bench_shape(name, H, G, d, window, scale_div, a, rng)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(
        what="one layer's dense attention: numpy / former sparse path vs native.attention",
        toy_scale=toy, load_average=load, chunk=a.chunk, repeat=a.repeat,
        threads=a.threads or native.n_threads_default(), simd=native.simd(),
        machine=platform.machine(), cpus=os.cpu_count(), numpy=np.__version__,
        times="(min, median) seconds", results=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
