"""KVCache: storage (kv/storage.py) and selection (kv/policies.py) composed, for
every sequence of one engine. It stores and hands out views and selections; the
forward pass (model/forward.py) does RoPE and attention.

Observers (evaluation, calibration) see what flows through without patching:
an observer is any object with some of
    on_write(layer, seq, positions, k_pre, v)      pre-RoPE keys and values appended
    on_query(layer, seq, positions, q_pre)         pre-RoPE queries of a step
    on_select(layer, seq, position, q_rot, sel)    a decode selection: q_rot (H, d)
                                                   post-RoPE scaled, sel per KV head
"""
from __future__ import annotations

import itertools
import weakref

import numpy as np

from ..backend.base import Backend
from .policies import Policy
from .registry import make_policy
from .storage import KVStorage

_CACHE_IDS = itertools.count()      # KVCache ids: a sequence's key in the backend is (id, seq)


def _backend_key(cache_id: int, seq: int):
    return (cache_id, seq)


class KVCache:
    def __init__(self, layers, n_ctx: int, policy: Policy, backend: Backend | None = None,
                 cache_type: str = "f32", spill_dir=None, initial: int = 256,
                 cache_type_v: str | None = None):
        if backend is None:
            from ..backend.cpu import CPUBackend
            backend = CPUBackend()
        self.layers, self.n_ctx, self.B, self.policy = layers, int(n_ctx), backend, policy
        self.storage = KVStorage(layers, n_ctx, backend, offload=policy.retrieves,
                                 dtype=cache_type, dtype_v=cache_type_v, spill_dir=spill_dir,
                                 initial=initial)
        policy.bind(layers, self.n_ctx, backend, self.storage)
        self.lengths: dict[int, int] = {}
        # what the backend holds per sequence (a GPU's row caches) is keyed (this cache's id,
        # seq): caches sharing a backend number their sequences alike; freed with the sequence,
        # or with this cache if it is dropped unclosed
        self._id = next(_CACHE_IDS)
        weakref.finalize(self, _release_all, backend, self._id, self.lengths)
        self.observers: list = []
        self._next_seq = 0

    @property
    def name(self) -> str:
        return self.policy.name

    @property
    def selects(self) -> bool:
        """Whether decode rows attend a policy's selection (a retrieval policy)."""
        return self.policy.retrieves

    @property
    def device_memory(self) -> bool:
        """Whether the bytes it counts (estimate_bytes, budget_bytes) are device memory."""
        return not self.B.host

    def set_budget(self, seq: int, budget) -> None:
        """seq's own selection budget (None: the policy's); a retrieval policy only."""
        self.policy.set_budget(seq, budget)

    # -- sequences ----------------------------------------------------------------------
    def add_sequence(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        self.storage.add(seq)
        self.policy.add_sequence(seq)
        self.lengths[seq] = 0
        return seq

    def remove_sequence(self, seq: int) -> None:
        """Free everything the sequence holds (buffers, store map and spill file, codes)."""
        self.storage.remove(seq)
        self.policy.remove_sequence(seq)
        self.lengths.pop(seq, None)
        self.B.release(self._key(seq))

    def close(self) -> None:
        for seq in list(self.lengths):
            self.remove_sequence(seq)

    def length(self, seq: int) -> int:
        try:
            return self.lengths[seq]
        except KeyError:
            raise ValueError(f"unknown sequence {seq}") from None

    def advance(self, seq: int, n: int) -> None:
        """Called once every layer has written n more tokens of seq."""
        self.lengths[seq] += n

    def can_truncate(self, seq: int, n: int) -> bool:
        """Whether truncate(seq, n) is possible (sliding-window layers may have dropped
        keys that positions >= n would need)."""
        return seq in self.lengths and 0 <= n <= self.lengths[seq] and \
            self.storage.can_truncate(seq, n)

    def truncate(self, seq: int, n: int) -> None:
        """Drop every token from position n on (prefix reuse, rollback of a failed step)."""
        length = self.length(seq)
        if not 0 <= n <= length:
            raise ValueError(f"cannot truncate sequence {seq} of length {length} to {n}")
        if not self.storage.can_truncate(seq, n):
            raise ValueError(f"kv: sequence {seq} can no longer be truncated to {n}: its "
                             f"sliding-window layers dropped the keys before that window")
        self._forget(seq, n)
        self.lengths[seq] = n

    def rollback(self, seq: int) -> None:
        """Forget rows some layers wrote beyond the sequence's length (a failed step)."""
        self._forget(seq, self.lengths[seq])

    def _forget(self, seq: int, n: int) -> None:
        self.storage.truncate(seq, n)
        self.policy.on_truncate(seq, n)
        self.B.forget_rows(self._key(seq), n)

    def compact(self, seq: int) -> None:
        """Give back memory a long one-shot prefill left in sliding-window buffers."""
        self.storage.compact(seq)

    def nbytes(self, seq: int | None = None) -> int:
        return self.storage.nbytes(seq) + self.policy.nbytes(seq) + self._row_bytes(seq)

    def _key(self, seq: int):
        """seq's name in the backend (held memory: row caches)."""
        return _backend_key(self._id, seq)

    def _row_bytes(self, seq: int | None) -> int:
        """What the backend holds for seq (None: for every sequence of this cache)."""
        return sum(self.B.held_bytes(self._key(s)) for s in (self.lengths if seq is None else (seq,)))

    def estimate_bytes(self, n_tokens: int) -> int:
        """Bytes one sequence of n_tokens will hold in the backend's memory (on a GPU the
        host store of a retrieval policy is not counted: admission is by device memory),
        with the policy's state (codes, page bounds) and the row caches at their largest."""
        rows = 0
        if self.policy.retrieves and self.B.caps.row_cache:
            rows = self.B.estimate_held_bytes(
                [(L.n_kv_heads, L.head_dim, self.policy.max_selected(n_tokens, L.group))
                 for L in (self.layers[i] for i in self.storage.slot)], self.storage.dtype)
        return (self.storage.estimate_bytes(n_tokens, store=self.B.host) + self.policy.estimate_bytes()
                + rows)

    def budget_bytes(self, seq: int) -> int:
        """What seq holds of the memory estimate_bytes counts (the engine's budget)."""
        return self.storage.nbytes(seq, store=self.B.host) + self.policy.nbytes(seq) + self._row_bytes(seq)

    # -- the forward pass's side ----------------------------------------------------------
    def retrieves(self, layer: int) -> bool:
        """Whether decode rows of this layer attend a selection (else every position)."""
        return layer in self.storage.slot

    def write(self, layer: int, seq: int, first_pos: int, k_pre, k_rot, v) -> None:
        """k_pre, k_rot, v (m, G, d): the next m positions of seq in this layer."""
        self.storage.write(layer, seq, first_pos, k_rot, v)
        if self.retrieves(layer):
            self.policy.on_write(layer, seq, first_pos, k_pre, k_rot)
        for o in self.observers:
            if hasattr(o, "on_write"):
                o.on_write(layer, seq, np.arange(first_pos, first_pos + k_pre.shape[0]), k_pre, v)

    def write_decode(self, layer: int, seqs, positions, k_pre, k_rot, v) -> None:
        """A decode step's rows (S, G, d), one per sequence: one storage call for a layer in
        backend buffers; per sequence (write) for the host store, codes or observers."""
        if self.retrieves(layer) or self.observers:
            for i, seq in enumerate(seqs):
                self.write(layer, seq, int(positions[i]), k_pre[i:i + 1], k_rot[i:i + 1], v[i:i + 1])
        else:
            self.storage.write_decode(layer, seqs, positions, k_rot, v)

    def reserve_decode(self, seqs, positions) -> None:
        """Room for one more row in every buffer of seqs, before a step that must not
        reallocate (a CUDA graph's)."""
        for seq, p in zip(seqs, positions):
            self.storage.reserve(seq, int(p), 1)

    def notify_query(self, layer: int, seq: int, positions, q_pre) -> None:
        for o in self.observers:
            if hasattr(o, "on_query"):
                o.on_query(layer, seq, positions, q_pre)

    def view(self, layer: int, seq: int, hi: int | None = None):
        """(K (G, T, d), V (G, T, d), pos0) the layer holds for seq."""
        return self.storage.view(layer, seq, hi)

    def buffer(self, layer: int, seq: int):
        """(K, V (G, capacity, d), pos0, n) of a layer kept in a backend buffer."""
        return self.storage.buffer(layer, seq)

    def select(self, L, seqs, q_pre, q_rot, T):
        """Decode rows of a retrieval layer: (idx (S, G, Kmax), lens (S, G))."""
        for i, seq in enumerate(seqs):
            stored = self.storage.layer_end(L.index, seq)
            if not 0 < int(T[i]) <= stored:
                raise ValueError(f"kv: layer {L.index} has no keys for position {int(T[i]) - 1} "
                                 f"of sequence {seq} (stored {stored})")
        idx, lens = self.policy.select(L, seqs, q_pre, q_rot, T)
        for o in self.observers:
            if hasattr(o, "on_select"):
                for i, seq in enumerate(seqs):
                    o.on_select(L.index, seq, int(T[i]) - 1, q_rot[i],
                                [idx[i, g, :lens[i, g]] for g in range(L.n_kv_heads)])
        return idx, lens

    def sparse_attend(self, L, seqs, q_pre, q_rot, qg, T):
        """Decode rows of a retrieval layer, one query each: the policy's selection (select),
        then one backend call attending every sequence's selected rows of the host store
        (through the backend's row caches of (seq, layer) where it keeps them). q_pre
        (S, H, d) pre-RoPE, q_rot (S, H, d) post-RoPE scaled, qg (S, G, g, d) post-RoPE,
        T (S,) positions each query sees. -> (S, G, g, d)."""
        idx, lens = self.select(L, seqs, q_pre, q_rot, T)
        arrays = [self.store_arrays(L.index, s) for s in seqs]
        return self.B.sparse_attention(qg, [a[0] for a in arrays], [a[1] for a in arrays], idx, lens,
                                       L.scale, seqs=[self._key(s) for s in seqs], layer=L.index)

    def store_arrays(self, layer: int, seq: int):
        """(K, V) (G, capacity, d) of an offloaded layer: what sparse attention reads."""
        return self.storage.store(seq).arrays(self.storage.slot[layer])

    def keys(self, layer: int, seq: int) -> np.ndarray:
        """Every stored post-RoPE key of a retrieval layer, (T, G, d) (evaluation)."""
        return self.storage.store(seq).keys(self.storage.slot[layer])


def _release_all(backend: Backend, cache_id: int, lengths: dict) -> None:
    """What the backend still holds for the sequences of a dropped KVCache."""
    for seq in list(lengths):
        backend.release(_backend_key(cache_id, seq))


def make_kv_cache(name: str, layers, n_ctx: int, backend: Backend | None = None,
                  cache_type: str = "f32", spill_dir=None, initial: int = 256,
                  cache_type_v: str | None = None, **params) -> KVCache:
    """A KVCache under policy `name` (see kv/policies.py) with its parameters; cache_type
    (and cache_type_v, default the same): 'f32', 'f16', 'q8_0' or 'q4_0' (ggml's blocks)."""
    return KVCache(layers, n_ctx, make_policy(name, **params), backend=backend,
                   cache_type=cache_type, cache_type_v=cache_type_v, spill_dir=spill_dir,
                   initial=initial)
