"""The dense policy's KV storage and the forward pass's attention against a direct float64 attention (causal + sliding window + GQA)."""
import numpy as np
import pytest

from kvutil import append, attend

from a2ats_lite.config import AttnLayer
from a2ats_lite.errors import ContextOverflowError
from a2ats_lite.kv import KVCache, make_kv_cache
from a2ats_lite.rope import Rope


def _layers(window=None, n_heads=4, n_kv_heads=2, d=16, pairing="half", n_layers=2):
    # layer 0 slides (if window), layer 1 is global with another RoPE base
    out = []
    for i in range(n_layers):
        out.append(AttnLayer(index=i, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=d,
                             scale=d ** -0.5, window=window if i % 2 == 0 else None,
                             rope=Rope(d, base=10000.0 if i % 2 == 0 else 1e6, pairing=pairing)))
    return out


def _rope64(x, pos, rope: Rope):
    # independent RoPE: rotate complex pairs, float64
    x = x.astype(np.float64)
    d = x.shape[-1]
    ang = pos[:, None] * rope.base ** (-np.arange(0, d, 2) / d)        # (n, d/2)
    rot = np.exp(1j * ang)[:, None, :]
    out = np.empty_like(x)
    if rope.pairing == "half":
        z = (x[..., : d // 2] + 1j * x[..., d // 2:]) * rot
        out[..., : d // 2], out[..., d // 2:] = z.real, z.imag
    else:
        z = (x[..., 0::2] + 1j * x[..., 1::2]) * rot
        out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def attention64(layer: AttnLayer, q, k, v, qpos, kpos):
    """q (n, H, d), k/v (T, G, d) PRE-RoPE, float64 reference of the contract in kv/base.py."""
    qr, kr = _rope64(q, qpos, layer.rope), _rope64(k, kpos, layer.rope)
    out = np.zeros(q.shape, dtype=np.float64)
    for h in range(layer.n_heads):
        g = h // layer.group
        s = qr[:, h] @ kr[:, g].T * layer.scale                       # (n, T)
        rel = qpos[:, None] - kpos[None, :]
        ok = rel >= 0
        if layer.window is not None:
            ok &= rel < layer.window
        s = np.where(ok, s, -np.inf)
        p = np.exp(s - s.max(1, keepdims=True))
        out[:, h] = (p / p.sum(1, keepdims=True)) @ v[:, g]
    return out


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _run(kv, seq, layer_idx, k, v, q, start, chunks):
    """Append/attend the tokens [start, start+len) in the given chunk sizes; returns outputs."""
    outs, a = [], 0
    for c in chunks:
        pos = np.arange(start + a, start + a + c)
        append(kv, layer_idx, seq, k[a:a + c], v[a:a + c], pos)
        outs.append(attend(kv, layer_idx, seq, q[a:a + c], pos))
        a += c
    return np.concatenate(outs)


@pytest.mark.parametrize("pairing", ["half", "adjacent"])
@pytest.mark.parametrize("chunks", [[37], [5, 11, 1, 1, 19], [1] * 37])
def test_chunked_attention_matches_float64(pairing, chunks):
    rng = np.random.default_rng(len(chunks) + (pairing == "half"))
    layers = _layers(window=6, pairing=pairing)
    kv = make_kv_cache("dense", layers, n_ctx=64, initial=4)          # tiny initial capacity: exercise growth
    seq = kv.add_sequence()
    n = sum(chunks)
    for li, layer in enumerate(layers):
        q, k, v = _rand(rng, n, 4, 16), _rand(rng, n, 2, 16), _rand(rng, n, 2, 16)
        out = _run(kv, seq, li, k, v, q, 0, chunks)
        pos = np.arange(n)
        ref = attention64(layer, q, k, v, pos, pos)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_sliding_window_memory_is_bounded_and_exact():
    rng = np.random.default_rng(7)
    layers = _layers(window=8, n_heads=2, n_kv_heads=1, d=8)
    kv = make_kv_cache("dense", layers, n_ctx=4096, initial=4)
    seq = kv.add_sequence()
    n = 600
    q, k, v = _rand(rng, n, 2, 8), _rand(rng, n, 1, 8), _rand(rng, n, 1, 8)
    outs = []
    for t in range(n):                                   # token-by-token decode on the window layer
        pos = np.array([t])
        append(kv, 0, seq, k[t:t + 1], v[t:t + 1], pos)
        outs.append(attend(kv, 0, seq, q[t:t + 1], pos))
    pos = np.arange(n)
    np.testing.assert_allclose(np.concatenate(outs), attention64(layers[0], q, k, v, pos, pos),
                               rtol=1e-4, atol=1e-5)
    buf = kv.storage.bufs[seq][0]
    assert buf.k.shape[1] <= 32, "a window layer must not grow with the context"
    assert buf.pos0 > 0


def test_window_layer_gives_back_a_long_prefill_and_stays_exact():
    rng = np.random.default_rng(8)
    layers = _layers(window=8, n_heads=2, n_kv_heads=1, d=8)
    kv = make_kv_cache("dense", layers, n_ctx=4096, initial=4)
    seq = kv.add_sequence()
    n = 1000
    q, k, v = _rand(rng, n + 3, 2, 8), _rand(rng, n + 3, 1, 8), _rand(rng, n + 3, 1, 8)
    append(kv, 0, seq, k[:n], v[:n], np.arange(n))        # one long prefill (e.g. a replayed prefix)
    kv.advance(seq, n)
    assert kv.storage.bufs[seq][0].k.shape[1] >= n
    kv.compact(seq)
    assert kv.storage.bufs[seq][0].k.shape[1] == 16, "the prefill's capacity was kept"
    outs = []
    for t in range(n, n + 3):
        pos = np.array([t])
        append(kv, 0, seq, k[t:t + 1], v[t:t + 1], pos)
        outs.append(attend(kv, 0, seq, q[t:t + 1], pos))
    pos = np.arange(n, n + 3)
    np.testing.assert_allclose(np.concatenate(outs), attention64(layers[0], q[n:], k, v, pos, np.arange(n + 3)),
                               rtol=1e-4, atol=1e-5)


def test_batched_sequences_are_independent_and_lengths():
    rng = np.random.default_rng(3)
    layers = _layers(window=None, n_layers=1)
    kv = make_kv_cache("dense", layers, n_ctx=100)
    assert isinstance(kv, KVCache) and kv.name == "dense"
    a, b = kv.add_sequence(), kv.add_sequence()
    qa, ka, va = _rand(rng, 9, 4, 16), _rand(rng, 9, 2, 16), _rand(rng, 9, 2, 16)
    qb, kb, vb = _rand(rng, 4, 4, 16), _rand(rng, 4, 2, 16), _rand(rng, 4, 2, 16)
    oa = _run(kv, a, 0, ka, va, qa, 0, [9])
    ob = _run(kv, b, 0, kb, vb, qb, 0, [4])
    kv.advance(a, 9)
    kv.advance(b, 4)
    assert kv.length(a) == 9 and kv.length(b) == 4
    np.testing.assert_allclose(oa, attention64(layers[0], qa, ka, va, np.arange(9), np.arange(9)),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ob, attention64(layers[0], qb, kb, vb, np.arange(4), np.arange(4)),
                               rtol=1e-4, atol=1e-5)
    kv.remove_sequence(a)
    with pytest.raises(ValueError):
        attend(kv, 0, a, qa[:1], np.array([9]))
    assert kv.nbytes() == kv.nbytes(b) > 0


def test_truncate_then_continue_equals_fresh():
    rng = np.random.default_rng(11)
    layers = _layers(window=5)
    n, cut = 20, 13
    q, k, v = _rand(rng, n, 4, 16), _rand(rng, n, 2, 16), _rand(rng, n, 2, 16)
    k2, v2, q2 = _rand(rng, 4, 2, 16), _rand(rng, 4, 2, 16), _rand(rng, 4, 4, 16)
    kv = make_kv_cache("dense", layers, n_ctx=64)
    s = kv.add_sequence()
    for li in range(2):
        _run(kv, s, li, k, v, q, 0, [n])
    kv.advance(s, n)
    assert kv.can_truncate(s, cut)
    kv.truncate(s, cut)
    assert kv.length(s) == cut
    outs = [_run(kv, s, li, k2, v2, q2, cut, [2, 2]) for li in range(2)]
    kk, vv = np.concatenate([k[:cut], k2]), np.concatenate([v[:cut], v2])
    pos = np.arange(cut + 4)
    for li, layer in enumerate(layers):
        ref = attention64(layer, q2, kk, vv, pos[cut:], pos)
        np.testing.assert_allclose(outs[li], ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        kv.truncate(s, 1000)


def test_truncate_refused_when_window_dropped():
    rng = np.random.default_rng(5)
    layers = _layers(window=4)
    kv = make_kv_cache("dense", layers, n_ctx=256, initial=4)
    s = kv.add_sequence()
    for t in range(100):
        for li in range(2):
            append(kv, li, s, _rand(rng, 1, 2, 16), _rand(rng, 1, 2, 16), np.array([t]))
        kv.advance(s, 1)
    assert not kv.can_truncate(s, 10)
    with pytest.raises(ValueError, match="truncate"):
        kv.truncate(s, 10)
    assert kv.can_truncate(s, 99)


def test_bad_positions_and_overflow():
    rng = np.random.default_rng(0)
    kv = make_kv_cache("dense", _layers(n_layers=1), n_ctx=4)
    s = kv.add_sequence()
    with pytest.raises(ValueError, match="positions"):
        append(kv, 0, s, _rand(rng, 2, 2, 16), _rand(rng, 2, 2, 16), np.array([3, 4]))
    with pytest.raises(ContextOverflowError):
        append(kv, 0, s, _rand(rng, 5, 2, 16), _rand(rng, 5, 2, 16), np.arange(5))
