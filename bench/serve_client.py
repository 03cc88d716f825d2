"""The client side of bench/bench_serve.py: a server started as a subprocess on a free
loopback port (its log in a temporary file, named when it fails), and timed streaming
/v1/completions requests to it."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


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


async def one(client: httpx.AsyncClient, url: str, model: str, prompt: str, tokens: int,
              **fields) -> dict:
    """One streamed greedy completion (fields: more request fields, e.g. response_format
    and ignore_eos False); its timings, token count, text and finish reason."""
    body = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True},
            **fields}
    t0 = time.perf_counter()
    times, usage, text, finish = [], None, [], None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            text = (await r.aread()).decode(errors="replace")
            raise RuntimeError(f"HTTP {r.status_code} from {url}: {text[:500]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d.get("error"):          # a failure after the stream started
                raise RuntimeError(f"error in the stream from {url}: {str(d['error'])[:500]}")
            if d.get("usage"):
                usage = d["usage"]
            if d.get("choices"):
                finish = d["choices"][0].get("finish_reason") or finish
                if d["choices"][0].get("text"):
                    times.append(time.perf_counter())
                    text.append(d["choices"][0]["text"])
    end = time.perf_counter()
    n = usage["completion_tokens"] if usage else len(times)
    return {"ttft": times[0] - t0 if times else None, "itl": [b - a for a, b in zip(times, times[1:])],
            "tokens": n, "latency": end - t0, "text": "".join(text), "finish_reason": finish}


def pct(xs, q):
    """The q-quantile of the sorted list xs (nearest rank; NaN when empty)."""
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def log_tail(log, n: int = 2000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-n:].strip()


@contextlib.contextmanager
def serving(name: str, cmd: list[str], port: int, ready_path: str = "/v1/models",
            ready_timeout: float = 300):
    """Start the server (its stdout and stderr to a temporary log file: a pipe nobody reads
    fills with the load log and blocks the server before it is ready), yield its base URL,
    stop it (the log is kept, and named, when the body failed)."""
    base = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench_serve_{name}_", suffix=".log",
                                      delete=False)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    ok = False
    try:
        try:
            wait_ready(f"{base}{ready_path}", proc, ready_timeout)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; its log ({log.name}) ends:\n{log_tail(log)}") from None
        yield base
        ok = True
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        if ok:
            os.unlink(log.name)
