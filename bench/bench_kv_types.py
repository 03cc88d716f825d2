"""Decode speed of the default model per KV cache type (llama.cpp's --cache-type-k/-v names,
the same type for K and V).

    python bench/bench_kv_types.py [--depth 8192] [--steps 32] [--types f16 q8_0 q4_0] [--toy]

Per type: a prompt of --depth random tokens prefilled (chunks of 512), then --steps
single-token decode steps of that sequence timed one by one (the forward pass with its
logits, as generation runs it): decode tok/s from the median step, and the KV cache's bytes.
Beside it, one layer's attention alone (native.attention: one decode row over --depth keys of
the default model's shape, H=4 G=1 d=256), to separate the kernel from the rest of a step.
Full scale runs only when the 1-minute load average is < 3 (the machine is shared); --toy
runs a depth of 256 and 4 steps whatever the load, said in the output and the JSON. Writes
bench/results/kv_types.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from a2ats_lite import native  # noqa: E402
from a2ats_lite.gguf import GGUFFile  # noqa: E402
from a2ats_lite.kv import make_kv_cache  # noqa: E402
from a2ats_lite.model import Model  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
MAX_LOAD = 3.0


def decode_steps(model, kv_type: str, depth: int, steps: int, rng) -> dict:
    """Prefill depth tokens, then time steps single-token decode steps."""
    kv = make_kv_cache("dense", model.attn_layers, depth + steps + 1, cache_type=kv_type)
    s = kv.add_sequence()
    model.forward([rng.integers(100, 20000, depth)], [s], kv, logits="none")
    ts = []
    for t in rng.integers(100, 20000, steps):
        t0 = time.perf_counter()
        model.forward([np.array([t])], [s], kv)
        ts.append(time.perf_counter() - t0)
    med = statistics.median(ts)
    return dict(step_median_s=med, step_min_s=min(ts), tok_s=1.0 / med, kv_bytes=kv.nbytes())


def attention_alone(kv_type: str, depth: int, repeat: int, rng) -> float:
    """Median seconds of one decode row's attention over depth keys (one layer)."""
    H, G, d = 4, 1, 256
    rows = rng.standard_normal((2, G, depth, d)).astype(np.float32)
    K, V = (x.astype(np.float16) if kv_type == "f16" else x if kv_type == "f32"
            else native.kv_quantize(x, kv_type) for x in rows)
    q = rng.standard_normal((1, H, d)).astype(np.float32)
    args = (q, [K], [V], [0], np.zeros(1, np.int64), np.array([0]), np.array([depth]), d ** -0.5)
    native.attention(*args)
    ts = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        native.attention(*args)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--depth", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--types", nargs="+", default=["f16", "q8_0", "q4_0"], choices=list(native.KV_TYPES))
    ap.add_argument("--toy", action="store_true", help="depth 256, 4 steps, whatever the load")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "kv_types.json")
    a = ap.parse_args(argv)
    load = os.getloadavg()[0]
    if a.toy:
        a.depth, a.steps = 256, 4
    elif load >= MAX_LOAD:
        print(f"load average {load:.1f} >= {MAX_LOAD}: not measuring (the machine is shared); "
              "rerun when it is quieter, or --toy")
        return 3
    if not a.model.is_file():
        print(f"need {a.model} (make model)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    model = Model.from_gguf(GGUFFile(a.model), n_batch=512)
    scale = "TOY scale" if a.toy else "full scale"
    print(f"{scale}: default model, depth {a.depth}, {a.steps} decode steps, "
          f"{native.n_threads_default()} threads, load {load:.1f}")
    print(f"{'K/V type':<9} {'decode tok/s':>13} {'step ms (med/min)':>19} {'KV MiB':>8} {'attention alone ms':>19}")
    results = []
    for t in a.types:
        r = decode_steps(model, t, a.depth, a.steps, rng)
        r["attention_alone_s"] = attention_alone(t, a.depth, max(3, a.steps), rng)
        r["type"] = t
        results.append(r)
        print(f"{t:<9} {r['tok_s']:>13.1f} {r['step_median_s'] * 1e3:>10.2f} / {r['step_min_s'] * 1e3:<6.2f} "
              f"{r['kv_bytes'] / 2 ** 20:>8.1f} {r['attention_alone_s'] * 1e3:>19.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(toy_scale=a.toy, depth=a.depth, steps=a.steps, load=load,
                                     threads=native.n_threads_default(), model=str(a.model),
                                     results=results), indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
