"""Weight products per type and shape: ours next to llama.cpp's own product, in one run.

    python bench/bench_matmul.py [--rows 1,16,512] [--threads 2] [--repeat 5] [--only Q6_K:640x2048,Q8_0]
                                 [--before DIR] [--toy] [--json bench/results/matmul.json]

Shapes: every (type, shape) of the default model's 2-D weights (its real tensors), the
llama-3.2-1b shapes 2048x2048, 512x2048, 8192x2048, 2048x8192 in Q4_0 and Q8_0 and the
llama-3.1-8b shapes 4096x4096, 14336x4096 in Q4_0 (random blocks), each times 1, 16 and 512
rows of float32 activations. Ours: QMatrix.apply, the model's product (int8 activations
quantized inside, repacked weights). llama.cpp: a graph of MUL_MAT nodes on its CPU backend
through llama-cpp-python's ggml libraries (bench/ggml_matmul.py: its repacked layouts for the
types it repacks), the same threads. Each figure is the best of --repeat timings of a batch of
products long enough to time (the same batch size for both; the order alternates, each batch
once the other's threads have gone idle, after an untimed one). GFLOP/s = 2 * n_out * n_in *
rows / s, GB/s = the GGUF weight bytes / s. Both results are checked against each other (int8
activations: ~1e-2), so both compute the same product.

--before DIR: a column for another a2ats_lite tree (e.g. an older commit, unpacked with
`git archive <rev> | tar -x -C DIR` and built with `python native/build_native.py` in DIR),
timed in a child process through its QMatrix.apply. --toy: two small shapes, rows 1 and 5
(the test of this script). --only: the cases of those types (TYPE) or type and shape
(TYPE:NOUTxNIN), comma-separated, to time a few before and after a change. Writes --json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K = 2, 6, 8, 12, 13, 14
SYNTH = [("llama-3.2-1b", t, n_out, n_in) for t in (Q4_0, Q8_0)
         for n_out, n_in in ((2048, 2048), (512, 2048), (8192, 2048), (2048, 8192))]
SYNTH += [("llama-3.1-8b", Q4_0, 4096, 4096), ("llama-3.1-8b", Q4_0, 14336, 4096)]
TOY = [("toy", Q4_0, 72, 256), ("toy", Q4_K, 40, 512)]
MIN_BATCH_S = 0.02          # a timed batch of products lasts at least this long
# Before each timed batch the other side's threads have gone idle, and its own are awake: idle
# threads spin a while before they sleep (libgomp's, which llama.cpp's ggml uses, ~10 ms after
# a graph; ours ~0.2 ms) and would take a core from the next batch: a pause, then an untimed
# batch (waking sleeping threads, and the clock of idle cores, is not timed either).
SETTLE_S = 0.03


def random_blocks(ggml_type: int, n_out: int, n_in: int, rng) -> np.ndarray:
    """Random GGUF blocks with sane f16 scales (random bytes there give NaN/Inf)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    raw = rng.integers(0, 256, (n_out * n_in // block, size), dtype=np.uint8)
    offs = {Q4_0: [0], Q5_0: [0], Q8_0: [0], Q4_K: [0, 2], Q5_K: [0, 2], Q6_K: [208]}[ggml_type]
    for off in offs:
        d = rng.uniform(0.001, 0.05, len(raw)).astype(np.float16)
        raw[:, off:off + 2] = d.view(np.uint8).reshape(-1, 2)
    return raw.reshape(-1)


def shapes(model: str, toy: bool):
    """[(label, type, n_out, n_in, raw)]: the default model's tensors (one per type and
    shape), then the synthetic shapes."""
    rng = np.random.default_rng(0)
    if toy:
        return [(lab, t, o, i, random_blocks(t, o, i, rng)) for lab, t, o, i in TOY]
    from a2ats_lite.gguf import GGUFFile
    f, seen, out = GGUFFile(model), set(), []
    for name, t in f.tensors.items():
        key = (t.ggml_type, tuple(t.shape))
        if len(t.shape) == 2 and t.ggml_type in (Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K) and key not in seen:
            seen.add(key)
            out.append((f"default:{name.split('.')[-2]}", t.ggml_type, t.shape[0], t.shape[1],
                        np.array(f.tensor_data(name))))
    return sorted(out, key=lambda s: (s[1], s[2] * s[3])) + [
        (lab, t, o, i, random_blocks(t, o, i, rng)) for lab, t, o, i in SYNTH]


def selected(cases: list, only: str | None) -> list:
    """The (label, type, n_out, n_in, raw) cases that --only names (all without --only)."""
    if not only:
        return cases
    from a2ats_lite import native
    keys = {k.strip().upper() for k in only.split(",") if k.strip()}
    return [c for c in cases if native.GGML_TYPES[c[1]][0].upper() in keys
            or f"{native.GGML_TYPES[c[1]][0]}:{c[2]}x{c[3]}".upper() in keys]


def best_time(fn, reps: int, repeat: int) -> float:
    """Seconds per product: the best of `repeat` batches of `reps` products (fn runs a batch)."""
    best = math.inf
    for _ in range(repeat):
        time.sleep(SETTLE_S)
        fn()
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best / reps


def ours_product(ggml_type, n_out, n_in, raw, x):
    from a2ats_lite.backend.cpu import QMatrix
    m = QMatrix("w", ggml_type, n_out, n_in, raw)
    m.apply(x)          # first use: the repack (and warm caches)
    return m


def time_case(ggml_type, n_out, n_in, raw, rows, repeat, threads, g, rng):
    """{ours_s, llama_s, rel_diff, repacked} for one product shape."""
    x = rng.standard_normal((rows, n_in)).astype(np.float32)
    m = ours_product(ggml_type, n_out, n_in, raw, x)
    t0 = time.perf_counter()
    y = m.apply(x)
    reps = max(1, min(1000, int(MIN_BATCH_S / max(time.perf_counter() - t0, 1e-6))))
    res = {"reps": reps}
    ll = None
    if g is not None:
        from ggml_matmul import MulMat
        ll = MulMat(g, ggml_type, n_out, n_in, raw, x, threads, reps)
        ll.run()
        ref = ll.result()
        res["rel_diff"] = float(np.abs(ref - y).max() / max(np.abs(ref).max(), 1e-30))
        res["llama_repacked"] = ll.repacked

    def run_ours():
        for _ in range(reps):
            m.apply(x)
    times = {"ours": math.inf, "llama": math.inf}
    for _ in range(repeat):              # alternate: a busy spell hurts both alike
        times["ours"] = min(times["ours"], best_time(run_ours, reps, 1))
        if ll is not None:
            times["llama"] = min(times["llama"], best_time(ll.run, reps, 1))
    if ll is not None:
        ll.close()
    res["ours_s"] = times["ours"]
    res["llama_s"] = times["llama"] if ll is not None else None
    return res


def before_times(tree: str, cases, repeat: int) -> list:
    """Seconds per product of another a2ats_lite tree's QMatrix.apply, in a child process."""
    spec = [(t, o, i, rows) for (_, t, o, i, _), rows in cases]
    code = ("import json, sys, numpy as np, time; sys.path.insert(0, %r); import a2ats_lite; "
            "from a2ats_lite.backend.cpu import QMatrix; spec, raws = json.loads(sys.stdin.readline()), "
            "np.load(sys.argv[1]); out = []\n"
            "for k, (t, o, i, rows) in enumerate(spec):\n"
            "    m = QMatrix('w', t, o, i, raws[str(k)]); x = np.random.default_rng(k).standard_normal("
            "(rows, i)).astype(np.float32); t0 = time.perf_counter(); m.apply(x)\n"
            "    reps = max(1, min(1000, int(%r / max(time.perf_counter() - t0, 1e-6)))); best = 1e9\n"
            "    for _ in range(%d):\n"
            "        t0 = time.perf_counter()\n"
            "        for _ in range(reps): m.apply(x)\n"
            "        best = min(best, (time.perf_counter() - t0) / reps)\n"
            "    out.append(best)\n"
            "print(json.dumps({'file': a2ats_lite.__file__, 'times': out}))") % (tree, MIN_BATCH_S, repeat)
    npz = ROOT / "bench" / "results" / ".before_weights.npz"
    npz.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz, **{str(k): raw for k, ((_, _, _, _, raw), _) in enumerate(cases)})
    try:
        r = subprocess.run([sys.executable, "-c", code, str(npz)], input=json.dumps(spec) + "\n",
                           capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": tree})
    finally:
        npz.unlink()
    got = json.loads(r.stdout.strip().splitlines()[-1])
    if not got["file"].startswith(str(Path(tree).resolve())):
        raise SystemExit(f"--before {tree}: the child imported {got['file']}")
    return got["times"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--rows", default="1,16,512")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--before", default=None, help="another a2ats_lite tree to time beside ours")
    ap.add_argument("--toy", action="store_true", help="two small shapes, rows 1 and 5")
    ap.add_argument("--only", default=None, help="TYPE or TYPE:NOUTxNIN, comma-separated: those cases alone")
    ap.add_argument("--no-llama", action="store_true", help="leave llama.cpp out")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "matmul.json"))
    a = ap.parse_args()
    os.environ["A2ATS_THREADS"] = str(a.threads)
    from a2ats_lite import native
    native.n_threads_default.cache_clear()
    rows_list = [1, 5] if a.toy and a.rows == "1,16,512" else [int(r) for r in a.rows.split(",")]
    g = None
    if not a.no_llama:
        try:
            from ggml_matmul import GGML
            g = GGML()
        except (ImportError, OSError, IndexError) as e:
            print(f"llama.cpp's ggml not available ({e}): ours alone")
    cases = [(s, rows) for s in selected(shapes(a.model, a.toy), a.only) for rows in rows_list]
    if not cases:
        raise SystemExit(f"--only {a.only}: no such case")
    before = before_times(a.before, cases, a.repeat) if a.before else [None] * len(cases)
    rng = np.random.default_rng(1)
    results = []
    hdr = (f"{'shape':<22}{'type':<6}{'n_out x n_in':>13}{'rows':>5} |{'ours ms':>9}{'GFLOP/s':>8}{'GB/s':>6}"
           f" |{'llama ms':>9}{'GFLOP/s':>8}{'GB/s':>6} |{'ours/llama':>10}" + (f" |{'before GF/s':>11}" if a.before else ""))
    print(f"threads {a.threads}, simd {native.simd()}, best of {a.repeat}; "
          f"llama.cpp {'via ' + str(g.__class__.__module__) if g else 'absent'}")
    print(hdr)
    for ((label, t, n_out, n_in, raw), rows), tb in zip(cases, before):
        r = time_case(t, n_out, n_in, raw, rows, a.repeat, a.threads, g, rng)
        flop, nbytes = 2.0 * n_out * n_in * rows, raw.nbytes
        r.update(shape=label, type=native.GGML_TYPES[t][0], n_out=n_out, n_in=n_in, rows=rows,
                 weight_bytes=nbytes, ours_gflops=flop / r["ours_s"] / 1e9, ours_gbs=nbytes / r["ours_s"] / 1e9)
        line = (f"{label:<22}{r['type']:<6}{f'{n_out}x{n_in}':>13}{rows:>5} |{r['ours_s'] * 1e3:>9.3f}"
                f"{r['ours_gflops']:>8.1f}{r['ours_gbs']:>6.1f} |")
        if r["llama_s"]:
            r.update(llama_gflops=flop / r["llama_s"] / 1e9, llama_gbs=nbytes / r["llama_s"] / 1e9,
                     ratio=r["llama_s"] / r["ours_s"])
            line += (f"{r['llama_s'] * 1e3:>9.3f}{r['llama_gflops']:>8.1f}{r['llama_gbs']:>6.1f} |"
                     f"{r['ratio']:>9.2f}x")
            if r["rel_diff"] > 5e-2:
                line += f"  (results differ: {r['rel_diff']:.2g})"
        else:
            line += f"{'-':>9}{'-':>8}{'-':>6} |{'-':>10}"
        if tb is not None:
            r.update(before_s=tb, before_gflops=flop / tb / 1e9)
            line += f" |{r['before_gflops']:>11.1f}"
        print(line, flush=True)
        results.append(r)
    summary = {}
    for rows in rows_list:
        for t in sorted({r["type"] for r in results}):
            rs = [r for r in results if r["rows"] == rows and r["type"] == t and r.get("ratio")]
            if rs:
                summary[f"{t} x{rows}"] = math.exp(sum(math.log(r["ratio"]) for r in rs) / len(rs))
    if summary:
        print("ours / llama.cpp speed, geometric mean over shapes: "
              + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    out = {"threads": a.threads, "repeat": a.repeat, "simd": native.simd(), "toy": a.toy,
           "llama_cpp": g is not None, "load_avg": os.getloadavg(), "results": results,
           "geomean_ratio": summary}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
