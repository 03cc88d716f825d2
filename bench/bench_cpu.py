"""CPU prefill and decode speed of the default model at several context lengths.

    python bench/bench_cpu.py [--model PATH] [--contexts 512 2048 8192] [--decode 16]

For each context length: prefill that many tokens (chunks of n_batch), then
decode --decode tokens greedily one at a time. Reports prompt tok/s, decode
tok/s (median step), the bytes one decode step reads (weights + KV) and the
bandwidth that implies, and where a decode step's time goes (quantized
products, the 262144-wide output product, attention, the rest = Python and
small numpy ops). Writes bench/results/cpu.json. If llama-cpp-python is
importable, the same prefill/decode is timed with it for comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from a2ats_lite.gguf import GGUFFile  # noqa: E402
from a2ats_lite.backend.cpu import CPUBackend, QMatrix  # noqa: E402
from a2ats_lite.kv import KVCache, make_kv_cache  # noqa: E402
from a2ats_lite.model import Model  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


class Profile:
    """Wall time per category, collected by wrapping the hot functions while enabled."""

    def __init__(self, model: Model):  # patches the classes: every Model instance is profiled
        self.on = False
        self.t = defaultdict(float)
        big = {model.w.output.name}
        apply, attend, append = QMatrix.apply, CPUBackend.attention, KVCache.write
        decode_attend = CPUBackend.decode_attention
        prof = self

        def timed(fn, cat_of):
            def wrapper(*a, **kw):
                if not prof.on:
                    return fn(*a, **kw)
                t0 = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    prof.t[cat_of(a)] += time.perf_counter() - t0
            return wrapper

        QMatrix.apply = timed(apply, lambda a: "output product" if a[0].name in big else "layer products")
        CPUBackend.attention = timed(attend, lambda a: "attention")
        CPUBackend.decode_attention = timed(decode_attend, lambda a: "attention")
        KVCache.write = timed(append, lambda a: "kv append")


def kv_bytes_read(kv: KVCache, seq: int) -> int:
    # a decode step reads every cached K and V row of every layer (window layers: <= window)
    total = 0
    for layer in kv.layers:
        buf = kv.storage.bufs[seq][layer.index]
        n = buf.n if layer.window is None else min(buf.n, layer.window)
        total += 2 * n * buf.k.shape[0] * buf.k.shape[2] * buf.k.itemsize
    return total


def bench_ours(model: Model, model_f: Model, ctx: int, n_decode: int, prof: Profile, rng) -> dict:
    toks = rng.integers(1000, 200000, ctx)
    kv = make_kv_cache("dense", model.attn_layers, ctx + 2 * n_decode + 4)
    s = kv.add_sequence()
    t0 = time.perf_counter()
    logits = model.forward([toks], [s], kv, logits="last")[0]
    t_prefill = time.perf_counter() - t0
    row = dict(context=ctx, prefill_s=t_prefill, prompt_tok_s=ctx / t_prefill)
    nxt = int(logits.argmax())
    row.update(decode(model, kv, s, nxt, n_decode, prof))
    # the same sequence continued with the layer matrices expanded to float32 (BLAS)
    row["float32_layers"] = decode(model_f, kv, s, nxt, n_decode, prof)
    return row


def decode(model: Model, kv, s: int, nxt: int, n_decode: int, prof: Profile) -> dict:
    # one warm-up step (first-touch of buffers), then timed steps under the profiler
    nxt = int(model.forward([np.array([nxt])], [s], kv)[0].argmax())
    prof.t.clear()
    prof.on = True
    steps = []
    for _ in range(n_decode):
        t0 = time.perf_counter()
        nxt = int(model.forward([np.array([nxt])], [s], kv)[0].argmax())
        steps.append(time.perf_counter() - t0)
    prof.on = False
    step = statistics.median(steps)
    w_bytes = model.decode_bytes_per_token()
    kv_b = kv_bytes_read(kv, s)
    total = sum(steps)
    split = {k: v / total for k, v in sorted(prof.t.items())}
    split["other (python, norms, embedding)"] = max(0.0, 1 - sum(split.values()))
    return dict(decode_step_ms=step * 1e3, decode_tok_s=1 / step,
                weight_bytes_per_token=w_bytes, kv_bytes_per_token=kv_b,
                gb_s=(w_bytes + kv_b) / step / 1e9, weight_gb_s=w_bytes / step / 1e9,
                kv_bytes_held=kv.nbytes(s), decode_time_split=split)


def bench_llama_cpp(path: Path, ctx: int, n_decode: int, rng) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    n = os.cpu_count()
    llm = Llama(model_path=str(path), n_ctx=ctx + n_decode + 8, n_batch=512, n_threads=n, n_threads_batch=n,
                logits_all=False, verbose=False)
    toks = [int(t) for t in rng.integers(1000, 200000, ctx)]
    t0 = time.perf_counter()
    llm.eval(toks)
    t_prefill = time.perf_counter() - t0
    steps = []
    nxt = 1000
    for _ in range(n_decode):
        t0 = time.perf_counter()
        llm.eval([nxt])
        steps.append(time.perf_counter() - t0)
    step = statistics.median(steps)
    return dict(context=ctx, prompt_tok_s=ctx / t_prefill, decode_tok_s=1 / step)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu.json")
    args = ap.parse_args(argv)
    if not args.model.is_file():
        print(f"model not found: {args.model} (run `make model`)", file=sys.stderr)
        return 2

    load_before = os.getloadavg()[0]
    if load_before > 1.0:
        print(f"warning: load average {load_before:.1f} before the run: other processes share the "
              f"CPU and the figures below will be low", file=sys.stderr)
    t0 = time.perf_counter()
    f = GGUFFile(args.model)
    model = Model.from_gguf(f, n_batch=args.n_batch)
    load_s = time.perf_counter() - t0
    model_f = Model.from_gguf(f, n_batch=args.n_batch, f32_layers=True)
    prof = Profile(model)
    rng = np.random.default_rng(0)
    rows, ref_rows = [], []
    for ctx in args.contexts:
        rows.append(bench_ours(model, model_f, ctx, args.decode, prof, rng))
        ref = bench_llama_cpp(args.model, ctx, args.decode, rng)
        if ref is not None:
            ref_rows.append(ref)

    print(f"model {args.model.name}: load {load_s:.2f} s; layer matrices "
          f"{'float32' if model.f32_layers else 'quantized'} (default), output matrix quantized")
    print(f"{'context':>8} {'layers':>9} {'prompt tok/s':>13} {'decode tok/s':>13} {'step ms':>8} "
          f"{'MB/token':>9} {'GB/s':>6} {'KV held MB':>11}")
    for r in rows:
        for label, d in (("quantized", r), ("float32", r["float32_layers"])):
            mb = (d["weight_bytes_per_token"] + d["kv_bytes_per_token"]) / 1e6
            pp = f"{r['prompt_tok_s']:>13.1f}" if d is r else f"{'':>13}"
            print(f"{r['context']:>8} {label:>9} {pp} {d['decode_tok_s']:>13.2f} "
                  f"{d['decode_step_ms']:>8.1f} {mb:>9.1f} {d['gb_s']:>6.2f} {d['kv_bytes_held'] / 1e6:>11.1f}")
    print("\nwhere a decode step's time goes:")
    cats = list(rows[0]["decode_time_split"])
    print(f"{'context':>8} {'layers':>9} " + " ".join(f"{c[:22]:>23}" for c in cats))
    for r in rows:
        for label, d in (("quantized", r), ("float32", r["float32_layers"])):
            print(f"{r['context']:>8} {label:>9} " + " ".join(
                f"{100 * d['decode_time_split'].get(c, 0):>22.1f}%" for c in cats))
    if ref_rows:
        print("\nllama-cpp-python on the same machine:")
        for r, o in zip(ref_rows, rows):
            print(f"{r['context']:>8} prompt {r['prompt_tok_s']:.1f} tok/s (ours x{o['prompt_tok_s'] / r['prompt_tok_s']:.2f})"
                  f", decode {r['decode_tok_s']:.2f} tok/s (ours x{o['decode_tok_s'] / r['decode_tok_s']:.2f})")
    else:
        print("\nllama-cpp-python is not installed here: no llama.cpp figures from this run")

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        model=str(args.model.name), load_s=load_s, n_batch=args.n_batch, decode_steps=args.decode,
        machine=dict(platform=platform.platform(), python=platform.python_version(),
                     numpy=np.__version__, cpus=os.cpu_count(),
                     load_avg_before=load_before, load_avg_after=os.getloadavg()[0]),
        ours=rows, llama_cpp=ref_rows or None), indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
