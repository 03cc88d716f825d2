"""Query-aware VQ math against direct formulas on small random cases; the sidecar file."""
import zipfile

import numpy as np
import pytest

from a2ats_lite.errors import SidecarError
from a2ats_lite.config import AttnLayer
from a2ats_lite.rope import Rope
from a2ats_lite.vq import (Calibration, Codebook, calibrate_from_samples, estimate_H, fingerprint,
                           kmeans, nearest, train_codebook)


def test_wrope_score_is_rotated_query_dot_prerope_key():
    # (R_b q) . k equals the RoPE score of q at position i against k at i - b, any i (float64)
    rng = np.random.default_rng(0)
    for pairing in ("half", "adjacent"):
        rope = Rope(head_dim=16, base=10000.0, pairing=pairing)
        q, k = rng.standard_normal((2, 1, 1, 16)).astype(np.float32)
        b = 37
        wrope = float((rope(q, [b])[0, 0].astype(np.float64) * k[0, 0]).sum())
        for i in (37, 100, 5000):
            exact = float((rope(q, [i])[0, 0].astype(np.float64) * rope(k, [i - b])[0, 0]).sum())
            assert wrope == pytest.approx(exact, rel=1e-4, abs=1e-5)


def test_H_factor_and_normalization():
    rng = np.random.default_rng(1)
    q = rng.standard_normal((500, 8)) * np.arange(1, 9)
    H, L = estimate_H(q)
    ref = q.T @ q / 500
    ref = ref / np.sqrt(np.mean(ref ** 2)) + 1e-6 * np.eye(8)
    np.testing.assert_allclose(H, ref, rtol=1e-12)
    np.testing.assert_allclose(L @ L.T, H, rtol=1e-10, atol=1e-12)
    assert np.allclose(L, np.tril(L))
    # rank-deficient samples still factor thanks to the ridge
    assert np.isfinite(estimate_H(rng.standard_normal((3, 8)))[1]).all()
    with pytest.raises(ValueError):
        estimate_H(np.zeros((0, 8)))


def test_nearest_is_brute_force_argmin():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1000, 12))
    c = rng.standard_normal((37, 12))
    direct = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(nearest(x, c, chunk=128), direct)       # float64
    agree = nearest(x.astype(np.float32), c) == direct                      # float32 GEMM
    assert agree.mean() > 0.99


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_kmeans_objective_decreases_and_is_h_metric_distortion(dtype):
    rng = np.random.default_rng(3)
    keys = rng.standard_normal((2000, 8))
    q = rng.standard_normal((800, 8)) * np.array([5, 1, 1, 1, 0.2, 0.2, 3, 1])
    H, L = estimate_H(q)
    res = kmeans(keys @ L, 32, iters=50, tol=0, seed=3, dtype=dtype)
    obj = np.array(res.objective)
    assert (np.diff(obj) <= 1e-9 * obj[:-1]).all() and obj[-1] < 0.9 * obj[0]
    # the objective equals sum |L^T (k - c)|^2 = sum (k - c)^T H (k - c), c in key space
    # (float32 runs see the points rounded to float32)
    rel = 1e-9 if dtype == np.float64 else 1e-6
    C = np.linalg.solve(L.T, res.centroids.T).T
    diff = keys - C[res.labels]
    assert np.einsum("nd,de,ne->n", diff, H, diff).sum() == pytest.approx(obj[-1], rel=rel)
    assert ((diff @ L) ** 2).sum() == pytest.approx(obj[-1], rel=rel)
    # labels are the nearest centroids (a Lloyd fixed point when tol=0 and it stopped early)
    if res.n_iter < 50:
        assert (nearest(keys @ L, res.centroids) == res.labels).all()


def test_kmeans_is_seeded_and_handles_degenerate_data():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((300, 5))
    a, b = kmeans(x, 10, seed=7, iters=5), kmeans(x, 10, seed=7, iters=5)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    dup = np.repeat(x[:6], 20, axis=0)            # 6 distinct points, 10 centroids
    res = kmeans(dup, 10, iters=10, seed=0)
    assert res.objective[-1] == pytest.approx(0.0, abs=1e-9)
    res = kmeans(x[:10], 10, iters=3, seed=0)     # k == n
    assert res.objective[-1] == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="at least k=11"):
        kmeans(x[:10], 11)


def test_code_assignment_is_argmin_in_H_metric():
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((300, 6)).astype(np.float32)
    q = rng.standard_normal((200, 6)) * np.array([4, 1, 0.1, 1, 2, 0.5])
    cb = train_codebook(keys, q, n_centroids=16, iters=20, seed=0)
    H = estimate_H(q)[0]
    d = keys[:, None, :].astype(np.float64) - cb.centroids[None].astype(np.float64)
    dist = np.einsum("nkd,de,nke->nk", d, H, d)                            # (n, 16) direct
    codes = cb.assign(keys)
    assert codes.dtype == np.uint16
    np.testing.assert_array_equal(cb.assign(keys, dtype=np.float64), np.argmin(dist, axis=1))
    # float32 assignment: the code is nearest up to float32 rounding
    chosen = dist[np.arange(300), codes]
    assert (chosen <= dist.min(1) * (1 + 1e-4) + 1e-6).all()


def test_query_aware_beats_plain_vq_on_score_error():
    # the point of the method: smaller error of q~.k where queries actually point
    rng = np.random.default_rng(6)
    d = 16
    scale = np.ones(d)
    scale[:3] = 8.0
    keys = rng.standard_normal((3000, d))
    q_train = rng.standard_normal((2000, d)) * scale
    q_test = rng.standard_normal((500, d)) * scale
    aware = train_codebook(keys, q_train, 64, iters=30, seed=1)
    plain = train_codebook(keys, None, 64, iters=30, seed=1)

    def err(cb):
        approx = cb.centroids[cb.assign(keys)]
        return np.mean((q_test @ keys.T - q_test @ approx.T) ** 2)

    assert err(aware) < 0.8 * err(plain)


def test_calibrate_from_samples_follows_the_method():
    rng = np.random.default_rng(7)
    H_, G, D, N, b = 4, 2, 8, 400, 50
    rope = Rope(head_dim=D, base=10000.0)
    layers = [AttnLayer(0, H_, G, D, 0.3, 16, rope), AttnLayer(1, H_, G, D, 0.3, None, rope)]
    q = {1: rng.standard_normal((N, H_, D)).astype(np.float32) * rng.uniform(0.3, 3, D).astype(np.float32)}
    k = {1: rng.standard_normal((N, G, D)).astype(np.float32)}
    pos = {1: np.arange(N)}
    cal = calibrate_from_samples(layers, q, k, pos, model_fingerprint="abc", n_centroids=8,
                                 iters=5, b=b, seed=2)
    assert sorted(cal.a2ats) == sorted(cal.vq) == [(1, 0), (1, 1)]
    assert cal.params["b"] == b and cal.params["n_centroids"] == 8 and cal.fingerprint == "abc"
    for g in range(G):
        # H from the WRoPE queries R_b q of the group's two query heads, pooled
        qt = rope(q[1][:, 2 * g:2 * g + 2], np.full(N, b)).reshape(-1, D)
        np.testing.assert_allclose(cal.a2ats[(1, g)].L, estimate_H(qt)[1], rtol=1e-5, atol=1e-6)
        ref = train_codebook(k[1][:, g], qt, 8, iters=5, seed=2)
        np.testing.assert_allclose(cal.a2ats[(1, g)].centroids, ref.centroids, rtol=1e-5, atol=1e-5)
        # the ablation: plain k-means of POST-RoPE keys
        ref = train_codebook(rope(k[1], pos[1])[:, g], None, 8, iters=5, seed=2)
        np.testing.assert_array_equal(cal.vq[(1, g)].L, np.eye(D, dtype=np.float32))
        np.testing.assert_allclose(cal.vq[(1, g)].centroids, ref.centroids, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="fewer than"):
        calibrate_from_samples(layers, q, k, pos, n_centroids=N + 1, iters=1)


# -- the sidecar ------------------------------------------------------------------------
def _cal(tmp_path, rng):
    model = tmp_path / "m.gguf"
    model.write_bytes(rng.bytes(3 << 20))
    books = {(5, g): Codebook(rng.standard_normal((8, 4)).astype(np.float32),
                              np.tril(rng.standard_normal((4, 4))).astype(np.float32))
             for g in range(2)}
    plain = {(5, g): Codebook(rng.standard_normal((8, 4)).astype(np.float32),
                              np.eye(4, dtype=np.float32)) for g in range(2)}
    cal = Calibration(params={"b": 2048, "w": 64, "s": 8, "n_centroids": 8, "tol": 1e-4,
                              "note": "x"},
                      fingerprint=fingerprint(model), a2ats=books, vq=plain)
    return model, cal


def test_fingerprint_sees_size_head_and_tail(tmp_path):
    p = tmp_path / "f.bin"
    data = bytearray(np.random.default_rng(8).bytes(3 << 20))
    p.write_bytes(bytes(data))
    fp = fingerprint(p)
    assert fp == fingerprint(p) and len(fp) == 64
    for where in (10, len(data) - 10):
        changed = bytearray(data)
        changed[where] ^= 1
        p.write_bytes(bytes(changed))
        assert fingerprint(p) != fp
    p.write_bytes(bytes(data) + b"\0")
    assert fingerprint(p) != fp


def test_sidecar_round_trip(tmp_path):
    model, cal = _cal(tmp_path, np.random.default_rng(9))
    cal.save(tmp_path / "m.gguf.a2ats")
    cal.save(tmp_path / "m.gguf.a2ats")        # overwriting is atomic too
    back = Calibration.load(tmp_path / "m.gguf.a2ats", model_path=model)
    assert back.params == cal.params and back.fingerprint == cal.fingerprint
    for kind in ("a2ats", "vq"):
        assert sorted(getattr(back, kind)) == sorted(getattr(cal, kind))
        for key in getattr(cal, kind):
            a, b = getattr(cal, kind)[key], getattr(back, kind)[key]
            np.testing.assert_array_equal(a.centroids, b.centroids)
            np.testing.assert_array_equal(a.L, b.L)
            assert a.centroids.dtype == b.centroids.dtype
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.a2ats"]


def test_sidecar_for_another_model_is_refused(tmp_path):
    model, cal = _cal(tmp_path, np.random.default_rng(10))
    side = tmp_path / "m.gguf.a2ats"
    cal.save(side)
    other = tmp_path / "other.gguf"
    other.write_bytes(b"x" * 100)
    with pytest.raises(SidecarError) as e:
        Calibration.load(side, model_path=other)
    assert str(e.value) == (f"sidecar {side} was made for another model file; "
                            f"run `a2ats-lite calibrate {other}`")


def _rewrite(path, drop=None, replace=None):
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != drop}
    arrays.update(replace or {})
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing_file", "missing_L",
                                    "missing_param", "nan", "bad_shape", "version", "bad_zip_member"])
def test_corrupted_sidecar_is_refused(tmp_path, damage):
    model, cal = _cal(tmp_path, np.random.default_rng(11))
    p = tmp_path / "m.gguf.a2ats"
    cal.save(p)
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        p.write_bytes(b"not a sidecar at all")
    elif damage == "missing_file":
        p.unlink()
    elif damage == "missing_L":
        _rewrite(p, drop="a2ats.5.1.L")
    elif damage == "missing_param":
        _rewrite(p, replace={"meta.params": np.array(repr([("b", 2048)]))})
    elif damage == "nan":
        bad = cal.a2ats[(5, 0)].centroids.copy()
        bad[3, 1] = np.nan
        _rewrite(p, replace={"a2ats.5.0.C": bad})
    elif damage == "bad_shape":
        _rewrite(p, replace={"vq.5.0.L": np.eye(3, dtype=np.float32)})
    elif damage == "version":
        _rewrite(p, replace={"meta.version": np.array(99)})
    else:
        with zipfile.ZipFile(p, "a") as z:          # a member that is not an array
            z.writestr("evil.npy", b"\x93NUMPY garbage")
    with pytest.raises(SidecarError) as e:
        Calibration.load(p, model_path=model)
    msg = str(e.value)
    assert str(p) in msg
    if damage == "missing_file":
        assert f"a2ats-lite calibrate {model}" in msg
    elif damage == "version":
        assert "version 99" in msg
    else:
        assert "corrupted" in msg


def test_calibrate_model_on_a_tiny_model(tmp_path):
    # the whole calibration path: recorded pre-RoPE q/k -> codebooks per full layer and KV head
    from test_model import random_arrays, tiny_config

    from a2ats_lite.kv import make_kv_cache
    from a2ats_lite.model import Model
    from a2ats_lite.vq import calibrate_model

    c = tiny_config("gemma3")
    model = Model.from_arrays(c, random_arrays(c, seed=1))
    model_file = tmp_path / "tiny.gguf"
    model_file.write_bytes(b"tiny model stand-in")
    rng = np.random.default_rng(0)
    docs = [list(rng.integers(0, c.n_vocab, 60)) for _ in range(4)]
    cal = calibrate_model(model, docs, model_file, n_centroids=8, iters=5, b=16)
    full = [L.index for L in model.attn_layers if L.window is None]
    assert full and set(cal.a2ats) == {(i, g) for i in full for g in range(c.n_head_kv)}
    assert set(cal.vq) == set(cal.a2ats) and cal.params["tokens"] == 240
    cal.save(tmp_path / "tiny.a2ats")
    back = Calibration.load(tmp_path / "tiny.a2ats", model_path=model_file)
    # and the a2ats policy runs on the model with it, with the calibration's b
    from kvutil import Selections
    kv = make_kv_cache("a2ats", model.attn_layers, 128, calib=back, budget=4, sinks=2, window=4)
    assert kv.policy.wrope_b == 16
    sel = Selections(kv)
    seq = kv.add_sequence()
    logits = model.forward([np.array(docs[0])], [seq], kv)
    for t in range(5):
        logits = model.forward([np.array([int(np.argmax(logits[0]))])], [seq], kv)
    assert np.isfinite(logits[0]).all() and sel
