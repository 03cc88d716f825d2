"""Serving benchmark: `a2ats-lite serve` under 1, 4 and 16 concurrent streaming clients,
against llama.cpp's own server (continuous batching) and llama-cpp-python's.

    python bench/bench_serve.py                       # default model, 128 new tokens each
    python bench/bench_serve.py --tokens 32 --clients 1,4,16
    python bench/bench_serve.py --llama-server /tmp/lcpp/build/bin/llama-server

Starts each server (a subprocess on a free loopback port, --parallel = the most clients;
its log goes to a temporary file, named when the server fails), then for each concurrency
level sends that many streaming /v1/completions requests at once (fixed prompts, greedy,
ignore_eos so each produces exactly --tokens tokens) and measures aggregate generated
tokens/s, time to first token (TTFT) and inter-token latency (ITL: gaps between streamed
chunks). Prints a table and writes bench/results/bench_serve.json.

The anchors, same model, same threads (--threads, default all CPUs):
  llama-server       llama.cpp's server, `--parallel N -c N*ctx` (continuous batching),
                     with --llama-server PATH. Build it from the llama.cpp sources that
                     llama-cpp-python 0.3.36 vendors (nothing of it belongs in the repo):
                       pip download llama-cpp-python==0.3.36 --no-binary :all: --no-deps -d /tmp/lcpp
                       tar xzf /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcpp
                       cmake -S /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp -B /tmp/lcpp/build \
                             -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
                       cmake --build /tmp/lcpp/build -j2 --target llama-server llama-bench
                     (-> /tmp/lcpp/build/bin/llama-server; --llama-fa sets its -fa,
                     --llama-server-args adds options)
  llama_cpp.server   `python -m llama_cpp.server` when llama-cpp-python's server extra is
                     importable (--no-llama-cpp-python skips it). It serves one request at a
                     time and interrupts a running request when a new one arrives, so its
                     "generated" column is below clients x tokens at concurrency > 1.

    python bench/bench_serve.py --constrained         # structured output's cost, 1 and 16 clients

--constrained (a2ats-lite only; bench/serve_constrained.py says how) runs the same load
free and under a JSON-schema response_format, and writes bench_serve_constrained.json.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from serve_client import free_port, one, pct, serving  # noqa: E402  (bench/ is on sys.path)
from serve_constrained import main_constrained  # noqa: E402

PROMPTS = ["The three most important inventions of the nineteenth century were",
           "Once upon a time, in a small village by the sea,",
           "The best way to learn a new programming language is",
           "Photosynthesis is the process by which",
           "The history of the Roman Empire begins",
           "A good recipe for bread needs",
           "The main causes of the First World War were",
           "In mathematics, a prime number is"]


async def level(base: str, model: str, clients: int, tokens: int) -> dict:
    url = f"{base}/v1/completions"
    # no keep-alive: a server may close an idle kept-alive connection just as the next
    # request is sent on it (llama-server does), and a loopback connect costs nothing here
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as c:
        # warm-up: a prompt over 16 tokens, so the first wide prefill step (which maps and
        # dequantizes the weights the first time) is not in the numbers
        await one(c, url, model, " ".join(PROMPTS), 2)
        t0 = time.perf_counter()
        res = await asyncio.gather(*(one(c, url, model, PROMPTS[i % len(PROMPTS)], tokens)
                                     for i in range(clients)))
        wall = time.perf_counter() - t0
    ttft = sorted(r["ttft"] for r in res if r["ttft"] is not None)
    itl = sorted(x for r in res for x in r["itl"])
    total = sum(r["tokens"] for r in res)
    return {"clients": clients, "tokens_each": tokens, "generated": total, "wall_s": wall,
            "tok_per_s": total / wall, "ttft_median_s": statistics.median(ttft) if ttft else None,
            "ttft_p95_s": pct(ttft, 0.95), "itl_median_s": statistics.median(itl) if itl else None,
            "itl_p95_s": pct(itl, 0.95)}


def metrics(base: str) -> dict:
    try:
        text = httpx.get(f"{base}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("a2ats_") and "seqs_per_step" in line:
            out[line.split("{")[0][6:]] = float(line.rsplit(" ", 1)[1])
    return out


def run_server(name: str, cmd: list[str], port: int, model: str, levels, tokens,
               ready_path: str = "/v1/models", ready_timeout: float = 300) -> list[dict]:
    """Start the server, run the levels, stop it."""
    with serving(name, cmd, port, ready_path, ready_timeout) as base:
        rows = []
        for n in levels:
            r = asyncio.run(level(base, model, n, tokens))
            r["server"] = name
            r.update(metrics(base))
            rows.append(r)
            print(f"  {name}: {n} clients done ({r['tok_per_s']:.1f} tok/s)", file=sys.stderr)
        return rows


def table(rows) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1e3:.0f}"
    head = ("| server | clients | generated | tok/s (total) | TTFT median ms | TTFT p95 ms | "
            "ITL median ms | ITL p95 ms |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['server']} | {r['clients']} | {r['generated']}/{r['clients'] * r['tokens_each']} | "
                     f"{r['tok_per_s']:.1f} | {ms(r['ttft_median_s'])} | "
                     f"{ms(r['ttft_p95_s'])} | {ms(r['itl_median_s'])} | {ms(r['itl_p95_s'])} |")
    return "\n".join(lines)


def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF model (default: the default model)")
    ap.add_argument("--tokens", type=int, default=None,
                    help="new tokens per request (default 128; --constrained: max_tokens, 64)")
    ap.add_argument("--clients", default=None,
                    help="comma-separated concurrency levels (default 1,4,16; --constrained: 1,16)")
    ap.add_argument("--constrained", action="store_true",
                    help="a2ats-lite only: the same load free and under a JSON-schema "
                         "response_format, side by side (-> bench_serve_constrained.json)")
    ap.add_argument("--requests", type=int, default=2,
                    help="--constrained: requests each client sends per mode and round")
    ap.add_argument("--rounds", type=int, default=2,
                    help="--constrained: rounds per level, the modes' order alternating")
    ap.add_argument("-c", "--ctx-size", type=int, default=512, help="context per stream")
    ap.add_argument("--kv", default="dense")
    ap.add_argument("-b", "--batch-size", type=int, default=512,
                    help="the server's -b: most tokens per engine step")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="every server's threads")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary (see above)")
    ap.add_argument("--llama-fa", default="auto", choices=["on", "off", "auto"],
                    help="llama-server's -fa (default: its own, auto)")
    ap.add_argument("--llama-server-args", default="",
                    help="more llama-server options, one string (e.g. '--poll 0')")
    ap.add_argument("--no-llama-cpp-python", action="store_true", help="skip llama_cpp.server")
    ap.add_argument("--no-ours", action="store_true", help="skip a2ats-lite serve")
    ap.add_argument("--json", default=None, help="output (default bench/results/bench_serve"
                                                 "[_constrained].json)")
    a = ap.parse_args(argv)
    if a.tokens is None:
        a.tokens = 64 if a.constrained else 128
    if a.clients is None:
        a.clients = "1,16" if a.constrained else "1,4,16"
    if a.json is None:
        a.json = str(ROOT / "bench" / "results" / ("bench_serve_constrained.json" if a.constrained
                                                   else "bench_serve.json"))
    if a.tokens < 2:
        ap.error("--tokens must be at least 2")
    if a.requests < 1 or a.rounds < 1:
        ap.error("--requests and --rounds must be at least 1")
    try:
        a.levels = [int(x) for x in a.clients.split(",") if x.strip()]
    except ValueError:
        a.levels = []
    if not a.levels or min(a.levels) < 1:
        ap.error("--clients needs positive integers")
    return a


def servers(a, par: int) -> list[tuple]:
    """(name, command builder port -> argv, ready path) of every server this run compares."""
    t = str(a.threads)
    out = []
    if not a.no_ours:
        out.append(("a2ats-lite", lambda port: [
            sys.executable, "-m", "a2ats_lite.cli", "serve", a.model, "--port", str(port),
            "-c", str(a.ctx_size), "--parallel", str(par), "--kv", a.kv, "-b", str(a.batch_size)],
            "/v1/models"))
    if a.llama_server:
        out.append(("llama-server", lambda port: [
            a.llama_server, "-m", a.model, "--host", "127.0.0.1", "--port", str(port),
            "-c", str(a.ctx_size * par), "--parallel", str(par), "--cont-batching",
            "-b", str(a.batch_size), "-t", t, "-tb", t, "-fa", a.llama_fa,
            "-ctk", "f16", "-ctv", "f16", *shlex.split(a.llama_server_args)], "/health"))
    return out


LLAMA_CPP_SERVER_NEEDS = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def llama_cpp_python_server(a, par: int):
    """llama_cpp.server's entry, or a note saying why it is not run."""
    if a.no_llama_cpp_python:
        return None, None
    if importlib.util.find_spec("llama_cpp") is None:
        return None, ("llama-cpp-python is not installed: no llama_cpp.server run "
                      "(pip install 'a2ats-lite[llama]')")
    missing = [m for m in LLAMA_CPP_SERVER_NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        return None, (f"llama_cpp.server needs {', '.join(missing)} (pip install "
                      f"'llama-cpp-python[server]'): not run")
    t = str(a.threads)
    return ("llama_cpp.server", lambda port: [
        sys.executable, "-m", "llama_cpp.server", "--model", a.model, "--port", str(port),
        "--n_ctx", str(a.ctx_size * par), "--host", "127.0.0.1", "--n_threads", t,
        "--n_threads_batch", t], "/v1/models"), None


def main(argv=None) -> int:
    a = parse(argv)
    if a.model is None:
        sys.path.insert(0, str(ROOT))
        from a2ats_lite.default_model import default_model_path
        a.model = str(default_model_path())
    if a.constrained:
        if a.no_ours:
            print("--constrained measures a2ats-lite serve: drop --no-ours", file=sys.stderr)
            return 2
        return main_constrained(a, servers(a, max(a.levels))[0])
    if a.llama_server and not Path(a.llama_server).is_file():
        print(f"llama-server not found at {a.llama_server}", file=sys.stderr)
        return 2
    par = max(a.levels)
    print(f"{Path(a.model).name}: -c {a.ctx_size} per stream, -b {a.batch_size}, --parallel {par}, "
          f"{a.threads} threads, {a.tokens} tokens per request", file=sys.stderr)
    todo = servers(a, par)
    extra, note = llama_cpp_python_server(a, par)
    if extra:
        todo.append(extra)
    notes = [note] if note else []
    if not a.llama_server:
        notes.append("no --llama-server: llama.cpp's own server (the serving anchor) not run")
    rows = []
    for name, cmd, ready in todo:
        port = free_port()
        try:
            rows += run_server(name, cmd(port), port, Path(a.model).name, a.levels, a.tokens, ready)
        except Exception as e:  # report, keep the other servers' numbers
            notes.append(f"{name} run failed: {e}")
    for n in notes:
        print(n, file=sys.stderr)
    print(table(rows))
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "ctx": a.ctx_size, "kv": a.kv, "tokens": a.tokens,
                               "batch_size": a.batch_size, "threads": a.threads,
                               "llama_fa": a.llama_fa if a.llama_server else None,
                               "llama_server_args": a.llama_server_args if a.llama_server else None,
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "loadavg": os.getloadavg()},
                               "notes": notes, "rows": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
