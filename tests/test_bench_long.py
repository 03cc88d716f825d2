"""bench/bench_long.py's code layouts (--codes, --rerank) at toy scale: random codebooks in
4-bit layouts run the fast-scan path a calibrated sidecar would (scan="fast", codes packed in
blocks of 32 tokens, decode keys assigned by the real run's stacked assigner), one JSON and
table row per layout and re-rank factor."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from benchutil import load_bench, write_tiny

bench_long = load_bench("bench_long")
cc = sys.modules["cpu_compare"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("bench_long") / "tiny.gguf")   # head dim 16


def _args(tiny, tmp_path, *extra):
    return ["--model", str(tiny), "--contexts", "300", "--prefill-max", "128", "--llama-contexts",
            "--decode", "2", "--split-steps", "1", "--membw-mib", "4",
            "--llama-cache", str(tmp_path / "lref.json"), *extra]


def test_layouts_side_by_side_fast_scan(tiny, tmp_path, capsys, monkeypatch):
    from a2ats_lite.backend.cpu import CPUBackend
    calls = {"select_fastscan": 0, "select_topk": 0}
    for name in calls:          # count which scoring kernel each selection goes through
        real = getattr(CPUBackend, name)

        def counted(self, *a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(self, *a, **kw)
        monkeypatch.setattr(CPUBackend, name, counted)
    out = tmp_path / "layouts.json"
    assert bench_long.main(_args(tiny, tmp_path, "--codes", "8x8", "16x4", "--rerank", "2",
                                 "--out", str(out))) == 0
    text = capsys.readouterr().out
    assert "ours a2ats 8x8 r2" in text and "ours a2ats 16x4 r2" in text
    assert "where our decode step's time goes" in text
    data = json.loads(out.read_text())
    assert data["a2ats_variants"] == [dict(label="8x8 r2", codes="8x8", rerank=2, scan="exact"),
                                      dict(label="16x4 r2", codes="16x4", rerank=2, scan="fast")]
    rows = {r["runtime"]: r for r in data["decode"]}
    assert set(rows) == {"ours dense", "ours a2ats 8x8 r2", "ours a2ats 16x4 r2"}
    exact, fast = rows["ours a2ats 8x8 r2"], rows["ours a2ats 16x4 r2"]
    assert (exact["codes"], exact["rerank"], exact["scan"]) == ("8x8", 2, "exact")
    assert (fast["codes"], fast["rerank"], fast["scan"]) == ("16x4", 2, "fast")
    for r in (exact, fast):
        assert r["decode_tok_s"] > 0 and r["time_split"] and r["kv_parts_bytes"]["rerank"] > 0
    # the fast-scan codes are packed nibbles: 16 subspaces in 8 bytes per token, 8x8's in 16
    assert fast["kv_held_mb"] < exact["kv_held_mb"]
    assert calls["select_fastscan"] > 0 and calls["select_topk"] > 0


def test_fast_layout_assigns_decode_keys_like_a_real_run(tiny):
    """16x4 random codebooks with a random prefix: the policy scores by fast-scan on packed
    blocks, the layer's assigner is the real StackedCodebooks, and a decode step's key gets
    the nearest-centroid codes a plain Codebook gives it."""
    from a2ats_lite.backend import scoring
    from a2ats_lite.runtime import Runtime
    rt = Runtime(tiny, n_ctx=512)
    try:
        (v,), _ = cc.a2ats_variants(tiny, rt.model.attn_layers, codes=["16x4"], random_fill=True)
        kv = cc.new_cache(rt, "a2ats", 512, calib=v["calib"], rerank=v["rerank"])
        try:
            pol = kv.policy
            assert pol.scan == "fast" and pol.fast and pol.rerank == cc.DEFAULT_RERANK
            layer = next(iter(pol.slot))
            assert isinstance(pol.assign[layer].stacked, cc.StackedCodebooks)
            n = 100
            seq = rt.model.load_prefix(kv, cc.random_prefix(rt.model.attn_layers, n,
                                                            np.random.default_rng(3)))
            blocks = pol.seq_codes(seq, pol.slot[layer])        # (G, n_blocks, M / 2, 32) uint8
            L = rt.model.attn_layers[layer]
            assert blocks.dtype == np.uint8 and blocks.shape[1:] == (-(-512 // 32), 8, 32)
            cap = cc.Capture(len(rt.model.attn_layers))
            kv.observers.append(cap)
            rt.model.forward([np.array([5])], [seq], kv)
            kv.observers.remove(cap)
            key = cap.prefix()[layer][0][0].astype(np.float32)  # (G, d) the step's pre-RoPE key
            got = scoring.fastscan_unpack(blocks, n, n + 1)[:, :, 0]                 # (G, M)
            for g in range(L.n_kv_heads):
                book = v["calib"].a2ats[(layer, g)]
                real = cc.Codebook(None, book.L, sub=book.sub)
                assert np.array_equal(got[g], real.assign_codes(key[g:g + 1])[0])
        finally:
            kv.close()
    finally:
        rt.close()


def test_random_calibration_records_scan_like_calibrate(tiny):
    from a2ats_lite.runtime import Runtime
    rt = Runtime(tiny, n_ctx=256)
    try:
        layers = rt.model.attn_layers
        for codes, scan in (("8x8", "exact"), ("16x4", "fast"), ("8x4", "fast"), ("1x4", "exact")):
            cal = cc.random_calibration(layers, np.random.default_rng(0), codes, rerank=4)
            assert cc.layout_of(cal) == (codes, 4, scan)
        with pytest.raises(ValueError, match="head dim 16"):
            cc.random_calibration(layers, np.random.default_rng(0), "32x4")
    finally:
        rt.close()


def test_bad_layouts_exit_2(tiny, tmp_path, capsys):
    assert bench_long.main(_args(tiny, tmp_path, "--codes", "32x4", "--out",
                                 str(tmp_path / "x.json"))) == 2
    assert "head dim 16" in capsys.readouterr().err
    for bad in (["--codes", "8y8"], ["--rerank", "0"]):
        with pytest.raises(SystemExit) as e:
            bench_long.parse(bad)
        assert e.value.code == 2
    with pytest.raises(ValueError, match="not both"):
        cc.a2ats_variants(tiny, [], sidecar=tmp_path / "s.a2ats", codes=["8x8"])
