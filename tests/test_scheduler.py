"""The scheduler and its KV manager on fakes: admission order, KV budgets, prefill chunking,
prefix reuse and eviction, and the engine's step on a fake model (no weights, no numerics)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from a2ats_lite.engine import Engine
from a2ats_lite.engine.kv_manager import KVManager
from a2ats_lite.engine.scheduler import Scheduler
from a2ats_lite.engine.sequence import Status, make_request
from a2ats_lite.errors import CapacityError, ContextOverflowError, EmptyPromptError, TokenizerError
from a2ats_lite.sampling import SamplingParams

PER_TOKEN = 100          # the fake cache's bytes per token


class FakeKV:
    """What KVManager and the engine use of a KVCache: lengths and bytes, no arrays."""

    def __init__(self, n_ctx=1024, name="dense"):
        self.n_ctx, self.name, self.selects, self.device_memory = n_ctx, name, name != "dense", False
        self.lengths, self.budgets, self._next, self.removed = {}, {}, 0, []

    def estimate_bytes(self, n_tokens):
        return PER_TOKEN * n_tokens

    def budget_bytes(self, seq):
        return PER_TOKEN * self.lengths[seq]

    def add_sequence(self):
        self._next += 1
        self.lengths[self._next] = 0
        return self._next

    def remove_sequence(self, seq):
        self.removed.append(seq)
        del self.lengths[seq]

    def length(self, seq):
        return self.lengths[seq]

    def can_truncate(self, seq, n):
        return 0 <= n <= self.lengths[seq]

    def truncate(self, seq, n):
        self.lengths[seq] = n

    def set_budget(self, seq, budget):
        self.budgets[seq] = budget

    def nbytes(self):
        return sum(self.budget_bytes(s) for s in self.lengths)


def req(rid, n_prompt, max_tokens=4, first=0):
    p = SamplingParams(max_tokens=max_tokens, temperature=0)
    return make_request(rid, list(range(first, first + n_prompt)), p, 1000, (), 0.0)


def run_plan(plan):
    """What the engine does after a step, minus sampling: prefill advances, decode stays."""
    for r, n in plan:
        if r.status is Status.PREFILL:
            r.n_computed += n
            if r.prefill_left == 0:
                r.status = Status.DECODE


def test_decode_rows_first_then_prefill_chunks_then_admission_in_order():
    kv = FakeKV()
    s = Scheduler(max_seqs=3, max_step_tokens=10, kv=KVManager(kv))
    a, b, c, d = req(0, 4), req(1, 15), req(2, 3), req(3, 2)
    for r in (a, b, c, d):
        s.add(r)
    plan = s.schedule()
    # a's whole prompt (4), then b's first chunk (6); c waits: no rows left this step
    assert [(r.rid, n) for r, n in plan] == [(0, 4), (1, 6)]
    run_plan(plan)
    plan = s.schedule()
    # a decodes one row, b's next chunk takes 9 more rows (9 of its 9 left), c admitted? no room
    assert [(r.rid, n) for r, n in plan] == [(0, 1), (1, 9)]
    run_plan(plan)
    plan = s.schedule()
    # both decode, then c (the head of the queue) is admitted; d must wait: max_seqs = 3
    assert [(r.rid, n) for r, n in plan] == [(0, 1), (1, 1), (2, 3)]
    assert [r.rid for r in s.waiting] == [3] and len(s.running) == 3
    s.finish(a)
    assert [(r.rid, n) for r, n in s.schedule()][-1] == (3, 2)


def test_kv_budget_admits_fcfs_and_never_overtakes():
    kv = FakeKV()
    km = KVManager(kv, budget=PER_TOKEN * 30, cache_seqs=0)
    s = Scheduler(max_seqs=8, max_step_tokens=100, kv=km)
    big, small = req(0, 20, max_tokens=8), req(1, 2, max_tokens=2)   # 28 and 4 tokens
    first = req(2, 4, max_tokens=2)                                     # 6 tokens
    for r in (first, big, small):
        s.add(r)
    plan = s.schedule()
    # first (6) is admitted; big (28) does not fit beside it; small (4) would, but must not
    # overtake the head of the queue
    assert [r.rid for r, _ in plan] == [2]
    assert km.reserved == {first.seq: 6 * PER_TOKEN}
    s.finish(first)                                   # cache_seqs=0: freed at once
    assert kv.removed == [first.seq] and km.reserved == {}
    assert [r.rid for r, _ in s.schedule()] == [0]     # big now; small (28 + 4 > 30) waits


def test_kv_budget_counts_reservations_exactly():
    kv = FakeKV()
    km = KVManager(kv, budget=PER_TOKEN * 31, cache_seqs=0)
    s = Scheduler(max_seqs=8, max_step_tokens=100, kv=km)
    a, b = req(0, 20, max_tokens=8), req(1, 2, max_tokens=2)          # 28 + 4 = 32 > 31
    s.add(a)
    s.add(b)
    assert [r.rid for r, _ in s.schedule()] == [0]
    assert not km.can_admit(b.prompt, b.params)
    km.budget = PER_TOKEN * 32
    assert km.can_admit(b.prompt, b.params)


def test_check_refuses_what_can_never_fit_and_foreign_policies():
    km = KVManager(FakeKV(), budget=PER_TOKEN * 10)
    with pytest.raises(CapacityError, match="lower the context size"):
        km.check(list(range(8)), SamplingParams(max_tokens=4))
    km.check(list(range(6)), SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="may ask for kv 'dense', not 'a2ats'"):
        km.check([1], SamplingParams(kv="a2ats"))
    with pytest.raises(ValueError, match="budget applies to a retrieval"):
        km.check([1], SamplingParams(budget=0.5))


def test_retrieval_budget_per_request_reaches_the_cache():
    kv = FakeKV(name="a2ats")
    km = KVManager(kv)
    km.check([1, 2], SamplingParams(kv="dense"))
    seq, _ = km.admit([1, 2], SamplingParams(budget=0.25))
    assert kv.budgets[seq] == 0.25
    seq, _ = km.admit([1, 2], SamplingParams(kv="dense"))
    assert kv.budgets[seq] == kv.n_ctx                  # dense: every position


def test_prefix_reuse_and_eviction_of_cached_prefixes():
    kv = FakeKV()
    km = KVManager(kv, budget=PER_TOKEN * 40, cache_seqs=2)
    p = SamplingParams(max_tokens=2)
    s1, n = km.admit(list(range(10)), p)
    assert n == 0
    kv.lengths[s1] = 11                                  # prompt + one generated token ran
    km.release(s1, list(range(12)))                      # the last sampled token never ran
    assert km.cached[s1] == list(range(11)) and km.reserved == {}
    # a prompt extending it reuses its first 11 tokens; a different one does not
    s2, n = km.admit(list(range(15)), p)
    assert (s2, n) == (s1, 11) and kv.lengths[s1] == 11 and not km.cached
    kv.lengths[s2] = 16
    km.release(s2, list(range(17)))
    s3, n = km.admit([7, 7, 7], p)
    assert n == 0 and s3 != s2
    # a request that needs the cached prefix's memory evicts it (oldest first)
    assert km.can_admit(list(range(100, 130)), p)       # 5 + 32 = 37 <= 40 once evicted
    km.admit(list(range(100, 130)), p)
    assert s2 in kv.removed and not km.cached
    km.clear_cache()


def test_cache_seqs_bounds_the_cached_prefixes():
    kv = FakeKV()
    km = KVManager(kv, cache_seqs=2)
    seqs = [km.admit([i, i + 1], SamplingParams(max_tokens=1))[0] for i in range(3)]
    for s in seqs:
        kv.lengths[s] = 2
        km.release(s, [0, 1, 2])
    assert list(km.cached) == seqs[1:] and kv.removed == seqs[:1]
    km.free(seqs[1])
    assert seqs[1] in kv.removed


class FakeModel:
    """Logits that always favour token (last position + 1) % V: deterministic, cheap."""

    def __init__(self, n_vocab=50, n_batch=8):
        self.config = SimpleNamespace(n_vocab=n_vocab)
        self.n_batch = n_batch
        self.steps = []

    def step(self, batch, kv, greedy=False):
        self.steps.append(batch)
        for i, s in enumerate(batch.seq_ids):
            kv.lengths[s] += batch.n_tokens(i)
        pos = batch.positions[batch.logit_rows]
        y = np.zeros((len(pos), self.config.n_vocab), np.float32)
        y[np.arange(len(pos)), (pos + 1) % self.config.n_vocab] = 1.0
        return y


class FakeTokenizer:
    eog_ids = frozenset({49})

    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_engine_step_on_a_fake_model():
    kv, model = FakeKV(n_ctx=64), FakeModel(n_batch=8)
    eng = Engine(model, kv, FakeTokenizer(), max_seqs=2, cache_seqs=2)
    r0 = eng.add_request(list(range(10)), SamplingParams(max_tokens=3, temperature=0))
    r1 = eng.add_request([5, 6], SamplingParams(max_tokens=2, temperature=0))
    outs = {}
    while eng.has_unfinished():
        for o in eng.step():
            outs.setdefault(o.rid, []).append(o.token)
    # r0's prompt runs in chunks of 8 then 2; its tokens follow positions 9, 10, 11
    assert outs[r0] == [10, 11, 12] and outs[r1] == [2, 3]
    assert [b.n_rows for b in model.steps][:2] == [8, 2 + 2]
    assert eng.stats.requests_finished == 2 and len(eng.kv_manager.cached) == 2
    # the next request extending r1's tokens reuses them
    r2 = eng.add_request([5, 6, 2, 9], SamplingParams(max_tokens=1, temperature=0))
    eng.step()
    assert eng.stats.reused_tokens == 3 and r2 not in eng.requests
    eng.close()
    assert not kv.lengths


def test_engine_refuses_bad_prompts_with_one_type_each():
    eng = Engine(FakeModel(), FakeKV(n_ctx=16), FakeTokenizer())
    with pytest.raises(EmptyPromptError):
        eng.add_request([])
    with pytest.raises(TokenizerError, match="out of range"):
        eng.add_request([1, 50])
    with pytest.raises(TokenizerError, match="integers"):
        eng.add_request([1, 2.0])
    with pytest.raises(ContextOverflowError, match="does not fit the context size 16"):
        eng.add_request(list(range(16)))
    assert not eng.has_unfinished()
