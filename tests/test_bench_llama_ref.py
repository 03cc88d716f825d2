"""bench/llama_ref.py (llama.cpp's reference figures, cached) and bench/membw.py at toy
scale: the cache logic with a fake timing function, the fingerprint, llama-bench's JSON
through a fake binary, and llama-cpp-python's own timing of a tiny synthetic file where
llama_cpp is importable."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from benchutil import load_bench

ref = load_bench("llama_ref")
INF = float("inf")      # the cache tests cache whatever the load of the machine running them
membw = load_bench("membw")


class FakeTimer:
    """fa on decodes faster, fa off processes prompts faster; counts its calls."""

    def __init__(self, timed_out=()):
        self.calls, self.timed_out = [], set(timed_out)

    def __call__(self, path, depth, threads, n_decode, fa, n_batch, timeout=None, replay=False):
        self.calls.append((depth, fa) + (("replay",) if replay else ()))
        if ("on" if fa else "off") in self.timed_out:
            return dict(timed_out=True, timeout_s=timeout)
        if replay:
            return dict(n_prompt=max(depth, 1), prompt_s=None, fill="replayed",
                        decode_ms=10.0 if fa else 20.0, method="fake")
        return dict(n_prompt=max(depth, 1), prompt_s=(2.0 if fa else 1.0) * depth / 100,
                    decode_ms=10.0 if fa else 20.0, method="fake")


@pytest.fixture
def model(tmp_path) -> Path:
    p = tmp_path / "m.gguf"
    p.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return p


def test_cache_reused_and_marked(model, tmp_path):
    cache, t = tmp_path / "cache.json", FakeTimer()
    r1 = ref.measure(model, 200, 2, 4, cache_path=cache, timer=t, version="v1", max_load=INF)
    assert len(t.calls) == 2 and not any(s["cached"] for s in r1["settings"].values())
    b = r1["best"]
    assert (b["decode_fa"], b["decode_tok_s"]) == ("on", pytest.approx(100.0))
    assert (b["prompt_fa"], b["prompt_tok_s"]) == ("off", pytest.approx(100.0))
    assert b["decode_cached"] is False
    r2 = ref.measure(model, 200, 2, 4, cache_path=cache, timer=t, version="v1", max_load=INF)
    assert len(t.calls) == 2                                    # nothing timed again
    assert all(s["cached"] for s in r2["settings"].values()) and r2["best"]["decode_cached"]
    assert r2["best"]["decode_tok_s"] == r1["best"]["decode_tok_s"]
    assert "(cache)" in ref.describe(r2) and "(cache)" not in ref.describe(r1)
    ref.measure(model, 200, 2, 4, cache_path=cache, timer=t, version="v1", max_load=INF, use_cache=False)
    assert len(t.calls) == 4                                    # --no-cache: timed again


@pytest.mark.parametrize("change", ["depth", "threads", "n_decode", "version", "file"])
def test_cache_key_parts(model, tmp_path, change):
    cache, t = tmp_path / "cache.json", FakeTimer()
    args = dict(depth=200, threads=2, n_decode=4, version="v1")
    ref.measure(model, args["depth"], args["threads"], args["n_decode"], cache_path=cache, timer=t,
                version=args["version"], max_load=INF)
    if change == "file":
        with open(model, "ab") as f:
            f.write(b"x")
    else:
        args[change] = {"depth": 300, "threads": 1, "n_decode": 8, "version": "v2"}[change]
    r = ref.measure(model, args["depth"], args["threads"], args["n_decode"], cache_path=cache,
                    timer=t, version=args["version"], max_load=INF)
    assert len(t.calls) == 4 and not any(s["cached"] for s in r["settings"].values())


def test_timeout_not_cached(model, tmp_path):
    cache = tmp_path / "cache.json"
    t = FakeTimer(timed_out={"on"})
    r = ref.measure(model, 200, 2, 4, cache_path=cache, timer=t, version="v1", max_load=INF, timeout=5)
    assert r["settings"]["on"]["timed_out"] and r["best"]["decode_fa"] == "off"
    assert "timed out after 5 s" in ref.describe(r)
    t2 = FakeTimer()
    r = ref.measure(model, 200, 2, 4, cache_path=cache, timer=t2, version="v1", max_load=INF)
    assert t2.calls == [(200, True)]                             # only the missing setting
    assert r["best"]["decode_fa"] == "on" and r["settings"]["off"]["cached"]


def test_busy_machine_not_cached(model, tmp_path):
    cache, t = tmp_path / "cache.json", FakeTimer()
    r = ref.measure(model, 200, 2, 4, cache_path=cache, timer=t, version="v1", max_load=-1)
    assert all("not cached" in s["not_cached"] for s in r["settings"].values())
    assert r["best"]["decode_fa"] == "on" and not cache.exists()
    assert "not cached" in ref.describe(r)


def test_no_figures_no_best(model, tmp_path):
    t = FakeTimer(timed_out={"on", "off"})
    r = ref.measure(model, 200, 2, 4, cache_path=tmp_path / "c.json", timer=t, version="v1", max_load=INF)
    assert r["best"] is None and not (tmp_path / "c.json").exists()


def test_fingerprint(tmp_path):
    small = tmp_path / "small"
    small.write_bytes(b"a" * 1000)
    fp = ref.file_fingerprint(small)
    small.write_bytes(b"a" * 999 + b"b")                       # small files: the whole sha
    assert ref.file_fingerprint(small) != fp
    big = tmp_path / "big"
    data = bytearray(3 * ref.MIB)
    big.write_bytes(data)
    fp = ref.file_fingerprint(big)
    data[-1] = 1                                                 # the last MiB counts
    big.write_bytes(data)
    assert ref.file_fingerprint(big) != fp and fp.startswith(f"{3 * ref.MIB}:")


def test_prompt_ids():
    a = ref.prompt_ids(100, 300)
    assert a == ref.prompt_ids(100, 300) and len(a) == 100
    assert all(75 <= t < 300 for t in a)
    assert len(ref.prompt_ids(0, 262144)) == 1 and max(ref.prompt_ids(5000, 262144)) < 200000


def test_llama_bench_fake_binary(model, tmp_path):
    """time_llama_bench's two invocations and its reading of -o json."""
    log = tmp_path / "args.jsonl"
    fake = tmp_path / "llama-bench"
    fake.write_text(f"""#!{sys.executable}
import json, sys
a = sys.argv[1:]
open({str(log)!r}, "a").write(json.dumps(a) + "\\n")
v = lambda k: int(a[a.index(k) + 1])
p, n = v("-p"), v("-n")
d = v("-d") if "-d" in a else 0
ts = 50.0 if n else 400.0
print(json.dumps([{{"n_prompt": p, "n_gen": n, "n_depth": d, "avg_ns": int((n or p) / ts * 1e9),
                   "avg_ts": ts, "build_commit": "abc"}}]))
""")
    fake.chmod(0o755)
    r = ref.time_llama_bench(fake, model, 800, 2, 8, True)
    assert r["prompt_s"] == pytest.approx(2.0) and r["decode_ms"] == pytest.approx(20.0)
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(calls) == 2 and all(c[c.index("-fa") + 1] == "1" for c in calls)
    assert calls[1][calls[1].index("-d") + 1] == "800" and "--no-warmup" in calls[0]
    out = ref.measure(model, 800, 2, 8, cache_path=tmp_path / "c.json", llama_bench=fake,
                      max_load=INF)
    assert out["version"].startswith("llama-bench sha256") and out["best"]["prompt_tok_s"] == 400
    ref.measure(model, 800, 2, 8, cache_path=tmp_path / "c.json", llama_bench=fake,
                      max_load=INF)
    assert len(log.read_text().splitlines()) == 6                # 2 settings x 2 runs, then cached


def test_replay_cached_under_its_own_key(model, tmp_path):
    cache, t = tmp_path / "cache.json", FakeTimer()
    computed = ref.measure(model, 200, 2, 4, cache_path=cache, timer=t, version="v1", max_load=INF)
    r = ref.measure(model, 200, 2, 4, cache_path=cache, timer=t, version="v1", max_load=INF,
                    replay=True)
    assert t.calls[2:] == [(200, True, "replay"), (200, False, "replay")]   # not the computed entries
    assert r["replayed"] and not computed["replayed"]
    assert r["best"]["prompt_tok_s"] is None and r["best"]["decode_fa"] == "on"
    assert "prompt replayed" in ref.describe(r)
    again = ref.measure(model, 200, 2, 4, cache_path=cache, timer=t, version="v1", max_load=INF,
                        replay=True)
    assert len(t.calls) == 4 and again["best"]["decode_cached"]
    assert ref.time_llama_bench(tmp_path / "none", model, 200, 2, 4, True, replay=True)["failed"]


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp not installed")
def test_python_worker_replay_tiny(tmp_path):
    """A replayed cache of 150 positions from blocks of 32 (4 loaded, the 22-token tail computed):
    the worker checks the sequence spans 0..149 and decodes after it."""
    synth = load_bench("make_synth_gguf")
    path = tmp_path / "tiny.gguf"
    synth.write_synth_gguf(path, "tiny", "q4_0", n_ctx=4096, n_vocab=300)
    r = ref.measure(path, 150, 1, 2, n_batch=32, cache_path=tmp_path / "c.json", timeout=120,
                    replay=True, max_load=INF)
    for fa in ("on", "off"):
        s = r["settings"][fa]
        assert s.get("decode_ms", 0) > 0 and s["fill"] == "replayed" and s["prompt_tok_s"] is None, s
        assert s["n_prompt"] == 150


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama_cpp not installed")
def test_python_worker_tiny(tmp_path):
    synth = load_bench("make_synth_gguf")
    path = tmp_path / "tiny.gguf"
    synth.write_synth_gguf(path, "tiny", "q4_0", n_ctx=4096, n_vocab=300)
    r = ref.measure(path, 40, 1, 2, cache_path=tmp_path / "c.json", timeout=120)
    for fa in ("on", "off"):
        s = r["settings"][fa]
        assert s["decode_ms"] > 0 and s["prompt_tok_s"] > 0 and s["n_prompt"] == 40, s
    assert r["version"].startswith("llama-cpp-python")


@pytest.mark.parametrize("use_c", [True, False])
def test_membw_small(use_c):
    r = membw.measure(threads=2, mib=4, reps=1, use_c=use_c)
    assert all(r[k] > 0 for k in membw.KERNELS) and r["mib"] == 4
    assert ("C kernels" in r["method"]) == (use_c and membw.c_kernels() is not None)
