"""Rotary position embedding, both pairings, with the scalings GGUF files use.

llama-family GGUF files rotate adjacent pairs (x[2j], x[2j+1]) because the
converter permutes the Q/K rows; qwen2/qwen3/gemma rotate half-split pairs
(x[j], x[j + n_rot/2]). Using the wrong one gives fluent garbage, not an error.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Rope:
    head_dim: int
    base: float = 10000.0
    pairing: str = "half"              # "half" (neox) or "adjacent" (llama GGUF)
    n_rot: int | None = None           # rotated dims (partial rotary); None = head_dim
    freq_scale: float = 1.0            # linear scaling: positions * freq_scale
    freq_factors: tuple | None = None  # llama3-style per-frequency divisors (rope_freqs.weight)

    @property
    def rot(self) -> int:
        return self.n_rot or self.head_dim

    def inv_freq(self) -> np.ndarray:  # (rot/2,) float64
        j = np.arange(0, self.rot, 2, dtype=np.float64)
        f = self.base ** (-j / self.rot)
        if self.freq_factors is not None:
            f = f / np.asarray(self.freq_factors, dtype=np.float64)
        return f * self.freq_scale

    def cos_sin(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(n, rot/2) cos and sin tables for integer positions (n,)."""
        ang = np.asarray(positions, dtype=np.float64)[:, None] * self.inv_freq()[None, :]
        return np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)

    def __call__(self, x: np.ndarray, positions) -> np.ndarray:
        """Rotate x (n, n_heads, head_dim) at positions (n,); returns a new array."""
        cos, sin = self.cos_sin(positions)
        return self.apply(x, cos, sin)

    def apply(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        # x (n, h, d); cos/sin (n, rot/2) broadcast over heads
        out = np.array(x, dtype=np.float32, copy=True)
        r = self.rot
        c, s = cos[:, None, :], sin[:, None, :]
        if self.pairing == "adjacent":
            a, b = x[..., 0:r:2], x[..., 1:r:2]
            out[..., 0:r:2] = a * c - b * s
            out[..., 1:r:2] = a * s + b * c
        else:
            a, b = x[..., : r // 2], x[..., r // 2 : r]
            out[..., : r // 2] = a * c - b * s
            out[..., r // 2 : r] = a * s + b * c
        return out
