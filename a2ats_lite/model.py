"""The transformer forward pass on CPU (numpy), one function for every architecture.

    model = Model.from_gguf(GGUFFile(path))           # or Model.from_arrays(config, {...})
    kv = make_kv_cache("dense", model.attn_layers, n_ctx)
    seq = kv.add_sequence()
    last = model.forward([prompt_ids], [seq], kv)[0]   # (n_vocab,) logits of the last token

Weights keep their GGUF encoding (QMatrix: raw bytes of the mmap) and are
multiplied one of two ways:
  * quantized (the default): decode rows go through native.matmul_q, which
    reads each quantized block once (AVX2, all cores), so a decode step reads
    the file's 253 MB instead of 1.07 GB of float32; prefill (many rows)
    dequantizes slices to float32 tiles and uses BLAS;
  * float32 (f32_layers=True, or None = when they fit F32_LAYERS_BUDGET):
    dequantized once, then BLAS for every product (costs 4x the memory; on the
    2-core dev machine it decodes no faster, see bench/bench_cpu.py).
The embedding / output matrix (262144 x 640 for the default model, 0.67 GB as
float32) is never expanded whole: decode multiplies its quantized blocks,
prefill logits dequantize it in slices, and embedding lookups dequantize only
the rows they need.

Per-architecture differences (llama / qwen2 / qwen3 / gemma3) are switches of
ModelConfig; tensor names are GGUF's (tinygrad apps/llm.py style).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import ModelConfig
from .errors import ContextOverflowError, ModelError, TokenizerError
from .kv.base import KVCache
from .ops import gated_, rms_norm, softcap

GGML_F32, GGML_F16 = 0, 1
DECODE_ROWS = 16            # up to this many rows a quantized product uses native.matmul_q
F32_LAYERS_BUDGET = 1 << 30 # f32_layers=None keeps layer matrices in f32 when they fit this
KEEP_F32_BYTES = 64 << 20   # an embedding/output matrix is cached as f32 only below this
OUT_SLICE_ROWS = 16384      # rows dequantized at once by the sliced product


def _native():
    # imported on first use: float32-only models (tests, tiny configs) never need the C library
    from . import native
    return native


class QMatrix:
    """A (n_out, n_in) weight in its GGUF encoding; y = W @ x row-wise via apply()."""

    def __init__(self, name: str, ggml_type: int, n_out: int, n_in: int, raw: np.ndarray,
                 keep_f32: bool = False):
        self.name, self.ggml_type, self.n_out, self.n_in = name, int(ggml_type), int(n_out), int(n_in)
        self.raw = raw                      # uint8 (nbytes,) zero-copy view, or f32 (n_out, n_in)
        self.keep_f32 = keep_f32            # True: dequantize once, every product on f32 BLAS
        self._f32 = raw if self.ggml_type == GGML_F32 else None

    @classmethod
    def from_array(cls, name: str, a: np.ndarray) -> "QMatrix":
        a = np.ascontiguousarray(a, dtype=np.float32)
        if a.ndim != 2:
            raise ModelError(None, f"tensor {name}: expected a matrix, got shape {a.shape}")
        return cls(name, GGML_F32, a.shape[0], a.shape[1], a)

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_out, self.n_in)

    def _dequant(self, r0: int, r1: int) -> np.ndarray:
        if self.ggml_type == GGML_F32:
            return self.raw[r0:r1]
        rb = self.nbytes // self.n_out          # every row is whole blocks
        raw = self.raw[r0 * rb:r1 * rb]
        if self.ggml_type == GGML_F16:
            return raw.view(np.float16).reshape(r1 - r0, self.n_in).astype(np.float32)
        return _native().dequantize(raw, self.ggml_type, (r1 - r0, self.n_in), np.float32)

    def dense(self) -> np.ndarray:
        """(n_out, n_in) float32; cached when keep_f32."""
        if self._f32 is not None:
            return self._f32
        w = self._dequant(0, self.n_out)
        if self.keep_f32:
            self._f32 = w
        return w

    def drop_f32(self) -> None:
        if self.ggml_type != GGML_F32:
            self._f32 = None

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Rows ids (n,) as float32 (n, n_in): an embedding lookup reads only those rows."""
        if self._f32 is not None:
            return self._f32[ids]
        if self.ggml_type == GGML_F16:
            return self.raw.view(np.float16).reshape(self.n_out, self.n_in)[ids].astype(np.float32)
        rb = self.nbytes // self.n_out
        raw = self.raw.reshape(self.n_out, rb)[ids]           # (n, row_bytes) gathered blocks
        return _native().dequantize(raw.reshape(-1), self.ggml_type, (len(ids), self.n_in), np.float32)

    @property
    def f32_nbytes(self) -> int:
        return self.n_out * self.n_in * 4

    def apply(self, x: np.ndarray) -> np.ndarray:
        """x (n, n_in) float32 -> (n, n_out) float32 = x @ W^T."""
        n = x.shape[0]
        if self._f32 is not None or self.keep_f32:
            return x @ self.dense().T
        if n <= DECODE_ROWS:
            return _native().matmul_q(self.raw, self.ggml_type, self.n_out, self.n_in,
                                      np.ascontiguousarray(x, dtype=np.float32))
        # not kept in f32: dequantize a slice of output rows at a time
        y = np.empty((n, self.n_out), dtype=np.float32)
        for r0 in range(0, self.n_out, OUT_SLICE_ROWS):
            r1 = min(self.n_out, r0 + OUT_SLICE_ROWS)
            y[:, r0:r1] = x @ self._dequant(r0, r1).T   # (BLAS into a strided out is slower)
        return y

    def __repr__(self):
        return f"QMatrix({self.name!r}, type={self.ggml_type}, {self.n_out}x{self.n_in})"


@dataclass
class LayerWeights:
    attn_norm: np.ndarray            # (n_embd,)
    wq: QMatrix                      # (n_head * head_dim, n_embd)
    wk: QMatrix                      # (n_head_kv * head_dim, n_embd)
    wv: QMatrix                      # (n_head_kv * head_dim, n_embd)
    wo: QMatrix                      # (n_embd, n_head * head_dim)
    ffn_norm: np.ndarray             # (n_embd,)
    w_gate: QMatrix                  # (n_ff, n_embd)
    w_up: QMatrix                    # (n_ff, n_embd)
    w_down: QMatrix                  # (n_embd, n_ff)
    bq: np.ndarray | None = None     # qwen2 attention biases
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    q_norm: np.ndarray | None = None  # (head_dim,) qwen3 / gemma3
    k_norm: np.ndarray | None = None
    post_attn_norm: np.ndarray | None = None  # gemma3
    post_ffn_norm: np.ndarray | None = None


class Weights:
    """Every tensor the forward pass uses, by GGUF name, checked against the config."""

    def __init__(self, config: ModelConfig, matrix, vector, path=None):
        """matrix(name, shape, required) -> QMatrix | None; vector(name, n, required) -> array | None."""
        c = config
        qd, kvd = c.n_head * c.head_dim, c.n_head_kv * c.head_dim
        self.tok_embd = matrix("token_embd.weight", (c.n_vocab, c.n_embd), True)
        out = matrix("output.weight", (c.n_vocab, c.n_embd), False)
        self.output = out if out is not None else self.tok_embd   # missing -> tied embeddings
        self.output_norm = vector("output_norm.weight", c.n_embd, True)
        self.rope_freqs = vector("rope_freqs.weight", c.rope_n_rot // 2, False)
        self.layers: list[LayerWeights] = []
        for i in range(c.n_layer):
            p = f"blk.{i}."
            self.layers.append(LayerWeights(
                attn_norm=vector(p + "attn_norm.weight", c.n_embd, True),
                wq=matrix(p + "attn_q.weight", (qd, c.n_embd), True),
                wk=matrix(p + "attn_k.weight", (kvd, c.n_embd), True),
                wv=matrix(p + "attn_v.weight", (kvd, c.n_embd), True),
                wo=matrix(p + "attn_output.weight", (c.n_embd, qd), True),
                ffn_norm=vector(p + "ffn_norm.weight", c.n_embd, True),
                w_gate=matrix(p + "ffn_gate.weight", (c.n_ff, c.n_embd), True),
                w_up=matrix(p + "ffn_up.weight", (c.n_ff, c.n_embd), True),
                w_down=matrix(p + "ffn_down.weight", (c.n_embd, c.n_ff), True),
                bq=vector(p + "attn_q.bias", qd, c.attn_bias),
                bk=vector(p + "attn_k.bias", kvd, c.attn_bias),
                bv=vector(p + "attn_v.bias", kvd, c.attn_bias),
                q_norm=vector(p + "attn_q_norm.weight", c.head_dim, c.qk_norm),
                k_norm=vector(p + "attn_k_norm.weight", c.head_dim, c.qk_norm),
                post_attn_norm=vector(p + "post_attention_norm.weight", c.n_embd, c.post_norms),
                post_ffn_norm=vector(p + "post_ffw_norm.weight", c.n_embd, c.post_norms),
            ))

    def layer_matrices(self) -> list[QMatrix]:
        return [m for lw in self.layers for m in (lw.wq, lw.wk, lw.wv, lw.wo, lw.w_gate, lw.w_up, lw.w_down)]

    def matrices(self) -> list[QMatrix]:
        ms = self.layer_matrices() + [self.output]
        return ms + ([self.tok_embd] if self.tok_embd is not self.output else [])

    @classmethod
    def from_gguf(cls, f, config: ModelConfig) -> "Weights":
        def check(name, shape, required):
            t = f.tensors.get(name)
            if t is None:
                if required:
                    raise ModelError(f.path, f"tensor {name} is missing")
                return None
            if tuple(t.shape) != tuple(shape):
                raise ModelError(f.path, f"tensor {name} has shape {t.shape}, expected {tuple(shape)}")
            return t

        def matrix(name, shape, required):
            t = check(name, shape, required)
            if t is None:
                return None
            if t.ggml_type == GGML_F32:
                return QMatrix(name, GGML_F32, *shape, f.tensor_array(name))
            return QMatrix(name, t.ggml_type, *shape, f.tensor_data(name))

        def vector(name, n, required):
            t = check(name, (n,), required)
            if t is None:
                return None
            if t.ggml_type not in (GGML_F32, GGML_F16):
                raise ModelError(f.path, f"tensor {name} is {t.type_name}; norms/biases must be F32 or F16")
            return np.array(f.tensor_array(name), dtype=np.float32)

        return cls(config, matrix, vector, f.path)

    @classmethod
    def from_arrays(cls, config: ModelConfig, arrays: dict) -> "Weights":
        """arrays: GGUF tensor name -> numpy array (float32 copies) or QMatrix."""
        def fetch(name, required):
            a = arrays.get(name)
            if a is None and required:
                raise ModelError(None, f"tensor {name} is missing")
            return a

        def matrix(name, shape, required):
            a = fetch(name, required)
            if a is None:
                return None
            m = a if isinstance(a, QMatrix) else QMatrix.from_array(name, a)
            if m.shape != tuple(shape):
                raise ModelError(None, f"tensor {name} has shape {m.shape}, expected {tuple(shape)}")
            return m

        def vector(name, n, required):
            a = fetch(name, required)
            if a is None:
                return None
            a = np.array(a, dtype=np.float32).reshape(-1)
            if a.shape != (n,):
                raise ModelError(None, f"tensor {name} has shape {a.shape}, expected ({n},)")
            return a

        return cls(config, matrix, vector)


def _chunks(lengths: list[int], n_batch: int):
    """Lay the sequences' tokens end to end and cut them into chunks of <= n_batch rows.
    Yields lists of (sequence index, start, end); a sequence appears at most once per chunk."""
    chunk, room = [], n_batch
    for i, n in enumerate(lengths):
        a = 0
        while a < n:
            b = min(n, a + room)
            chunk.append((i, a, b))
            room -= b - a
            a = b
            if room == 0:
                yield chunk
                chunk, room = [], n_batch
    if chunk:
        yield chunk


class Model:
    """Config + weights + the forward pass. KV state lives in the KVCache passed in."""

    def __init__(self, config: ModelConfig, weights: Weights, n_batch: int = 512,
                 f32_layers: bool | None = False):
        """f32_layers: keep layer matrices quantized (False, the default), dequantized
        (True), or None = f32 when they fit F32_LAYERS_BUDGET. f32 copies are made lazily."""
        if n_batch <= 0:
            raise ValueError(f"n_batch must be positive, got {n_batch}")
        self.config, self.w, self.n_batch = config, weights, int(n_batch)
        self.attn_layers = config.attn_layers(weights.rope_freqs)
        layer_ms = weights.layer_matrices()
        if f32_layers is None:
            f32_layers = sum(m.f32_nbytes for m in layer_ms) <= F32_LAYERS_BUDGET
        self.f32_layers = bool(f32_layers)
        for m in layer_ms:
            m.keep_f32 = self.f32_layers
        for m in (weights.output, weights.tok_embd):   # small vocabularies: f32 is cheap
            m.keep_f32 = m.f32_nbytes <= KEEP_F32_BYTES

    @classmethod
    def from_gguf(cls, f, config: ModelConfig | None = None, n_batch: int = 512,
                  f32_layers: bool | None = False) -> "Model":
        config = config or ModelConfig.from_gguf(f)
        return cls(config, Weights.from_gguf(f, config), n_batch, f32_layers)

    @classmethod
    def from_arrays(cls, config: ModelConfig, arrays: dict, n_batch: int = 512,
                    f32_layers: bool | None = None) -> "Model":
        return cls(config, Weights.from_arrays(config, arrays), n_batch, f32_layers)

    def decode_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: every matrix once, in the form it is
        multiplied in (f32 copy or quantized blocks); embedding rows are negligible."""
        def read(m):
            return m.f32_nbytes if (m.keep_f32 or m._f32 is not None) else m.nbytes
        ms = self.w.layer_matrices() + [self.w.output]
        return sum(read(m) for m in ms)

    def drop_f32_cache(self) -> None:
        """Free the float32 copies (they are remade on the next use)."""
        for m in self.w.matrices():
            m.drop_f32()

    # -- forward -------------------------------------------------------------
    def forward(self, tokens: list, seqs: list[int], kv: KVCache, logits="last") -> list:
        """Run tokens[i] (1-D ids) after what kv already holds for seqs[i].

        logits: 'last' -> per sequence (n_vocab,) of its last token; 'all' -> (n_i, n_vocab);
        'none' -> None; or a list of per-sequence index arrays (into tokens[i]) -> (m_i, n_vocab)
        in that order. All sequences share the matrix products (rows stacked, chunks of
        n_batch rows); attention is per sequence, through the KV policy.
        """
        c = self.config
        toks = [np.asarray(t).reshape(-1) for t in tokens]
        if len(toks) != len(seqs) or len(set(seqs)) != len(seqs):
            raise ValueError("forward needs one token array per sequence and distinct sequences")
        for t, s in zip(toks, seqs):
            if s not in kv.lengths:
                raise ValueError(f"sequence {s} is not in this KV cache (add_sequence() first)")
            if t.size == 0:
                raise ValueError(f"sequence {s}: no tokens to run")
            if not np.issubdtype(t.dtype, np.integer):
                raise TokenizerError(f"token ids must be integers, got {t.dtype}")
            if t.min() < 0 or t.max() >= c.n_vocab:
                bad = t[(t < 0) | (t >= c.n_vocab)][0]
                raise TokenizerError(f"token id {int(bad)} out of range [0, {c.n_vocab})")
            if kv.length(s) + t.size > kv.n_ctx:
                raise ContextOverflowError(f"sequence {s}: {kv.length(s)} cached + {t.size} new "
                                           f"tokens exceed the context size {kv.n_ctx}")
        want, order = self._logit_rows(toks, logits)

        picked: list[list[np.ndarray]] = [[] for _ in toks]   # final hidden rows per sequence
        for chunk in _chunks([t.size for t in toks], self.n_batch):
            ids = np.concatenate([toks[i][a:b] for i, a, b in chunk])
            x = self.w.tok_embd.rows(ids.astype(np.int64))            # (N, n_embd)
            if c.embd_scale != 1.0:
                x *= np.float32(c.embd_scale)   # f32 sqrtf(n_embd), as llama.cpp scales it
            segs, r = [], 0
            for i, a, b in chunk:
                p0 = kv.length(seqs[i])
                segs.append((seqs[i], r, r + b - a, np.arange(p0, p0 + b - a)))
                r += b - a
            try:
                for layer in range(c.n_layer):
                    x = self._block(layer, x, segs, kv)
            except BaseException:
                # (Ctrl-C included) drop what some layers appended, so the cache stays usable
                for s, *_ in segs:
                    try:
                        kv.truncate(s, kv.length(s))
                    except Exception:
                        pass
                raise
            for (s, r0, r1, _), (i, a, b) in zip(segs, chunk):
                kv.advance(s, r1 - r0)
                if want[i] is not None:
                    sel = want[i][(want[i] >= a) & (want[i] < b)] - a + r0
                    if sel.size:
                        picked[i].append(x[sel])

        out = self._logits(picked, want)
        if isinstance(logits, str) and logits == "last":
            return [o[0] for o in out]
        return [o if inv is None else o[inv] for o, inv in zip(out, order)]

    def _logit_rows(self, toks, logits):
        """-> (sorted unique row indices per sequence or None, the caller's order or None)."""
        if logits is None or isinstance(logits, str):
            if logits == "last":
                return [np.array([t.size - 1]) for t in toks], [None] * len(toks)
            if logits == "all":
                return [np.arange(t.size) for t in toks], [None] * len(toks)
            if logits in ("none", None):
                return [None] * len(toks), [None] * len(toks)
        if isinstance(logits, str) or len(logits) != len(toks):
            raise ValueError("logits must be 'last', 'all', 'none' or one index array per sequence")
        want, order = [], []
        for t, w in zip(toks, logits):
            w, inv = np.unique(np.asarray(w, dtype=np.int64).reshape(-1), return_inverse=True)
            if w.size and (w[0] < 0 or w[-1] >= t.size):
                raise ValueError(f"logit index out of range [0, {t.size})")
            inv = inv.reshape(-1)
            want.append(w)
            order.append(None if len(inv) == len(w) and np.all(inv == np.arange(len(w))) else inv)
        return want, order

    def _logits(self, picked, want) -> list:
        c = self.config
        rows = [np.concatenate(p) if p else np.zeros((0, c.n_embd), np.float32) for p in picked]
        sizes = [len(r) for r in rows]
        if sum(sizes) == 0:
            return [None if w is None else np.zeros((0, c.n_vocab), np.float32) for w in want]
        h = rms_norm(np.concatenate(rows), self.w.output_norm, c.norm_eps)   # (m, n_embd)
        y = self.w.output.apply(h)                                          # (m, n_vocab)
        if c.final_logit_softcap:
            y = softcap(y, c.final_logit_softcap)
        out, r = [], 0
        for w, n in zip(want, sizes):
            out.append(None if w is None else y[r:r + n])
            r += n
        return out

    def _block(self, layer: int, x: np.ndarray, segs, kv: KVCache) -> np.ndarray:
        """One transformer layer on the stacked rows x (N, n_embd) of a chunk."""
        c, lw = self.config, self.w.layers[layer]
        N, H, G, d, eps = x.shape[0], c.n_head, c.n_head_kv, c.head_dim, c.norm_eps

        # attention
        h = rms_norm(x, lw.attn_norm, eps)                  # (N, n_embd)
        q = lw.wq.apply(h)                                  # (N, H*d)
        k = lw.wk.apply(h)                                  # (N, G*d)
        v = lw.wv.apply(h)                                  # (N, G*d)
        if lw.bq is not None:
            q += lw.bq
            k += lw.bk
            v += lw.bv
        q, k, v = q.reshape(N, H, d), k.reshape(N, G, d), v.reshape(N, G, d)
        if lw.q_norm is not None:                           # per-head RMS norm, pre-RoPE
            q = rms_norm(q, lw.q_norm, eps)
            k = rms_norm(k, lw.k_norm, eps)
        att = np.empty((N, H, d), dtype=np.float32)
        for s, r0, r1, pos in segs:                         # the policy applies RoPE
            kv.append(layer, s, k[r0:r1], v[r0:r1], pos)
            att[r0:r1] = kv.attend(layer, s, q[r0:r1], pos)
        o = lw.wo.apply(att.reshape(N, H * d))              # (N, n_embd)
        if lw.post_attn_norm is not None:
            o = rms_norm(o, lw.post_attn_norm, eps)
        x = x + o

        # feed-forward: down(act(gate(h)) * up(h))
        h = rms_norm(x, lw.ffn_norm, eps)
        f = lw.w_down.apply(gated_(lw.w_gate.apply(h), lw.w_up.apply(h), c.act))  # (N, n_embd)
        if lw.post_ffn_norm is not None:
            f = rms_norm(f, lw.post_ffn_norm, eps)
        x += f
        return x
