"""Decode and prefill speed on the GPU (CUDA backend), and the same benchmark on the CPU.

    python bench/bench_gpu.py [--model FILE ...] [--contexts 0 4096 32768] [--batches 1 4 16]
                              [--steps 16] [--kv dense a2ats] [--prefill 512] [--chunk 128]
                              [--sparse auto|gpu|host] [--row-cache 1.5]
    python bench/bench_gpu.py --device cpu --model tiny.gguf --contexts 0 64 --batches 1 2

Per model: load time; prefill tok/s of one prompt of --prefill tokens run as one step, and
the same prompt in steps of --chunk rows (chunked prefill); then one decode cell per
(KV policy, context, batch): `batch` sequences holding `context` tokens each step together
(one Batch of `batch` decode rows per Model.step, greedy tokens by backend.argmax). A
context is filled by a replayed prefill of random pre-RoPE K/V (Model.load_prefix, as in
bench/bench_long.py; on the GPU the same per-layer replay, forward.store_kv, with the K/V
drawn on the device), so no prefill of 32K tokens is run. Each cell times --steps steps
after 2 warm-up steps (the clock is read after synchronizing the device); reported: median
and min step ms, tok/s (batch / median step), weight bytes + KV bytes read per step and the
effective GB/s they imply (gpt-fast style), peak memory (CuPy's pool: total_bytes() sampled
after every step, its max; and device memory in use by memGetInfo), KV bytes held. Speed
does not depend on the values: a2ats runs with random codebooks (cpu_compare.random_calibration:
one subspace of --centroids centroids, no exact re-rank).

A cell that runs out of memory or fails is recorded ("oom" / "error" with the message) and
the next cell runs. A retrieval cell whose host K/V store would exceed
--max-store-gb is recorded as "skipped". With --greedy N each model (file up to
--greedy-max-bytes) is first checked against the CPU backend's f32 path: N teacher-forced
greedy steps, argmax agreement and the largest logit difference.

Default models: models/gemma-3-270m-q4_k_m.gguf when present (skipped with one line when
not: the device machine has no network) and models/synth-llama-3.1-8b-q4_0.gguf, made with
bench/make_synth_gguf.py when missing (on --device cuda; on --device cpu only with
--make-synth). --device cpu: the same benchmark on the CPU backend; its defaults are tiny
(contexts 0 256, batches 1 2, 4 steps, prefill 64) so it runs on a 2-core machine.

Writes bench/results/bench_gpu.json (--out) after every cell, and $OUT/bench_gpu.json when
$OUT is set (the device machine's result folder). Exit status 0, also when cells failed;
2 when the device is unusable or an argument is invalid.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from a2ats_lite.backend import get_backend  # noqa: E402
from a2ats_lite.batch import Batch  # noqa: E402
from a2ats_lite.errors import A2ATSError, DeviceError  # noqa: E402
from a2ats_lite.gguf import GGUFFile  # noqa: E402
from a2ats_lite.kv import make_kv_cache  # noqa: E402
from a2ats_lite.model import Model  # noqa: E402
from a2ats_lite.model.forward import store_kv  # noqa: E402

DEFAULT_MODEL = ROOT / "models" / "gemma-3-270m-q4_k_m.gguf"
SYNTH_8B = ROOT / "models" / "synth-llama-3.1-8b-q4_0.gguf"
SYNTH_RE = re.compile(r"^synth-(?P<shape>[a-z0-9.\-]+?)-(?P<type>q4_0|q8_0|f16)(?:-(?P<layers>\d+)l)?\.gguf$")
WARMUP = 2
DEFAULTS = {  # per device: contexts, batches, steps, prefill, chunk
    "cuda": dict(contexts=[0, 4096, 32768], batches=[1, 4, 16], steps=16, prefill=512, chunk=128),
    "cpu": dict(contexts=[0, 256], batches=[1, 2], steps=4, prefill=64, chunk=32),
}
OOM_WORDS = ("out of memory", "memoryallocation", "cudaerrormemoryallocation", "cublas_status_alloc_failed")


# -- the device: synchronization, memory sampling, random K/V ------------------------------
class Device:
    def __init__(self, name: str, **options):
        self.name = name
        self.B = get_backend(name, **options)      # DeviceError when cuda is unusable
        self.gpu = name == "cuda"
        self.cp = None
        if self.gpu:
            import cupy
            self.cp = cupy
            self.pool = cupy.get_default_memory_pool()

    def sync(self) -> None:
        if self.gpu:
            self.cp.cuda.Device().synchronize()

    def free(self) -> None:
        """Give the pool's cached blocks back (between cells, after an OOM)."""
        if self.gpu:
            self.sync()
            self.pool.free_all_blocks()

    def info(self) -> dict:
        d = dict(device=self.name, platform=platform.platform(), python=platform.python_version(),
                 numpy=np.__version__, cpus=os.cpu_count(), load_avg=os.getloadavg()[0])
        if self.gpu:
            try:
                d.update(self._gpu_info())
            except Exception as e:  # noqa: BLE001 - informational only
                d["gpu_info_error"] = err_msg(e)
        return d

    def _gpu_info(self) -> dict:
        cp = self.cp
        rt = cp.cuda.runtime
        props = rt.getDeviceProperties(0)
        name = props.get("name", b"?")
        free, total = rt.memGetInfo()
        d = dict(gpu=name.decode() if isinstance(name, bytes) else str(name),
                 compute_capability=f"{props.get('major')}.{props.get('minor')}",
                 gpu_memory_bytes=int(total), gpu_free_bytes_at_start=int(free),
                 cupy=cp.__version__, cuda_runtime=_cuda_version(rt.runtimeGetVersion()),
                 cuda_driver=_cuda_version(rt.driverGetVersion()))
        try:
            d["nvrtc"] = ".".join(map(str, cp.cuda.nvrtc.getVersion()))
        except Exception:  # noqa: BLE001 - informational only
            pass
        return d

    def randn(self, shape, rng, host: bool):
        """Random float32 K/V rows: on the device (GPU, not host) or as numpy."""
        if self.gpu and not host:
            return self.cp.random.standard_normal(shape, dtype=np.float32)
        return rng.standard_normal(shape, dtype=np.float32)


def _cuda_version(v: int) -> str:
    return f"{v // 1000}.{v % 1000 // 10}"


class Peak:
    """Peak memory over a cell: CuPy pool bytes (total and in use), device memory in use
    (memGetInfo), host max RSS. Sampled after every step (outside the timed region)."""

    def __init__(self, dev: Device):
        self.dev = dev
        self.pool = self.pool_used = self.device_used = 0
        self.sample()

    def sample(self) -> None:
        if self.dev.gpu:
            p = self.dev.pool
            self.pool = max(self.pool, int(p.total_bytes()))
            self.pool_used = max(self.pool_used, int(p.used_bytes()))
            free, total = self.dev.cp.cuda.runtime.memGetInfo()
            self.device_used = max(self.device_used, int(total - free))

    def as_dict(self) -> dict:
        if not self.dev.gpu:
            return dict(peak_pool_bytes=None, peak_pool_used_bytes=None, peak_device_used_bytes=None,
                        host_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        return dict(peak_pool_bytes=self.pool, peak_pool_used_bytes=self.pool_used,
                    peak_device_used_bytes=self.device_used,
                    host_max_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def classify(e: BaseException) -> str:
    if isinstance(e, MemoryError):          # cupy.cuda.memory.OutOfMemoryError is one
        return "oom"
    msg = f"{type(e).__name__} {e}".lower()
    return "oom" if any(w in msg for w in OOM_WORDS) else "error"


def err_msg(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:2000]


# -- models -------------------------------------------------------------------------------
def make_synth(path: Path, quiet: bool = False) -> None:
    m = SYNTH_RE.match(path.name)
    cmd = [sys.executable, str(ROOT / "bench" / "make_synth_gguf.py"), "--shape", m["shape"],
           "--type", m["type"], "-o", str(path)]
    if m["layers"]:
        cmd += ["--layers", m["layers"]]
    print(f"making {path} ({' '.join(cmd[1:])})", file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL if quiet else None)


def resolve_models(args) -> list[tuple[Path, str | None]]:
    """-> [(path, None) to run, or (path, reason) to skip with one line]."""
    out = []
    paths = args.model or [DEFAULT_MODEL, SYNTH_8B]
    for p in paths:
        p = Path(p)
        if p.is_file():
            out.append((p, None))
            continue
        synth = SYNTH_RE.match(p.name)
        if synth and (args.device == "cuda" or args.make_synth):
            try:
                make_synth(p)
                out.append((p, None))
            except (subprocess.CalledProcessError, OSError) as e:
                out.append((p, f"could not be made: {err_msg(e)}"))
        elif synth:
            out.append((p, "not present (made only on --device cuda or with --make-synth)"))
        elif p == DEFAULT_MODEL and not args.model:
            out.append((p, "not present (the default model: `make model`; no network on the device)"))
        else:
            out.append((p, "not present"))
    return out


# -- filling a context: the replayed prefill ----------------------------------------------
class Prefix:
    """Random pre-RoPE K/V of `n` positions, one array pair per distinct (G, d) layer shape
    (every layer replays the same values: speed does not depend on them)."""

    def __init__(self, dev: Device, layers, n: int, rng, host: bool):
        self.n, self.host = n, host
        self.kv = {}
        for L in layers:
            key = (L.n_kv_heads, L.head_dim)
            if key not in self.kv:
                self.kv[key] = (dev.randn((n, *key), rng, host), dev.randn((n, *key), rng, host))

    def per_layer(self, layers):
        return [self.kv[(L.n_kv_heads, L.head_dim)] for L in layers]


def fill_sequence(model: Model, kv, prefix: Prefix | None) -> int:
    """A new sequence of kv holding prefix.n positions. Host arrays: Model.load_prefix; device
    arrays (GPU): the same replay (forward.store_kv per layer), without the host round trip."""
    if prefix is None or prefix.n == 0:
        return kv.add_sequence()
    layers = model.attn_layers
    if prefix.host:
        return model.load_prefix(kv, prefix.per_layer(layers))
    seq = kv.add_sequence()
    try:
        batch = Batch.make([seq], [np.zeros(prefix.n, np.int64)], [0])
        for L, (k, v) in zip(layers, prefix.per_layer(layers)):
            store_kv(model.B, L, kv, batch, k, v)
        kv.advance(seq, prefix.n)
        kv.compact(seq)
    except BaseException:
        kv.remove_sequence(seq)
        raise
    return seq


def probe_load_prefix(model: Model, dev: Device, rng) -> str:
    """Whether Model.load_prefix takes host (numpy) K/V on this backend: 'ok' or the error."""
    kv = None
    try:
        kv = make_kv_cache("dense", model.attn_layers, 16, backend=model.B, cache_type="f16")
        p = Prefix(dev, model.attn_layers, 4, rng, host=True)
        seq = model.load_prefix(kv, p.per_layer(model.attn_layers))
        return "ok" if kv.length(seq) == 4 else "error: wrong length"
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return err_msg(e)
    finally:
        if kv is not None:
            kv.close()


# -- bytes read per decode step ------------------------------------------------------------
class SelectCount:
    """KV observer: rows a retrieval policy selects (decode steps of retrieval layers)."""

    def __init__(self):
        self.rows = 0

    def on_select(self, layer, seq, position, q_rot, sel):
        self.rows += sum(len(s) for s in sel)


def kv_read_bytes(layers, kv, policy: str, T: float, n_seqs: int, selected_rows_per_step: float,
                  item: int, centroids: int) -> int:
    """KV bytes one decode step reads for n_seqs sequences at about T cached positions:
    dense layers every visible row (window layers at most the window); retrieval layers
    the selected rows + their codes (M uint16 per position and KV head, M product-code
    subspaces) + the LUT (M x centroids float32 per query head)."""
    total = 0.0
    M = int(getattr(kv.policy, "M", 1) or 1)
    for L in layers:
        if kv.retrieves(L.index):
            total += n_seqs * (T * L.n_kv_heads * 2 * M + L.n_heads * M * centroids * 4)
        else:
            vis = T if L.window is None else min(T, L.window)
            total += n_seqs * 2 * vis * L.n_kv_heads * L.head_dim * item
    if policy != "dense":
        d = layers[0].head_dim
        total += selected_rows_per_step * 2 * d * item
    return int(total)


# -- prefill -------------------------------------------------------------------------------
def bench_prefill(model: Model, dev: Device, n: int, chunk: int, reps: int, cache_type: str,
                  rng) -> list[dict]:
    B, layers = model.B, model.attn_layers
    toks = rng.integers(0, model.config.n_vocab, n).astype(np.int64)
    rows = []
    for mode, step_rows in (("one step", n), ("chunked", min(chunk, n))):
        peak = Peak(dev)

        def once():
            kv = make_kv_cache("dense", layers, n + 8, backend=B, cache_type=cache_type,
                               initial=n + 8)
            try:
                s = kv.add_sequence()
                dev.sync()
                t0 = time.perf_counter()
                for a in range(0, n, step_rows):
                    b = min(n, a + step_rows)
                    want = None if b == n else [np.zeros(0, np.int64)]
                    logits = model.step(Batch.make([s], [toks[a:b]], [a], want), kv)
                B.argmax(logits)
                dev.sync()
                dt = time.perf_counter() - t0
                peak.sample()
                return dt
            finally:
                kv.close()

        row = dict(mode=mode, tokens=n, rows_per_step=step_rows, status="ok", message=None)
        try:
            once()                                              # warm-up: kernel compiles, cuBLAS
            times = [once() for _ in range(max(1, reps))]
            t = statistics.median(times)
            row.update(median_ms=1e3 * t, min_ms=1e3 * min(times), tok_s=n / t, reps=len(times))
        except (A2ATSError, MemoryError, RuntimeError, ValueError, OSError) as e:
            row.update(status=classify(e), message=err_msg(e))
        except Exception as e:  # noqa: BLE001 - any other failure is recorded, the bench goes on
            row.update(status="error", message=err_msg(e))
        row.update(peak.as_dict())
        dev.free()
        rows.append(row)
        _print_prefill(row)
    return rows


def _print_prefill(r: dict) -> None:
    if r["status"] != "ok":
        print(f"  prefill {r['tokens']} tokens, {r['mode']} ({r['rows_per_step']} rows/step): "
              f"{r['status']}: {r['message']}", flush=True)
        return
    pool = "" if r["peak_pool_bytes"] is None else f", peak pool {r['peak_pool_bytes'] / 2**20:.0f} MiB"
    print(f"  prefill {r['tokens']} tokens, {r['mode']} ({r['rows_per_step']} rows/step): "
          f"{r['tok_s']:.1f} tok/s ({r['median_ms']:.1f} ms){pool}", flush=True)


# -- decode --------------------------------------------------------------------------------
def decode_steps(model: Model, dev: Device, kv, seqs, steps: int, peak: Peak, rng,
                 warmup: int = WARMUP):
    """warmup + steps decode steps of every sequence together -> timed step seconds."""
    toks = rng.integers(0, model.config.n_vocab, len(seqs)).astype(np.int64)
    times = []
    for i in range(warmup + steps):
        batch = Batch.make(seqs, [toks[j:j + 1] for j in range(len(seqs))],
                           [kv.length(s) for s in seqs])
        dev.sync()
        t0 = time.perf_counter()
        toks = model.step(batch, kv, greedy=True)       # ids picked on the backend
        dev.sync()
        dt = time.perf_counter() - t0
        peak.sample()
        if i >= warmup:
            times.append(dt)
    return times


def bench_decode(model: Model, dev: Device, args, policy: str, weight_bytes: int, rng,
                 cells: list, on_cell) -> None:
    """Every (context, batch) cell of one KV policy, appended to cells (on_cell() after each)."""
    B, layers = model.B, model.attn_layers
    item = 2 if args.cache_type == "f16" else 4
    params = {}
    if policy != "dense":
        from cpu_compare import random_calibration
        bits = args.centroids.bit_length() - 1
        params = {"budget": args.budget,
                  "calib": random_calibration(layers, np.random.default_rng(1), codes=f"1x{bits}",
                                              rerank=1)}
    for ctx in args.contexts:
        n_ctx = ctx + WARMUP + args.steps + 8
        kv, prefix, seqs = None, None, []
        try:
            # initial=n_ctx: buffers sized once (no growth, and so no reallocation, mid-cell)
            kv = make_kv_cache(policy, layers, n_ctx, backend=B, cache_type=args.cache_type,
                               initial=n_ctx, **params)
            # GPU: K/V drawn on the device and replayed as a prefill hands them to the cache
            # (device arrays, every policy); CPU: Model.load_prefix of host arrays
            prefix = Prefix(dev, layers, ctx, rng, host=not dev.gpu) if ctx else None
            ctx_error = None
        except Exception as e:  # noqa: BLE001 - the context's cells are recorded as failed
            ctx_error = e
        for b in args.batches:
            cell = dict(kv=policy, context=ctx, batch=b, steps=args.steps, status="ok", message=None)
            peak = Peak(dev)
            t_fill = 0.0
            try:
                if ctx_error is not None:
                    raise ctx_error
                if policy != "dense":
                    store = b * ctx * sum(2 * L.n_kv_heads * L.head_dim * item for L in layers
                                          if kv.retrieves(L.index))
                    if store > args.max_store_gb * 1e9:
                        cell.update(status="skipped", message=f"host store of {store / 1e9:.1f} GB "
                                    f"> --max-store-gb {args.max_store_gb}")
                        raise _Skip()
                t0 = time.perf_counter()
                while len(seqs) < b:
                    seqs.append(fill_sequence(model, kv, prefix))
                    peak.sample()
                dev.sync()
                t_fill = time.perf_counter() - t0
                run = seqs[:b]
                fetch0 = dict(B.fetch_stats) if B.name == "cuda" else {}   # the CUDA backend's counters
                times = decode_steps(model, dev, kv, run, args.steps, peak, rng)
                if fetch0:          # rows the retrieval layers selected / fetched from the host
                    n = args.steps + WARMUP
                    cell["rows_per_step"] = {k: (B.fetch_stats[k] - fetch0[k]) / n for k in fetch0}
                    cell["sparse_paths"] = {str(k): v for k, v in B.chooser.choice.items()}
                sel = 0.0
                if policy != "dense":       # rows selected: one more step, untimed, observed
                    counter = SelectCount()
                    kv.observers.append(counter)
                    try:
                        decode_steps(model, dev, kv, run, 1, peak, rng, warmup=0)
                    finally:
                        kv.observers.remove(counter)
                    sel = float(counter.rows)
                    # the step's time split (each phase synchronized: untimed steps)
                    B.profile = {}
                    try:
                        decode_steps(model, dev, kv, run, SPLIT_STEPS, peak, rng, warmup=0)
                        cell["split_ms"] = {k: 1e3 * v / SPLIT_STEPS for k, v in B.profile.items()}
                    finally:
                        B.profile = None
                med = statistics.median(times)
                T = ctx + WARMUP + (args.steps + 1) / 2
                kv_b = kv_read_bytes(layers, kv, policy, T, b, sel, item, args.centroids)
                cell.update(median_step_ms=1e3 * med, min_step_ms=1e3 * min(times), tok_s=b / med,
                            tok_s_per_seq=1 / med, weight_bytes_per_step=weight_bytes,
                            kv_bytes_per_step=kv_b, gb_s=(weight_bytes + kv_b) / med / 1e9,
                            kv_bytes_held=int(sum(kv.nbytes(s) for s in run)), fill_s=t_fill)
            except _Skip:
                pass
            except KeyboardInterrupt:
                raise
            except Exception as e:  # noqa: BLE001 - recorded per cell; the next cell runs
                cell.update(status=classify(e), message=err_msg(e))
                if args.verbose:
                    traceback.print_exc()
                dev.free()
            if kv is not None:
                # back to `ctx` tokens for the next batch size (else dropped, and refilled);
                # a sequence a failure left half-filled is dropped too
                for s in list(kv.lengths):
                    if s in seqs and kv.length(s) == ctx:
                        continue
                    if s in seqs and kv.can_truncate(s, ctx):
                        kv.truncate(s, ctx)
                    else:
                        kv.remove_sequence(s)
                        if s in seqs:
                            seqs.remove(s)
            cell.update(peak.as_dict())
            cells.append(cell)
            _print_cell(cell)
            on_cell()
        if kv is not None:
            kv.close()
        del kv, prefix, seqs
        dev.free()


class _Skip(Exception):
    pass


SPLIT_STEPS = 3     # steps profiled per retrieval cell for its time split


HEADER = (f"  {'kv':<6} {'context':>7} {'batch':>5} {'tok/s':>9} {'ms/step':>8} {'min ms':>8} "
          f"{'MB read':>9} {'GB/s':>7} {'KV MB':>9} {'pool MiB':>9} {'dev MiB':>8}  status")


def _print_cell(c: dict) -> None:
    if c["status"] != "ok":
        print(f"  {c['kv']:<6} {c['context']:>7} {c['batch']:>5} {'-':>9} {'-':>8} {'-':>8} "
              f"{'-':>9} {'-':>7} {'-':>9} {'-':>9} {'-':>8}  {c['status']}: {c['message']}", flush=True)
        return
    mib = (lambda x: f"{x / 2**20:9.0f}") if c["peak_pool_bytes"] is not None else (lambda x: f"{'-':>9}")
    dev = f"{c['peak_device_used_bytes'] / 2**20:8.0f}" if c["peak_device_used_bytes"] else f"{'-':>8}"
    read = (c["weight_bytes_per_step"] + c["kv_bytes_per_step"]) / 1e6
    print(f"  {c['kv']:<6} {c['context']:>7} {c['batch']:>5} {c['tok_s']:>9.1f} "
          f"{c['median_step_ms']:>8.2f} {c['min_step_ms']:>8.2f} {read:>9.1f} {c['gb_s']:>7.1f} "
          f"{c['kv_bytes_held'] / 1e6:>9.2f} {mib(c['peak_pool_bytes'])} {dev}  ok", flush=True)
    if c.get("rows_per_step", {}).get("selected"):
        r = c["rows_per_step"]
        print(f"         rows/step: {r['selected']:.0f} selected, {r['fetched']:.0f} fetched from the "
              f"host store; path by (batch, rows): {c.get('sparse_paths') or '-'}", flush=True)
    if c.get("split_ms"):
        print("         split ms/step: " + ", ".join(f"{k} {v:.2f}" for k, v in c["split_ms"].items()),
              flush=True)


# -- correctness: the benchmarked backend against the CPU's f32 path -------------------------
def greedy_check(path: Path, model: Model, n_tokens: int, rng) -> dict:
    """Teacher-forced greedy decode of a random 16-token prompt + n_tokens steps on the
    benchmarked model and on the CPU backend with f32 layer matrices (the reference), both
    with f32 K/V: per step the max |logit difference| and whether the argmaxes agree (the
    reference's tokens are fed to both). A disagreement at a near-tie (reference gap between
    the two tokens <= 1e-3 * max |logit|) is counted apart."""
    ref = Model.from_gguf(GGUFFile(path), n_batch=64, f32_layers=True)
    prompt = rng.integers(0, model.config.n_vocab, 16).astype(np.int64)

    def run(m: Model, forced):
        kv = make_kv_cache("dense", m.attn_layers, len(prompt) + n_tokens + 8, backend=m.B,
                           cache_type="f32")
        try:
            s = kv.add_sequence()
            logits = m.step(Batch.make([s], [prompt], [0]), kv)
            out, toks = [logits[0]], []
            for i in range(n_tokens):
                t = int(np.asarray(m.B.argmax(logits)).reshape(-1)[0])
                toks.append(t)
                nxt = t if forced is None else forced[i]
                logits = m.step(Batch.make([s], [np.array([nxt])], [kv.length(s)]), kv)
                out.append(logits[0])
            toks.append(int(np.asarray(m.B.argmax(logits)).reshape(-1)[0]))
            return np.stack(out), toks
        finally:
            kv.close()

    ref_logits, ref_toks = run(ref, None)
    dev_logits, dev_toks = run(model, ref_toks)
    scale = max(1.0, float(np.abs(ref_logits).max()))
    diff = np.abs(dev_logits.astype(np.float64) - ref_logits).max(axis=1)
    mism = [i for i in range(len(ref_toks)) if ref_toks[i] != dev_toks[i]]
    ties = [i for i in mism
            if abs(float(ref_logits[i, ref_toks[i]]) - float(ref_logits[i, dev_toks[i]])) <= 1e-3 * scale]
    return dict(reference="cpu backend, f32 layer matrices, f32 K/V (teacher-forced)",
                prompt_tokens=len(prompt), steps=len(ref_toks), max_abs_logit_diff=float(diff.max()),
                max_rel_logit_diff=float(diff.max() / scale), first_step_rel_diff=float(diff[0] / scale),
                argmax_agree=len(ref_toks) - len(mism), mismatches=mism, near_tie_mismatches=ties,
                finite=bool(np.isfinite(dev_logits).all()))


# -- one model ----------------------------------------------------------------------------
def bench_model(path: Path, dev: Device, args, rng, res: dict, on_cell) -> None:
    """Fill res (already in the result) with one model's figures; on_cell() saves the JSON."""
    res.update(model=path.name, path=str(path), status="ok", message=None, decode=[], prefill=[])
    peak = Peak(dev)
    t0 = time.perf_counter()
    try:
        model = Model.from_gguf(GGUFFile(path), n_batch=max(args.prefill, args.chunk, 16),
                                backend=dev.B)
        dev.sync()
    except Exception as e:  # noqa: BLE001 - the model is recorded as failed, the next one runs
        res.update(status=classify(e), message=err_msg(e))
        print(f"model {path.name}: {res['status']}: {res['message']}", flush=True)
        dev.free()
        return
    peak.sample()
    c = model.config
    res.update(load_s=time.perf_counter() - t0, arch=c.arch, n_layer=c.n_layer, n_embd=c.n_embd,
               n_head=c.n_head, n_head_kv=c.n_head_kv, head_dim=c.head_dim, n_vocab=c.n_vocab,
               file_bytes=path.stat().st_size, weight_bytes_per_step=model.decode_bytes_per_token(),
               fill="Model.load_prefix of host K/V" if not dev.gpu else
                    "forward.store_kv replay of K/V drawn on the device (Model.load_prefix's loop)",
               after_load=peak.as_dict())
    res["load_prefix_host_kv"] = probe_load_prefix(model, dev, rng)
    w = res["weight_bytes_per_step"]
    print(f"\nmodel {path.name} on {dev.name}: {c.arch}, {c.n_layer} layers, vocab {c.n_vocab}; "
          f"load {res['load_s']:.1f} s; weights read per decode step {w / 1e6:.1f} MB; "
          f"load_prefix with host K/V: {res['load_prefix_host_kv']}", flush=True)
    if args.greedy:
        if path.stat().st_size > args.greedy_max_bytes:
            res["greedy"] = dict(status="skipped", message=f"file larger than --greedy-max-bytes "
                                 f"{args.greedy_max_bytes:.0f} (the CPU reference would be slow)")
        else:
            try:
                res["greedy"] = dict(status="ok", **greedy_check(path, model, args.greedy, rng))
            except Exception as e:  # noqa: BLE001 - recorded; the benchmark goes on
                res["greedy"] = dict(status=classify(e), message=err_msg(e))
            dev.free()
        g = res["greedy"]
        if g["status"] == "ok":
            print(f"  greedy vs CPU f32: {g['argmax_agree']}/{g['steps']} argmax agree "
                  f"(near-tie mismatches {len(g['near_tie_mismatches'])}), max |logit diff| "
                  f"{g['max_abs_logit_diff']:.2e} ({g['max_rel_logit_diff']:.1e} of max |logit|)",
                  flush=True)
        else:
            print(f"  greedy vs CPU f32: {g['status']}: {g['message']}", flush=True)
        on_cell()
    res["prefill"] = bench_prefill(model, dev, args.prefill, args.chunk, args.prefill_reps,
                                   args.cache_type, rng)
    on_cell()
    print(HEADER, flush=True)
    for policy in args.kv:
        bench_decode(model, dev, args, policy, w, rng, res["decode"], on_cell)
    del model
    dev.free()


# -- main ---------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, nargs="+", action="extend", default=None,
                    help="GGUF file(s); repeatable. A missing synth-SHAPE-TYPE.gguf is made.")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--contexts", type=int, nargs="+", default=None)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per cell")
    ap.add_argument("--kv", nargs="+", default=["dense"], choices=["dense", "a2ats"])
    ap.add_argument("--prefill", type=int, default=None, help="prompt tokens of the prefill run")
    ap.add_argument("--chunk", type=int, default=None, help="rows per step of the chunked prefill")
    ap.add_argument("--prefill-reps", type=int, default=2)
    ap.add_argument("--cache-type", default="f16", choices=["f16", "f32"])
    ap.add_argument("--budget", type=float, default=0.03, help="a2ats budget")
    ap.add_argument("--sparse", default="auto", choices=["auto", "gpu", "host"],
                    help="cuda: where a2ats attends its selected rows (auto: timed, then the faster)")
    ap.add_argument("--row-cache", type=float, default=1.5,
                    help="cuda: row-cache slots per selected row (0: fetch every row every step)")
    ap.add_argument("--centroids", type=int, default=4096, help="a2ats random codebook size")
    ap.add_argument("--max-store-gb", type=float, default=16.0,
                    help="skip a retrieval cell whose host K/V store would exceed this")
    ap.add_argument("--greedy", type=int, default=0, metavar="N",
                    help="also check N teacher-forced greedy steps against the CPU backend's f32 path")
    ap.add_argument("--greedy-max-bytes", type=float, default=2e9,
                    help="skip the greedy check for model files larger than this")
    ap.add_argument("--make-synth", action="store_true", help="make missing synthetic models on cpu too")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bench_gpu.json")
    ap.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failed cells")
    args = ap.parse_args(argv)
    for k, v in DEFAULTS[args.device].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if any(c < 0 for c in args.contexts) or any(b < 1 for b in args.batches):
        ap.error("contexts must be >= 0 and batches >= 1")
    if args.centroids < 2 or args.centroids & (args.centroids - 1):
        ap.error("--centroids must be a power of two >= 2")
    if args.steps < 1 or args.prefill < 1 or args.chunk < 1 or args.prefill_reps < 1 or args.greedy < 0:
        ap.error("--steps, --prefill, --chunk and --prefill-reps must be >= 1, --greedy >= 0")
    args.batches = sorted(set(args.batches))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        opts = {} if args.device == "cpu" else {"sparse": args.sparse, "row_cache": args.row_cache}
        dev = Device(args.device, **opts)
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    argv = list(sys.argv[1:] if argv is None else argv)
    result = dict(bench="bench_gpu",
                  command=" ".join(shlex.quote(a) for a in ["python", "bench/bench_gpu.py"] + argv),
                  argv=argv, started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  git=_git_head(), machine=dev.info(),
                  settings=dict(device=args.device, contexts=args.contexts, batches=args.batches,
                                steps=args.steps, warmup_steps=WARMUP, kv=args.kv,
                                cache_type=args.cache_type, prefill=args.prefill, chunk=args.chunk,
                                prefill_reps=args.prefill_reps, budget=args.budget,
                                centroids=args.centroids, seed=args.seed, greedy=args.greedy),
                  models=[], skipped_models=[])
    outs = [args.out] + ([Path(os.environ["OUT"]) / "bench_gpu.json"] if os.environ.get("OUT") else [])

    def write():
        for o in outs:
            try:
                o.parent.mkdir(parents=True, exist_ok=True)
                tmp = o.with_name(o.name + ".tmp")
                tmp.write_text(json.dumps(result, indent=2, default=_json_default))
                tmp.replace(o)
            except OSError as e:
                print(f"warning: could not write {o}: {e}", file=sys.stderr)

    m = result["machine"]
    if not dev.gpu:
        where = f"CPU backend, {m['cpus']} cores, load average {m['load_avg']:.1f}"
    elif "gpu" in m:
        where = f"{m['gpu']} ({m['gpu_memory_bytes'] / 2**30:.0f} GiB), CuPy {m['cupy']}, CUDA " \
                f"runtime {m['cuda_runtime']}, driver {m['cuda_driver']}"
    else:
        where = f"GPU (no details: {m.get('gpu_info_error')})"
    print(f"bench_gpu on {args.device}: {where}", flush=True)
    for path, skip in resolve_models(args):
        if skip:
            print(f"model {path.name}: skipped, {skip}", flush=True)
            result["skipped_models"].append(dict(model=path.name, path=str(path), reason=skip))
            continue
        res = {}
        result["models"].append(res)
        bench_model(path, dev, args, rng, res, write)
        write()
    write()
    print("\nwrote " + ", ".join(map(str, outs)))
    return 0


def _git_head() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


if __name__ == "__main__":
    sys.exit(main())
