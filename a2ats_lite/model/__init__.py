"""The model: config + weights on a backend + the forward pass.

    model = Model.from_gguf(GGUFFile(path))                 # or Model.from_arrays(config, {...})
    kv = make_kv_cache("dense", model.attn_layers, n_ctx)
    seq = kv.add_sequence()
    last = model.forward([prompt_ids], [seq], kv)[0]         # (n_vocab,) logits of the last token
    logits = model.step(batch, kv)                           # one engine step (batch.py)

Weights keep their GGUF encoding on the backend. The embedding / output matrix
(262144 x 640 for the default model, 0.67 GB as float32) is never expanded
whole on the CPU: decode multiplies its quantized blocks, prefill logits
dequantize it in slices, and embedding lookups dequantize only the rows they need.
"""
from __future__ import annotations

import numpy as np

from ..backend.base import Backend
from ..batch import Batch
from ..config import ModelConfig
from ..errors import TokenizerError
from ..prompts import check_context
from . import forward as _fwd
from .weights import LayerWeights, Weights  # noqa: F401

F32_LAYERS_BUDGET = 1 << 30 # f32_layers=None keeps layer matrices in f32 when they fit this
KEEP_F32_BYTES = 64 << 20   # an embedding/output matrix is kept as f32 only below this


def _cpu():
    from ..backend.cpu import CPUBackend
    return CPUBackend()


class Model:
    """Config + weights + the forward pass. KV state lives in the KVCache passed in."""

    def __init__(self, config: ModelConfig, weights: Weights, n_batch: int = 512,
                 f32_layers: bool | None = False, backend: Backend | None = None):
        """f32_layers (CPU): keep layer matrices quantized (False, the default), dequantized
        (True), or None = f32 when they fit F32_LAYERS_BUDGET. f32 copies are made lazily."""
        if n_batch <= 0:
            raise ValueError(f"n_batch must be positive, got {n_batch}")
        self.config, self.w, self.n_batch = config, weights, int(n_batch)
        self.B = backend or _cpu()
        freqs = weights.rope_freqs
        self.attn_layers = config.attn_layers(None if freqs is None else np.asarray(self.B.to_host(freqs)))
        layer_ms = weights.layer_matrices()
        if f32_layers is None:
            f32_layers = sum(m.f32_nbytes for m in layer_ms) <= F32_LAYERS_BUDGET
        self.f32_layers = bool(f32_layers)
        if self.B.caps.f32_cache:
            for m in layer_ms:
                self.B.keep_f32(m, self.f32_layers)
            for m in (weights.output, weights.token_embd):   # small vocabularies: f32 is cheap
                self.B.keep_f32(m, m.f32_nbytes <= KEEP_F32_BYTES)

    @classmethod
    def from_gguf(cls, f, config: ModelConfig | None = None, n_batch: int = 512,
                  f32_layers: bool | None = False, backend: Backend | None = None) -> "Model":
        config = config or ModelConfig.from_gguf(f)
        backend = backend or _cpu()
        return cls(config, Weights.from_gguf(f, config, backend), n_batch, f32_layers, backend)

    @classmethod
    def from_arrays(cls, config: ModelConfig, arrays: dict, n_batch: int = 512,
                    f32_layers: bool | None = None, backend: Backend | None = None) -> "Model":
        backend = backend or _cpu()
        return cls(config, Weights.from_arrays(config, arrays, backend), n_batch, f32_layers, backend)

    def decode_bytes_per_token(self) -> int:
        """Weight bytes one decode step reads: every matrix once, in the form it is
        multiplied in (f32 copy or quantized blocks); embedding rows are negligible."""
        return sum(m.read_bytes for m in self.w.layer_matrices() + [self.w.output])

    # -- one step --------------------------------------------------------------------
    def step(self, batch: Batch, kv, greedy: bool = False) -> np.ndarray:
        """Run a step's rows after what kv holds: host logits (len(batch.logit_rows), n_vocab),
        or with greedy the first maximal token of each of those rows (int64), chosen on the
        backend (on a GPU only the ids come back).
        The rows must fit the backend at once (the engine keeps steps within n_batch).
        On any error (Ctrl-C included) what some layers wrote is dropped, so the cache
        stays usable; on success every sequence's length advances by its rows."""
        def rollback():
            for s in batch.seq_ids:
                try:
                    kv.rollback(s)
                except Exception:
                    pass

        def run():
            y = _fwd.forward(self.w, self.attn_layers, batch, kv, self.B)
            if y is None:
                return np.zeros(0, np.int64) if greedy else np.zeros((0, self.config.n_vocab), np.float32)
            return self.B.argmax(y) if greedy else self.B.to_host(y)
        try:
            if self.graphable(batch, kv):
                # a CUDA graph per batch size: no buffer may move while it runs
                kv.reserve_decode(batch.seq_ids, batch.positions)
                logits = self.B.graph_step(("decode", batch.n_seqs, greedy), run, kv.n_ctx, rollback)
            else:
                logits = run()
        except BaseException:
            rollback()
            raise
        for i, s in enumerate(batch.seq_ids):
            kv.advance(s, batch.n_tokens(i))
        return logits.astype(np.int64) if greedy else logits

    def graphable(self, batch: Batch, kv) -> bool:
        """A decode step the backend can replay as a CUDA graph: every row a decode row, the
        dense policy (a retrieval policy's selection goes through the host), no observers."""
        return self.B.caps.graphs and batch.decode_only \
            and not kv.policy.retrieves and not kv.observers

    def load_prefix(self, kv, prefix_kv) -> int:
        """A new sequence of kv holding a captured prefill (see forward.load_prefix)."""
        return _fwd.load_prefix(self.B, self.attn_layers, kv, prefix_kv)

    # -- whole prompts -----------------------------------------------------------------
    def check_tokens(self, toks, seqs, kv) -> None:
        c = self.config
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
            check_context(t.size, kv.n_ctx, cached=kv.length(s), room=0)

    def forward(self, tokens: list, seqs: list[int], kv, logits="last") -> list:
        """Run tokens[i] (1-D ids) after what kv already holds for seqs[i], in steps of at
        most n_batch rows (all sequences share the products of a step).

        logits: 'last' -> per sequence (n_vocab,) of its last token; 'all' -> (n_i, n_vocab);
        'none' -> None; or a list of per-sequence index arrays (into tokens[i]) -> (m_i, n_vocab)
        in that order."""
        toks = [np.asarray(t).reshape(-1) for t in tokens]
        self.check_tokens(toks, seqs, kv)
        want, order = _logit_rows(toks, logits)
        picked: list[list[np.ndarray]] = [[] for _ in toks]
        for chunk in _chunks([t.size for t in toks], self.n_batch):
            rows = [None if want[i] is None else
                    want[i][(want[i] >= a) & (want[i] < b)] - a for i, a, b in chunk]
            batch = Batch.make([seqs[i] for i, _, _ in chunk], [toks[i][a:b] for i, a, b in chunk],
                               [kv.length(seqs[i]) for i, _, _ in chunk],
                               [np.zeros(0, np.int64) if r is None else r for r in rows])
            y = self.step(batch, kv)
            r0 = 0
            for (i, _, _), r in zip(chunk, rows):
                n = 0 if r is None else len(r)
                if n:
                    picked[i].append(y[r0:r0 + n])
                r0 += n
        out = [None if w is None else (np.concatenate(p) if p else
                                       np.zeros((0, self.config.n_vocab), np.float32))
               for w, p in zip(want, picked)]
        if isinstance(logits, str) and logits == "last":
            return [o[0] for o in out]
        return [o if inv is None or o is None else o[inv] for o, inv in zip(out, order)]


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


def _logit_rows(toks, logits):
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
