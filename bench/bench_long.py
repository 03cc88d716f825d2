"""Long-context decode on the CPU: ours (dense and a2ats) against llama.cpp at its best, on
synthetic files of real shapes (bench/make_synth_gguf.py: random weights, the real KV
per token), next to the machine's memory bandwidth.

    python bench/bench_long.py                     # llama-3.2-1b Q4_0: 8K/32K/64K/128K
    python bench/bench_long.py --shape llama-3.1-8b  # 8K and 32K ours, 8K llama.cpp
    python bench/bench_long.py --contexts 8192 --llama-contexts 8192 --prefill-max 8192
    python bench/bench_long.py --codes 8x8 16x4 32x4 --rerank 3   # layouts side by side

Presets (--shape; --contexts / --llama-contexts override):
  llama-3.2-1b  ours at 8K, 32K, 64K, 128K; llama.cpp at 8K, 32K, 64K
  llama-3.1-8b  ours at 8K, 32K;           llama.cpp at 8K
The file (models/synth-<shape>-q4_0.gguf, or --model) is written when missing.

Per context: up to --prefill-max tokens the prompt ids are really prefilled by our dense
runtime (the prompt tok/s; its K/V are captured); longer contexts are replayed
(model.load_prefix) from random pre-RoPE K/V, one pair shared by every layer (speed does
not depend on the values; "replayed" in the prompt table). Then --decode timed
single-token steps (median) dense, and a2ats on the same prefix with the shipped
default (`a2ats-lite calibrate`'s code layout and exact re-rank, today 8x8 and 4: the
model's sidecar when one sits next to it, else random codebooks in that layout), or with
random codebooks in each --codes layout at each --rerank factor (one row each, "ours a2ats
<layout> r<R>"; 4-bit layouts with an even M are scored by fast-scan as a sidecar
calibrate wrote for them would be: scan="fast", the codes packed in blocks of 32 tokens).
With random codebooks the prefix's codes are drawn at random unless --exact-fill-codes,
while each decode step assigns its new key by nearest centroid through the assigner a real
run uses (cpu_compare.FillCodebook). Then --split-steps profiled steps: where the time goes.
llama.cpp (bench/llama_ref.py) on the same file and prompt ids, same threads, f16 K/V,
flash attention on and off; its long prompts are slow on 2 cores (the 1B shape's 32K
prompt ~24 min per setting), so above --llama-prefill-max (default: --prefill-max) its
cache is replayed too (llama_ref --replay: one block computed, its state loaded block after
block; decode figures only, marked "replayed"), and its figures are cached in
bench/results/llama_ref_cache.json (marked "(cache)"); --llama-timeout stops a setting
that runs longer (reported, not cached).
Tables as bench_cpu.py's, plus the KV memory each cache holds. Writes
bench/results/bench_long.json (bench_long_<shape>.json for a non-default shape).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import cpu_compare as cc  # noqa: E402
import llama_ref  # noqa: E402
import membw  # noqa: E402
from bench_cpu import Profile, machine, print_split, set_threads  # noqa: E402
from a2ats_lite.runtime import Runtime  # noqa: E402

PRESETS = {"llama-3.2-1b": ([8192, 32768, 65536, 131072], [8192, 32768, 65536]),
           "llama-3.1-8b": ([8192, 32768], [8192])}


def synth_path(shape: str) -> Path:
    return ROOT / "models" / f"synth-{shape}-q4_0.gguf"


def fill(rt, ids, ctx: int, args, rng):
    """A dense cache holding ctx tokens: (kv, seq, prefix for a2ats, prompt seconds or None)."""
    kv = cc.new_cache(rt, "dense", ctx + 2 * args.decode + 16 + args.split_steps)
    if ctx <= args.prefill_max:
        seq, prompt_s, prefix = cc.prefill(rt.model, kv, ids)
        return kv, seq, prefix, prompt_s
    prefix = cc.random_prefix(rt.model.attn_layers, ctx, rng)
    return kv, rt.model.load_prefix(kv, prefix), prefix, None


def split(prof, model, kv, seq, tok, n: int):
    """Share of n profiled decode steps' time per category (None for n = 0)."""
    return prof.split(lambda: cc.decode_steps(model, kv, seq, tok, n)) if n else None


def a2ats_row(rt, ctx: int, args, variant: dict, prefix, tok, ceiling, prof, spill_dir=None) -> dict:
    """One a2ats setting (cpu_compare.a2ats_variants) on a new cache holding prefix; spill_dir:
    its host store in an unlinked file there ("offload" rows)."""
    model, item = rt.model, cc.ITEM["f16"]
    kv = cc.new_cache(rt, "a2ats", ctx + 2 * args.decode + 16 + args.split_steps,
                      calib=variant["calib"], budget=args.budget, rerank=variant["rerank"],
                      spill_dir=spill_dir)
    try:
        t0 = time.perf_counter()
        seq = model.load_prefix(kv, prefix)
        fill_s = time.perf_counter() - t0
        steps = cc.decode_steps(model, kv, seq, tok, args.decode)
        rss = cc.resident_mb()                             # while the cache is live
        parts = cc.a2ats_step_bytes(model, kv, seq, tok, item)
        scan = "fast" if kv.policy.fast else "exact"       # what the policy really scores with
        name = f"ours a2ats {variant['label']}" + (" offload" if spill_dir else "")
        return cc.ours_row(name, steps, model.decode_bytes_per_token(),
                           sum(parts.values()), ceiling, kv_parts_bytes=parts, fill_s=fill_s,
                           kv_held_mb=kv.nbytes(seq) / 1e6, rss_mb=rss, codes=variant["codes"],
                           rerank=kv.policy.rerank, scan=scan, offload=bool(spill_dir),
                           time_split=split(prof, model, kv, seq, tok, args.split_steps))
    finally:
        kv.close()


def ours(rt, ctx: int, args, variants, ceiling, rng, prof) -> tuple[list, float | None]:
    model, item = rt.model, cc.ITEM["f16"]
    ids = llama_ref.prompt_ids(ctx, rt.config.n_vocab)
    tok, weight_bytes = ids[-1], model.decode_bytes_per_token()
    T = len(ids) + 1 + args.decode // 2                           # the median step's context
    rows = []
    t0 = time.perf_counter()
    kv, seq, prefix, prompt_s = fill(rt, ids, ctx, args, rng)
    try:
        fill_s = time.perf_counter() - t0
        if "dense" in args.policies:
            steps = cc.decode_steps(model, kv, seq, tok, args.decode)
            rows.append(cc.ours_row("ours dense", steps, weight_bytes,
                                    cc.dense_kv_bytes(model.attn_layers, T, item), ceiling,
                                    fill_s=fill_s, kv_held_mb=kv.nbytes(seq) / 1e6,
                                    rss_mb=cc.resident_mb(),
                                    time_split=split(prof, model, kv, seq, tok, args.split_steps)))
    finally:
        kv.close()
    spills = [None] + ([args.kv_offload_dir] if args.kv_offload_dir else [])
    if "a2ats" in args.policies:
        rows += [a2ats_row(rt, ctx, args, v, prefix, tok, ceiling, prof, spill_dir=spill)
                 for v in variants for spill in spills]
    # the bench's own copy of the prefix (for the a2ats caches' load_prefix): part of "anon"
    own = sum(a.nbytes for a in {id(a): a for pair in prefix for a in pair}.values()) / 1e6
    for r in rows:
        r["bench_prefix_mb"] = own
    return rows, (ctx / prompt_s if prompt_s and ctx else None)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(PRESETS), default="llama-3.2-1b")
    ap.add_argument("--model", type=Path, default=None, help="GGUF file (default: the shape's synthetic file)")
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--llama-contexts", type=int, nargs="*", default=None,
                    help="contexts llama.cpp is timed at (default: the preset's; none: no values)")
    ap.add_argument("--prefill-max", type=int, default=8192,
                    help="contexts up to this are really prefilled by us (prompt tok/s); longer: replayed")
    ap.add_argument("--llama-prefill-max", type=int, default=None,
                    help="the same for llama.cpp (default: --prefill-max)")
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--policies", nargs="+", default=["dense", "a2ats"], choices=["dense", "a2ats"])
    ap.add_argument("--budget", type=float, default=0.03)
    ap.add_argument("--sidecar", type=Path, default=None)
    ap.add_argument("--codes", type=cc.codes_arg, nargs="+", default=None, metavar="MxBITS",
                    help="random codebooks in each layout, one a2ats row each (default: the "
                         f"sidecar, else the shipped {cc.DEFAULT_CODES})")
    ap.add_argument("--rerank", type=cc.rerank_arg, nargs="+", default=None, metavar="R",
                    help="exact re-rank factors, one row each per layout (default: the "
                         f"calibration's; random codebooks: the shipped {cc.DEFAULT_RERANK})")
    ap.add_argument("--split-steps", type=int, default=4, help="steps profiled for the time split (0: none)")
    ap.add_argument("--exact-fill-codes", action="store_true",
                    help="random codebooks: assign the prefix's codes by nearest centroid too (slow)")
    ap.add_argument("--kv-offload-dir", type=Path, default=None, metavar="DIR",
                    help="also run each a2ats setting with its host store in an unlinked file in "
                         "DIR (rows marked offload), to compare resident memory")
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--no-cache", action="store_true", help="time llama.cpp again (cache updated)")
    ap.add_argument("--llama-bench", type=Path, default=None)
    ap.add_argument("--llama-timeout", type=float, default=None, help="seconds per llama.cpp setting")
    ap.add_argument("--llama-cache", type=Path, default=llama_ref.CACHE)
    ap.add_argument("--cache-max-load", type=float, default=None, help="cache no llama.cpp figure "
                    "timed above this load average (default: threads + 1)")
    ap.add_argument("--membw-mib", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args(argv)
    contexts, llama_contexts = PRESETS[a.shape]
    a.contexts = a.contexts or contexts
    a.llama_contexts = llama_contexts if a.llama_contexts is None else a.llama_contexts
    a.model = a.model or synth_path(a.shape)
    a.llama_prefill_max = a.prefill_max if a.llama_prefill_max is None else a.llama_prefill_max
    if a.kv_offload_dir is not None and not a.kv_offload_dir.is_dir():
        ap.error(f"--kv-offload-dir {a.kv_offload_dir}: not a directory")
    a.out = a.out or ROOT / "bench" / "results" / (
        "bench_long.json" if a.shape == "llama-3.2-1b" else f"bench_long_{a.shape}.json")
    return a


def main(argv=None) -> int:
    args = parse(argv)
    if not args.model.is_file():
        print(f"making {args.model} (bench/make_synth_gguf.py)", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "bench" / "make_synth_gguf.py"), "--shape",
                        args.shape, "--type", "q4_0", "-o", str(args.model)], check=True)
    load_before = os.getloadavg()[0]
    if load_before > 1.0:
        print(f"warning: load average {load_before:.1f} before the run: the figures will be low",
              file=sys.stderr)
    threads = set_threads(args.threads)
    bw = membw.measure(threads, args.membw_mib)
    ceiling = bw["read"]
    why_not = llama_ref.unavailable(args.llama_bench) if args.llama_contexts else "no --llama-contexts"
    rt = Runtime(args.model, n_ctx=max(args.contexts) + 2 * args.decode + 32 + args.split_steps,
                 n_batch=args.n_batch)
    prof = Profile(rt.model.w.output.name)
    rng = np.random.default_rng(0)
    try:
        got = cc.bench_variants(args, rt.model.attn_layers, random_fill=not args.exact_fill_codes)
        if got is None:
            return 2
        variants, calib_note = got
        weight_bytes = rt.model.decode_bytes_per_token()
        rows, prompts = [], []
        for ctx in args.contexts:
            mine, prompt = ours(rt, ctx, args, variants, ceiling, rng, prof)
            ref = None
            if not why_not and ctx in args.llama_contexts:
                ref = llama_ref.measure(args.model, ctx, threads, args.decode, n_batch=args.n_batch,
                                        use_cache=not args.no_cache, cache_path=args.llama_cache,
                                        llama_bench=args.llama_bench, timeout=args.llama_timeout,
                                        max_load=args.cache_max_load,
                                        replay=ctx > args.llama_prefill_max)
            T = ctx + 1 + args.decode // 2
            theirs = cc.llama_rows(ref, weight_bytes, cc.dense_kv_bytes(rt.model.attn_layers, T, 2), ceiling)
            rows += [dict(r, depth=ctx) for r in mine + theirs]
            prompts.append(cc.prompt_row(ctx, prompt, ref,
                                         ours_note="replayed" if ctx > args.prefill_max else "-"))
            print(f"  context {ctx} done", file=sys.stderr, flush=True)
    finally:
        prof.close()
        rt.close()
    cc.with_ratios(rows)
    print(f"model {args.model.name}; {threads} threads, f16 K/V, budget {args.budget}; a2ats: {calib_note}")
    print(f"llama.cpp: {why_not and 'not run: ' + why_not or llama_ref.llama_version(args.llama_bench)}"
          f" at {args.llama_contexts}")
    print(f"membw ({bw['method']}): read {bw['read']:.1f}, copy {bw['copy']:.1f}, triad {bw['triad']:.1f} GB/s")
    print()
    print(cc.prompt_table(prompts))
    print()
    print(cc.decode_table(rows, ceiling))
    print("\nKV memory held, fill time and resident memory while decoding (ours; file: mapped "
          "weights and a spilled store, which the page cache can drop):")
    for r in rows:
        if "kv_held_mb" in r:
            dense = next((x for x in rows if x["depth"] == r["depth"] and x["runtime"] == "ours dense"), None)
            vs = f", {r['decode_tok_s'] / dense['decode_tok_s']:.2f}x our dense" if dense and dense is not r else ""
            rss = r.get("rss_mb") or {}
            res = (f"; resident anon {rss['anon']:7.0f} MB (the bench's prefix copy "
                   f"{r['bench_prefix_mb']:.0f}), file {rss['file']:6.0f} MB" if "anon" in rss else "")
            print(f"{r['depth']:>7}  {r['runtime']:<28} held {r['kv_held_mb']:9.1f} MB, filled in "
                  f"{r['fill_s']:6.1f} s{vs}{res}")
    print_split(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(
        model=args.model.name, shape=args.shape, decode_steps=args.decode, budget=args.budget,
        prefill_max=args.prefill_max, llama_prefill_max=args.llama_prefill_max, a2ats=calib_note,
        a2ats_variants=cc.variant_fields(variants),
        llama_cpp=why_not or llama_ref.llama_version(args.llama_bench),
        machine=machine(load_before, threads, bw), prompt=prompts, decode=rows), indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
