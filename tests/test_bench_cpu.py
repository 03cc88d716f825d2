"""bench/bench_cpu.py and bench/bench_long.py at toy scale (a tiny synthetic model, a few
steps), and the byte accounting of bench/cpu_compare.py they print. llama.cpp's part runs
where llama_cpp is importable (into a temporary cache); else the benches say it did not."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from benchutil import load_bench, write_tiny

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None


bench_cpu = load_bench("bench_cpu")
bench_long = load_bench("bench_long")
cc = sys.modules["cpu_compare"]
A2ATS = f"ours a2ats {cc.DEFAULT_CODES} r{cc.DEFAULT_RERANK}"   # the shipped layout's row


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("bench_cpu") / "tiny.gguf")


def _common(tmp_path):
    return ["--decode", "2", "--membw-mib", "4", "--llama-cache", str(tmp_path / "lref.json"),
            "--llama-timeout", "120", "--cache-max-load", "1e9"]   # cached however busy the machine


def test_bench_cpu_toy(tiny, tmp_path, capsys):
    out = tmp_path / "cpu.json"
    args = ["--model", str(tiny), "--contexts", "0", "100", "--split-steps", "1", "--out", str(out)]
    assert bench_cpu.main(args + _common(tmp_path)) == 0
    text = capsys.readouterr().out
    assert "prompt processing" in text and "ours a2ats" in text
    assert f"codes {cc.DEFAULT_CODES}, re-rank {cc.DEFAULT_RERANK}" in text
    data = json.loads(out.read_text())
    rows = {(r["depth"], r["runtime"]): r for r in data["decode"]}
    for depth in (0, 100):
        for name in ("ours dense", A2ATS):
            r = rows[(depth, name)]
            assert r["decode_tok_s"] > 0 and r["mb_per_step"] > 0 and r["time_split"]
        assert set(rows[(depth, A2ATS)]["kv_parts_bytes"]) == {"rows", "codes", "lut", "rerank",
                                                                        "window_layers"}
    prompts = {p["depth"]: p for p in data["prompt"]}
    assert prompts[0]["ours_tok_s"] is None and prompts[100]["ours_tok_s"] > 0
    assert data["machine"]["membw"]["read"] > 0
    if not HAVE_LLAMA:
        assert "not run" in text
        return
    for depth in (0, 100):
        assert rows[(depth, "llama.cpp fa on")]["decode_tok_s"] > 0
        best = [r for r in data["decode"] if r["depth"] == depth and r.get("best")]
        assert len(best) == 1 and rows[(depth, "ours dense")]["vs_llama"] > 0
    assert "(cache)" not in text
    assert bench_cpu.main(args + _common(tmp_path) + ["--policies", "dense", "--split-steps", "0"]) == 0
    assert "(cache)" in capsys.readouterr().out                 # llama.cpp's figures reused


def test_bench_long_toy(tiny, tmp_path, capsys):
    out = tmp_path / "long.json"
    assert bench_long.main(["--model", str(tiny), "--contexts", "100", "300", "--prefill-max", "128",
                            "--llama-contexts", "100", "300", "--n-batch", "64", "--out", str(out)]
                           + _common(tmp_path)) == 0
    text = capsys.readouterr().out
    assert "replayed" in text and "KV memory held" in text
    data = json.loads(out.read_text())
    prompts = {p["depth"]: p for p in data["prompt"]}
    assert prompts[100]["ours_tok_s"] > 0 and prompts[300]["ours_tok_s"] is None
    assert prompts[300]["fa_on"] is None                         # llama.cpp replayed at 300
    assert prompts[300]["llama_replayed"] == HAVE_LLAMA and not prompts[100]["llama_replayed"]
    if HAVE_LLAMA:
        names = {(r["depth"], r["runtime"]) for r in data["decode"]}
        assert {(100, "llama.cpp fa on"), (300, "llama.cpp fa on replayed"),
                (300, "llama.cpp fa off replayed")} <= names
    ours = [r for r in data["decode"] if r["runtime"].startswith("ours")]
    assert len(ours) == 4 and all(r["kv_held_mb"] > 0 and r["decode_tok_s"] > 0 for r in ours)
    assert [r["runtime"] for r in ours] == ["ours dense", A2ATS] * 2
    assert all((r["codes"], r["rerank"], r["scan"]) == (cc.DEFAULT_CODES, cc.DEFAULT_RERANK, "exact")
               for r in ours[1::2])
    assert any(r["runtime"].startswith("llama.cpp") for r in data["decode"]) == HAVE_LLAMA


def test_bench_long_offload_rows_and_resident_memory(tiny, tmp_path, capsys):
    """--kv-offload-dir: each a2ats setting again with its store in an unlinked file there
    (nothing left in the directory), every row of ours with the resident memory it held."""
    spill = tmp_path / "spill"
    spill.mkdir()
    out = tmp_path / "long.json"
    assert bench_long.main(["--model", str(tiny), "--contexts", "300", "--prefill-max", "128",
                            "--llama-contexts", "--split-steps", "0", "--kv-offload-dir", str(spill),
                            "--out", str(out)] + _common(tmp_path)) == 0
    assert "resident anon" in capsys.readouterr().out
    ours = [r for r in json.loads(out.read_text())["decode"] if r["runtime"].startswith("ours")]
    assert [r["runtime"] for r in ours] == ["ours dense", A2ATS, A2ATS + " offload"]
    assert [r.get("offload") for r in ours] == [None, False, True]
    for r in ours:
        assert r["rss_mb"]["anon"] > 0 and r["rss_mb"]["file"] > 0 and r["bench_prefix_mb"] > 0
    assert list(spill.iterdir()) == []
    with pytest.raises(SystemExit) as e:                         # argparse's usage error
        bench_long.main(["--model", str(tiny), "--kv-offload-dir", str(tmp_path / "none")])
    assert e.value.code == 2


def test_random_calibration_is_the_shipped_layout(tiny):
    from a2ats_lite.runtime import Runtime
    rt = Runtime(tiny, n_ctx=512)
    try:
        cal = cc.random_calibration(rt.model.attn_layers, np.random.default_rng(0))
        kv = cc.new_cache(rt, "a2ats", 512, calib=cal)
        try:
            M, bits = cc.parse_codes(cc.DEFAULT_CODES)
            assert kv.policy.rerank == cc.DEFAULT_RERANK and kv.policy.M == M
            assert {b.n_centroids for b in cal.a2ats.values()} == {2 ** bits}
            assert kv.policy.qtrans                                # the query transform runs
        finally:
            kv.close()
    finally:
        rt.close()


def test_fill_codebook_assigns_decode_keys_for_real(tiny, rng):
    from a2ats_lite.runtime import Runtime
    rt = Runtime(tiny, n_ctx=512)
    try:
        cal = cc.random_calibration(rt.model.attn_layers, rng, random_fill=True)
    finally:
        rt.close()
    book = next(iter(cal.a2ats.values()))
    real = cc.Codebook(None, book.L, sub=book.sub)
    key = rng.standard_normal((1, book.dim)).astype(np.float32)
    assert np.array_equal(book.assign_codes(key), real.assign_codes(key))   # a decode step's key
    many = book.assign_codes(rng.standard_normal((300, book.dim)).astype(np.float32))
    assert many.shape == (300, book.M) and many.dtype == np.uint16 and many.max() < book.n_centroids


def test_step_bytes_match_the_policy(tiny):
    """The a2ats bytes: codes of every candidate of every (layer, KV head), the selected rows
    (at most dense's), the re-rank's keys."""
    from a2ats_lite.runtime import Runtime
    rt = Runtime(tiny, n_ctx=1024)
    try:
        cal = cc.random_calibration(rt.model.attn_layers, np.random.default_rng(1))
        kv = cc.new_cache(rt, "a2ats", 1024, calib=cal, budget=8)
        try:
            n = 600
            seq = rt.model.load_prefix(kv, cc.random_prefix(rt.model.attn_layers, n, np.random.default_rng(2)))
            parts = cc.a2ats_step_bytes(rt.model, kv, seq, 5, 2)
            layers = [L for L in rt.model.attn_layers if L.window is None]
            T = n + 1
            lo, hi = kv.policy.candidates(T)
            M = cc.parse_codes(cc.DEFAULT_CODES)[0]
            assert parts["codes"] == sum(L.n_kv_heads * (hi - lo) * M * 2 for L in layers)
            assert 0 < parts["rows"] < cc.dense_kv_bytes(layers, T, 2)
            assert parts["rerank"] > 0 and parts["lut"] > 0
        finally:
            kv.close()
    finally:
        rt.close()


def test_dense_kv_bytes_window_layers():
    L = lambda w: SimpleNamespace(window=w, n_kv_heads=2, head_dim=4)  # noqa: E731
    assert cc.dense_kv_bytes([L(None), L(10)], 100, 2) == 2 * 100 * 8 * 2 + 2 * 10 * 8 * 2
    assert cc.dense_kv_bytes([L(10)], 5, 4) == 2 * 5 * 8 * 4


def test_ratios_and_tables():
    rows = [dict(depth=8, runtime="ours dense", decode_tok_s=30.0, step_ms=33.3, mb_per_step=10,
                 gb_s=0.3, ceiling_frac=0.1),
            dict(depth=8, runtime="llama.cpp fa on", decode_tok_s=20.0, step_ms=50, mb_per_step=10,
                 gb_s=0.2, ceiling_frac=0.05, best=True, cached=True),
            dict(depth=8, runtime="llama.cpp fa off", note="timed out after 5 s")]
    cc.with_ratios(rows)
    assert rows[0]["vs_llama"] == pytest.approx(1.5) and rows[1]["vs_llama"] == 1.0
    t = cc.decode_table(rows, 3.0)
    assert "1.50x" in t and "(cache) best" in t and "timed out after 5 s" in t
    ref = dict(settings={"on": dict(prompt_tok_s=50.0), "off": dict(prompt_tok_s=80.0)},
               best=dict(prompt_tok_s=80.0, prompt_fa="off", prompt_cached=False))
    p = cc.prompt_table([cc.prompt_row(8, 40.0, ref), cc.prompt_row(16, None, None, "replayed")])
    assert "0.50x" in p and "replayed" in p
