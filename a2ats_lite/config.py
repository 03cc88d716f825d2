"""ModelConfig: the whole GGUF metadata -> model hyper-parameter map, in one place.

Per-architecture differences are switches here (pairing, norms, gates,
biases, sliding windows), so the forward pass stays one function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import ModelError
from .rope import Rope

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3", "gemma3")


@dataclass(frozen=True)
class AttnLayer:
    """What attention needs to know about one layer (made by ModelConfig.attn_layers).

    Semantics every KV policy and backend honour: the query at position i sees the key
    at position j iff j <= i and (window is None or i - j < window); out = softmax(scale
    * q.k) @ v with GQA: query head h uses KV head h // group."""
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


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    n_vocab: int
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_ctx_train: int
    norm_eps: float
    rope_base: float
    rope_base_swa: float          # RoPE base of sliding-window layers (Gemma 3: 10000)
    rope_pairing: str             # 'adjacent' (llama GGUF) or 'half' (neox)
    rope_n_rot: int
    rope_freq_scale: float        # linear scaling, applied to full-attention layers
    rope_scaling_type: str        # 'none' | 'linear' | 'llama3' (freq factors tensor)
    sliding_window: int | None
    swa_pattern: int | None       # every swa_pattern-th layer is global, the rest slide
    attn_scale: float
    embd_scale: float
    act: str                      # 'silu' | 'gelu_tanh'
    qk_norm: bool
    attn_bias: bool
    post_norms: bool
    tied_embeddings: bool
    final_logit_softcap: float | None

    @property
    def group(self) -> int:
        return self.n_head // self.n_head_kv

    def is_swa(self, layer: int) -> bool:
        if not self.sliding_window or not self.swa_pattern:
            return False
        return (layer + 1) % self.swa_pattern != 0

    def layer_rope(self, layer: int, freq_factors=None) -> Rope:
        swa = self.is_swa(layer)
        ff = None if swa or freq_factors is None else tuple(float(x) for x in freq_factors)
        return Rope(head_dim=self.head_dim, base=self.rope_base_swa if swa else self.rope_base,
                    pairing=self.rope_pairing, n_rot=self.rope_n_rot,
                    freq_scale=1.0 if swa else self.rope_freq_scale, freq_factors=ff)

    def attn_layers(self, freq_factors=None) -> list[AttnLayer]:
        return [AttnLayer(index=i, n_heads=self.n_head, n_kv_heads=self.n_head_kv,
                          head_dim=self.head_dim, scale=self.attn_scale,
                          window=self.sliding_window if self.is_swa(i) else None,
                          rope=self.layer_rope(i, freq_factors))
                for i in range(self.n_layer)]

    @classmethod
    def from_gguf(cls, f) -> "ModelConfig":
        return cls.from_metadata(f.metadata, tensor_names=set(f.tensors), path=f.path)

    @classmethod
    def from_metadata(cls, md: dict, tensor_names=(), path=None) -> "ModelConfig":
        arch = md.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelError(path, f"unsupported architecture {arch!r}; supported: "
                                   f"{', '.join(SUPPORTED_ARCHS)}")

        def get(key, default=None, required=False):
            v = md.get(f"{arch}.{key}", default)
            if v is None and required:
                raise ModelError(path, f"metadata key {arch}.{key} is missing")
            return v

        def uniform_int(key, **kw):
            # some files store per-layer arrays; we support them when all layers agree
            v = get(key, **kw)
            if isinstance(v, np.ndarray):
                if v.size == 0 or (v != v.flat[0]).any():
                    raise ModelError(path, f"per-layer {arch}.{key} values differ; not supported")
                v = v.flat[0]
            return _positive_int(v, f"{arch}.{key}", path)

        n_embd = uniform_int("embedding_length", required=True)
        n_head = uniform_int("attention.head_count", required=True)
        n_head_kv = uniform_int("attention.head_count_kv", default=n_head)
        if n_head % n_head_kv:
            raise ModelError(path, f"head_count {n_head} is not a multiple of head_count_kv {n_head_kv}")
        head_dim = uniform_int("attention.key_length", default=n_embd // n_head)
        tokens = md.get("tokenizer.ggml.tokens")
        n_vocab = get("vocab_size") or (len(tokens) if tokens is not None else None)
        if not n_vocab:
            raise ModelError(path, "vocabulary size unknown (no tokenizer.ggml.tokens)")
        gemma = arch == "gemma3"
        window = get("attention.sliding_window") if gemma else None
        scaling = str(get("rope.scaling.type", "none"))
        factor = float(get("rope.scaling.factor", 1.0) or 1.0)
        if scaling == "linear" and factor > 0:
            freq_scale = 1.0 / factor
        elif scaling in ("none", "linear"):
            freq_scale = 1.0
        else:
            raise ModelError(path, f"unsupported rope scaling type {scaling!r} (none, linear, "
                                   "and llama3 freq factors are supported)")
        if "rope_freqs.weight" in tensor_names:
            scaling = "llama3"
        return cls(
            arch=arch, n_vocab=int(n_vocab), n_embd=n_embd,
            n_layer=uniform_int("block_count", required=True),
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            n_ff=uniform_int("feed_forward_length", required=True),
            n_ctx_train=uniform_int("context_length", default=2048),
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_base=float(get("rope.freq_base", 10000.0)),
            rope_base_swa=float(get("rope.freq_base_swa", 10000.0)) if gemma else float(get("rope.freq_base", 10000.0)),
            rope_pairing="adjacent" if arch == "llama" else "half",
            rope_n_rot=int(get("rope.dimension_count", head_dim)),
            rope_freq_scale=freq_scale, rope_scaling_type=scaling,
            sliding_window=int(window) if window else None,
            swa_pattern=_swa_pattern(get("attention.sliding_window_pattern", 6)) if window else None,
            attn_scale=1.0 / math.sqrt(head_dim),
            embd_scale=math.sqrt(n_embd) if gemma else 1.0,
            act="gelu_tanh" if gemma else "silu",
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            attn_bias="blk.0.attn_q.bias" in tensor_names,
            post_norms=gemma,
            tied_embeddings="output.weight" not in tensor_names,
            final_logit_softcap=get("final_logit_softcapping") or None,
        )


def _positive_int(v, key, path) -> int:
    if isinstance(v, (bool, float, str)) or v is None:
        raise ModelError(path, f"metadata {key} must be an integer, got {v!r}")
    v = int(v)
    if v <= 0 or v > 1 << 31:
        raise ModelError(path, f"metadata {key} out of range: {v}")
    return v


def _swa_pattern(v) -> int:
    # newer files store one flag per layer (True = sliding); the period is the first global layer + 1
    if isinstance(v, np.ndarray):
        glob = np.flatnonzero(~v.astype(bool))
        return int(glob[0]) + 1 if glob.size else 0
    return int(v)
