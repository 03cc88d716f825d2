"""A2ATS decode-step retrieval kernels, one layer.

    python bench/bench_retrieval.py --selection [--T 8192 32768 131072] [--repeat 7] [--threads N]
    python bench/bench_retrieval.py [--T 8192 32768 65536] [--S 1 4] [--repeat 7] [--threads N]

--selection: one layer's selection (LUT + code scoring + top-K, the candidates of the exact
re-rank: K = rerank x 3% of T per query head, union over the group) for the default model's
shape (G=1 KV head, g=4, d=256) and Llama-3.2-1B's (G=8, g=4, d=64), one sequence, sinks 8,
window 64: the shipped 8x8 codes (uint16 per subspace, float LUT sums, radix top-K) against
4-bit fast-scan codes (16x4 and 32x4: blocks of 32 tokens, 8-bit LUTs, vpshufb, histogram
top-K), and 16x4 codes through the exact path. Per row: median and min ms, the code bytes
read and their GB/s. Writes bench/results/bench_selection.json.

Without it: native (C) kernels against their numpy equivalents, a Llama-3.2-1B-like layer:
G=8 KV heads, g=4 query heads per KV head, d=64,
C=4096 centroids (M=1, plain VQ), sinks=8, window=64, K=3% of T per query head,
float32 host store (and float16 for the attention). For each (T, S):
  lut     native.build_lut             vs  batched matmul q @ centroids^T
  select  native.select_topk           vs  per (s, k): LUT lookup by codes, argpartition
                                           per query head, np.unique union, concatenation
  attn    native.sparse_attention      vs  per (s, k): fancy-index gather of K and V rows,
                                           matmul, softmax, matmul
  exact   native.exact_scores          vs  per (s, k): q @ K[lo:hi]^T (the oracle scores)
Medians (and minima: steadier on a shared machine) of --repeat runs after a warm-up;
ratio = numpy / native.
Both sides are single calls per layer; numpy's BLAS runs on one thread unless
OPENBLAS_NUM_THREADS / OMP_NUM_THREADS are set (its products here are 4-row GEMVs,
and a multi-threaded OpenBLAS on a busy machine is 100x slower, not faster).
Writes bench/results/bench_retrieval.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

for _v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, "1")   # before numpy is imported

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
from a2ats_lite import native  # noqa: E402
from a2ats_lite.backend import scoring  # noqa: E402
from timing import min_median  # noqa: E402

G, g, d, C, M = 8, 4, 64, 4096, 1
SINKS, WINDOW, BUDGET = 8, 64, 0.03


# ---- numpy equivalents -------------------------------------------------------------------
def np_lut(q, cent_t):
    """cent_t (G, M, dsub, C): the centroids transposed once, outside the timing."""
    S = q.shape[0]
    if M == 1:
        return np.matmul(q, cent_t[:, 0])[:, :, :, None]                  # (S, G, g, 1, C)
    qr = q.reshape(S, G, g, M, d // M).transpose(0, 1, 3, 2, 4)         # (S, G, M, g, ds)
    return np.matmul(qr, cent_t).transpose(0, 1, 3, 2, 4)               # (S, G, g, M, C)


def np_select(lut, codes, T, K):
    out = []
    for s in range(lut.shape[0]):
        t = int(T[s])
        lo = min(SINKS, t)
        hi = max(lo, t - WINDOW)
        for k in range(G):
            if hi - lo <= K:
                picked = np.arange(lo, hi)
            else:
                sc = lut[s, k, :, 0][:, codes[s][k, 0, lo:hi]]
                for m in range(1, M):
                    sc = sc + lut[s, k, :, m][:, codes[s][k, m, lo:hi]]
                top = np.argpartition(-sc, K - 1, axis=1)[:, :K]
                picked = lo + np.unique(top)
            out.append(np.concatenate([np.arange(lo), picked, np.arange(hi, t)]))
    return out


def np_attention(q, keys, values, sel, scale):
    S = q.shape[0]
    out = np.empty((S, G, g, d), np.float32)
    for s in range(S):
        for k in range(G):
            ix = sel[s * G + k]
            Kr = keys[s][k][ix].astype(np.float32, copy=False)
            Vr = values[s][k][ix].astype(np.float32, copy=False)
            sc = (q[s, k] @ Kr.T) * scale
            sc -= sc.max(axis=1, keepdims=True)
            p = np.exp(sc)
            p /= p.sum(axis=1, keepdims=True)
            out[s, k] = p @ Vr
    return out


def np_exact(q, keys, lo, hi):
    return [q[s, k] @ keys[s][k, lo[s]:hi[s]].T for s in range(q.shape[0]) for k in range(G)]


def run(T_len, S, repeat, nt, rng):
    K = max(1, int(np.ceil(BUDGET * T_len)))
    caps = [T_len + 64 * s for s in range(S)]                 # different capacities
    T = np.array([T_len - 3 * s for s in range(S)], np.int64)   # and lengths
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    cent = rng.standard_normal((G, M, C, d // M)).astype(np.float32)
    codes = [rng.integers(0, C, (G, M, c), dtype=np.uint16) for c in caps]
    keys = [rng.standard_normal((G, c, d)).astype(np.float32) for c in caps]
    values = [rng.standard_normal((G, c, d)).astype(np.float32) for c in caps]
    keys16 = [k.astype(np.float16) for k in keys]
    values16 = [v.astype(np.float16) for v in values]
    scale = 1 / np.sqrt(d)
    lut = native.build_lut(q, cent, n_threads=nt)
    idx, lens = native.select_topk(lut, codes, T, SINKS, WINDOW, K, n_threads=nt)
    sel = [idx[s, k, :lens[s, k]] for s in range(S) for k in range(G)]
    lo = np.full(S, SINKS, np.int64)
    hi = T - WINDOW
    cent_t = np.ascontiguousarray(cent.transpose(0, 1, 3, 2))
    assert np.allclose(np_lut(q, cent_t), lut, atol=1e-4)
    rows = []

    def add(name, f_native, f_numpy):
        tn_min, tn = min_median(f_native, repeat)
        tp_min, tp = min_median(f_numpy, repeat)
        rows.append(dict(kernel=name, T=T_len, S=S, K=K, native_ms=tn * 1e3, numpy_ms=tp * 1e3,
                         ratio=tp / tn, native_min_ms=tn_min * 1e3, numpy_min_ms=tp_min * 1e3,
                         ratio_min=tp_min / tn_min))

    add("lut", lambda: native.build_lut(q, cent, out=lut, n_threads=nt), lambda: np_lut(q, cent_t))
    add("select", lambda: native.select_topk(lut, codes, T, SINKS, WINDOW, K, out_idx=idx,
                                             out_len=lens, n_threads=nt),
        lambda: np_select(lut, codes, T, K))
    add("attn f32", lambda: native.sparse_attention(q, keys, values, idx, lens, scale, n_threads=nt),
        lambda: np_attention(q, keys, values, sel, scale))
    add("attn f16", lambda: native.sparse_attention(q, keys16, values16, idx, lens, scale,
                                                    n_threads=nt),
        lambda: np_attention(q, keys16, values16, sel, scale))
    add("exact", lambda: native.exact_scores(q, keys, lo, hi, n_threads=nt),
        lambda: np_exact(q, keys, lo, hi))
    # correctness of what was timed (cheap): native attention matches numpy on the same selection
    ref = np_attention(q, keys, values, sel, scale)
    err = float(np.abs(native.sparse_attention(q, keys, values, idx, lens, scale, n_threads=nt) - ref).max())
    assert err < 1e-4, err
    # the selection is exact: top-K by score with ties to the smaller position (numpy's
    # argpartition breaks the many ties of a 4096-value LUT arbitrarily), checked on s = 0
    same = True
    t = int(T[0])
    lo0, hi0 = min(SINKS, t), max(min(SINKS, t), t - WINDOW)
    cand = np.arange(lo0, hi0)
    for k in range(G):
        picked = set()
        for j in range(g):
            sc = lut[0, k, j, 0, codes[0][k, 0, lo0:hi0]]
            picked.update(cand[np.lexsort((cand, -sc))[:K]].tolist())
        ref = np.concatenate([np.arange(lo0), sorted(picked), np.arange(hi0, t)])
        same &= bool(np.array_equal(ref, sel[k]))
    for r in rows:
        r["selection_exact"] = same
    return rows


# ---- selection: 8x8 exact vs 4-bit fast-scan ----------------------------------------------
SHAPES = {"gemma-3-270m": dict(G=1, g=4, d=256), "llama-3.2-1b": dict(G=8, g=4, d=64)}
LAYOUTS = (("8x8", "exact"), ("16x4", "exact"), ("16x4", "fast"), ("32x4", "fast"))


def selection_rows(T, shape, repeat, n_threads, rng, rerank=3, layouts=LAYOUTS):
    """One layer of `shape` (G, g, d) at T tokens: per (layout, path) the time of build_lut +
    selection of rerank x 3% candidates per query head, checked against the numpy reference."""
    G_, g_, d_ = shape["G"], shape["g"], shape["d"]
    K = rerank * max(1, int(np.ceil(BUDGET * T)))
    Tn = np.array([T], np.int64)
    q = rng.standard_normal((1, G_, g_, d_)).astype(np.float32)
    lo, hi = min(SINKS, T), max(min(SINKS, T), T - WINDOW)
    rows = []
    for layout, path in layouts:
        M_, bits = (int(x) for x in layout.split("x"))
        C_ = 2 ** bits
        cent = rng.standard_normal((G_, M_, C_, d_ // M_)).astype(np.float32)
        raw = rng.integers(0, C_, (G_, M_, T), dtype=np.uint16)
        if path == "fast":
            codes = np.zeros((G_, -(-T // 32), M_ // 2, 32), np.uint8)
            native.fastscan_pack(raw, codes, 0)
            nbytes = ((hi + 31) // 32 - lo // 32) * 32 * M_ // 2 * G_ if hi > lo else 0
            pick = native.fastscan_select
        else:
            codes, nbytes, pick = raw, (hi - lo) * M_ * 2 * G_, native.select_topk
        lut = native.build_lut(q, cent, n_threads=n_threads)
        idx, lens = pick(lut, [codes], Tn, SINKS, WINDOW, K, n_threads=n_threads)

        def step():
            native.build_lut(q, cent, out=lut, n_threads=n_threads)
            pick(lut, [codes], Tn, SINKS, WINDOW, K, out_idx=idx, out_len=lens, n_threads=n_threads)
        best, med = min_median(step, repeat)
        _, lut_med = min_median(lambda: native.build_lut(q, cent, out=lut, n_threads=n_threads), repeat)
        # the selection timed is the reference's (KV head 0: its quantized or float LUT sums)
        if hi - lo > K:
            top = (scoring.fastscan_topk(lut[0, 0], codes[0], lo, hi, K) if path == "fast" else
                   scoring.topk_union(scoring.lut_lookup(lut[0, 0], raw[0][:, lo:hi]), K)) + lo
            want = np.concatenate([np.arange(lo), top, np.arange(hi, T)])
            assert np.array_equal(idx[0, 0, :lens[0, 0]], want), (layout, path)
        rows.append(dict(shape=shape, T=T, K=K, layout=layout, path=path, ms=med * 1e3,
                         min_ms=best * 1e3, lut_ms=lut_med * 1e3, codes_bytes=int(nbytes),
                         codes_gbs=nbytes / best / 1e9))
    base = next((r for r in rows if (r["layout"], r["path"]) == ("8x8", "exact")), None)
    for r in rows:
        r["speedup_vs_8x8"] = base["min_ms"] / r["min_ms"] if base else None
    return rows


def _printed(rows, line) -> list[dict]:
    """The rows as they are measured, each printed by line(row) at once."""
    out = []
    for r in rows:
        out.append(r)
        print(line(r), flush=True)
    return out


def _write(path, **fields) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields, indent=1))
    print(f"wrote {path}")


def selection_main(a, nt):
    rng = np.random.default_rng(0)
    print(f"one layer's selection: build_lut + top-K of {a.rerank} x 3% of T per query head, "
          f"1 sequence, sinks={SINKS} window={WINDOW}, {nt} threads, simd={native.simd()}")
    print(f"{'shape':<13} {'T':>6} {'layout':<6} {'path':<5} {'ms':>8} {'min ms':>8} {'lut ms':>7}"
          f" {'codes KB':>9} {'GB/s':>6} {'vs 8x8':>7}")
    out = _printed((dict(r, model=name) for name, shape in SHAPES.items() for T in a.T
                    for r in selection_rows(T, shape, a.repeat, nt, rng, a.rerank)),
                   lambda r: f"{r['model']:<13} {r['T']:>6} {r['layout']:<6} {r['path']:<5} "
                             f"{r['ms']:>8.3f} {r['min_ms']:>8.3f} {r['lut_ms']:>7.3f} "
                             f"{r['codes_bytes'] / 1024:>9.0f} {r['codes_gbs']:>6.2f} "
                             f"{r['speedup_vs_8x8']:>6.1f}x")
    _write(a.out or ROOT / "bench" / "results" / "bench_selection.json",
           sinks=SINKS, window=WINDOW, budget=BUDGET, rerank=a.rerank, threads=nt,
           simd=native.simd(), cpu_count=os.cpu_count(), machine=platform.machine(),
           load_avg=os.getloadavg(), repeat=a.repeat, results=out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--selection", action="store_true",
                    help="one layer's selection: 8x8 exact vs 4-bit fast-scan codes")
    ap.add_argument("--T", type=int, nargs="+", default=None)
    ap.add_argument("--S", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--rerank", type=int, default=3, help="--selection: candidates = rerank x K")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    nt = a.threads or native.n_threads_default()
    if a.selection:
        a.T = a.T or [8192, 32768, 131072]
        return selection_main(a, nt)
    a.T = a.T or [8192, 32768, 65536]
    a.out = a.out or str(ROOT / "bench" / "results" / "bench_retrieval.json")
    rng = np.random.default_rng(0)
    print(f"layer G={G} g={g} d={d} C={C} M={M} sinks={SINKS} window={WINDOW} K=3% of T, "
          f"{nt} threads, simd={native.simd()}")
    print(f"{'kernel':<9} {'T':>6} {'S':>2} {'K':>5} {'native ms':>10} {'numpy ms':>10} {'ratio':>7}"
          f" | {'min native':>10} {'min numpy':>10} {'ratio':>7}")
    rows = _printed((r for T_len in a.T for S in a.S for r in run(T_len, S, a.repeat, nt, rng)),
                    lambda r: f"{r['kernel']:<9} {r['T']:>6} {r['S']:>2} {r['K']:>5} "
                              f"{r['native_ms']:>10.3f} {r['numpy_ms']:>10.3f} {r['ratio']:>6.1f}x | "
                              f"{r['native_min_ms']:>10.3f} {r['numpy_min_ms']:>10.3f} "
                              f"{r['ratio_min']:>6.1f}x")
    _write(a.out, layer=dict(G=G, g=g, d=d, C=C, M=M, sinks=SINKS, window=WINDOW, budget=BUDGET),
           threads=nt, simd=native.simd(), blas_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
           cpu_count=os.cpu_count(), machine=platform.machine(), numpy=np.__version__,
           repeat=a.repeat, results=rows)


if __name__ == "__main__":
    main()
