"""Drive one layer of a KVCache the way the forward pass does (store, attend, advance),
for tests of the KV storage and selection policies without a model; the float64 attention
reference and the native attention over one cache that the kernel tests compare."""
import numpy as np

from a2ats_lite import native
from a2ats_lite.batch import Batch
from a2ats_lite.model.forward import attend as _attend
from a2ats_lite.model.forward import store_kv


def _batch(seq, positions):
    positions = np.asarray(positions, dtype=np.int64)
    return Batch.make([seq], [np.zeros(len(positions), np.int64)], [int(positions[0])])


def append(kv, layer, seq, k, v, positions):
    """Store pre-RoPE keys k and values v (n, G, d) of positions for one layer."""
    L = kv.layers[layer]
    store_kv(kv.B, L, kv, _batch(seq, positions), np.asarray(k, np.float32), np.asarray(v, np.float32))


def attend(kv, layer, seq, q, positions):
    """Attention of pre-RoPE queries q (n, H, d) at positions, as the forward pass does."""
    return _attend(kv.B, kv.layers[layer], np.asarray(q, np.float32), _batch(seq, positions), kv)


class Selections:
    """Observer keeping each (layer, seq)'s last decode selection (per KV head)."""

    def __init__(self, kv):
        self.last = {}
        kv.observers.append(self)

    def on_select(self, layer, seq, position, q_rot, sel):
        self.last[(layer, seq)] = sel

    def __getitem__(self, key):
        return self.last[key]

    def __contains__(self, key):
        return key in self.last

    def __bool__(self):
        return bool(self.last)


def spans(pos, pos0, window):
    """Rows [lo, hi) of a cache starting at pos0 that queries at positions pos see."""
    pos = np.asarray(pos, dtype=np.int64)
    lo = np.zeros_like(pos) + pos0 if window is None else np.maximum(pos0, pos - window + 1)
    return lo - pos0, pos + 1 - pos0


def reference_attention(q, K, V, lo, hi, scale):
    """float64 softmax attention of each row of q (n, H, d) over its span [lo, hi) of float
    K, V (G, T, d)."""
    n, H, d = q.shape
    g = H // K.shape[0]
    K64, V64 = K.astype(np.float64), V.astype(np.float64)
    out = np.zeros((n, H, d))
    for i in range(n):
        if hi[i] <= lo[i]:
            continue
        kk = np.repeat(K64[:, lo[i]:hi[i]], g, axis=0)          # (H, m, d)
        vv = np.repeat(V64[:, lo[i]:hi[i]], g, axis=0)
        s = scale * np.einsum("hd,hmd->hm", q[i].astype(np.float64), kk)
        w = np.exp(s - s.max(axis=1, keepdims=True))
        out[i] = np.einsum("hm,hmd->hd", w / w.sum(axis=1, keepdims=True), vv)
    return out


def one_cache_attention(q, K, V, pos0, lo, hi, scale, **kw):
    """native.attention of every row of q over one sequence's K, V starting at pos0."""
    return native.attention(q, [K], [V], [pos0], np.zeros(len(q), np.int64), lo, hi, scale, **kw)


def assert_native_selects_as_numpy(layers, drive, **policy):
    """An a2ats cache (256 positions, policy's parameters) driven by drive(kv) on the native
    retrieval kernels and on the numpy backend: the same last decode selections, per (layer,
    sequence) and KV head, and some."""
    from a2ats_lite.backend.cpu import CPUBackend
    from a2ats_lite.kv import make_kv_cache
    sels = []
    for native_retrieval in (True, False):
        kv = make_kv_cache("a2ats", layers, 256, backend=CPUBackend(native_retrieval=native_retrieval),
                           **policy)
        kv.sel = Selections(kv)
        drive(kv)
        sels.append(kv.sel.last)
    assert sels[0].keys() == sels[1].keys() and sels[0]
    for key in sels[0]:
        for a, b in zip(sels[0][key], sels[1][key]):
            np.testing.assert_array_equal(a, b)


def selection_heads(S, G, T, sinks, window):
    """(s, k, lo, hi, t) of every (sequence s, KV head k) of a selection: [lo, hi) the scored
    candidates of its t = T[s] tokens, after the sinks and before the window."""
    for s in range(S):
        t = int(T[s])
        lo = min(sinks, t)
        hi = max(lo, t - window)
        for k in range(G):
            yield s, k, lo, hi, t


def assert_rows_bit_identical(rng, q, K, V, window, scale, whole, other_cache, n_alone, n_mine):
    """whole: the attention of a prompt's rows q (T, H, d) over K, V (G, T, .) in one call.
    In random chunks (each over the cache up to its own end, any thread count), n_alone rows
    one by one, and n_mine rows beside two other sequences' (other_cache(n) -> K, V of n rows:
    a prefill chunk and decode rows) in one call: the same bits."""
    T, H, d = q.shape
    lo, hi = spans(np.arange(T), 0, window)
    run = one_cache_attention
    for _ in range(2):
        cuts = np.unique(np.concatenate([[0, T], rng.integers(1, T, 6)]))
        got = np.concatenate([run(q[a:b], K[:, :b], V[:, :b], 0, lo[a:b], hi[a:b], scale,
                                  n_threads=int(rng.integers(1, 5)))
                              for a, b in zip(cuts[:-1], cuts[1:])])
        assert np.array_equal(got, whole)
    for i in rng.integers(0, T, n_alone):
        assert np.array_equal(run(q[i:i + 1], K[:, :i + 1], V[:, :i + 1], 0, lo[i:i + 1],
                                  hi[i:i + 1], scale), whole[i:i + 1])
    K2, V2 = other_cache(90)
    K3, V3 = other_cache(2000)
    mine = rng.choice(T, n_mine, replace=False)
    rows = ([(0, i) for i in mine] + [(1, p) for p in range(60, 90)]
            + [(2, p) for p in rng.integers(0, 2000, 9)])
    rows = [rows[k] for k in rng.permutation(len(rows))]
    seq = np.array([s for s, _ in rows])
    p = np.array([r for _, r in rows])
    l2, h2 = spans(p, 0, window)
    qq = np.stack([q[r] if s == 0 else rng.standard_normal((H, d)).astype(np.float32)
                   for s, r in rows])                                  # (n, H, d)
    mixed = native.attention(qq, [K, K2, K3], [V, V2, V3], [0, 0, 0], seq, l2, h2, scale)
    assert np.array_equal(mixed[seq == 0], whole[p[seq == 0]])


def assert_cache_start_keeps_rows(rng, K, V, g, d, window, drop):
    """A window buffer K, V (G, T, .) of head dim d that dropped its first `drop` rows
    (pos0 > 0) gives the last 40 rows' attention (g query heads per KV head) the same numbers."""
    G, T = K.shape[:2]
    q = rng.standard_normal((40, G * g, d)).astype(np.float32)
    lo, hi = spans(np.arange(T - 40, T), 0, window)
    lo = np.maximum(lo, drop)                   # (no row sees before the drop)
    full = one_cache_attention(q, K, V, 0, lo, hi, 0.0625)
    dropped = one_cache_attention(q, np.ascontiguousarray(K[:, drop:]),
                                  np.ascontiguousarray(V[:, drop:]), drop, lo - drop, hi - drop,
                                  0.0625)
    assert np.array_equal(full, dropped)


def backend_prefill_and_decode(B, rng, cache, G, g, d, pos0, window):
    """Backend B's attention (scale 0.2) of two sequences of 40 and 25 rows from pos0 over
    caches cache(T, cap) -> K, V (G, T, .) views of (G, cap, .) buffers (cap = T + 11): a
    prefill chunk per sequence, and decode_attention of all their rows read in place from the
    whole buffers -> (bufs, qs, pos, pre (per sequence (T, G * g, d)), rows (n, G, g, d), dec)."""
    bufs, qs, pos = [], [], []
    for T in (40, 25):
        K, V = cache(T, T + 11)
        bufs.append((K.base, V.base, pos0, T))
        qs.append(rng.standard_normal((T, G * g, d)).astype(np.float32))
        pos.append(np.arange(pos0, pos0 + T))
    pre = [B.attention(q, K[:, :T], V[:, :T], p, pos0, window, 0.2)
           for q, (K, V, _, T), p in zip(qs, bufs, pos)]
    rows = np.concatenate(qs).reshape(-1, G, g, d)
    dec = B.decode_attention(rows, [bufs[0]] * 40 + [bufs[1]] * 25, np.concatenate(pos), window, 0.2)
    return bufs, qs, pos, pre, rows, dec


def chunk_and_decode_rows(rng, H, d, window, pos0, T):
    """Query rows over a cache of T rows from pos0: a prefill chunk (the last min(T, 40)
    positions) and 5 earlier decode-like rows -> (q (n, H, d), lo, hi, scale d^-0.5)."""
    n = min(T, 40)
    pos = np.concatenate([np.arange(pos0 + T - n, pos0 + T), rng.integers(pos0, pos0 + T, 5)])
    q = rng.standard_normal((len(pos), H, d)).astype(np.float32)
    lo, hi = spans(pos, pos0, window)
    return q, lo, hi, d ** -0.5
