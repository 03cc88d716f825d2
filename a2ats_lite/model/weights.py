"""Every tensor the forward pass uses, by GGUF tensor name, checked against the
config and held by a backend in its GGUF encoding. Formats, no arithmetic.

Attribute names are GGUF's (tinygrad's apps/llm.py style): `blk.3.attn_q.weight`
is `weights.layers[3].attn_q`, `blk.3.attn_q.bias` is `.attn_q_bias`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend.base import Backend
from ..config import ModelConfig
from ..errors import ModelError
from ..gguf import GGML_F16, GGML_F32, GGML_TYPE_NAMES


@dataclass
class LayerWeights:
    attn_norm: object                    # (n_embd,)
    attn_q: object                       # (n_head * head_dim, n_embd)
    attn_k: object                       # (n_head_kv * head_dim, n_embd)
    attn_v: object                       # (n_head_kv * head_dim, n_embd)
    attn_output: object                  # (n_embd, n_head * head_dim)
    ffn_norm: object                     # (n_embd,)
    ffn_gate: object                     # (n_ff, n_embd)
    ffn_up: object                       # (n_ff, n_embd)
    ffn_down: object                     # (n_embd, n_ff)
    attn_q_bias: object = None           # qwen2 attention biases
    attn_k_bias: object = None
    attn_v_bias: object = None
    attn_q_norm: object = None           # (head_dim,) qwen3 / gemma3
    attn_k_norm: object = None
    post_attention_norm: object = None   # gemma3
    post_ffw_norm: object = None

    def matrices(self) -> list:
        return [self.attn_q, self.attn_k, self.attn_v, self.attn_output,
                self.ffn_gate, self.ffn_up, self.ffn_down]


class Weights:
    def __init__(self, config: ModelConfig, matrix, vector):
        """matrix(name, shape, required) -> handle | None; vector(name, n, required) -> array | None."""
        c = config
        qd, kvd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        self.config = c
        self.token_embd = matrix("token_embd.weight", (c.n_vocab, c.n_embd), True)
        out = matrix("output.weight", (c.n_vocab, c.n_embd), False)
        self.output = out if out is not None else self.token_embd   # missing -> tied embeddings
        self.output_norm = vector("output_norm.weight", c.n_embd, True)
        self.rope_freqs = vector("rope_freqs.weight", c.rope_n_rot // 2, False)
        self.layers: list[LayerWeights] = []
        for i in range(c.n_layer):
            p = f"blk.{i}."
            self.layers.append(LayerWeights(
                attn_norm=vector(p + "attn_norm.weight", c.n_embd, True),
                attn_q=matrix(p + "attn_q.weight", (qd, c.n_embd), True),
                attn_k=matrix(p + "attn_k.weight", (kvd, c.n_embd), True),
                attn_v=matrix(p + "attn_v.weight", (kvd, c.n_embd), True),
                attn_output=matrix(p + "attn_output.weight", (c.n_embd, qd), True),
                ffn_norm=vector(p + "ffn_norm.weight", c.n_embd, True),
                ffn_gate=matrix(p + "ffn_gate.weight", (c.n_ff, c.n_embd), True),
                ffn_up=matrix(p + "ffn_up.weight", (c.n_ff, c.n_embd), True),
                ffn_down=matrix(p + "ffn_down.weight", (c.n_embd, c.n_ff), True),
                attn_q_bias=vector(p + "attn_q.bias", qd, c.attn_bias),
                attn_k_bias=vector(p + "attn_k.bias", kvd, c.attn_bias),
                attn_v_bias=vector(p + "attn_v.bias", kvd, c.attn_bias),
                attn_q_norm=vector(p + "attn_q_norm.weight", c.head_dim, c.qk_norm),
                attn_k_norm=vector(p + "attn_k_norm.weight", c.head_dim, c.qk_norm),
                post_attention_norm=vector(p + "post_attention_norm.weight", c.n_embd, c.post_norms),
                post_ffw_norm=vector(p + "post_ffw_norm.weight", c.n_embd, c.post_norms),
            ))

    def layer_matrices(self) -> list:
        return [m for lw in self.layers for m in lw.matrices()]

    def matrices(self) -> list:
        ms = self.layer_matrices() + [self.output]
        return ms + ([self.token_embd] if self.token_embd is not self.output else [])

    @classmethod
    def from_gguf(cls, f, config: ModelConfig, backend: Backend) -> "Weights":
        """The tensors of GGUF file f on backend; a tensor of a type the backend cannot run
        is refused here, at load."""
        runs = backend.caps.tensor_types

        def check(name, shape, required):
            t = f.tensors.get(name)
            if t is None:
                if required:
                    raise ModelError(f.path, f"tensor {name} is missing")
                return None
            if tuple(t.shape) != tuple(shape):
                raise ModelError(f.path, f"tensor {name} has shape {t.shape}, expected {tuple(shape)}")
            if t.ggml_type not in runs:
                raise ModelError(f.path, f"tensor {name} has type {t.type_name}, which the "
                                 f"{backend.name} backend cannot run; it runs: "
                                 + ", ".join(GGML_TYPE_NAMES[k] for k in sorted(runs)))
            return t

        def matrix(name, shape, required):
            t = check(name, shape, required)
            if t is None:
                return None
            raw = f.tensor_array(name) if t.ggml_type == GGML_F32 else f.tensor_data(name)
            return backend.matrix(name, t.ggml_type, *shape, raw)

        def vector(name, n, required):
            t = check(name, (n,), required)
            if t is None:
                return None
            if t.ggml_type not in (GGML_F32, GGML_F16):
                raise ModelError(f.path, f"tensor {name} is {t.type_name}; norms/biases must be F32 or F16")
            return backend.vector(np.array(f.tensor_array(name), dtype=np.float32))

        return cls(config, matrix, vector)

    @classmethod
    def from_arrays(cls, config: ModelConfig, arrays: dict, backend: Backend) -> "Weights":
        """arrays: GGUF tensor name -> numpy array (float32 copies) or a backend matrix."""
        def fetch(name, required):
            a = arrays.get(name)
            if a is None and required:
                raise ModelError(None, f"tensor {name} is missing")
            return a

        def matrix(name, shape, required):
            a = fetch(name, required)
            if a is None:
                return None
            m = backend.matrix_from_array(name, a)
            if tuple(m.shape) != tuple(shape):
                raise ModelError(None, f"tensor {name} has shape {m.shape}, expected {tuple(shape)}")
            return m

        def vector(name, n, required):
            a = fetch(name, required)
            if a is None:
                return None
            a = np.array(a, dtype=np.float32).reshape(-1)
            if a.shape != (n,):
                raise ModelError(None, f"tensor {name} has shape {a.shape}, expected ({n},)")
            return backend.vector(a)

        return cls(config, matrix, vector)
