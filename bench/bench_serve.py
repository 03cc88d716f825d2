"""Serving benchmark: `a2ats-lite serve` under 1, 4 and 16 concurrent streaming clients.

    python bench/bench_serve.py                       # default model, 128 new tokens each
    python bench/bench_serve.py --tokens 32 --clients 1,4,16

Starts the server (a subprocess on a free loopback port, --parallel = the most clients),
then for each concurrency level sends that many streaming /v1/completions requests at
once (fixed prompts, greedy, ignore_eos so each produces exactly --tokens tokens) and
measures aggregate generated tokens/s, time to first token (TTFT) and inter-token latency
(ITL: gaps between streamed chunks). Prints a table and writes bench/results/bench_serve.json.
The same load runs against `python -m llama_cpp.server` when llama-cpp-python is
importable (pip install 'a2ats-lite[llama]'); otherwise the script says so.
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["The three most important inventions of the nineteenth century were",
           "Once upon a time, in a small village by the sea,",
           "The best way to learn a new programming language is",
           "Photosynthesis is the process by which",
           "The history of the Roman Empire begins",
           "A good recipe for bread needs",
           "The main causes of the First World War were",
           "In mathematics, a prime number is"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("server did not become ready")


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    times, usage = [], None
    async with client.stream("POST", url, json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("usage"):
                usage = d["usage"]
            if d.get("choices") and d["choices"][0].get("text"):
                times.append(time.perf_counter())
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else len(times)
    return {"ttft": times[0] - t0 if times else None, "itl": [b - a for a, b in zip(times, times[1:])],
            "tokens": n, "latency": end - t0}


async def level(base: str, model: str, clients: int, tokens: int) -> dict:
    url = f"{base}/v1/completions"
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
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

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")
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


def run_server(name: str, cmd: list[str], port: int, model: str, levels, tokens) -> list[dict]:
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT)
    try:
        wait_ready(f"{base}/v1/models", proc)
        rows = []
        for n in levels:
            r = asyncio.run(level(base, model, n, tokens))
            r["server"] = name
            r.update(metrics(base))
            rows.append(r)
            print(f"  {name}: {n} clients done ({r['tok_per_s']:.1f} tok/s)", file=sys.stderr)
        return rows
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def table(rows) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1e3:.0f}"
    head = ("| server | clients | tok/s (total) | TTFT median ms | TTFT p95 ms | ITL median ms | "
            "ITL p95 ms |")
    lines = [head, "|" + "---|" * 7]
    for r in rows:
        lines.append(f"| {r['server']} | {r['clients']} | {r['tok_per_s']:.1f} | {ms(r['ttft_median_s'])} | "
                     f"{ms(r['ttft_p95_s'])} | {ms(r['itl_median_s'])} | {ms(r['itl_p95_s'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF model (default: the default model)")
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    ap.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    ap.add_argument("-c", "--ctx-size", type=int, default=512)
    ap.add_argument("--kv", default="dense")
    ap.add_argument("-b", "--batch-size", type=int, default=512,
                    help="the server's -b: most tokens per engine step")
    ap.add_argument("--json", default=str(ROOT / "bench" / "results" / "bench_serve.json"))
    a = ap.parse_args()
    if a.tokens < 2:
        ap.error("--tokens must be at least 2")
    levels = [int(x) for x in a.clients.split(",") if x.strip()]
    if not levels or min(levels) < 1:
        ap.error("--clients needs positive integers")
    if a.model is None:
        sys.path.insert(0, str(ROOT))
        from a2ats_lite.default_model import default_model_path
        a.model = str(default_model_path())
    par = max(levels)
    port = free_port()
    print(f"a2ats-lite serve: {Path(a.model).name}, -c {a.ctx_size}, -b {a.batch_size}, --parallel {par}, "
          f"{a.tokens} tokens per request", file=sys.stderr)
    cmd = [sys.executable, "-m", "a2ats_lite.cli", "serve", a.model, "--port", str(port),
           "-c", str(a.ctx_size), "--parallel", str(par), "--kv", a.kv, "-b", str(a.batch_size)]
    rows = run_server("a2ats-lite", cmd, port, Path(a.model).name, levels, a.tokens)
    note = None
    if importlib.util.find_spec("llama_cpp") is not None and \
            importlib.util.find_spec("llama_cpp.server") is not None:
        port = free_port()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", a.model, "--port", str(port),
               "--n_ctx", str(a.ctx_size * par), "--host", "127.0.0.1"]
        try:
            rows += run_server("llama_cpp.server", cmd, port, a.model, levels, a.tokens)
        except Exception as e:  # report, keep our numbers
            note = f"llama_cpp.server run failed: {e}"
    else:
        note = ("llama-cpp-python (llama_cpp.server) is not installed: no llama.cpp comparison "
                "(pip install 'a2ats-lite[llama]')")
    if note:
        print(note, file=sys.stderr)
    print(table(rows))
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": a.model, "ctx": a.ctx_size, "kv": a.kv, "tokens": a.tokens,
                               "batch_size": a.batch_size,
                               "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                           "loadavg": os.getloadavg()},
                               "note": note, "rows": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
