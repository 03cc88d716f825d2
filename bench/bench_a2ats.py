"""Decode speed of dense vs a2ats on the CPU, with a2ats's time split.

    python bench/bench_a2ats.py [--contexts 8192 16384 32768] [--decode 16] [--budget 0.03] [--sidecar F]

One dense prefill per context serves both policies (evaluate.prefill_once).
Each policy then decodes --decode tokens greedily, and the table shows the
median step. For a2ats, the time inside its full-attention layers is split
into scoring (LUT build + lookup), top-K (selection minus scoring), gather
(native row gather from the offloaded store) and attention (over the
selection). Working KV MB is what each policy keeps in ordinary buffers (dense:
every layer's K/V at its grown capacity; a2ats: the sliding-window layers, codes
and nothing else); store MB is a2ats's offloaded full-precision K/V (an anonymous
or spill-file map, the part a GPU build keeps off the device); total = both.
Needs the default model's sidecar (a2ats-lite calibrate). Writes bench/results/a2ats.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from a2ats_lite import Runtime  # noqa: E402
from a2ats_lite.evaluate import _make_kv, prefill_once, start_from  # noqa: E402


def timed(obj, name, acc, key):
    """Wrap obj.name so its wall time adds up in acc[key]."""
    fn = getattr(obj, name)

    def wrap(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            acc[key] += time.perf_counter() - t
    setattr(obj, name, wrap)


def decode(rt, policy, prefix, n, budget):
    kv = _make_kv(rt, policy, budget)
    acc = defaultdict(float)
    if policy != "dense":
        timed(kv, "select", acc, "select")                     # scoring + top-K
        timed(kv.B, "sparse_attention", acc, "attention")      # gather fused with attention
    seq = start_from(rt, kv, prefix)
    # one untimed step first: first touch of the decode buffers, code and gather paths
    logits = rt.model.forward([np.array([int(np.argmax(prefix.logits))])], [seq], kv)[0]
    acc.clear()
    steps = []
    for _ in range(n):
        t = time.perf_counter()
        logits = rt.model.forward([np.array([int(np.argmax(logits))])], [seq], kv)[0]
        steps.append(time.perf_counter() - t)
    held = kv.nbytes(seq)
    store = kv.storage.stores[seq].nbytes_used if policy != "dense" else 0
    # codes live in a calloc'd (slot, head, n_ctx) array: only the written tokens cost memory
    n_tok = int(kv.storage.stores[seq].n.max()) if policy != "dense" else 0
    codes = kv.policy.codes[seq][:, :, :n_tok].nbytes if policy == "a2ats" else 0
    kv.close()
    split = {}
    if policy != "dense":
        split = {"scoring + top-k": acc["select"], "gather + attention": acc["attention"]}
        split = {k: v / n * 1e3 for k, v in split.items()}  # ms per step
    return {"decode_tok_s": 1.0 / statistics.median(steps), "step_ms": statistics.median(steps) * 1e3,
            "kv_in_memory_mb": (held + codes) / 2**20, "offloaded_store_mb": store / 2**20,
            "kv_total_mb": (held + codes + store) / 2**20,
            "split_ms_per_step": split}


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--budget", type=float, default=0.03)
    ap.add_argument("--sidecar", default=None, help="calibration file (default: MODEL.a2ats)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "a2ats.json")
    a = ap.parse_args()
    rt = Runtime(a.model, n_ctx=max(a.contexts) + a.decode + 9, sidecar=a.sidecar)
    rng = np.random.default_rng(0)
    results = []
    print(f"{'ctx':>6} {'policy':<7} {'tok/s':>7} {'step ms':>8} {'working KV MB':>14} {'store MB':>9} "
          f"{'total MB':>9}  split ms/step")
    for ctx in a.contexts:
        tokens = [rt.tokenizer.bos_id] + list(rng.integers(1000, 200000, ctx - 1))
        prefix = prefill_once(rt, tokens)
        for policy in ("dense", "a2ats"):
            r = decode(rt, policy, prefix, a.decode, a.budget)
            r.update(ctx=ctx, policy=policy)
            results.append(r)
            split = ", ".join(f"{k} {v:.1f}" for k, v in r["split_ms_per_step"].items())
            print(f"{ctx:>6} {policy:<7} {r['decode_tok_s']:7.2f} {r['step_ms']:8.1f} "
                  f"{r['kv_in_memory_mb']:14.1f} {r['offloaded_store_mb']:9.1f} {r['kv_total_mb']:9.1f}  {split}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"budget": a.budget, "sidecar": a.sidecar, "results": results}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
