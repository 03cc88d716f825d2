"""The small numeric building blocks of the forward pass (numpy, float32).

Each is a few lines and matches ggml's CPU definition; tests/test_ops.py checks
them against float64 references. Functions marked "in place" overwrite their
first argument to save a (n_tokens, n_ff) temporary during prefill.
"""
from __future__ import annotations

import math

import numpy as np

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def rms_norm(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    """x (..., d) -> x / sqrt(mean(x^2) + eps) * w over the last axis (w (d,) or None)."""
    x = np.asarray(x, dtype=np.float32)
    ms = np.einsum("...i,...i->...", x, x, dtype=np.float32)[..., None] / np.float32(x.shape[-1])
    out = x * (1.0 / np.sqrt(ms + np.float32(eps))).astype(np.float32)
    if w is not None:
        out *= w
    return out


def silu_(x: np.ndarray) -> np.ndarray:
    """In place: x * sigmoid(x). sigmoid = (1 + tanh(x/2)) / 2 never overflows."""
    t = np.tanh(x * np.float32(0.5))
    t += np.float32(1.0)
    t *= np.float32(0.5)
    x *= t
    return x


def gelu_tanh_(x: np.ndarray) -> np.ndarray:
    """In place: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), ggml_gelu's formula.
    The cubic uses x clipped to [-10, 10]: tanh has saturated there, and x^3 cannot overflow."""
    c = np.clip(x, np.float32(-10.0), np.float32(10.0))
    t = c * c
    t *= np.float32(0.044715)
    t += np.float32(1.0)
    t *= c
    t *= np.float32(_SQRT_2_OVER_PI)
    np.tanh(t, out=t)
    t += np.float32(1.0)
    t *= np.float32(0.5)
    x *= t
    return x


def silu(x: np.ndarray) -> np.ndarray:
    return silu_(np.array(x, dtype=np.float32, copy=True))


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    return gelu_tanh_(np.array(x, dtype=np.float32, copy=True))


ACTIVATIONS_ = {"silu": silu_, "gelu_tanh": gelu_tanh_}


def gated_(gate: np.ndarray, up: np.ndarray, act: str) -> np.ndarray:
    """In place on gate: act(gate) * up (SwiGLU / GeGLU). gate, up (n, n_ff)."""
    ACTIVATIONS_[act](gate)
    gate *= up
    return gate


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax in x's precision (float32 unless x is float64); -inf
    entries get probability 0. The one softmax of the package (sampling, metrics)."""
    x = np.asarray(x)
    if x.dtype != np.float64:
        x = x.astype(np.float32)
    e = x - x.max(axis=axis, keepdims=True)
    np.exp(e, out=e)
    e /= e.sum(axis=axis, keepdims=True)
    return e


def softcap(x: np.ndarray, cap: float) -> np.ndarray:
    """cap * tanh(x / cap): Gemma 2's logit soft-capping."""
    return (np.tanh(np.asarray(x, dtype=np.float32) / np.float32(cap)) * np.float32(cap)).astype(np.float32)


def log_softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    m = x.max(axis=axis, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=axis, keepdims=True)))
