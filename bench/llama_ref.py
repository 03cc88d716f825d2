"""llama.cpp's prompt and decode speed on a GGUF file at a given depth, at its best, cached:
the reference the CPU benches (bench_cpu.py, bench_long.py) compare with.

    python bench/llama_ref.py MODEL --depth 8192 [--threads 2] [--decode 16] [--no-cache]
    python bench/llama_ref.py MODEL --depth 8192 --llama-bench /tmp/lcpp/build/bin/llama-bench

Through llama-cpp-python (default): for each flash-attention setting (on, off) a fresh
context with f16 K/V, n_batch = n_ubatch = 512 and the given threads for prompt and decode;
the prompt (prompt_ids: `depth` token ids, the same ids the benches give our runtime) is
fed in n_batch chunks through the low-level llama_decode and timed as the prompt's
processing; then one untimed single-token step and `decode` timed single-token
llama_decode calls (median), each on a llama_batch that asks logits for its token but
never copies them to Python. Each setting runs in a subprocess: llama.cpp's log stays out
of the output, and --timeout can stop a prefill that would not finish.

--replay (bench_long.py: contexts above its --prefill-max, as its own rows are): the cache is
filled without computing the prompt, as our replayed rows are: one n_batch block of the
prompt really decoded, its sequence state saved (llama_state_seq_get_data) and loaded back
block after block (llama_state_seq_set_data into a second sequence, shifted to the block's
positions with llama_memory_seq_add, handed to the timed sequence with llama_memory_seq_cp;
one unified KV buffer, so the timed sequence's cells are the ones a computed prompt would
fill), the last partial block computed. The decode steps then run over as many cells as
after a computed prompt (the first, untimed step applies the position shift); a decode
step's cost does not depend on the K/V values. No prompt figure; cached under its own key.

With --llama-bench PATH: llama.cpp's own llama-bench (`-o json -r 1 -ctk f16 -ctv f16`),
`-p DEPTH -n 0 --no-warmup` for the prompt and `-p 0 -n DECODE -d DEPTH` for decode at that
depth (llama-bench reports the mean rate over the DECODE tokens, not a median step).

"best" is the faster setting for each figure (decode and prompt separately). Results
are cached in bench/results/llama_ref_cache.json, keyed by the file's fingerprint (size +
sha256 of its first and last MiB; the whole file's sha256 when it is under 2 MiB), depth,
threads, decode steps, n_batch, flash attention, the llama.cpp version (llama-cpp-python's
version, or the sha256 of the llama-bench binary and the shared libraries beside it) and
the CPU model; a rerun takes them from the cache unless --no-cache, and says which
figures came from it. A figure timed on a busy machine (1-minute load average above
threads + 1, --cache-max-load) is reported and not cached, and so is a timed-out or failed
setting; each entry records the load average it was measured under.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "bench" / "results" / "llama_ref_cache.json"
MIB = 1 << 20
FA = {"on": True, "off": False}


# -- what both sides run ------------------------------------------------------------------
def prompt_ids(depth: int, n_vocab: int, seed: int = 0) -> list[int]:
    """The prompt of a run at `depth`: max(depth, 1) token ids drawn from the ordinary part of
    the vocabulary (speed does not depend on them; both runtimes get the same ones)."""
    lo, hi = min(1000, n_vocab // 4), min(n_vocab, 200000)
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(lo, hi, max(int(depth), 1))]


# -- the cache key -----------------------------------------------------------------------
def file_fingerprint(path) -> str:
    """size + sha256 of the first and last MiB (the whole file under 2 MiB): cheap on a
    several-GB model, and any edit of a synthetic file's header or tail changes it."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= 2 * MIB:
            h.update(f.read())
        else:
            h.update(f.read(MIB))
            f.seek(size - MIB)
            h.update(f.read(MIB))
    return f"{size}:{h.hexdigest()[:32]}"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def llama_version(llama_bench=None) -> str | None:
    """What identifies the llama.cpp build that times: llama-cpp-python's version, or the
    llama-bench binary's sha256. None when it is not there."""
    if llama_bench is not None:
        p = Path(llama_bench)
        if not p.is_file():
            return None
        # the binary and the shared libraries built beside it (libllama, libggml-*)
        libs = sorted({x.resolve() for x in p.parent.glob("lib*.so*") if x.is_file()})
        h = hashlib.sha256()
        for f in [p.resolve(), *libs]:
            h.update(f.read_bytes())
        return f"llama-bench sha256 {h.hexdigest()[:16]}"
    if importlib.util.find_spec("llama_cpp") is None:
        return None
    try:
        return f"llama-cpp-python {importlib.metadata.version('llama_cpp_python')}"
    except importlib.metadata.PackageNotFoundError:
        return "llama-cpp-python (unknown version)"


def cache_key(fingerprint: str, depth: int, threads: int, n_decode: int, version: str,
              fa: str, n_batch: int, cpu: str, replay: bool = False) -> str:
    key = dict(file=fingerprint, depth=int(depth), threads=int(threads), n_decode=int(n_decode),
               version=version, flash_attn=fa, n_batch=int(n_batch), kv="f16", cpu=cpu)
    if replay:                       # a computed prompt's entries keep their key
        key["fill"] = "replayed"
    return json.dumps(key, sort_keys=True)


class Cache:
    """key -> result, in one JSON file written atomically after each new result (an
    interrupted long run keeps what it finished)."""

    def __init__(self, path=CACHE):
        self.path = Path(path)
        try:
            self.entries = json.loads(self.path.read_text()).get("entries", {})
        except (OSError, ValueError, AttributeError):
            self.entries = {}

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, key: str, value: dict) -> None:
        self.entries[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps({"entries": self.entries}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


# -- timing through llama-cpp-python (in a subprocess) -------------------------------------
def _worker(spec: dict) -> dict:
    """One flash-attention setting, timed in this process through the low-level API."""
    import llama_cpp as L

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(spec["path"].encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {spec['path']}")
    ids = prompt_ids(spec["depth"], L.llama_vocab_n_tokens(L.llama_model_get_vocab(model)))
    n_batch, n_decode, threads = spec["n_batch"], spec["n_decode"], spec["threads"]
    cp = L.llama_context_default_params()
    cp.n_ctx = len(ids) + n_decode + 2
    cp.n_batch = cp.n_ubatch = n_batch
    if spec.get("replay"):            # a second sequence to load blocks into, one KV buffer
        cp.n_seq_max, cp.kv_unified = 2, True
    cp.n_threads = cp.n_threads_batch = threads
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED if spec["fa"] else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.type_k = cp.type_v = L.GGML_TYPE_F16
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama.cpp could not make a context")
    batch = L.llama_batch_init(n_batch, 0, 1)

    def run(tokens, pos0, seq=0) -> float:
        """Seconds of one llama_decode of tokens at positions pos0.. (logits: last only)."""
        batch.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
            batch.seq_id[i][0], batch.logits[i] = seq, 0
        batch.logits[len(tokens) - 1] = 1
        t0 = time.perf_counter()
        rc = L.llama_decode(ctx, batch)
        L.llama_synchronize(ctx)
        dt = time.perf_counter() - t0
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return dt

    t0 = time.perf_counter()
    if spec.get("replay"):
        _replay(L, ctx, run, ids, n_batch)
        prompt_s, fill = None, dict(fill="replayed", fill_s=time.perf_counter() - t0)
    else:
        prompt_s, fill = sum(run(ids[a:a + n_batch], a) for a in range(0, len(ids), n_batch)), {}
    pos = len(ids)
    run([ids[-1]], pos)                                  # untimed: first single-token step
    steps = [run([ids[-1]], pos + 1 + i) for i in range(n_decode)]
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return dict(n_prompt=len(ids), prompt_s=prompt_s, decode_ms=1e3 * statistics.median(steps),
                method="llama-cpp-python llama_decode", **fill)


def _replay(L, ctx, run, ids, n_batch) -> None:
    """Sequence 0 holding len(ids) tokens' K/V at positions 0.. without computing the prompt
    (see --replay): one block really decoded into sequence 1 and its state saved, then loaded
    into sequence 1 for each block, shifted to its positions, copied to 0; the tail computed."""
    import ctypes

    mem, P = L.llama_get_memory(ctx), n_batch
    n_full = len(ids) // P
    if n_full:
        run(ids[:P], 0, seq=1)
        n = L.llama_state_seq_get_size(ctx, 1)
        state = (ctypes.c_uint8 * n)()
        if L.llama_state_seq_get_data(ctx, state, n, 1) != n:
            raise RuntimeError("llama.cpp: could not save the block's state")
        L.llama_memory_seq_rm(mem, 1, -1, -1)
        for b in range(n_full):
            if L.llama_state_seq_set_data(ctx, state, n, 1) != n:
                raise RuntimeError(f"llama.cpp: could not load block {b} (cache full?)")
            if b:
                L.llama_memory_seq_add(mem, 1, -1, -1, b * P)
            L.llama_memory_seq_cp(mem, 1, 0, -1, -1)
            L.llama_memory_seq_rm(mem, 1, -1, -1)
    for a in range(n_full * P, len(ids), P):          # the last partial block, computed
        run(ids[a:a + P], a)
    if L.llama_memory_seq_pos_max(mem, 0) != len(ids) - 1 or L.llama_memory_seq_pos_min(mem, 0) != 0:
        raise RuntimeError("llama.cpp: the replayed sequence does not span the prompt")


def time_python(path, depth, threads, n_decode, fa: bool, n_batch=512, timeout=None,
                replay=False) -> dict:
    spec = dict(path=str(path), depth=int(depth), threads=int(threads), n_decode=int(n_decode),
                fa=bool(fa), n_batch=int(n_batch), replay=bool(replay))
    with tempfile.TemporaryFile("w+") as err:
        try:
            p = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker",
                                json.dumps(spec)], stdout=subprocess.PIPE, stderr=err, text=True,
                               timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(timed_out=True, timeout_s=timeout)
        if p.returncode != 0:
            err.seek(0)
            tail = err.read()[-2000:]
            return dict(failed=f"worker exited with {p.returncode}: {tail.strip()}")
    return json.loads(p.stdout.strip().splitlines()[-1])


# -- timing through llama-bench ------------------------------------------------------------
def parse_llama_bench(text: str) -> list[dict]:
    """llama-bench -o json: a list of tests with n_prompt, n_gen, n_depth, avg_ns, avg_ts..."""
    rows = json.loads(text)
    if not isinstance(rows, list):
        raise ValueError("llama-bench JSON: expected a list of tests")
    return rows


def time_llama_bench(binary, path, depth, threads, n_decode, fa: bool, n_batch=512,
                     timeout=None, replay=False) -> dict:
    if replay:
        return dict(failed="llama-bench computes its prompt (-d); replay needs llama-cpp-python")
    common = [str(binary), "-m", str(path), "-t", str(threads), "-b", str(n_batch), "-ub",
              str(n_batch), "-ctk", "f16", "-ctv", "f16", "-fa", "1" if fa else "0", "-r", "1",
              "-o", "json"]
    n_prompt = max(int(depth), 1)
    runs = {"prompt": ["-p", str(n_prompt), "-n", "0", "--no-warmup"],
            "decode": ["-p", "0", "-n", str(n_decode), "-d", str(n_prompt)]}
    out = {}
    t_end = None if timeout is None else time.monotonic() + timeout
    for what, extra in runs.items():
        left = None if t_end is None else max(1.0, t_end - time.monotonic())
        try:
            p = subprocess.run(common + extra, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, timeout=left)
        except subprocess.TimeoutExpired:
            return dict(timed_out=True, timeout_s=timeout)
        if p.returncode != 0:
            return dict(failed=f"llama-bench exited with {p.returncode}: {p.stderr[-2000:].strip()}")
        out[what] = parse_llama_bench(p.stdout)[0]
    return dict(n_prompt=n_prompt, prompt_s=out["prompt"]["avg_ns"] / 1e9,
                decode_ms=1e3 / out["decode"]["avg_ts"], method="llama-bench (mean decode rate)",
                build=out["decode"].get("build_commit"))


# -- the reference ------------------------------------------------------------------------
def _rates(r: dict) -> dict:
    """Add tok/s to a timing (prompt tok/s only for a prompt of 16 tokens or more)."""
    if "decode_ms" in r:
        r["decode_tok_s"] = 1e3 / r["decode_ms"]
        r["prompt_tok_s"] = (r["n_prompt"] / r["prompt_s"]
                             if r.get("prompt_s") and r["n_prompt"] >= 16 else None)
    return r


def best(settings: dict) -> dict | None:
    """The faster setting for decode and for prompt (they may differ), with where each came
    from. None when no setting produced figures."""
    ok = {fa: r for fa, r in settings.items() if "decode_ms" in r}
    if not ok:
        return None
    d = max(ok, key=lambda fa: ok[fa]["decode_tok_s"])
    pp = [fa for fa in ok if ok[fa].get("prompt_tok_s")]
    p = max(pp, key=lambda fa: ok[fa]["prompt_tok_s"]) if pp else None
    return dict(decode_tok_s=ok[d]["decode_tok_s"], decode_ms=ok[d]["decode_ms"], decode_fa=d,
                decode_cached=ok[d]["cached"],
                prompt_tok_s=ok[p]["prompt_tok_s"] if p else None, prompt_fa=p,
                prompt_cached=ok[p]["cached"] if p else None)


def unavailable(llama_bench=None) -> str | None:
    """Why llama.cpp cannot be timed here, or None."""
    if llama_bench is not None:
        return None if Path(llama_bench).is_file() else f"llama-bench not found at {llama_bench}"
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed (pip install 'a2ats-lite[llama]')"
    return None


def measure(path, depth: int, threads: int = 2, n_decode: int = 16, *, n_batch: int = 512,
            use_cache: bool = True, cache_path=CACHE, llama_bench=None, timeout=None,
            settings=("on", "off"), timer=None, version=None, max_load=None,
            replay: bool = False) -> dict:
    """llama.cpp on `path` at `depth`: {"settings": {"on": ..., "off": ...}, "best": ...,
    "version", "fingerprint"}; each setting's figures carry cached=True when they came from
    the cache. timer(path, depth, threads, n_decode, fa, n_batch, timeout) -> timing dict
    replaces the real one (tests); version names its build in the key. A figure timed while
    the 1-minute load average exceeds max_load (default: threads + 1, llama.cpp's own
    threads and some slack) is reported but not cached (not_cached says why): a busy
    machine's figure must not stand in for a quiet run's. replay: fill the cache without
    computing the prompt (module docstring; decode figures only)."""
    max_load = threads + 1.0 if max_load is None else max_load
    if timer is None:
        timer = time_python if llama_bench is None else (
            lambda *a, **kw: time_llama_bench(llama_bench, *a, **kw))
    version = version or llama_version(llama_bench)
    fp, cpu = file_fingerprint(path), cpu_name()
    cache = Cache(cache_path)
    out = {}
    for fa in settings:
        key = cache_key(fp, depth, threads, n_decode, version, fa, n_batch, cpu, replay)
        hit = cache.get(key) if use_cache else None
        if hit is not None:
            out[fa] = dict(hit, cached=True)
            continue
        r = timer(path, depth, threads, n_decode, FA[fa], n_batch, timeout=timeout, replay=replay)
        r = _rates(dict(r, cached=False))
        load = os.getloadavg()[0]
        if "decode_ms" in r and load > max_load:
            r["not_cached"] = f"load {load:.1f} > {max_load:g}: not cached"
        elif "decode_ms" in r:
            cache.put(key, dict({k: v for k, v in r.items() if k != "cached"},
                                measured_at=time.strftime("%Y-%m-%d %H:%M:%S"), load_avg=load))
        out[fa] = r
    return dict(settings=out, best=best(out), version=version, fingerprint=fp, depth=int(depth),
                threads=int(threads), n_decode=int(n_decode), replayed=bool(replay))


def describe(ref: dict) -> str:
    """One line per setting: its figures, or why there are none, and whether cached."""
    lines = []
    for fa, r in ref["settings"].items():
        if "decode_ms" in r:
            pp = f"{r['prompt_tok_s']:.1f} tok/s" if r.get("prompt_tok_s") else "-"
            pp = "replayed" if r.get("fill") == "replayed" else pp
            mark = " (cache)" if r["cached"] else f" ({r['not_cached']})" if r.get("not_cached") else ""
            lines.append(f"  fa {fa:<3}: prompt {pp}, decode {r['decode_tok_s']:.2f} tok/s{mark}")
        elif r.get("timed_out"):
            lines.append(f"  fa {fa:<3}: timed out after {r['timeout_s']} s")
        else:
            lines.append(f"  fa {fa:<3}: failed: {r.get('failed')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:                      # the subprocess of time_python
        print(json.dumps(_worker(json.loads(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--depth", type=int, nargs="+", default=[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--n-batch", type=int, default=512)
    ap.add_argument("--no-cache", action="store_true", help="time again (the cache is updated)")
    ap.add_argument("--llama-bench", type=Path, default=None, help="time with this llama-bench binary")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per setting")
    ap.add_argument("--replay", action="store_true",
                    help="fill the cache without computing the prompt (decode figures only)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--cache-max-load", type=float, default=None,
                    help="cache no figure timed above this load average (default: threads + 1)")
    a = ap.parse_args(argv)
    why = unavailable(a.llama_bench)
    if why or not a.model.is_file():
        print(why or f"model not found: {a.model}", file=sys.stderr)
        return 2
    for depth in a.depth:
        ref = measure(a.model, depth, a.threads, a.decode, n_batch=a.n_batch, use_cache=not a.no_cache,
                      cache_path=a.cache, llama_bench=a.llama_bench, timeout=a.timeout,
                      max_load=a.cache_max_load, replay=a.replay)
        print(f"{a.model.name} depth {depth}, {a.threads} threads, {ref['version']}:")
        print(describe(ref))
    return 0


if __name__ == "__main__":
    sys.exit(main())
