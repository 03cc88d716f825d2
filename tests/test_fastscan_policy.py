"""The fast-scan path of the coded policies (a2ats / vq with 4-bit codes, scan="fast"): codes
packed as decode appends them, selections equal to the quantized-LUT reference and to the
numpy backend, the re-rank after it, the sidecar's scan parameter, and the selection bench at
toy scale."""
import numpy as np
import pytest
from test_retrieval import FULL, GROUP, G, D, data, layers, make, run

from a2ats_lite.backend import scoring
from a2ats_lite.backend.cpu import CPUBackend
from a2ats_lite.errors import SidecarError
from a2ats_lite.vq import Calibration, calibrate_from_samples, train_codebook


def _books(rng, M, kind="a2ats"):
    return {(i, g): train_codebook(rng.standard_normal((300, D)),
                                   rng.standard_normal((200, D)) if kind == "a2ats" else None,
                                   16, iters=5, n_subspaces=M)
            for i in FULL for g in range(G)}


def _cal(rng, M, scan="fast", kind="a2ats", **params):
    p = {"b": 2048, "w": 64, "s": 8, "n_centroids": 16, "codes": f"{M}x4", **params}
    if scan is not None:
        p["scan"] = scan
    return Calibration(params=p, fingerprint="", **{kind: _books(rng, M, kind)})


@pytest.mark.parametrize("kind", ["a2ats", "vq"])
@pytest.mark.parametrize("M", [2, 4])
def test_codes_are_packed_as_assigned(rng, kind, M):
    """Prefill then decode one token at a time: the packed blocks hold every token's codes."""
    ls = layers()
    T = 75
    qkv = data(rng, T)
    cal = _cal(rng, M, kind=kind)
    kv = make(kind, ls, budget=4, sinks=2, window=4, calib=cal)
    assert kv.policy.fast and kv.policy.codes_shape(ls[1])[2:] == (-(-kv.n_ctx // 32), M // 2, 32)
    seq, _ = run(kv, qkv, 40)
    for i in FULL:
        L, s = ls[i], kv.storage.slot[i]
        keys = qkv[i][1] if kind == "a2ats" else L.rope(qkv[i][1], np.arange(T))
        for g in range(G):
            want = getattr(cal, kind)[(i, g)].assign_codes(keys[:, g])        # (T, M)
            got = scoring.fastscan_unpack(kv.policy.codes[seq][s], 0, T)[g]   # (M, T)
            np.testing.assert_array_equal(got, want.T)
            cand = np.array([3, 17, 40, 41, 70])
            np.testing.assert_array_equal(kv.policy.cand_codes(seq, s, g, cand), want[cand].T)


@pytest.mark.parametrize("M", [2, 4])
def test_selection_is_the_quantized_top_k(rng, M):
    """Without re-rank each query head keeps the top-K of its quantized-LUT integer scores (ties
    to the earlier position), united over the group: the policy's LUT, quantized in numpy."""
    ls = layers()
    T, K, sinks, window = 90, 5, 2, 4
    qkv = data(rng, T)
    kv = make("a2ats", ls, budget=K, sinks=sinks, window=window, calib=_cal(rng, M), rerank=1)
    seq, _ = run(kv, qkv, 70)
    for i in FULL:
        L, s = ls[i], kv.storage.slot[i]
        q = qkv[i][0][T - 1:T]
        for g in range(G):
            heads = slice(g * GROUP, (g + 1) * GROUP)
            lut = kv.policy.lut(L, g, q[0, heads], None)                  # (group, M, 16)
            qlut = scoring.fastscan_quantize_lut(lut)[0].astype(np.int64)
            lo, hi = sinks, T - window                # the last step sees all T positions
            cand = np.arange(lo, hi)
            codes = kv.policy.cand_codes(seq, s, g, cand)
            sc = sum(qlut[:, m, codes[m]] for m in range(M))              # (group, n)
            want = set()
            for j in range(GROUP):
                want.update(cand[np.lexsort((cand, -sc[j]))[:K]].tolist())
            want |= set(range(lo)) | set(range(hi, T))
            assert kv.sel[(i, seq)][g].tolist() == sorted(want)


@pytest.mark.parametrize("rerank", [1, 3])
def test_native_path_equals_the_numpy_backend(rng, rerank):
    from kvutil import assert_native_selects_as_numpy
    qkv = data(rng, 100)
    assert_native_selects_as_numpy(layers(), lambda kv: run(kv, qkv, 70), budget=5, sinks=2,
                                   window=4, calib=_cal(rng, 4), rerank=rerank)


def test_rerank_large_enough_equals_the_oracle(rng):
    ls = layers()
    qkv = data(rng, 90)
    kv = make("a2ats", ls, budget=5, sinks=2, window=4, calib=_cal(rng, 2), rerank=100)
    orc = make("oracle", ls, budget=5, sinks=2, window=4)
    seq, _ = run(kv, qkv, 60)
    oseq, _ = run(orc, qkv, 60)
    for i in FULL:
        for g in range(G):
            assert kv.sel[(i, seq)][g].tolist() == orc.sel[(i, oseq)][g].tolist()


def test_scan_parameter(rng, tmp_path):
    assert CPUBackend().caps.fast_scan and CPUBackend().caps.rerank
    ls = layers()
    cal = _cal(rng, 4, scan=None)
    assert not make("a2ats", ls, budget=3, calib=cal).policy.fast        # old sidecars: exact
    assert make("a2ats", ls, budget=3, calib=cal, scan="fast").policy.fast
    exact = make("a2ats", ls, budget=3, calib=_cal(rng, 4), scan="exact").policy
    assert not exact.fast and exact.codes_shape(ls[1])[2] == 4               # uint16 per subspace
    with pytest.raises(ValueError, match="scan must be"):
        make("a2ats", ls, budget=3, calib=cal, scan="quick")
    eight = Calibration(params={"b": 2048, "w": 64, "s": 8, "n_centroids": 8, "codes": "2x3"},
                        fingerprint="", a2ats={(i, g): train_codebook(
                            rng.standard_normal((100, D)), rng.standard_normal((100, D)), 8,
                            iters=3, n_subspaces=2) for i in FULL for g in range(G)})
    with pytest.raises(SidecarError, match="4-bit codes"):
        make("a2ats", ls, budget=3, calib=eight, scan="fast")
    # the sidecar keeps it, and refuses what the layout cannot do
    path = tmp_path / "fs.a2ats"
    _cal(rng, 4).save(path)
    assert Calibration.load(path).params["scan"] == "fast"
    for params, needle in (({"scan": "fastest"}, "must be 'exact' or 'fast'"),
                           ({"scan": "fast", "codes": "4x5", "n_centroids": 32}, "needs 4-bit")):
        c = _cal(rng, 4)
        c.params.update(params)
        c.save(path)
        with pytest.raises(SidecarError, match=needle):
            Calibration.load(path)


def test_calibrate_records_fast_scan_for_4bit_layouts(rng):
    ls = layers()
    n = 300
    q = {i: rng.standard_normal((n, 4, D)).astype(np.float32) for i in FULL}
    k = {i: rng.standard_normal((n, G, D)).astype(np.float32) for i in FULL}
    pos = {i: np.arange(n) for i in FULL}
    for codes, scan in (("4x4", "fast"), ("2x4", "fast"), ("4x3", None), ("1x4", None)):
        cal = calibrate_from_samples(ls, q, k, pos, codes=codes, iters=2)
        assert cal.params.get("scan") == scan


def test_step_bytes_count_packed_codes(rng):
    ls = layers()
    kv = make("a2ats", ls, budget=3, sinks=8, window=64, calib=_cal(rng, 4))
    b = kv.policy.step_bytes(ls[1], 1000)          # candidates 8..935: blocks 0..29
    assert b["codes"] == 30 * 32 * 2 and b["lut"] == GROUP * 4 * 16 * 4


def test_bench_selection_runs_at_toy_scale(tmp_path):
    from benchutil import load_bench
    bench = load_bench("bench_retrieval")
    rows = bench.selection_rows(T=300, shape=dict(G=2, g=4, d=64), repeat=1, n_threads=1,
                                rng=np.random.default_rng(0))
    assert {r["layout"] for r in rows} >= {"8x8", "16x4"}
    assert all(r["ms"] > 0 and r["codes_bytes"] > 0 for r in rows)
