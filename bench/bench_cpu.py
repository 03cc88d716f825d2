"""CPU prompt processing and decode of a model at several depths, ours (dense and a2ats)
against llama.cpp at its best, next to the machine's memory bandwidth.

    python bench/bench_cpu.py [--model PATH] [--contexts 0 2048 8192] [--decode 16]
    python bench/bench_cpu.py --llama-bench /tmp/lcpp/build/bin/llama-bench   # llama.cpp's own tool
    python bench/bench_cpu.py --no-cache          # time llama.cpp again instead of its cache

For each depth (prompt length; depth 0 = a one-token prompt): our dense prefill of the
prompt ids (really computed, chunks of --n-batch: the prompt tok/s), then --decode timed
single-token steps (median) after one untimed step; then a2ats on the same prefix
(replayed into an a2ats cache: prefill is exact under every policy) with the shipped
default (`a2ats-lite calibrate`'s code layout and exact re-rank, today 8x8 and 4: the
model's sidecar when one sits next to it, else random codebooks in that layout; the
output says which), or random codebooks in each --codes layout at each --rerank factor
(one "ours a2ats <layout> r<R>" row each, as bench_long.py). llama.cpp (bench/llama_ref.py:
llama-cpp-python's llama_decode, or llama-bench with --llama-bench) on the same file and
prompt ids, same threads, f16 K/V, flash attention on and off: both are printed, the ratios
are against the faster ("best"); its figures are cached in bench/results/llama_ref_cache.json
and marked "(cache)" when they came from there.
Each decode row shows the bytes a step must read (see cpu_compare.py), the GB/s that
implies and its share of the read bandwidth membw.py measures; then where our decode
step's time goes. Writes bench/results/cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import cpu_compare as cc  # noqa: E402
import llama_ref  # noqa: E402
import membw  # noqa: E402
from a2ats_lite import native  # noqa: E402
from a2ats_lite.backend.cpu import CPUBackend, QMatrix  # noqa: E402
from a2ats_lite.kv import KVCache  # noqa: E402
from a2ats_lite.runtime import Runtime  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


class Profile:
    """Wall time per category over the steps run while on (the outermost timed call counts:
    no time is counted twice). Patches the classes while it lives: close() restores them."""

    def __init__(self, output_name: str):
        self.on, self.t, self._inside, self._saved = False, defaultdict(float), False, []
        big = {output_name}
        targets = [(QMatrix, "apply", lambda a: "output product" if a[0].name in big else "layer products"),
                   (CPUBackend, "attention", lambda a: "attention"),
                   (CPUBackend, "decode_attention", lambda a: "attention"),
                   (CPUBackend, "sparse_attention", lambda a: "attention"),
                   (KVCache, "select", lambda a: "a2ats selection"),
                   (KVCache, "write", lambda a: "kv write"),
                   (KVCache, "write_decode", lambda a: "kv write")]
        for owner, attr, cat in targets:
            fn = getattr(owner, attr, None)
            if fn is not None:
                self._saved.append((owner, attr, fn))
                setattr(owner, attr, self._timed(fn, cat))

    def _timed(self, fn, cat_of):
        prof = self

        def wrapper(*a, **kw):
            if not prof.on or prof._inside:
                return fn(*a, **kw)
            prof._inside = True
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                prof.t[cat_of(a)] += time.perf_counter() - t0
                prof._inside = False
        return wrapper

    def split(self, run) -> dict:
        """Share of run()'s wall time per category (and the rest)."""
        self.t.clear()
        self.on = True
        t0 = time.perf_counter()
        try:
            run()
        finally:
            self.on = False
        total = time.perf_counter() - t0
        out = {k: v / total for k, v in sorted(self.t.items())}
        out["other (python, norms, embedding)"] = max(0.0, 1 - sum(out.values()))
        return out

    def close(self):
        for owner, attr, fn in self._saved:
            setattr(owner, attr, fn)


def ours(rt, depth: int, ids, args, variants, prof, ceiling, weight_bytes) -> tuple[list, float | None]:
    """Our rows at one depth: dense (really prefilled) and a2ats (the same prefix replayed)."""
    n_ctx = len(ids) + 2 * args.decode + 16
    model, item = rt.model, cc.ITEM["f16"]
    tok, rows = ids[-1], []
    kv = cc.new_cache(rt, "dense", n_ctx)
    try:
        seq, prompt_s, prefix = cc.prefill(model, kv, ids)
        steps = cc.decode_steps(model, kv, seq, tok, args.decode)
        T = len(ids) + 1 + args.decode // 2                          # the median step's context
        split = prof.split(lambda: cc.decode_steps(model, kv, seq, tok, args.split_steps)) \
            if args.split_steps else None
        rows.append(cc.ours_row("ours dense", steps, weight_bytes,
                                cc.dense_kv_bytes(model.attn_layers, T, item), ceiling, time_split=split))
    finally:
        kv.close()
    for v in variants if "a2ats" in args.policies else []:
        kv = cc.new_cache(rt, "a2ats", n_ctx, calib=v["calib"], budget=args.budget, rerank=v["rerank"])
        try:
            seq = model.load_prefix(kv, prefix)
            steps = cc.decode_steps(model, kv, seq, tok, args.decode)
            parts = cc.a2ats_step_bytes(model, kv, seq, tok, item)
            split = prof.split(lambda: cc.decode_steps(model, kv, seq, tok, args.split_steps)) \
                if args.split_steps else None
            rows.append(cc.ours_row(f"ours a2ats {v['label']}", steps, weight_bytes, sum(parts.values()),
                                    ceiling, kv_parts_bytes=parts, time_split=split, codes=v["codes"],
                                    rerank=kv.policy.rerank, scan="fast" if kv.policy.fast else "exact"))
        finally:
            kv.close()
    prompt = len(ids) / prompt_s if depth >= 16 else None
    return rows, prompt


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--contexts", type=int, nargs="+", default=[0, 2048, 8192])
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None,
                    help="ours (A2ATS_THREADS) and llama.cpp's (default: ours, all CPUs)")
    ap.add_argument("--policies", nargs="+", default=["dense", "a2ats"], choices=["dense", "a2ats"])
    ap.add_argument("--budget", type=float, default=0.03)
    ap.add_argument("--sidecar", type=Path, default=None, help="a2ats calibration (default: MODEL.a2ats "
                    "when present, else random codebooks in the shipped layout)")
    ap.add_argument("--codes", type=cc.codes_arg, nargs="+", default=None, metavar="MxBITS",
                    help="random codebooks in each layout, one a2ats row each (see bench_long.py)")
    ap.add_argument("--rerank", type=cc.rerank_arg, nargs="+", default=None, metavar="R",
                    help="exact re-rank factors, one a2ats row each per layout")
    ap.add_argument("--split-steps", type=int, default=8, help="steps profiled for the time split (0: none)")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument("--no-cache", action="store_true", help="time llama.cpp again (cache updated)")
    ap.add_argument("--llama-bench", type=Path, default=None, help="time llama.cpp with this llama-bench")
    ap.add_argument("--llama-timeout", type=float, default=None, help="seconds per llama.cpp setting")
    ap.add_argument("--llama-cache", type=Path, default=llama_ref.CACHE)
    ap.add_argument("--cache-max-load", type=float, default=None, help="cache no llama.cpp figure "
                    "timed above this load average (default: threads + 1)")
    ap.add_argument("--membw-mib", type=int, default=None, help="membw array size (default 4x L3)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "cpu.json")
    return ap.parse_args(argv)


def set_threads(n: int | None) -> int:
    """Our native pool's threads (A2ATS_THREADS), read again; -> the count in use."""
    if n is not None:
        os.environ["A2ATS_THREADS"] = str(n)
        native.n_threads_default.cache_clear()
    return native.n_threads_default()


def machine(load_before: float, threads: int, bw: dict) -> dict:
    return dict(platform=platform.platform(), cpu=llama_ref.cpu_name(), cpus=os.cpu_count(),
                python=platform.python_version(), numpy=np.__version__, threads=threads,
                load_avg_before=load_before, load_avg_after=os.getloadavg()[0], membw=bw)


def print_split(rows: list[dict]) -> None:
    rows = [r for r in rows if r.get("time_split")]
    if not rows:
        return
    cats = sorted({c for r in rows for c in r["time_split"]})
    print("\nwhere our decode step's time goes (share of the profiled steps):")
    print(f"{'depth':>7}  {'runtime':<20} " + " ".join(f"{c[:16]:>16}" for c in cats))
    for r in rows:
        print(f"{r['depth']:>7}  {r['runtime']:<20} " +
              " ".join(f"{100 * r['time_split'].get(c, 0):>15.1f}%" for c in cats))


def main(argv=None) -> int:
    args = parse(argv)
    if not args.model.is_file():
        print(f"model not found: {args.model} (run `make model`)", file=sys.stderr)
        return 2
    load_before = os.getloadavg()[0]
    if load_before > 1.0:
        print(f"warning: load average {load_before:.1f} before the run: other processes share the "
              f"CPU and the figures below will be low", file=sys.stderr)
    threads = set_threads(args.threads)
    bw = membw.measure(threads, args.membw_mib)
    ceiling = bw["read"]
    why_not = "--no-llama" if args.no_llama else llama_ref.unavailable(args.llama_bench)
    rt = Runtime(args.model, n_ctx=max(args.contexts) + 2 * args.decode + 32, n_batch=args.n_batch)
    prof = Profile(rt.model.w.output.name)
    try:
        got = cc.bench_variants(args, rt.model.attn_layers)
        if got is None:
            return 2
        variants, calib_note = got
        weight_bytes = rt.model.decode_bytes_per_token()
        rows, prompts = [], []
        for depth in args.contexts:
            ids = llama_ref.prompt_ids(depth, rt.config.n_vocab)
            mine, prompt = ours(rt, depth, ids, args, variants, prof, ceiling, weight_bytes)
            ref = None if why_not else llama_ref.measure(
                args.model, depth, threads, args.decode, n_batch=args.n_batch,
                use_cache=not args.no_cache, cache_path=args.llama_cache,
                llama_bench=args.llama_bench, timeout=args.llama_timeout,
                max_load=args.cache_max_load)
            T = len(ids) + 1 + args.decode // 2
            theirs = cc.llama_rows(ref, weight_bytes, cc.dense_kv_bytes(rt.model.attn_layers, T, 2), ceiling)
            rows += [dict(r, depth=depth) for r in mine + theirs]
            prompts.append(cc.prompt_row(depth, prompt, ref))
            print(f"  depth {depth} done", file=sys.stderr, flush=True)
    finally:
        prof.close()
        rt.close()
    cc.with_ratios(rows)
    print(f"model {args.model.name}; {threads} threads, f16 K/V; a2ats: {calib_note}")
    print(f"llama.cpp: {why_not and 'not run: ' + why_not or llama_ref.llama_version(args.llama_bench)}")
    print(f"membw ({bw['method']}): read {bw['read']:.1f}, copy {bw['copy']:.1f}, triad {bw['triad']:.1f} GB/s")
    print()
    print(cc.prompt_table(prompts))
    print()
    print(cc.decode_table(rows, ceiling))
    print_split(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        model=args.model.name, n_batch=args.n_batch, decode_steps=args.decode, budget=args.budget,
        a2ats=calib_note, a2ats_variants=cc.variant_fields(variants),
        llama_cpp=why_not or llama_ref.llama_version(args.llama_bench),
        machine=machine(load_before, threads, bw), prompt=prompts, decode=rows), indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
