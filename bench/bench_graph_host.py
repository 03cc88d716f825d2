"""The host side of a CUDA-graph replay, measured without a GPU.

    python bench/bench_graph_host.py [--layers 2 6 18] [--batches 1 4 16] [--steps 20]

A decode step replayed from a captured graph (backend/cuda/graphs.py) still runs the forward
pass in Python for its host side: KV bookkeeping, the step's inputs written to the graph's
staging buffers, and every launch checked against the captured one; only then does the
graph run. That host time is the floor of a replayed step's latency, whatever the GPU. It
is measured here on the CPU shim (CUDABackend(xp=numpy, loader=ShimModule)) with the graph
launch itself disabled, on tiny llama-shaped models of several depths (the cost grows with
the layers, not their width). Prints a table and writes bench/results/graph_host.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from cuda_shim import ShimModule  # noqa: E402
from test_model import ARCH_CONFIGS, random_arrays, tiny_config  # noqa: E402

from a2ats_lite.backend.cuda import CUDABackend  # noqa: E402
from a2ats_lite.batch import Batch  # noqa: E402
from a2ats_lite.kv import make_kv_cache  # noqa: E402
from a2ats_lite.model import Model  # noqa: E402


def measure(n_layer: int, S: int, steps: int) -> dict:
    kw = {k: v for k, v in ARCH_CONFIGS["llama"].items() if k != "n_ff"}
    c = tiny_config("llama", n_layer=n_layer, n_ff=128, **kw)
    B = CUDABackend(xp=np, loader=ShimModule, decode_split_len=64)
    m = Model.from_arrays(c, random_arrays(c, 1), n_batch=64, backend=B)
    kv = make_kv_cache("dense", m.attn_layers, 256, backend=B, initial=256)
    seqs = [kv.add_sequence() for _ in range(S)]
    for s in seqs:
        m.forward([np.arange(4) % c.n_vocab], [s], kv)
    for _ in range(3):                         # eager warm-up, capture, one replay
        m.forward([np.array([1])] * S, seqs, kv)
    g = B._graphs[("decode", S, False)]
    B._launch = lambda g: None                 # the host side only
    times = []
    for _ in range(steps):
        batch = Batch.make(seqs, [np.array([1])] * S, [kv.length(s) for s in seqs])
        t0 = time.perf_counter()
        m.step(batch, kv)
        times.append(time.perf_counter() - t0)
    ms = statistics.median(times) * 1e3
    return {"layers": n_layer, "batch": S, "replay_host_ms": ms, "per_layer_ms": ms / n_layer,
            "launches": len(g.sigs), "uploads": len(g.uploads)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 6, 18])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "graph_host.json"))
    a = ap.parse_args()
    rows = []
    print(f"{'layers':>6} {'batch':>5} {'host ms/step':>12} {'ms/layer':>8} {'launches':>8} {'uploads':>7}")
    for n in a.layers:
        for S in a.batches:
            r = measure(n, S, a.steps)
            rows.append(r)
            print(f"{n:>6} {S:>5} {r['replay_host_ms']:>12.2f} {r['per_layer_ms']:>8.3f} "
                  f"{r['launches']:>8} {r['uploads']:>7}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"command": " ".join(sys.argv), "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
