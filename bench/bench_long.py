"""Long-context decode on the CPU: dense vs a2ats on a KV-heavy model.

    python bench/make_synth_gguf.py --shape llama-3.2-1b --type q4_0 -o models/synth-llama-3.2-1b-q4_0.gguf
    python bench/bench_long.py [--model FILE] [--contexts 8192 16384 32768 65536] [--decode 32]

The model is the synthetic llama-3.2-1b-shaped Q4_0 file (16 layers, 8 KV heads
of 64 dims: the real model's KV per token; random weights, ~0.5 GB): it is made
with bench/make_synth_gguf.py when missing. Each context is filled by a
replayed prefill (model.load_prefix) of random pre-RoPE K/V, then `--decode`
steps are timed (median). Speed does not depend on the values: a2ats runs with
random codebooks, and its codes are drawn at random instead of by nearest
centroid (assigning 64K keys x 128 heads against 4096 centroids would take the
bench an hour and changes nothing per step). Reported per context and policy:
decode tok/s, KV bytes read per step (dense: every cached K/V row; a2ats: the
selected rows + the codes scored + the LUT), KV memory held. llama.cpp's figures
on the same file come from llama-cpp-python when it is installed.
Writes bench/results/bench_long.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from a2ats_lite.gguf import GGUFFile  # noqa: E402
from a2ats_lite.kv import make_kv_cache  # noqa: E402
from a2ats_lite.model import Model  # noqa: E402
from a2ats_lite.vq import Calibration, Codebook  # noqa: E402

DEFAULT = ROOT / "models" / "synth-llama-3.2-1b-q4_0.gguf"


class RandomCodes(Codebook):
    """A codebook whose assignment draws codes at random (speed only, see the docstring)."""

    def assign(self, keys, dtype=np.float32):
        rng = np.random.default_rng(len(keys))
        return rng.integers(0, len(self.centroids), len(keys)).astype(np.uint16)


def random_calibration(layers, n_centroids: int, rng) -> Calibration:
    books = {(L.index, g): RandomCodes(rng.standard_normal((n_centroids, L.head_dim)).astype(np.float32),
                                       np.eye(L.head_dim, dtype=np.float32))
             for L in layers if L.window is None for g in range(L.n_kv_heads)}
    return Calibration(params={"b": 2048, "w": 64, "s": 8, "n_centroids": n_centroids},
                       fingerprint="", a2ats=books)


class ReadBytes:
    """KV observer: bytes a decode step reads from the selections it sees."""

    def __init__(self, item: int, d: int):
        self.item, self.d, self.rows, self.steps = item, d, 0, 0

    def on_select(self, layer, seq, position, q_rot, sel):
        self.rows += sum(len(s) for s in sel)


def decode(model, kv, prefix, n_decode: int) -> list[float]:
    seq = model.load_prefix(kv, prefix)
    tok = np.array([5])
    model.forward([tok], [seq], kv)                     # untimed: first touch of every path
    steps = []
    for _ in range(n_decode):
        t = time.perf_counter()
        model.forward([tok], [seq], kv)
        steps.append(time.perf_counter() - t)
    return seq, steps


def llama_cpp(path: Path, ctx: int, n: int):
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(path), n_ctx=ctx + n + 8, n_batch=512, n_threads=os.cpu_count(),
                verbose=False)
    llm.eval([5] * ctx)
    steps = []
    for _ in range(n):
        t = time.perf_counter()
        llm.eval([5])
        steps.append(time.perf_counter() - t)
    return 1 / statistics.median(steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT)
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--budget", type=float, default=0.03)
    ap.add_argument("--cache-type", default="f16", choices=["f16", "f32"])
    ap.add_argument("--centroids", type=int, default=4096)
    ap.add_argument("--policies", nargs="+", default=["dense", "a2ats"])
    ap.add_argument("--no-llama", action="store_true",
                    help="skip llama.cpp (its prefill of a long context takes minutes on 2 cores)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_long.json")
    args = ap.parse_args(argv)
    if not args.model.is_file():
        print(f"making {args.model} (bench/make_synth_gguf.py)", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_synth_gguf.py"), "--shape",
                        "llama-3.2-1b", "--type", "q4_0", "-o", str(args.model)], check=True)
    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"warning: load average {load:.1f} before the run: the figures will be low", file=sys.stderr)
    model = Model.from_gguf(GGUFFile(args.model))
    layers = model.attn_layers
    L0 = layers[0]
    item = 2 if args.cache_type == "f16" else 4
    rng = np.random.default_rng(0)
    calib = random_calibration(layers, args.centroids, rng)
    rows = []
    for ctx in args.contexts:
        prefix = [(rng.standard_normal((ctx, L.n_kv_heads, L.head_dim)).astype(np.float32),
                   rng.standard_normal((ctx, L.n_kv_heads, L.head_dim)).astype(np.float32))
                  for L in layers]
        for policy in args.policies:
            params = {} if policy == "dense" else {"budget": args.budget, "calib": calib}
            kv = make_kv_cache(policy, layers, ctx + args.decode + 8, cache_type=args.cache_type, **params)
            rb = ReadBytes(item, L0.head_dim)
            kv.observers.append(rb)
            t0 = time.perf_counter()
            seq, steps = decode(model, kv, prefix, args.decode)
            fill_s = time.perf_counter() - t0 - sum(steps)
            T = ctx + args.decode
            if policy == "dense":
                read = sum(2 * T * L.n_kv_heads * L.head_dim * item for L in layers)
            else:
                n_sel = rb.rows / (args.decode + 1)                       # rows per step, all layers
                codes = sum(T * L.n_kv_heads * 2 for L in layers)         # uint16 per token and head
                lut = sum(L.n_heads * args.centroids * 4 for L in layers)
                read = int(n_sel * 2 * L0.head_dim * item + codes + lut)
            rows.append(dict(context=ctx, policy=policy, decode_tok_s=1 / statistics.median(steps),
                             step_ms=1e3 * statistics.median(steps), kv_read_mb_per_step=read / 1e6,
                             kv_held_mb=kv.nbytes(seq) / 1e6, fill_s=fill_s))
            kv.close()
            r = rows[-1]
            print(f"{ctx:>7} {policy:<6} {r['decode_tok_s']:8.2f} tok/s  {r['step_ms']:8.1f} ms/step  "
                  f"KV read {r['kv_read_mb_per_step']:9.1f} MB/step  held {r['kv_held_mb']:9.1f} MB",
                  flush=True)
        ref = None if args.no_llama else llama_cpp(args.model, ctx, args.decode)
        rows.append(dict(context=ctx, policy="llama.cpp dense", decode_tok_s=ref))
        del prefix
    print(f"\n{'context':>8} {'policy':<16} {'tok/s':>8} {'ms/step':>9} {'KV MB read/step':>16} "
          f"{'KV MB held':>11} {'vs dense':>9}")
    for r in rows:
        if r["decode_tok_s"] is None:
            print(f"{r['context']:>8} {r['policy']:<16} not run (not installed, or --no-llama)")
            continue
        dense = next(x for x in rows if x["context"] == r["context"] and x["policy"] == "dense")
        ratio = r["decode_tok_s"] / dense["decode_tok_s"]
        print(f"{r['context']:>8} {r['policy']:<16} {r['decode_tok_s']:>8.2f} {r.get('step_ms', 0):>9.1f} "
              f"{r.get('kv_read_mb_per_step', 0):>16.1f} {r.get('kv_held_mb', 0):>11.1f} {ratio:>8.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(model=args.model.name, cache_type=args.cache_type,
                                        budget=args.budget, decode_steps=args.decode,
                                        load_avg_before=load, rows=rows), indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
