"""Rows an A2ATS decode step must fetch from the host store, with and without the GPU cache
of retrieved rows (backend/cuda/rowcache.py), on a real model's selections.

    python bench/bench_rowcache.py [--model M] [--sidecar F] [--ctx 8192] [--steps 64]
                                   [--budget 0.03] [--kv a2ats] [--factors 1 1.25 1.5 2]

The selections are those the policy makes on the CPU (the GPU path selects the same tokens,
tests/test_cuda_backend.py) while decoding --steps greedy tokens after a --ctx-token prefix
of natural text; each layer's sequence of selections then goes through the cache's own
bookkeeping (native.rowcache_plan, the code the CUDA backend runs) for each slot factor.
Per step (after the first, which fetches everything): rows selected, rows fetched, and the
bytes those cost over PCIe (K + V rows of the store's f16), summed over the retrieval
layers and KV heads of one sequence; cache MB is the device memory the caches hold at the
end. "none" is the path without a cache (every selected row, every step). Nothing here runs
on a GPU: the counts are what the GPU path would copy. Writes bench/results/rowcache.json.
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

from a2ats_lite import Runtime, native  # noqa: E402
from a2ats_lite.backend.cpu import CPUBackend  # noqa: E402
from a2ats_lite.corpus import natural_text  # noqa: E402
from a2ats_lite.evaluate import _make_kv, prefill_once, start_from  # noqa: E402
from a2ats_lite.batch import pad_selection  # noqa: E402
from a2ats_lite.backend.cuda.rowcache import RowCache  # noqa: E402

STORE_ITEM = 2          # f16 store rows


class Record:
    """KV observer: every decode selection, per layer (step order)."""

    def __init__(self):
        self.sel: dict = {}

    def on_select(self, layer, seq, position, q_rot, sel):
        self.sel.setdefault(layer, []).append([np.asarray(s, np.int64) for s in sel])


def selections(rt, policy, prefix, steps, budget) -> dict:
    kv = _make_kv(rt, policy, budget)
    rec = Record()
    kv.observers.append(rec)
    try:
        seq = start_from(rt, kv, prefix)
        logits = prefix.logits
        for _ in range(steps):
            logits = rt.model.forward([np.array([int(np.argmax(logits))])], [seq], kv)[0]
    finally:
        kv.close()
    return rec.sel


def replay(sel_by_layer: dict, n_ctx: int, factor: float | None, d: int) -> dict:
    """Rows selected / fetched per step (steps after the first) through the row cache's
    bookkeeping at `factor` slots per selected row (None: no cache)."""
    sel_rows = fetched = 0
    cache_bytes = 0
    n_steps = 0
    for layer, steps in sel_by_layer.items():
        G = len(steps[0])
        c = RowCache(CPUBackend(), G, d, np.float16)
        for t, sel in enumerate(steps):
            idx, lens = pad_selection([sel])
            idx, lens = idx.astype(np.int64), lens.astype(np.int32)
            if factor is None:
                miss = int(lens.sum())
            else:
                c.reserve(int(lens.max(initial=0)), factor, n_ctx)
                *_, m_n = native.rowcache_plan(idx, lens, [c.slot_of], [c.token_at], [c.hand])
                miss = int(m_n.sum())
            if t:                       # the first step fills the cache: not counted
                sel_rows += int(lens.sum())
                fetched += miss
        n_steps = len(steps) - 1
        cache_bytes += c.nbytes() if factor is not None else 0
    row = 2 * d * STORE_ITEM              # a K row and a V row
    return {"factor": factor, "selected_rows_per_step": sel_rows / n_steps,
            "fetched_rows_per_step": fetched / n_steps, "fetched_fraction": fetched / max(1, sel_rows),
            "mb_per_step": fetched / n_steps * row / 2**20, "cache_mb": cache_bytes / 2**20}


def overlap(sel_by_layer: dict) -> float:
    """Median over layers, heads and steps of |sel_t & sel_t-1| / |sel_t|."""
    r = []
    for steps in sel_by_layer.values():
        for a, b in zip(steps, steps[1:]):
            for x, y in zip(a, b):
                if len(y):
                    r.append(len(np.intersect1d(x, y, assume_unique=True)) / len(y))
    return statistics.median(r)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--sidecar", default=None, help="calibration file (default: MODEL.a2ats)")
    ap.add_argument("--ctx", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--budget", type=float, default=0.03)
    ap.add_argument("--kv", nargs="+", default=["a2ats"])
    ap.add_argument("--factors", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rowcache.json")
    a = ap.parse_args()
    if a.steps < 2 or a.ctx < 16:
        ap.error("--steps >= 2 and --ctx >= 16 needed")
    rt = Runtime(a.model, n_ctx=a.ctx + a.steps + 9, sidecar=a.sidecar)
    ids = rt.tokenizer.encode(natural_text("eval"), add_bos=False)
    tokens = [rt.tokenizer.bos_id] + ids[:a.ctx - 1]
    t0 = time.perf_counter()
    prefix = prefill_once(rt, tokens)
    print(f"prefill of {len(tokens)} tokens: {time.perf_counter() - t0:.1f} s")
    d = rt.model.attn_layers[0].head_dim
    results = []
    print(f"{'policy':<7} {'cache':>6} {'selected/step':>14} {'fetched/step':>13} {'fetched':>8} "
          f"{'MB/step':>8} {'cache MB':>9}")
    for policy in a.kv:
        sel = selections(rt, policy, prefix, a.steps, a.budget)
        ov = overlap(sel)
        for f in [None] + a.factors:
            r = replay(sel, rt.n_ctx, f, d)
            r.update(policy=policy, ctx=len(tokens), steps=a.steps, median_overlap=ov)
            results.append(r)
            print(f"{policy:<7} {'none' if f is None else f'{f:g}x':>6} {r['selected_rows_per_step']:14.0f} "
                  f"{r['fetched_rows_per_step']:13.0f} {r['fetched_fraction']:8.3f} "
                  f"{r['mb_per_step']:8.2f} {r['cache_mb']:9.2f}")
        print(f"{policy}: median overlap of consecutive selections {ov:.3f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"model": str(rt.model_path),
                                 "sidecar": a.sidecar, "budget": a.budget, "results": results}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
