"""Open + dequantize the default model: our reader and native library beside gguf-py, one run.

    python bench/bench_load.py [MODEL] [--gguf-tensors N]

gguf.GGUFReader is timed on the whole file (it takes minutes on 2 cores only
because of the vocabulary; pass --skip-gguf-open to leave it out).
gguf.quants.dequantize is timed on the first N tensors of each type and
extrapolated to the whole model by bytes; the table says so.
Writes bench/results/load.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def timed(fn, repeat=1):
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def ours(path, repeat):
    from a2ats_lite import native
    from a2ats_lite.gguf import GGUFFile

    def open_only():
        f = GGUFFile(path)
        f.metadata["tokenizer.ggml.tokens"]
        return f

    t_open, f = timed(open_only, repeat)

    def dequant_all():
        for name, t in f.tensors.items():
            native.dequantize(f.tensor_data(name), t.ggml_type, t.shape)

    t_deq, _ = timed(dequant_all, repeat)
    return t_open, t_deq, f


def theirs(path, f, n_per_type, skip_open):
    import gguf
    from gguf import quants
    t_open = None
    if not skip_open:
        t_open, _ = timed(lambda: gguf.GGUFReader(str(path)))
    by_type = defaultdict(list)
    for name, t in f.tensors.items():
        by_type[t.ggml_type].append(name)
    sampled_bytes, sampled_s = 0, 0.0
    for names in by_type.values():
        for name in names[:n_per_type]:
            t = f.tensors[name]
            raw = np.asarray(f.tensor_data(name)).reshape(t.shape[0] if len(t.shape) > 1 else 1, -1)
            s, _ = timed(lambda: quants.dequantize(raw, gguf.GGMLQuantizationType(t.ggml_type)))
            sampled_bytes += t.nbytes
            sampled_s += s
    total = sum(t.nbytes for t in f.tensors.values())
    return t_open, sampled_s * total / sampled_bytes, sampled_bytes / total


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", nargs="?", default=str(ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gguf-tensors", type=int, default=2, help="tensors per type timed with gguf.quants")
    ap.add_argument("--skip-gguf-open", action="store_true")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "load.json"))
    a = ap.parse_args()

    o_open, o_deq, f = ours(a.model, a.repeat)
    g_open, g_deq, frac = theirs(a.model, f, a.gguf_tensors, a.skip_gguf_open)
    rows = [
        ("open (metadata + tensor index + vocab)", o_open, g_open, "measured"),
        ("dequantize every tensor to f32", o_deq, g_deq, f"gguf extrapolated from {frac:.0%} of bytes"),
        ("open + dequantize all", o_open + o_deq, (g_open or 0) + g_deq if g_open else None, ""),
    ]
    print(f"model: {a.model} ({f.file_size / 2**20:.0f} MiB), threads: {os.cpu_count()}")
    print(f"{'step':<42}{'a2ats-lite':>12}{'gguf-py':>12}{'speed-up':>10}  note")
    for name, mine, ref, note in rows:
        ref_s = f"{ref:10.2f} s" if ref else "         -"
        ratio = f"{ref / mine:8.0f}x" if ref else "        -"
        print(f"{name:<42}{mine:10.2f} s{ref_s}{ratio}  {note}")
    out = {"model": a.model, "cpu_count": os.cpu_count(), "repeat_median_of": a.repeat,
           "ours_open_s": o_open, "ours_dequant_all_s": o_deq,
           "gguf_open_s": g_open, "gguf_dequant_all_s_extrapolated": g_deq,
           "gguf_dequant_sampled_fraction": frac}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
