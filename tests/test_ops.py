"""ops.py against float64 references on fresh random inputs."""
import math

import numpy as np
import pytest

from a2ats_lite import ops


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def _rand(rng, *shape, scale=3.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_rms_norm_matches_float64(rng):
    x = _rand(rng, 7, 5, 96)
    w = _rand(rng, 96, scale=1.0)
    eps = 1e-6
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + eps) * w
    out = ops.rms_norm(x, w, eps)
    assert out.dtype == np.float32 and out.shape == x.shape
    np.testing.assert_allclose(out, ref, rtol=2e-6, atol=2e-6)
    # without weight, and an all-zero row stays finite (eps)
    x[0, 0] = 0
    out = ops.rms_norm(x, None, eps)
    assert np.all(np.isfinite(out)) and np.all(out[0, 0] == 0)


def test_activations_match_float64(rng):
    x = _rand(rng, 3, 1000, scale=6.0)
    x[0, :4] = [-200.0, 200.0, -1e30, 1e30]       # saturating inputs stay finite
    x64 = x.astype(np.float64)
    with np.errstate(over="ignore"):
        silu_ref = x64 / (1 + np.exp(-x64))
        gelu_ref = 0.5 * x64 * (1 + np.tanh(math.sqrt(2 / math.pi) * (x64 + 0.044715 * x64 ** 3)))
    with np.errstate(all="raise"):              # ours must not even warn
        np.testing.assert_allclose(ops.silu(x), silu_ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ops.gelu_tanh(x), gelu_ref, rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(ops.silu(x))) and np.all(np.isfinite(ops.gelu_tanh(x)))


def test_gated_in_place(rng):
    g, u = _rand(rng, 4, 64), _rand(rng, 4, 64)
    g64, u64 = g.astype(np.float64), u.astype(np.float64)
    for act, f in (("silu", lambda t: t / (1 + np.exp(-t))),
                   ("gelu_tanh", lambda t: 0.5 * t * (1 + np.tanh(math.sqrt(2 / math.pi) * (t + 0.044715 * t ** 3))))):
        out = ops.gated_(g.copy(), u, act)
        np.testing.assert_allclose(out, f(g64) * u64, rtol=1e-5, atol=1e-5)


def test_softmax_stable_and_masked(rng):
    x = _rand(rng, 6, 50, scale=30.0)
    x[0] += 1e4                                  # huge values: no overflow
    x[1, :10] = -np.inf                          # masked entries get exactly 0
    x64 = x.astype(np.float64)
    e = np.exp(x64 - x64.max(-1, keepdims=True))
    ref = e / e.sum(-1, keepdims=True)
    out = ops.softmax(x)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-7)
    assert np.all(out[1, :10] == 0)
    np.testing.assert_allclose(out.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(ops.log_softmax(x[2:]), np.log(ref[2:]), rtol=1e-5, atol=1e-5)


def test_softcap(rng):
    x = _rand(rng, 100, scale=50.0)
    np.testing.assert_allclose(ops.softcap(x, 30.0), 30.0 * np.tanh(x.astype(np.float64) / 30.0),
                               rtol=1e-6, atol=1e-5)
