"""Query-aware VQ math against direct formulas on small random cases."""
import numpy as np
import pytest

from a2ats_lite.errors import SidecarError
from a2ats_lite.rope import Rope
from a2ats_lite.vq import (Calibration, Codebook, estimate_H, fingerprint, kmeans, train_codebook)


def test_wrope_score_is_rotated_query_dot_prerope_key():
    # (R_b q) . k equals the RoPE score of q at position i against k at i - b, any i
    rng = np.random.default_rng(0)
    for pairing in ("half", "adjacent"):
        rope = Rope(head_dim=16, base=10000.0, pairing=pairing)
        q, k = rng.standard_normal((2, 1, 1, 16)).astype(np.float32)
        b, i = 37, 100
        wrope = float((rope(q, [b])[0, 0].astype(np.float64) * k[0, 0]).sum())
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


def test_kmeans_objective_decreases_and_is_h_metric_distortion():
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((2000, 8))
    q = rng.standard_normal((800, 8)) * np.array([5, 1, 1, 1, 0.2, 0.2, 3, 1])
    H, L = estimate_H(q)
    res = kmeans(keys @ L, 32, iters=50, tol=0, seed=3)
    assert all(b <= a + 1e-9 for a, b in zip(res.objective, res.objective[1:]))
    assert res.objective[-1] < res.objective[0]
    # the objective equals sum (k - c)^T H (k - c) with c mapped back to key space
    C = np.linalg.solve(L.T, res.centroids.T).T
    cb = Codebook(C, L)
    codes = cb.assign(keys)
    diff = keys - C[codes]
    direct = np.einsum("nd,de,ne->n", diff, H, diff).sum()
    assert direct == pytest.approx(res.objective[-1], rel=1e-3)


def test_code_assignment_is_argmin_in_H_metric():
    rng = np.random.default_rng(4)
    keys = rng.standard_normal((300, 6)).astype(np.float32)
    q = rng.standard_normal((200, 6)) * np.array([4, 1, 0.1, 1, 2, 0.5])
    cb = train_codebook(keys, q, n_centroids=16, iters=20, seed=0)
    H = estimate_H(q)[0]
    d = keys[:, None, :].astype(np.float64) - cb.centroids[None].astype(np.float64)
    direct = np.argmin(np.einsum("nkd,de,nke->nk", d, H, d), axis=1)
    assert (cb.assign(keys) == direct).mean() > 0.99  # float32 storage may flip exact ties
    assert cb.assign(keys).dtype == np.uint16


def test_query_aware_beats_plain_vq_on_score_error():
    # the point of the method: smaller error of q~.k where queries actually point
    rng = np.random.default_rng(5)
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

    assert err(aware) < err(plain)


def _cal(tmp_path, rng):
    model = tmp_path / "m.gguf"
    model.write_bytes(rng.bytes(3 << 20))
    cb = Codebook(rng.standard_normal((8, 4)).astype(np.float32), np.eye(4, dtype=np.float32))
    cal = Calibration(params={"b": 2048, "w": 64, "s": 8, "n_centroids": 8},
                      fingerprint=fingerprint(model), a2ats={(5, 0): cb}, vq={(5, 0): cb})
    return model, cal


def test_sidecar_round_trip(tmp_path):
    model, cal = _cal(tmp_path, np.random.default_rng(6))
    cal.save(tmp_path / "m.gguf.a2ats")
    back = Calibration.load(tmp_path / "m.gguf.a2ats", model_path=model)
    assert back.params == cal.params and back.fingerprint == cal.fingerprint
    for kind in ("a2ats", "vq"):
        a, b = getattr(cal, kind)[(5, 0)], getattr(back, kind)[(5, 0)]
        np.testing.assert_array_equal(a.centroids, b.centroids)
        np.testing.assert_array_equal(a.L, b.L)
    assert [p.name for p in tmp_path.iterdir()] != [] and not list(tmp_path.glob("*.tmp*"))


def test_sidecar_for_another_model_is_refused(tmp_path):
    model, cal = _cal(tmp_path, np.random.default_rng(7))
    cal.save(tmp_path / "m.gguf.a2ats")
    other = tmp_path / "other.gguf"
    other.write_bytes(b"x" * 100)
    with pytest.raises(SidecarError, match="another model file"):
        Calibration.load(tmp_path / "m.gguf.a2ats", model_path=other)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_corrupted_sidecar_is_refused(tmp_path, damage):
    model, cal = _cal(tmp_path, np.random.default_rng(8))
    p = tmp_path / "m.gguf.a2ats"
    cal.save(p)
    data = p.read_bytes()
    if damage == "truncate":
        p.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        p.write_bytes(b"not a sidecar at all")
    else:
        p.unlink()
    with pytest.raises(SidecarError):
        Calibration.load(p, model_path=model)


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
    # and the a2ats policy runs on the model with it
    kv = make_kv_cache("a2ats", model.attn_layers, 128, calib=back, budget=4, sinks=2, window=4)
    seq = kv.add_sequence()
    logits = model.forward([np.array(docs[0])], [seq], kv)
    for t in range(5):
        logits = model.forward([np.array([int(np.argmax(logits[0]))])], [seq], kv)
    assert np.isfinite(logits[0]).all() and kv.last_selection
