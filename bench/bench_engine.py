"""The engine under concurrent load on the default model (CPU).

    python bench/bench_engine.py [--clients 1 4 16] [--tokens 64] [--kv dense]

For each level of concurrency, that many requests with mixed prompt lengths
(16..256 tokens) are queued at once and the engine steps until all finish, 64
new tokens each. Reported: aggregate decode tok/s (generated tokens / wall
time of the decode-only steps), time to first token (median, max), and the
per-step time split between the forward pass and the engine's own work
(scheduling, sampling, detokenization). Then batch-1 decode through the engine
against llama.cpp on the same prompt (llama-cpp-python, when installed: the
optional extra `[llama]`), same run, as bench/bench_cpu.py does.
Writes bench/results/bench_engine.json.
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

from a2ats_lite import Runtime  # noqa: E402
from a2ats_lite.sampling import SamplingParams  # noqa: E402
from bench_cpu import bench_llama_cpp  # noqa: E402  (bench/ is on sys.path: the same measurement)

DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"


def run_load(rt, n_clients: int, n_tokens: int, rng) -> dict:
    eng = rt.engine
    eng.clear_cache()
    lengths = rng.integers(16, 257, n_clients)
    prompts = [[rt.tokenizer.bos_id] + [int(t) for t in rng.integers(1000, 200000, n - 1)]
               for n in lengths]
    params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
    s0 = eng.stats.__dict__.copy()
    t0 = time.perf_counter()
    rids = {eng.add_request(p, params): t0 for p in prompts}
    ttft, decode_s, decode_tok, step_forward, step_other = {}, 0.0, 0, [], []
    while eng.has_unfinished():
        ts = time.perf_counter()
        outs = eng.step()
        dt = time.perf_counter() - ts
        info = eng.stats.last_step
        step_forward.append(info["forward_s"])
        step_other.append(info["other_s"])
        if info["prefill_rows"] == 0:
            decode_s += dt
            decode_tok += info["seqs"]
        for o in outs:
            if o.rid not in ttft:
                ttft[o.rid] = time.perf_counter() - rids[o.rid]
    wall = time.perf_counter() - t0
    st = eng.stats
    steps = st.steps - s0["steps"]
    return dict(clients=n_clients, prompt_lengths=[int(x) for x in lengths], new_tokens=n_tokens,
                wall_s=wall, decode_tok_s=decode_tok / decode_s if decode_s else None,
                total_tok_s=(st.generated_tokens - s0["generated_tokens"]) / wall,
                ttft_median_s=statistics.median(ttft.values()), ttft_max_s=max(ttft.values()),
                steps=steps, mean_seqs_per_step=(st.seqs_in_steps - s0["seqs_in_steps"]) / steps,
                step_forward_ms_median=1e3 * statistics.median(step_forward),
                step_other_ms_median=1e3 * statistics.median(step_other),
                other_share=sum(step_other) / (sum(step_other) + sum(step_forward)))


def batch1_decode(rt, ctx: int, n: int, rng) -> float:
    """Median decode step (tok/s) of one request through the engine after a ctx-token prompt."""
    eng = rt.engine
    eng.clear_cache()
    prompt = [rt.tokenizer.bos_id] + [int(t) for t in rng.integers(1000, 200000, ctx - 1)]
    eng.add_request(prompt, SamplingParams(temperature=0, max_tokens=n + 1, ignore_eos=True))
    steps = []
    while eng.has_unfinished():
        t = time.perf_counter()
        eng.step()
        if eng.stats.last_step["prefill_rows"] == 0:
            steps.append(time.perf_counter() - t)
    return 1.0 / statistics.median(steps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--kv", default="dense")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048],
                    help="prompt lengths of the batch-1 decode comparison")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_engine.json")
    args = ap.parse_args(argv)
    if not args.model.is_file():
        print(f"model not found: {args.model} (run `make model`)", file=sys.stderr)
        return 2
    load = os.getloadavg()[0]
    if load > 1.0:
        print(f"warning: load average {load:.1f} before the run: the figures will be low", file=sys.stderr)
    rng = np.random.default_rng(0)
    rt = Runtime(args.model, n_ctx=max(args.contexts) + args.tokens + 300, kv=args.kv,
                 max_seqs=max(args.clients))
    rows = [run_load(rt, c, args.tokens, rng) for c in args.clients]
    print(f"{'clients':>7} {'decode tok/s':>13} {'total tok/s':>12} {'TTFT med s':>11} {'TTFT max s':>11} "
          f"{'seqs/step':>10} {'fwd ms/step':>12} {'engine ms/step':>15} {'engine share':>13}")
    for r in rows:
        print(f"{r['clients']:>7} {r['decode_tok_s']:>13.1f} {r['total_tok_s']:>12.1f} "
              f"{r['ttft_median_s']:>11.2f} {r['ttft_max_s']:>11.2f} {r['mean_seqs_per_step']:>10.1f} "
              f"{r['step_forward_ms_median']:>12.1f} {r['step_other_ms_median']:>15.2f} "
              f"{100 * r['other_share']:>12.1f}%")
    b1 = []
    for ctx in args.contexts:
        ours = batch1_decode(rt, ctx, 16, rng)
        ref = bench_llama_cpp(args.model, ctx, 16, rng)
        ref = None if ref is None else ref["decode_tok_s"]
        b1.append(dict(context=ctx, ours_tok_s=ours, llama_cpp_tok_s=ref,
                       ratio=None if ref is None else ours / ref))
    print(f"\nbatch-1 decode (median step), same run:\n{'context':>8} {'ours tok/s':>11} "
          f"{'llama.cpp tok/s':>16} {'ratio':>6}")
    for r in b1:
        ref = "not installed" if r["llama_cpp_tok_s"] is None else f"{r['llama_cpp_tok_s']:.1f}"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        print(f"{r['context']:>8} {r['ours_tok_s']:>11.1f} {ref:>16} {ratio:>6}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(dict(model=args.model.name, kv=args.kv, load_avg_before=load,
                                        load=rows, batch1=b1), indent=2))
    print(f"\nwrote {args.out}")
    rt.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
