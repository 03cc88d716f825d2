"""Decode-time quantized products: native.matmul_q on the model's real tensors.

    python bench/bench_matmul.py [MODEL] [--repeat 5] [--threads N]

For every ggml type of the model's 2-D weights, all tensors of that type are
multiplied by n_vec random vectors (n_vec = 1 and 4, the batched-decode sizes)
and the weight bytes read per second are reported (median of --repeat sweeps).
Two references measured in the same run give the scale: this machine's memory
read bandwidth (numpy sum of a 256 MiB array, one thread) and BLAS f32 GEMV on a
256 MiB matrix (all threads). Beside each type: the same products as f32 BLAS
on the dequantized matrices (what keeping layer weights in float32 costs; the
tensors whose f32 copy exceeds 256 MiB, i.e. the embedding, are left out).
The last line is one decode token: every weight product of the model at n_vec = 1.
Writes bench/results/matmul.json.

    python bench/bench_matmul.py --compare [--rounds 3]

(--clock cpu times CPU seconds instead of wall seconds: with --threads 1, a
figure that other processes on a busy machine do not inflate.)
Before/after of the integer path: runs the benchmark --rounds times in child
processes alternately with A2ATS_MATMUL=f32 (x kept float32, the old path) and
A2ATS_MATMUL=q8 (x quantized to int8, integer SIMD; the default), and prints
the median over rounds of each mode's medians side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


CLOCK = time.perf_counter   # --clock cpu: time.process_time


def median_time(fn, repeat):
    fn()  # warm: page in the mmap, start the worker pool
    ts = []
    for _ in range(repeat):
        t = CLOCK()
        fn()
        ts.append(CLOCK() - t)
    return statistics.median(ts)


def references(repeat):
    a = np.ones(64 << 20, np.float32)                     # 256 MiB
    t_sum = median_time(lambda: a.sum(), repeat)
    w = np.ones((16384, 4096), np.float32)                # 256 MiB
    x = np.ones(4096, np.float32)
    t_gemv = median_time(lambda: w @ x, repeat)
    return a.nbytes / t_sum / 1e9, w.nbytes / t_gemv / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default=str(ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="default: A2ATS_THREADS or cpu count")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "matmul.json"))
    ap.add_argument("--compare", action="store_true", help="A2ATS_MATMUL=f32 vs q8, alternating child runs")
    ap.add_argument("--rounds", type=int, default=3, help="with --compare: runs of each mode")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the process's CPU time (all threads summed) instead of wall time; "
                         "with --threads 1 it is immune to other processes on a shared machine")
    a = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if a.clock == "cpu" else time.perf_counter
    if a.compare:
        return compare(a)

    from a2ats_lite import native
    from a2ats_lite.gguf import GGUFFile

    threads = a.threads or native.n_threads_default()
    f = GGUFFile(a.model)
    by_type = defaultdict(list)
    for name, t in f.tensors.items():
        if len(t.shape) == 2 and t.ggml_type in native.SUPPORTED_TYPES:
            by_type[t.ggml_type].append(t)
    rng = np.random.default_rng(0)

    def sweep(tensors, n_vec):
        xs = {t.shape[1]: rng.standard_normal((n_vec, t.shape[1])).astype(np.float32) for t in tensors}
        outs = {t.name: np.empty((n_vec, t.shape[0]), np.float32) for t in tensors}
        raws = {t.name: f.tensor_data(t.name) for t in tensors}

        def run():
            for t in tensors:
                native.matmul_q(raws[t.name], t.ggml_type, t.shape[0], t.shape[1], xs[t.shape[1]],
                                out=outs[t.name], n_threads=threads)
        return median_time(run, a.repeat)

    def sweep_f32(tensors, n_vec):
        tensors = [t for t in tensors if t.shape[0] * t.shape[1] * 4 <= 256 << 20]
        if not tensors:
            return None
        dense = {t.name: native.dequantize(f.tensor_data(t.name), t.ggml_type, t.shape) for t in tensors}
        xs = {t.shape[1]: rng.standard_normal((n_vec, t.shape[1])).astype(np.float32) for t in tensors}

        def run():
            for t in tensors:
                xs[t.shape[1]] @ dense[t.name].T
        return median_time(run, a.repeat)

    mem_gbs, gemv_gbs = references(a.repeat)
    rows = []
    for gtype, tensors in sorted(by_type.items()):
        nbytes = sum(t.nbytes for t in tensors)
        small = [t for t in tensors if t.shape[0] * t.shape[1] * 4 <= 256 << 20]
        for n_vec in (1, 4):
            s = sweep(tensors, n_vec)
            s_small = sweep(small, n_vec) if small and len(small) < len(tensors) else s
            s_f32 = sweep_f32(tensors, n_vec)
            rows.append({"type": native.GGML_TYPES[gtype][0], "n_tensors": len(tensors),
                         "mbytes": nbytes / 1e6, "n_vec": n_vec, "seconds": s,
                         "gb_per_s": nbytes / s / 1e9,
                         "fused_kernel": gtype in native.FAST_MATMUL_TYPES,
                         "f32_blas_seconds": s_f32,
                         "speedup_vs_f32_blas": (s_f32 / s_small) if s_f32 else None})
    all_2d = [t for ts in by_type.values() for t in ts]
    token_s = sweep(all_2d, 1)
    token_bytes = sum(t.nbytes for t in all_2d)

    print(f"model: {a.model}   threads: {threads}   simd: {native.simd()}   clock: {a.clock}")
    print(f"references: memory read (numpy sum, 1 thread) {mem_gbs:.1f} GB/s, "
          f"BLAS f32 GEMV 256 MiB ({os.cpu_count()} threads) {gemv_gbs:.1f} GB/s")
    print(f"{'type':<6}{'tensors':>8}{'MB':>9}{'n_vec':>6}{'ms':>9}{'GB/s':>8}{'of GEMV':>9}"
          f"{'f32 BLAS ms':>13}{'vs f32':>8}")
    for r in rows:
        f32 = (f"{r['f32_blas_seconds'] * 1e3:>13.2f}{r['speedup_vs_f32_blas']:>7.2f}x"
               if r["f32_blas_seconds"] else f"{'-':>13}{'-':>8}")
        print(f"{r['type']:<6}{r['n_tensors']:>8}{r['mbytes']:>9.1f}{r['n_vec']:>6}"
              f"{r['seconds'] * 1e3:>9.2f}{r['gb_per_s']:>8.2f}{r['gb_per_s'] / gemv_gbs:>9.0%}{f32}")
    print(f"one decode token (all {len(all_2d)} weight products, n_vec=1): {token_s * 1e3:.1f} ms, "
          f"{token_bytes / 1e6:.0f} MB, {token_bytes / token_s / 1e9:.2f} GB/s "
          f"-> {1 / token_s:.1f} tok/s bound for the products alone")
    out = {"model": a.model, "threads": threads, "cpu_count": os.cpu_count(), "simd": native.simd(), "clock": a.clock,
           "repeat_median_of": a.repeat, "memory_read_gb_per_s_1thread": mem_gbs,
           "blas_f32_gemv_gb_per_s": gemv_gbs, "per_type": rows,
           "token_products_s": token_s, "token_products_mbytes": token_bytes / 1e6}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")


def compare(a):
    """Alternate child runs with A2ATS_MATMUL=f32 and =q8; medians over rounds."""
    runs = {"f32": [], "q8": []}
    args = [sys.executable, __file__, a.model, "--repeat", str(a.repeat), "--clock", a.clock]
    if a.threads:
        args += ["--threads", str(a.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(a.rounds):
            for mode in ("f32", "q8"):
                path = os.path.join(tmp, f"{mode}{r}.json")
                subprocess.run(args + ["--json", path], check=True, stdout=subprocess.DEVNULL,
                               env={**os.environ, "A2ATS_MATMUL": mode})
                runs[mode].append(json.loads(Path(path).read_text()))
    med = statistics.median
    first = runs["q8"][0]
    print(f"model: {a.model}   threads: {first['threads']}   simd: {first['simd']}   clock: {a.clock}   "
          f"median of {a.rounds} alternating runs x {a.repeat} repeats per mode")
    print(f"references: memory read (1 thread) {med(r['memory_read_gb_per_s_1thread'] for r in runs['q8']):.1f} GB/s, "
          f"BLAS f32 GEMV {med(r['blas_f32_gemv_gb_per_s'] for r in runs['q8']):.1f} GB/s")
    print(f"{'type':<6}{'MB':>8}{'n_vec':>6}{'f32 ms':>9}{'GB/s':>7}{'q8 ms':>9}{'GB/s':>7}{'speedup':>9}")
    rows = []
    for i, row in enumerate(first["per_type"]):
        tf = med(r["per_type"][i]["seconds"] for r in runs["f32"])
        tq = med(r["per_type"][i]["seconds"] for r in runs["q8"])
        mb = row["mbytes"]
        print(f"{row['type']:<6}{mb:>8.1f}{row['n_vec']:>6}{tf * 1e3:>9.2f}{mb / 1e3 / tf:>7.1f}"
              f"{tq * 1e3:>9.2f}{mb / 1e3 / tq:>7.1f}{tf / tq:>8.2f}x")
        rows.append({"type": row["type"], "n_vec": row["n_vec"], "mbytes": mb, "f32_seconds": tf, "q8_seconds": tq})
    tf = med(r["token_products_s"] for r in runs["f32"])
    tq = med(r["token_products_s"] for r in runs["q8"])
    mb = first["token_products_mbytes"]
    print(f"one decode token ({mb:.0f} MB, n_vec=1): f32 {tf * 1e3:.2f} ms ({mb / 1e3 / tf:.1f} GB/s, "
          f"{1 / tf:.0f} tok/s bound), q8 {tq * 1e3:.2f} ms ({mb / 1e3 / tq:.1f} GB/s, {1 / tq:.0f} tok/s bound), "
          f"{tf / tq:.2f}x")
    out = {"model": a.model, "rounds": a.rounds, "repeat": a.repeat, "clock": a.clock, "per_type": rows,
           "token_products_s": {"f32": tf, "q8": tq}, "token_products_mbytes": mb}
    path = Path(a.json).with_name("matmul_compare.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
