"""The contract between the forward pass and a KV cache policy.

The model hands a policy PRE-RoPE keys and queries (straight out of the
projections, after any q/k norm) and their positions; the policy applies the
layer's RoPE itself where it needs real positions. That keeps pre-RoPE keys
reachable for retrieval policies (A2ATS codes are assigned from them) while
the dense policy simply stores rotated keys.

Attention semantics every policy must honour (for the tokens it attends):
  query at position i sees key at position j iff j <= i and
  (layer.window is None or i - j < layer.window)
  out = softmax(scale * q.k) @ v, with GQA: query head h uses KV head
  h // (n_heads // n_kv_heads).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from ..rope import Rope


@dataclass(frozen=True)
class AttnLayer:
    """What a policy needs to know about one attention layer."""
    index: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float            # softmax scale applied to q.k
    window: int | None      # sliding-window size; None = full attention
    rope: Rope              # this layer's RoPE (base differs per layer in Gemma 3)

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv_heads


class KVCache(ABC):
    """KV state of every sequence and layer under one policy.

    Sequences are identified by small ints from add_sequence(). For a step,
    the model calls, per layer: append(layer, seq, k, v, positions) with the
    new tokens, then attend(layer, seq, q, positions) for the same tokens.
    """

    name = "base"

    def __init__(self, layers: list[AttnLayer], n_ctx: int):
        self.layers = layers
        self.n_ctx = n_ctx
        self._next_seq = 0
        self.lengths: dict[int, int] = {}

    def add_sequence(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        self.lengths[seq] = 0
        self._init_sequence(seq)
        return seq

    def remove_sequence(self, seq: int) -> None:
        self._free_sequence(seq)
        self.lengths.pop(seq, None)

    def close(self) -> None:
        for seq in list(self.lengths):
            self.remove_sequence(seq)

    def length(self, seq: int) -> int:
        return self.lengths[seq]

    def advance(self, seq: int, n: int) -> None:
        """Called by the model once all layers have appended n tokens."""
        self.lengths[seq] += n

    def compact(self, seq: int) -> None:
        """Give back memory a long one-shot prefill left behind (policies that can)."""

    @abstractmethod
    def _init_sequence(self, seq: int) -> None: ...

    @abstractmethod
    def _free_sequence(self, seq: int) -> None: ...

    @abstractmethod
    def append(self, layer: int, seq: int, k: np.ndarray, v: np.ndarray,
               positions: np.ndarray) -> None:
        """k, v: (n, n_kv_heads, head_dim) float32, k PRE-RoPE; positions (n,)."""

    @abstractmethod
    def attend(self, layer: int, seq: int, q: np.ndarray,
               positions: np.ndarray) -> np.ndarray:
        """q: (n, n_heads, head_dim) PRE-RoPE -> (n, n_heads, head_dim) float32."""

    def truncate(self, seq: int, n: int) -> None:
        """Drop every token from position n on (prompt-prefix reuse)."""
        raise NotImplementedError(f"kv policy {self.name!r} cannot truncate")


POLICIES: dict[str, type] = {}


def register(cls):
    POLICIES[cls.name] = cls
    return cls


def make_kv_cache(name: str, layers: list[AttnLayer], n_ctx: int, **params) -> KVCache:
    from . import dense  # noqa: F401  (registers built-in policies)
    try:
        from . import retrieval  # noqa: F401
    except ImportError:
        pass
    if name not in POLICIES:
        raise ValueError(f"unknown kv policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    return POLICIES[name](layers, n_ctx, **params)
