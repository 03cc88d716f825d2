"""bench/bench_serve.py --constrained: the cost of structured output on a2ats-lite's server.

At each concurrency level the same closed-loop load runs twice, the two modes alternating
over the rounds: under a JSON-schema response_format (PERSON; no ignore_eos: the grammar
ends the reply), and free, each request with ignore_eos and as many tokens as its prompt's
constrained reply has, so both modes generate the same tokens. Compared: generated tokens
per wall second and the median time per output token; every constrained reply must parse
as JSON and match the schema.
"""
from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx
from serve_client import free_port, one, pct, serving   # bench/ is on sys.path (bench_serve)

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 24},
                         "age": {"type": "integer", "minimum": 0, "maximum": 150},
                         "tags": {"type": "array", "maxItems": 4,
                                  "items": {"type": "string", "maxLength": 16}}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
PEOPLE = ["Alice is a 34-year-old engineer who likes hiking and chess.",
          "Bob is a 51-year-old teacher who enjoys gardening and jazz.",
          "Chen is a 27-year-old nurse who plays tennis and paints.",
          "Dana is a 45-year-old pilot who collects stamps and cooks.",
          "Emil is a 19-year-old student who codes, games and runs.",
          "Fatima is a 38-year-old architect who sails and reads poetry.",
          "Gus is a 62-year-old farmer who fishes and builds furniture.",
          "Hana is a 23-year-old musician who climbs and writes songs."]
# one worked example first, so that the reply's size is that of a real record
SHOT = ('Ann is a 30-year-old chef who likes wine and cats. As JSON: {"name": "Ann", "age": 30, '
        '"tags": ["chef", "wine", "cats"]}\n')
JSON_PROMPTS = [f"{SHOT}{p} As JSON:" for p in PEOPLE]
MODES = ("unconstrained", "constrained")


def valid_person(text: str) -> bool:
    """text parses as JSON and matches PERSON (jsonschema when installed, else by hand)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    try:
        import jsonschema
    except ImportError:
        p = PERSON["properties"]
        return (isinstance(obj, dict) and set(obj) == set(p) and isinstance(obj["name"], str)
                and len(obj["name"]) <= p["name"]["maxLength"] and type(obj["age"]) is int
                and 0 <= obj["age"] <= 150 and isinstance(obj["tags"], list)
                and len(obj["tags"]) <= 4 and all(isinstance(t, str) and len(t) <= 16
                                                  for t in obj["tags"]))
    return jsonschema.Draft202012Validator(PERSON).is_valid(obj)


def counters(base: str) -> dict:
    """The server's a2ats_* counters (forward seconds, steps, generated tokens)."""
    text = httpx.get(f"{base}/metrics", timeout=30).text
    return {line.split("{")[0][6:]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines() if line.startswith("a2ats_") and "_total" in line}


async def phase(c, url: str, model: str, clients: int, per_client: int, mode: str,
                tokens: int, lengths: list[int]) -> tuple[list[dict], float]:
    """`clients` closed-loop clients, each sending per_client requests back to back: under
    the schema (max_tokens tokens, ended by the grammar), or free with ignore_eos and the
    number of tokens the prompt's constrained reply has, so both modes do the same work."""
    async def client(i):
        out = []
        for j in range(per_client):
            k = (i + j * clients) % len(lengths)
            if mode == "constrained":
                r = await one(c, url, model, JSON_PROMPTS[k], tokens, ignore_eos=False,
                              response_format=RESPONSE_FORMAT)
                r["valid"] = r["finish_reason"] == "stop" and valid_person(r["text"])
            else:
                r = await one(c, url, model, JSON_PROMPTS[k], lengths[k])
            out.append(r)
        return out
    t0 = time.perf_counter()
    res = await asyncio.gather(*(client(i) for i in range(clients)))
    return [r for rs in res for r in rs], time.perf_counter() - t0


def summarize(clients: int, mode: str, acc: dict) -> dict:
    res = acc["res"]
    toks = sum(r["tokens"] for r in res)
    # time per output token of each request: its decode time over its tokens after the first
    tpot = [(r["latency"] - r["ttft"]) / (r["tokens"] - 1) for r in res
            if r["ttft"] is not None and r["tokens"] > 1]
    itl = sorted(x for r in res for x in r["itl"])
    ttft = [r["ttft"] for r in res if r["ttft"] is not None]
    bad = [r["text"] for r in res if not r.get("valid", True)]
    return {"clients": clients, "mode": mode, "requests": len(res), "completion_tokens": toks,
            "wall_s": acc["wall"], "tok_per_s": toks / acc["wall"],
            "ms_per_token_median": statistics.median(tpot) * 1e3 if tpot else None,
            "itl_median_ms": statistics.median(itl) * 1e3 if itl else None,
            "itl_p95_ms": pct(itl, 0.95) * 1e3,
            "ttft_median_ms": statistics.median(ttft) * 1e3 if ttft else None,
            "invalid": len(bad) if mode == "constrained" else None, "invalid_examples": bad[:3],
            # the server's side: its forward passes (mask filling overlaps them) per step
            "server_steps": acc["steps"], "server_forward_s": acc["forward_s"],
            "server_forward_ms_per_step": acc["forward_s"] / max(1, acc["steps"]) * 1e3,
            "server_forward_share": acc["forward_s"] / acc["wall"]}


async def constrained_levels(base: str, model: str, a) -> tuple[list[dict], list[int]]:
    url = f"{base}/v1/completions"
    limits = httpx.Limits(max_connections=max(a.levels) + 4, max_keepalive_connections=0)
    n_prompts = min(len(JSON_PROMPTS), max(a.levels) * a.requests)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600), limits=limits) as c:
        # warm-up: a prompt over 16 tokens (the first wide prefill step maps the weights)
        await one(c, url, model, JSON_PROMPTS[0], 2)
        # each prompt once under the schema: its length for the free twin, the grammar warm
        cal = await asyncio.gather(*(one(c, url, model, p, a.tokens, ignore_eos=False,
                                         response_format=RESPONSE_FORMAT)
                                     for p in JSON_PROMPTS[:n_prompts]))
        lengths = [max(2, r["tokens"]) for r in cal]
        rows = []
        for n in a.levels:
            acc = {m: {"res": [], "wall": 0.0, "forward_s": 0.0, "steps": 0} for m in MODES}
            for rnd in range(a.rounds):            # alternate the order: drift hits both
                for mode in (MODES if rnd % 2 == 0 else MODES[::-1]):
                    before = counters(base)
                    res, wall = await phase(c, url, model, n, a.requests, mode, a.tokens, lengths)
                    after = counters(base)
                    m = acc[mode]
                    m["res"] += res
                    m["wall"] += wall
                    m["forward_s"] += after["forward_seconds_total"] - before["forward_seconds_total"]
                    m["steps"] += int(after["steps_total"] - before["steps_total"])
            free, cons = (summarize(n, m, acc[m]) for m in MODES)
            cons["ratio_tok_per_s"] = cons["tok_per_s"] / free["tok_per_s"]
            if cons["ms_per_token_median"] and free["ms_per_token_median"]:
                cons["ratio_ms_per_token"] = cons["ms_per_token_median"] / free["ms_per_token_median"]
            rows += [free, cons]
            print(f"  {n} clients: {free['tok_per_s']:.1f} tok/s free, {cons['tok_per_s']:.1f} "
                  f"constrained ({cons['ratio_tok_per_s']:.2f}x)", file=sys.stderr)
    return rows, lengths


def constrained_table(rows) -> str:
    def f(x, spec):
        return "-" if x is None else format(x, spec)
    lines = ["| clients | mode | requests | completion tokens | tok/s | median ms/token | "
             "tok/s C/U | ms/token C/U | invalid |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['clients']} | {r['mode']} | {r['requests']} | {r['completion_tokens']} | "
                     f"{r['tok_per_s']:.1f} | {f(r['ms_per_token_median'], '.1f')} | "
                     f"{f(r.get('ratio_tok_per_s'), '.2f')} | {f(r.get('ratio_ms_per_token'), '.2f')} | "
                     f"{f(r['invalid'], 'd')} |")
    return "\n".join(lines)


def main_constrained(a, server: tuple) -> int:
    """Run the levels of the parsed options `a` on server (bench_serve.servers's entry for
    a2ats-lite), print the table, write the JSON; 1 when a constrained reply was invalid."""
    par = max(a.levels)
    notes = ["--constrained measures a2ats-lite only (no llama-server, no llama_cpp.server)"]
    print(f"{Path(a.model).name}: -c {a.ctx_size} per stream, -b {a.batch_size}, --parallel "
          f"{par}, max_tokens {a.tokens}, {a.requests} requests per client, mode and round, "
          f"{a.rounds} rounds", file=sys.stderr)
    load_start = os.getloadavg()
    name, cmd, ready = server
    port = free_port()
    with serving(name, cmd(port), port, ready) as base:
        rows, lengths = asyncio.run(constrained_levels(base, Path(a.model).name, a))
    bad = sum(r["invalid"] or 0 for r in rows)
    if bad:
        notes.append(f"{bad} constrained replies did not parse or match the schema")
    for n in notes:
        print(n, file=sys.stderr)
    print(constrained_table(rows))
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "model": a.model, "ctx": a.ctx_size, "kv": a.kv, "batch_size": a.batch_size,
        "parallel": par, "max_tokens": a.tokens, "requests_per_client": a.requests,
        "rounds": a.rounds, "temperature": 0, "endpoint": "/v1/completions (streamed)",
        "response_format": RESPONSE_FORMAT, "prompts": JSON_PROMPTS[:len(lengths)],
        "unconstrained_tokens_per_prompt": lengths, "target_ratio": 0.9,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "loadavg_start": load_start, "loadavg_end": os.getloadavg()},
        "notes": notes, "rows": rows}, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 1 if bad else 0
