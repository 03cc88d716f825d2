"""Shared by bench_cpu.py and bench_long.py: our decode steps (dense and a2ats) at a depth,
the bytes each step must read, llama.cpp's reference (llama_ref.py) and the tables that
put them next to each other and to the machine's bandwidth ceiling (membw.py).

Bytes one decode step must read (MB/step), per runtime:
  dense / llama.cpp   every weight matrix in the form it is multiplied (the quantized
                      blocks) + every cached K and V row of every layer (a sliding-window
                      layer: its window) at f16
  a2ats               the weights + the sliding-window layers' rows + per full-attention
                      layer and KV head: the selected K and V rows, the candidates' codes
                      and the group's LUTs (policy.step_bytes), the keys of the exact re-rank
GB/s = MB/step / step time; "% ceil" = that over membw's read bandwidth.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np

from a2ats_lite.cli import DEFAULT_CODES, DEFAULT_RERANK  # what `calibrate` writes by default
from a2ats_lite.kv import make_kv_cache
from a2ats_lite.vq import Calibration, Codebook, load_sidecar_for, parse_codes, sidecar_path
from a2ats_lite.vq.codebook import StackedCodebooks, fast_scan_layout

ITEM = {"f16": 2, "f32": 4}


# -- the a2ats calibration --------------------------------------------------------------
class FillCodebook(Codebook):
    """A codebook whose codes for a write of many rows at once (a replayed prefix) are drawn
    at random, while a decode step's new key is assigned by nearest centroid as in a real
    run: nearest-centroid codes for a long prefix (every key of every layer and KV head
    against every centroid) are slow to compute and change nothing in a step's cost. The
    policy's per-layer assigner (stack) is the real run's StackedCodebooks for one row."""

    def assign_codes(self, keys, dtype=np.float32):
        if len(keys) <= 1:
            return super().assign_codes(keys, dtype)
        rng = np.random.default_rng(len(keys))
        return rng.integers(0, self.n_centroids, (len(keys), self.M)).astype(np.uint16)

    @staticmethod
    def stack(books, dtype=np.float32):
        return FillStacked(books, dtype)


class FillStacked(StackedCodebooks):
    """StackedCodebooks (the assigner a real run gives each layer) that draws the codes of a
    many-row write at random: keys (n, G, d) -> codes (G, M, n) uint16."""

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        n = np.asarray(keys).shape[0]
        if n <= 1:
            return super().__call__(keys)
        G, M, _, C = self.caT.shape
        return np.random.default_rng(n).integers(0, C, (G, M, n)).astype(np.uint16)


def random_calibration(layers, rng, codes: str = DEFAULT_CODES, rerank: int = DEFAULT_RERANK,
                       b: int = 2048, random_fill: bool = False) -> Calibration:
    """Random codebooks in the layout codes = "MxBITS" (M subspaces of 2**BITS centroids, a
    non-identity metric factor L so the query transform runs, re-rank factor and scan
    recorded as calibrate records them: scan="fast" for the layouts fast-scan scores): a step
    costs what it costs with a real sidecar. random_fill: FillCodebooks (random codes for
    many-row writes)."""
    kind = FillCodebook if random_fill else Codebook
    M, bits = parse_codes(codes)
    books = {}
    for L in layers:
        if L.window is not None:
            continue
        d = L.head_dim
        if d % M:
            raise ValueError(f"codes {codes}: {M} subspaces do not split the head dim {d}")
        for g in range(L.n_kv_heads):
            Lf = np.eye(d) + 0.1 * np.tril(rng.standard_normal((d, d)), -1)    # (d, d)
            sub = rng.standard_normal((M, 2 ** bits, d // M)).astype(np.float32)
            books[(L.index, g)] = kind(None, Lf.astype(np.float32), sub=sub)
    params = dict(b=b, w=64, s=8, n_centroids=2 ** bits, codes=f"{M}x{bits}", rerank=rerank,
                  random=True)
    if fast_scan_layout(M, 2 ** bits):
        params["scan"] = "fast"
    return Calibration(params=params, fingerprint="", a2ats=books)


def codes_arg(text: str) -> str:
    """argparse type of --codes: "MxBITS", normalized."""
    try:
        M, bits = parse_codes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return f"{M}x{bits}"


def rerank_arg(text: str) -> int:
    """argparse type of --rerank: an integer in [1, 1024] (1 = off), as a sidecar allows."""
    if not text.isdigit() or not 1 <= int(text) <= 1024:
        raise argparse.ArgumentTypeError(f"re-rank factor must be an integer in [1, 1024], "
                                         f"got {text!r:.40}")
    return int(text)


def layout_of(calib) -> tuple[str, int, str]:
    """(codes "MxBITS", re-rank, scan) a calibration's parameters give the a2ats policy."""
    p = calib.params
    return (p.get("codes", f"1x{int(p.get('n_centroids', 1)).bit_length() - 1}"),
            int(p.get("rerank", 1)), p.get("scan", "exact"))


def a2ats_variants(model_path, layers, sidecar=None, codes=None, reranks=None, seed: int = 0,
                   random_fill: bool = False) -> tuple[list[dict], str]:
    """The a2ats settings a bench times, one dict(label, calib, codes, rerank, scan) each, and
    a line saying where the codebooks come from. codes None: the model's sidecar when one is
    given or sits next to it, else random codebooks in the shipped layout; codes "MxBITS"
    list: random codebooks in each (random_fill: FillCodebooks). reranks None: the
    calibration's (random: the shipped DEFAULT_RERANK); else every layout at each factor."""
    if codes:
        if sidecar is not None:
            raise ValueError("give --codes (random codebooks) or --sidecar, not both")
        cals = [random_calibration(layers, np.random.default_rng(seed), c, random_fill=random_fill)
                for c in codes]
        fill = "; the replayed prefix's codes drawn at random" if random_fill else ""
        unused = "; the sidecar next to the model not used" if sidecar_path(model_path).is_file() else ""
        note = (f"random codebooks in codes {', '.join(layout_of(c)[0] for c in cals)} "
                f"(re-rank {', '.join(map(str, reranks or [DEFAULT_RERANK]))}{fill}{unused}): "
                f"speed only")
    else:
        cal, note = calibration_for(model_path, layers, sidecar, seed, random_fill)
        cals = [cal]
    out = []
    for cal in cals:
        layout, r0, scan = layout_of(cal)
        for r in reranks or [r0]:
            out.append(dict(label=f"{layout} r{r}", calib=cal, codes=layout, rerank=int(r), scan=scan))
    return out, note


def bench_variants(args, layers, random_fill: bool = False) -> tuple[list[dict], str] | None:
    """a2ats_variants for a bench's arguments (model, sidecar, codes, rerank, policies): ([],
    "-") without the a2ats policy; None, the error printed, for a layout the model cannot take
    (one that does not split the head dim, a sidecar given with --codes, ...)."""
    if "a2ats" not in args.policies:
        return [], "-"
    try:
        return a2ats_variants(args.model, layers, args.sidecar, args.codes, args.rerank,
                              random_fill=random_fill)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None


def variant_fields(variants) -> list[dict]:
    """What the JSON records of each a2ats setting."""
    return [{k: v[k] for k in ("label", "codes", "rerank", "scan")} for v in variants]


def calibration_for(model_path, layers, sidecar=None, seed: int = 0,
                    random_fill: bool = False) -> tuple[Calibration, str]:
    """The model's sidecar when one is given or sits next to it, else random codebooks in
    the shipped layout (random_fill: FillCodebooks); and a line saying which."""
    path = sidecar or sidecar_path(model_path)
    if sidecar is not None or path.is_file():
        cal = load_sidecar_for(model_path, path)
        p = cal.params
        return cal, (f"sidecar {path.name} (codes {p.get('codes', '1x' + str(p.get('n_centroids')))}, "
                     f"re-rank {p.get('rerank', 1)}, scan {p.get('scan', 'exact')})")
    cal = random_calibration(layers, np.random.default_rng(seed), random_fill=random_fill)
    fill = "; the replayed prefix's codes drawn at random" if random_fill else ""
    return cal, (f"random codebooks in the shipped layout (codes {DEFAULT_CODES}, re-rank "
                 f"{DEFAULT_RERANK}; no sidecar next to the model{fill}): speed only")


# -- filling a context --------------------------------------------------------------------
class Capture:
    """KV observer: the pre-RoPE keys and values a prefill writes, per layer (f16 copies)."""

    def __init__(self, n_layers: int):
        self.k = [[] for _ in range(n_layers)]
        self.v = [[] for _ in range(n_layers)]

    def on_write(self, layer, seq, positions, k_pre, v):
        self.k[layer].append(np.asarray(k_pre, np.float16))
        self.v[layer].append(np.asarray(v, np.float16))

    def prefix(self) -> list:
        return [(np.concatenate(k), np.concatenate(v)) for k, v in zip(self.k, self.v)]


def prefill(model, kv, ids) -> tuple[int, float, list]:
    """Run the prompt ids on a new sequence of kv (chunks of model.n_batch): (seq, seconds,
    the captured prefix for load_prefix into another cache)."""
    cap = Capture(len(model.attn_layers))
    kv.observers.append(cap)
    seq = kv.add_sequence()
    try:
        t0 = time.perf_counter()
        model.forward([np.asarray(ids)], [seq], kv, logits="last")
        dt = time.perf_counter() - t0
    finally:
        kv.observers.remove(cap)
    return seq, dt, cap.prefix()


def random_prefix(layers, n: int, rng) -> list:
    """(k_pre, v) (n, G, d) per layer for load_prefix: one random pair shared by every layer
    (speed does not depend on the values; a 128K context of 16 layers would need 8 GB)."""
    L = layers[0]
    pair = (rng.standard_normal((n, L.n_kv_heads, L.head_dim), np.float32),
            rng.standard_normal((n, L.n_kv_heads, L.head_dim), np.float32))
    if any((x.n_kv_heads, x.head_dim) != (L.n_kv_heads, L.head_dim) for x in layers):
        raise ValueError("random_prefix: the layers' K/V shapes differ")
    return [pair] * len(layers)


def new_cache(rt, policy: str, n_ctx: int, calib=None, budget=0.03, cache_type="f16", rerank=None,
              spill_dir=None):
    """A KV cache for a bench run; rerank None: the calibration's factor; spill_dir: a
    retrieval policy's host store in an unlinked file there (--kv-offload-dir)."""
    params = {} if policy == "dense" else dict(calib=calib, budget=budget, rerank=rerank)
    return make_kv_cache(policy, rt.model.attn_layers, n_ctx, backend=rt.backend,
                         cache_type=cache_type, spill_dir=spill_dir, **params)


def resident_mb() -> dict:
    """The process's resident memory now (Linux /proc/self/status), MB: anon (private memory:
    what cannot be dropped), file (mapped file pages: the weights, a spilled KV store; the page
    cache can drop them, written back first when dirty) and shmem. {} elsewhere."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem"):
                    out[key[3:].lower()] = int(val.split()[0]) * 1024 / 1e6   # kB -> MB
    except OSError:
        return {}
    return out


# -- decode steps ---------------------------------------------------------------------------
def decode_steps(model, kv, seq: int, token: int, n: int) -> list[float]:
    """One untimed step (first touch), then n timed single-token steps (seconds each)."""
    tok = [np.array([token])]
    model.forward(tok, [seq], kv)
    steps = []
    for _ in range(n):
        t0 = time.perf_counter()
        model.forward(tok, [seq], kv)
        steps.append(time.perf_counter() - t0)
    return steps


def dense_kv_bytes(layers, T: int, item: int) -> int:
    """K and V rows one dense step reads at context T (a sliding-window layer: its window)."""
    return sum(2 * (T if L.window is None else min(T, L.window)) * L.n_kv_heads * L.head_dim * item
               for L in layers)


class StepBytes:
    """KV observer over one a2ats step: what its selection makes it read (see the docstring)."""

    def __init__(self, kv, item: int):
        self.kv, self.item = kv, item
        self.rerank0 = kv.policy.stats.get("reranked_rows", 0)
        self.parts = dict(rows=0, codes=0, lut=0)

    def on_select(self, layer, seq, position, q_rot, sel):
        L = self.kv.layers[layer]
        self.parts["rows"] += sum(len(s) for s in sel) * 2 * L.head_dim * self.item
        sb = self.kv.policy.step_bytes(L, position + 1)
        self.parts["codes"] += sb["codes"] * L.n_kv_heads
        self.parts["lut"] += sb["lut"] * L.n_kv_heads

    def total(self) -> dict:
        L = next(x for x in self.kv.layers if x.window is None)
        rerank = (self.kv.policy.stats.get("reranked_rows", 0) - self.rerank0) * L.head_dim * self.item
        return dict(self.parts, rerank=rerank)


def a2ats_step_bytes(model, kv, seq: int, token: int, item: int) -> dict:
    """One more a2ats step with StepBytes attached: its parts, and the KV total including the
    sliding-window layers' rows."""
    ob = StepBytes(kv, item)
    kv.observers.append(ob)
    try:
        model.forward([np.array([token])], [seq], kv)
    finally:
        kv.observers.remove(ob)
    parts = ob.total()
    swa = [L for L in kv.layers if L.window is not None]
    parts["window_layers"] = dense_kv_bytes(swa, kv.length(seq), item)
    return parts


def ours_row(runtime: str, steps, weight_bytes: int, kv_bytes: int, ceiling: float | None,
             **extra) -> dict:
    step = statistics.median(steps)
    total = weight_bytes + kv_bytes
    return dict(runtime=runtime, decode_tok_s=1 / step, step_ms=1e3 * step,
                mb_per_step=total / 1e6, weight_mb=weight_bytes / 1e6, kv_mb=kv_bytes / 1e6,
                gb_s=total / step / 1e9, ceiling_frac=(total / step / 1e9 / ceiling) if ceiling else None,
                **extra)


def llama_rows(ref: dict | None, weight_bytes: int, kv_bytes: int, ceiling) -> list[dict]:
    """The reference's settings as table rows (a setting without figures says why)."""
    if ref is None:
        return []
    rows = []
    b = ref["best"] or {}
    for fa, r in ref["settings"].items():
        name = f"llama.cpp fa {fa}" + (" replayed" if r.get("fill") == "replayed" else "")
        if "decode_ms" not in r:
            why = f"timed out after {r['timeout_s']} s" if r.get("timed_out") else f"failed: {r.get('failed')}"
            rows.append(dict(runtime=name, note=why))
            continue
        row = ours_row(name, [r["decode_ms"] / 1e3], weight_bytes, kv_bytes, ceiling,
                       prompt_tok_s=r.get("prompt_tok_s"), cached=r["cached"],
                       not_cached=r.get("not_cached"))
        row["best"] = b.get("decode_fa") == fa
        rows.append(row)
    return rows


# -- tables -------------------------------------------------------------------------------
def _f(x, fmt, width):
    return f"{'-':>{width}}" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{fmt}}"


def decode_table(rows: list[dict], ceiling: float | None) -> str:
    """rows: dict(depth, runtime, decode_tok_s, step_ms, mb_per_step, gb_s, ceiling_frac,
    vs_llama, cached | note)."""
    head = (f"{'depth':>7}  {'runtime':<20} {'tok/s':>8} {'ms/step':>8} {'MB/step':>8} {'GB/s':>6} "
            f"{'%ceil':>6} {'vs llama.cpp best':>18}")
    lines = [f"decode (ceiling: membw read {_f(ceiling, '.1f', 1)} GB/s)", head]
    for r in rows:
        if "note" in r:
            lines.append(f"{r['depth']:>7}  {r['runtime']:<20} {r['note']}")
            continue
        mark = (" (cache)" if r.get("cached") else "") + (" best" if r.get("best") else "") + \
            (f" ({r['not_cached']})" if r.get("not_cached") else "")
        pct = None if r.get("ceiling_frac") is None else 100 * r["ceiling_frac"]
        vs = None if r.get("vs_llama") is None else r["vs_llama"]
        lines.append(f"{r['depth']:>7}  {r['runtime']:<20} {r['decode_tok_s']:>8.2f} {r['step_ms']:>8.1f} "
                     f"{r['mb_per_step']:>8.1f} {r['gb_s']:>6.2f} {_f(pct, '6.0f', 6)} "
                     f"{_f(vs, '17.2f', 17)}{'x' if vs is not None else ''}{mark}")
    return "\n".join(lines)


def prompt_table(rows: list[dict]) -> str:
    """rows: dict(depth, ours_tok_s | None, ours_note, fa_on, fa_off, best, cached)."""
    lines = ["prompt processing (tok/s)",
             f"{'depth':>7}  {'ours':>9} {'llama fa on':>12} {'llama fa off':>13} {'ours/best':>10}"]
    for r in rows:
        ours = _f(r.get("ours_tok_s"), "9.1f", 9) if r.get("ours_tok_s") else f"{r.get('ours_note', '-'):>9}"
        ratio = r["ours_tok_s"] / r["best"] if r.get("ours_tok_s") and r.get("best") else None
        lines.append(f"{r['depth']:>7}  {ours} {_f(r.get('fa_on'), '12.1f', 12)} "
                     f"{_f(r.get('fa_off'), '13.1f', 13)} {_f(ratio, '9.2f', 9)}"
                     f"{'x' if ratio else ''}{' (llama.cpp: cache)' if r.get('cached') else ''}"
                     f"{' (llama.cpp: replayed)' if r.get('llama_replayed') else ''}")
    return "\n".join(lines)


def prompt_row(depth: int, ours_tok_s, ref: dict | None, ours_note: str = "-") -> dict:
    s = (ref or {}).get("settings", {})
    b = (ref or {}).get("best") or {}
    return dict(depth=depth, ours_tok_s=ours_tok_s, ours_note=ours_note,
                fa_on=s.get("on", {}).get("prompt_tok_s"), fa_off=s.get("off", {}).get("prompt_tok_s"),
                best=b.get("prompt_tok_s"), best_fa=b.get("prompt_fa"), cached=b.get("prompt_cached"),
                llama_replayed=bool((ref or {}).get("replayed")))


def with_ratios(rows: list[dict]) -> list[dict]:
    """vs_llama on every row that has a decode rate: its tok/s over llama.cpp's best at that
    depth (rows of one depth are consecutive dicts with 'depth')."""
    for r in rows:
        best = [x for x in rows if x["depth"] == r["depth"] and x.get("best")]
        if "decode_tok_s" in r and best:
            r["vs_llama"] = r["decode_tok_s"] / best[0]["decode_tok_s"]
    return rows
