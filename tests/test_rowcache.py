"""The GPU cache of retrieved rows (backend/cuda/rowcache.py): the native bookkeeping against a
Python reference, the CUDA backend's cached sparse attention (plan, fetch of the misses only,
put_rows, attention through slot lists) on the CPU shim against the uncached gather path, and
the backend's ownership of its caches (one per (sequence, layer), released with the sequence)."""
from __future__ import annotations


import numpy as np
import pytest

from cuda_shim import ShimModule

from a2ats_lite import native
from a2ats_lite.backend.cuda import CUDABackend
from a2ats_lite.backend.cuda.rowcache import RowCache, cache_slots
from a2ats_lite.native import NativeError


def plan_ref(idx, lens, maps):
    """Python reference of native.rowcache_plan: hits keep their slots, misses take the next
    slots (clock order) no token of this step's selection uses."""
    S, G, kmax = idx.shape
    slots = np.full((S, G, kmax), -1, np.int32)
    miss = [[[] for _ in range(G)] for _ in range(S)]
    for s in range(S):
        slot_of, token_at, hand = maps[s]
        C = token_at.shape[1]
        for k in range(G):
            sel = [int(t) for t in idx[s, k, :lens[s, k]]]
            used = set()
            for i, t in enumerate(sel):
                sl = slot_of[k, t]
                if 0 <= sl < C and token_at[k, sl] == t:
                    slots[s, k, i] = sl
                    used.add(sl)
            h = int(hand[k])
            for i, t in enumerate(sel):
                if slots[s, k, i] >= 0:
                    continue
                sl = slot_of[k, t]
                if 0 <= sl < C and token_at[k, sl] == t:      # listed twice
                    slots[s, k, i] = sl
                    continue
                while h in used:
                    h = (h + 1) % C
                old = token_at[k, h]
                if old >= 0 and slot_of[k, old] == h:
                    slot_of[k, old] = -1
                token_at[k, h], slot_of[k, t] = t, h
                used.add(h)
                slots[s, k, i] = h
                miss[s][k].append((t, h))
                h = (h + 1) % C
            hand[k] = h
    return slots, miss


def new_maps(G, n_map, n_slots):
    return (np.full((G, n_map), -1, np.int32), np.full((G, n_slots), -1, np.int32),
            np.zeros(G, np.int32))


def selections(rng, S, G, kmax, n_maps, prev=None, keep=0.7):
    """Random sorted selections; with prev, about `keep` of each previous one selected again."""
    idx = np.full((S, G, kmax), -1, np.int64)
    lens = np.zeros((S, G), np.int32)
    for s in range(S):
        for k in range(G):
            n = int(rng.integers(0, min(kmax, n_maps[s]) + 1))
            pool = set()
            if prev is not None:
                old = prev[0][s, k, :prev[1][s, k]]
                pool = set(rng.choice(old, int(keep * len(old)), replace=False).tolist()) if len(old) else set()
            rest = [t for t in rng.permutation(n_maps[s]) if t not in pool]
            sel = sorted(list(pool)[:n] + rest[:max(0, n - len(pool))])
            idx[s, k, :len(sel)] = sel
            lens[s, k] = len(sel)
    return idx, lens


def test_plan_matches_reference(rng):
    S, G, kmax = 3, 2, 40
    n_maps, n_slots = (100, 45, 300), (40, 60, 50)
    maps = [new_maps(G, m, c) for m, c in zip(n_maps, n_slots)]
    ref_maps = [tuple(a.copy() for a in m) for m in maps]
    prev = None
    fetched = selected = 0
    for step in range(12):
        idx, lens = selections(rng, S, G, kmax, n_maps, prev)
        if step == 5:                                   # a token listed twice
            idx[0, 0, :3], lens[0, 0] = [7, 7, 9], max(3, lens[0, 0])
        slots, m_idx, m_slot, m_n = native.rowcache_plan(idx, lens, *[list(x) for x in zip(*maps)])
        want, miss = plan_ref(idx, lens, ref_maps)
        np.testing.assert_array_equal(slots, want)
        for s in range(S):
            for k in range(G):
                n = m_n[s, k]
                assert list(zip(m_idx[s, k, :n].tolist(), m_slot[s, k, :n].tolist())) == miss[s][k]
                assert (m_idx[s, k, n:] == -1).all() and (m_slot[s, k, n:] == -1).all()
                # every selected token sits in its slot, no two in one slot
                sel = idx[s, k, :lens[s, k]]
                assert (maps[s][1][k, slots[s, k, :lens[s, k]]] == sel).all()
                assert len(set(slots[s, k, :lens[s, k]].tolist())) == len(set(sel.tolist()))
        for a, b in zip(maps, ref_maps):
            for x, y in zip(a, b):
                np.testing.assert_array_equal(x, y)
        if step:
            fetched += int(m_n.sum())
            selected += int(lens.sum())
        prev = idx, lens
    assert fetched < 0.6 * selected          # ~70% of each selection was selected the step before


def test_plan_consecutive_steps_fetch_only_new_rows():
    G, n_map = 1, 64
    maps = [new_maps(G, n_map, 12)]
    a = np.array([[[0, 1, 2, 10, 11, 12, 13, 14]]], np.int64)
    b = np.array([[[0, 1, 2, 11, 12, 13, 14, 15]]], np.int64)
    lens = np.array([[8]], np.int32)
    *_, m_n = native.rowcache_plan(a, lens, *[list(x) for x in zip(*maps)])
    assert m_n[0, 0] == 8
    _, m_idx, _, m_n = native.rowcache_plan(b, lens, *[list(x) for x in zip(*maps)])
    assert m_n[0, 0] == 1 and m_idx[0, 0, 0] == 15
    # token 10 (not selected by b) is still held while slots remain: selecting it again is a hit
    *_, m_n = native.rowcache_plan(a, lens, *[list(x) for x in zip(*maps)])
    assert m_n[0, 0] == 0


def test_plan_refuses_bad_input_before_changing_maps():
    maps = [new_maps(2, 16, 4)]
    before = [m.copy() for m in maps[0]]
    idx = np.array([[[1, 2, -1], [3, 16, -1]]], np.int64)         # 16: outside the map
    lens = np.array([[2, 2]], np.int32)
    with pytest.raises(NativeError, match="index"):
        native.rowcache_plan(idx, lens, *[list(x) for x in zip(*maps)])
    idx[0, 1, 1] = 4
    with pytest.raises(NativeError, match="index"):                # 5 rows > 4 slots
        native.rowcache_plan(np.array([[[1, 2, 3, 4, 5]] * 2]), np.array([[5, 1]], np.int32),
                             *[list(x) for x in zip(*maps)])
    for x, y in zip(maps[0], before):
        np.testing.assert_array_equal(x, y)
    ro = [m.copy() for m in maps[0]]
    ro[0].flags.writeable = False
    with pytest.raises(NativeError, match="writable"):
        native.rowcache_plan(idx, lens, [ro[0]], [ro[1]], [ro[2]])
    # maps that disagree (corrupted) count as absent: still memory safe and correct
    slot_of, token_at, hand = new_maps(1, 16, 4)
    slot_of[0, 5], token_at[0, 1] = 3, 9
    slots, *_ = native.rowcache_plan(np.array([[[5, 9]]]), np.array([[2]], np.int32),
                                     [slot_of], [token_at], [hand])
    assert (token_at[0, slots[0, 0]] == [5, 9]).all()


def test_row_cache_grows_and_truncates():
    c = RowCache(CUDABackend(xp=np, loader=ShimModule), 2, 8, np.float16)
    c.reserve(10, 1.5, 40)
    assert c.n_slots == cache_slots(10, 1.5) == 15 and c.slot_of.shape == (2, 40)
    c.k[:] = 1
    c.token_at[:, :3] = [5, 30, 31]
    c.slot_of[:, [5, 30, 31]] = [0, 1, 2]
    c.reserve(12, 1.5, 100)
    assert c.n_slots == 18 and (c.k[:, :15] == 1).all() and c.slot_of.shape == (2, 100)
    assert (c.token_at[:, :3] == [5, 30, 31]).all() and (c.token_at[:, 3:] == -1).all()
    c.truncate(30)
    assert (c.token_at[:, :3] == [5, -1, -1]).all() and (c.slot_of[:, 30:] == -1).all()
    assert c.slot_of[0, 5] == 0 and c.nbytes() == 2 * 2 * 18 * 8 * 2


@pytest.fixture(scope="module")
def B():
    return CUDABackend(xp=np, loader=ShimModule, select_block=64, sparse="gpu")


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_cached_sparse_attention_equals_gather(B, rng, dtype):
    """Steps of changing selections (most tokens selected again, sequences of different
    lengths, an empty selection, a truncation): attention through the row caches equals the
    gather path bit for bit (the slot lists keep the selection's order), and fetches fewer
    rows."""
    S, G, g, d, kmax = 3, 2, 2, 24, 30
    caps = (64, 31, 90)
    keys = [rng.standard_normal((G, c, d)).astype(dtype) for c in caps]
    vals = [rng.standard_normal((G, c, d)).astype(dtype) for c in caps]
    seqs = [("equals-gather", np.dtype(dtype).name, i) for i in range(len(caps))]
    plain = CUDABackend(xp=np, loader=ShimModule, row_cache=0, sparse="gpu")
    B.fetch_stats.update(selected=0, fetched=0)
    prev = None
    for step in range(12):
        idx, lens = selections(rng, S, G, kmax, caps, prev, keep=0.8)
        if step == 3:
            lens[1, 0], idx[1, 0] = 0, -1
            for s in seqs:
                B.forget_rows(s, 20)                     # positions >= 20 rewritten
            for a in (*keys, *vals):
                a[:, 20:] = rng.standard_normal(a[:, 20:].shape)
        q = rng.standard_normal((S, G, g, d)).astype(np.float32)
        got = B.sparse_attention(q, keys, vals, idx, lens, 0.3, seqs=seqs, layer=0)
        want = plain.sparse_attention(q, keys, vals, idx, lens, 0.3)
        np.testing.assert_array_equal(got, want)
        assert (got[1, 0] == 0).all() or lens[1, 0]
        prev = idx, lens
    st = B.fetch_stats
    assert st["selected"] == plain.fetch_stats["selected"] == plain.fetch_stats["fetched"]
    assert st["fetched"] < 0.6 * st["selected"]


def test_row_cache_kernels_flag_bad_slots(B, rng):
    """The kernels check the slots they are given: a corrupted map is skipped on the device
    and reported at the next call, not read out of bounds."""
    G, d = 1, 8
    keys = [rng.standard_normal((G, 20, d)).astype(np.float32)]
    idx, lens = np.array([[[1, 2, 3]]]), np.array([[3]], np.int32)
    q = rng.standard_normal((1, G, 1, d)).astype(np.float32)
    B.sparse_attention(q, keys, keys, idx, lens, 1.0, seqs=["bad-slots"], layer=0)
    c = B._row_caches["bad-slots"][0]
    slots = np.array([[c.slot_of[0, 1], 99, c.slot_of[0, 3]]], np.int32)   # 99 >= 5 slots
    B._decode_table(q.reshape(1, 1, d), np.array([[B._ptr(c.k), B._ptr(c.v)]], np.uint64),
                    np.zeros((1, 2), np.int64), np.array([[0, 3]], np.int32), 1, "kf32_vf32", 1.0,
                    rows=(slots, np.array([c.n_slots], np.int32)))
    with pytest.raises(RuntimeError, match="row cache: kernel error flags 1"):
        B.sparse_attention(q, keys, keys, idx, lens, 1.0, seqs=["bad-slots"], layer=0)
    B.sparse_attention(q, keys, keys, idx, lens, 1.0, seqs=["bad-slots"], layer=0)   # flags cleared
    with pytest.raises(ValueError, match="one per sequence"):
        B.sparse_attention(np.concatenate([q, q]), keys * 2, keys * 2, np.concatenate([idx, idx]),
                           np.concatenate([lens, lens]), 1.0, seqs=["bad-slots"] * 2, layer=0)


def test_fetch_chunks():
    from a2ats_lite.backend.cuda.sparse import fetch_chunks
    rows = np.array([0, 5, 5, 0, 10, 0, 0, 20, 0])
    assert fetch_chunks(rows, 1, 1) == [(0, 9)]
    got = fetch_chunks(rows, 4, 1)
    assert got[0][0] <= 1 and got[-1][1] >= 8 and len(got) <= 4
    assert sum(rows[a:b].sum() for a, b in got) == 40                      # each row once
    assert all(b == c for (_, b), (c, _) in zip(got, got[1:]))             # contiguous
    assert fetch_chunks(rows, 4, 30) == [(0, 9)]                           # too few rows to cut
    assert fetch_chunks(np.zeros(4, int), 4, 1) == []


@pytest.mark.parametrize("row_cache", [0, 1.5])
def test_chunked_fetch_equals_one_chunk(rng, row_cache):
    """Rows gathered and copied up in several chunks (staging buffers in turn) give the
    one-chunk result bit for bit, with and without the row cache."""
    S, G, g, d, kmax = 4, 2, 2, 16, 24
    caps = (50, 30, 60, 41)
    keys = [rng.standard_normal((G, c, d)).astype(np.float16) for c in caps]
    vals = [rng.standard_normal((G, c, d)).astype(np.float16) for c in caps]
    one = CUDABackend(xp=np, loader=ShimModule, row_cache=row_cache, sparse="gpu")
    many = CUDABackend(xp=np, loader=ShimModule, row_cache=row_cache, fetch_chunks=5, chunk_rows=1,
                       sparse="gpu")
    seqs = list(range(len(caps)))
    prev = None
    for _ in range(3):
        idx, lens = selections(rng, S, G, kmax, caps, prev)
        q = rng.standard_normal((S, G, g, d)).astype(np.float32)
        a = one.sparse_attention(q, keys, vals, idx, lens, 0.25, seqs=seqs, layer=0)
        b = many.sparse_attention(q, keys, vals, idx, lens, 0.25, seqs=seqs, layer=0)
        np.testing.assert_array_equal(a, b)
        prev = idx, lens


def test_backend_owns_row_caches(rng):
    """The backend's row caches: one per (sequence, layer), made on first use, counted by
    held_bytes (at first use exactly estimate_held_bytes of the step's selection), past a
    position forgotten by forget_rows (slots kept), freed by release; the CPU backend holds
    nothing."""
    from a2ats_lite.backend.cpu import CPUBackend
    S, G, g, d, kmax = 2, 2, 2, 8, 12
    caps = (30, 40)
    keys = [rng.standard_normal((G, c, d)).astype(np.float16) for c in caps]
    B = CUDABackend(xp=np, loader=ShimModule, sparse="gpu")
    idx, lens = selections(rng, S, G, kmax, caps)
    q = rng.standard_normal((S, G, g, d)).astype(np.float32)
    assert B.held_bytes() == 0
    for layer in (3, 5):
        B.sparse_attention(q, keys, keys, idx, lens, 0.5, seqs=["a", "b"], layer=layer)
    assert sorted(B._row_caches) == ["a", "b"] and sorted(B._row_caches["a"]) == [3, 5]
    for i, s in enumerate("ab"):
        one = B.estimate_held_bytes([(G, d, int(lens[i].max()))], np.float16)
        assert B.held_bytes(s) == 2 * one == sum(c.nbytes() for c in B._row_caches[s].values())
    total = B.held_bytes()
    assert total == B.held_bytes("a") + B.held_bytes("b") > 0
    B.forget_rows("a", 10)
    for c in B._row_caches["a"].values():
        held = c.token_at[c.token_at >= 0]
        assert (held < 10).all() and (c.slot_of[:, 10:] == -1).all()
    assert B.held_bytes() == total
    held_a = B.held_bytes("a")
    B.release("a")
    assert "a" not in B._row_caches and B.held_bytes("a") == 0
    assert B.held_bytes() == B.held_bytes("b") == total - held_a
    B.release("b")
    assert B.held_bytes() == 0 and B._row_caches == {}
    cpu = CPUBackend()
    assert not cpu.caps.row_cache and cpu.held_bytes() == 0
    cpu.forget_rows("a", 0)
    cpu.release("a")
    assert cpu.estimate_held_bytes([(G, d, 100)], np.float16) == 0


def test_kv_caches_sharing_a_backend_keep_their_own_rows(rng):
    """Two KV caches on one backend number their sequences alike (both hold sequence 0): the
    backend keeps their row caches apart (a second cache attends exactly as it would alone),
    remove_sequence releases only its own, and a cache dropped unclosed releases the rest."""
    import gc

    from kvutil import append, attend

    from a2ats_lite.config import AttnLayer
    from a2ats_lite.kv import make_kv_cache
    from a2ats_lite.rope import Rope
    H, G, d, T, n0 = 4, 2, 16, 40, 24
    layers = [AttnLayer(0, H, G, d, d ** -0.5, None, Rope(head_dim=d, base=10000.0, pairing="half"))]

    def data():
        return [rng.standard_normal((T, h, d)).astype(np.float32) for h in (H, G, G)]

    def decode(kv, seq, qkv, t):
        q, k, v = qkv
        pos = np.arange(t, t + 1) if t >= n0 else np.arange(0, n0)
        append(kv, 0, seq, k[pos], v[pos], pos)
        out = attend(kv, 0, seq, q[pos], pos)
        kv.advance(seq, len(pos))
        return out

    def make(B):
        return make_kv_cache("oracle", layers, T, backend=B, budget=3, sinks=2, window=4)

    shared = CUDABackend(xp=np, loader=ShimModule, sparse="gpu")
    kv1, kv2 = make(shared), make(shared)
    alone = make(CUDABackend(xp=np, loader=ShimModule, sparse="gpu"))
    a, b = data(), data()
    s1, s2, s3 = kv1.add_sequence(), kv2.add_sequence(), alone.add_sequence()
    assert s1 == s2 == s3 == 0
    for t in [0] + list(range(n0, T)):
        decode(kv1, s1, a, t)
        np.testing.assert_array_equal(decode(kv2, s2, b, t), decode(alone, s3, b, t))
    one, two = kv1._row_bytes(s1), kv2._row_bytes(s2)
    assert one > 0 and two > 0 and shared.held_bytes() == one + two
    assert kv1.nbytes(s1) == kv1.storage.nbytes(s1) + kv1.policy.nbytes(s1) + one
    kv1.remove_sequence(s1)
    assert shared.held_bytes() == two and kv1._row_bytes(None) == 0
    del kv2
    gc.collect()
    assert shared.held_bytes() == 0


@pytest.mark.parametrize("faster", ["gpu", "host"], ids=["gpu-path-faster", "host-path-faster"])
def test_auto_path_chosen_by_measurement(rng, monkeypatch, faster):
    """sparse="auto": one untimed GPU-path call per kind of call, 3 timed calls of each path,
    then the faster one (a fake clock makes the host's native attention or the GPU path's
    gather the slow part); every call's output is the attention over the selection."""
    S, G, g, d, kmax = 2, 2, 2, 16, 20
    caps = (40, 33)
    keys = [rng.standard_normal((G, c, d)).astype(np.float16) for c in caps]
    vals = [rng.standard_normal((G, c, d)).astype(np.float16) for c in caps]
    B = CUDABackend(xp=np, loader=ShimModule)
    assert B.sparse == "auto" and B.row_cache == 1.5
    now = [0.0]
    B._clock = lambda: now[0]
    slow = native.sparse_attention if faster == "gpu" else native.gather_sel

    def slowed(*a, **k):
        now[0] += 1.0
        return slow(*a, **k)
    monkeypatch.setattr(native, slow.__name__, slowed)
    used = []
    for name in ("_sparse_cached",):
        orig = getattr(B, name)
        monkeypatch.setattr(B, name, lambda *a, _o=orig, **k: used.append("gpu") or _o(*a, **k))
    ref_backend = CUDABackend(xp=np, loader=ShimModule, sparse="host")
    idx, lens = selections(rng, S, G, kmax, caps)
    lens[:] = np.maximum(lens, 1)
    for step in range(9):                   # every step selects 3 new rows per entry
        for i in range(S):
            for k in range(G):
                idx[i, k, :lens[i, k]] = (np.arange(lens[i, k]) + 3 * step) % caps[i]
        q = rng.standard_normal((S, G, g, d)).astype(np.float32)
        out = B.sparse_attention(q, keys, vals, idx, lens, 0.3, seqs=[0, 1], layer=0)
        np.testing.assert_allclose(out, ref_backend.sparse_attention(q, keys, vals, idx, lens, 0.3),
                                   atol=2e-5)
    key = B.chooser.key(S, lens)
    assert B.chooser.choice == {key: faster}
    assert len(B.chooser.times[key]["gpu"]) == len(B.chooser.times[key]["host"]) == 3
    assert used.count("gpu") == 4 + (2 if faster == "gpu" else 0)


@pytest.mark.gpu
def test_row_cache_on_gpu_matches_host(rng):
    """On a GPU (pytest -m gpu): the row caches, the chunked fetch on the copy stream from
    pinned staging, put_rows and the indexed attention at a decode-sized step, against the
    CPU's native attention over the same selections, step after step; and the auto path."""
    from a2ats_lite.backend.cpu import CPUBackend
    S, G, g, d, kmax = 4, 8, 4, 128, 1200
    caps = (32768, 9000, 20000, 4096)
    keys = [rng.standard_normal((G, c, d)).astype(np.float16) for c in caps]
    vals = [rng.standard_normal((G, c, d)).astype(np.float16) for c in caps]
    ref = CPUBackend()
    for opts in (dict(sparse="gpu", row_cache=1.5, fetch_chunks=4, chunk_rows=256),
                 dict(sparse="gpu", row_cache=0, fetch_chunks=3, chunk_rows=256),
                 dict(sparse="auto")):
        B = CUDABackend(**opts)
        prev = None
        for _ in range(12):
            idx, lens = selections(rng, S, G, kmax, caps, prev, keep=0.7)
            q = rng.standard_normal((S, G, g, d)).astype(np.float32)
            got = B.to_host(B.sparse_attention(q, keys, vals, idx, lens, 0.09, seqs=list(range(S)),
                                               layer=0))
            np.testing.assert_allclose(got, ref.sparse_attention(q, keys, vals, idx, lens, 0.09),
                                       atol=2e-5, err_msg=str(opts))
            prev = idx, lens
        B._check_row_err()
        if B.row_cache and B.sparse == "gpu":
            assert B.fetch_stats["fetched"] < 0.5 * B.fetch_stats["selected"]
