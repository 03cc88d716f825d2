"""The Engine on the default model: continuous batching, abort, chunked prefill,
admission by KV memory, prompt-prefix reuse; and the Runtime facade's input checks."""
from dataclasses import replace

import numpy as np
import pytest

from a2ats_lite import Runtime
from a2ats_lite.engine import Engine
from a2ats_lite.errors import CapacityError, ContextOverflowError
from a2ats_lite.kv import make_kv_cache
from a2ats_lite.sampling import SamplingParams
from a2ats_lite.vq import Calibration, Codebook

PROMPTS = ["The history of the river begins in the mountains, where snow melts each spring and",
           "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "The three primary colours are red, yellow and blue. Mixing red and yellow gives",
           "Once upon a time, in a small village by the sea, there lived an old fisherman who"]


@pytest.fixture(scope="module")
def rt(default_model):
    with Runtime(default_model, n_ctx=4608, seed=0) as r:
        yield r


def random_calibration(rt, n_centroids=32, seed=0):
    """A2ATS codebooks of random centroids for every full-attention layer (selection runs;
    whether it is good does not matter for equality tests)."""
    rng = np.random.default_rng(seed)
    books = {}
    for L in rt.model.attn_layers:
        if L.window is None:
            for g in range(L.n_kv_heads):
                books[(L.index, g)] = Codebook(rng.standard_normal((n_centroids, L.head_dim)).astype(np.float32),
                                               np.eye(L.head_dim, dtype=np.float32))
    return Calibration(params={"b": 2048, "w": 8, "s": 2, "n_centroids": n_centroids},
                       fingerprint="", a2ats=books, vq=dict(books))


def engine(rt, policy="dense", spill_dir=None, **kw):
    params = {}
    if policy != "dense":
        params = dict(budget=4, sinks=2, window=8, spill_dir=spill_dir)
        if policy in ("a2ats", "vq"):
            params["calib"] = random_calibration(rt)
    kv = make_kv_cache(policy, rt.model.attn_layers, rt.n_ctx, **params)
    return Engine(rt.model, kv, rt.tokenizer, **kw)


def greedy(n):
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def drain(eng, tokens=None, per_step=None):
    """Step until idle; tokens[rid] collects sampled tokens, per_step the rids of each step."""
    tokens = {} if tokens is None else tokens
    while eng.has_unfinished():
        outs = eng.step()
        if per_step is not None:
            per_step.append({o.rid for o in outs})
        for o in outs:
            tokens.setdefault(o.rid, []).append(o.token)
    return tokens


def alone(rt, policy, ids, n, **ask):
    eng = engine(rt, policy)
    rid = eng.add_request(ids, replace(greedy(n), **ask))
    out = drain(eng)[rid]
    eng.close()
    return out


@pytest.mark.parametrize("policy", ["dense", "a2ats"])
def test_request_joining_a_running_batch_equals_running_alone(rt, policy):
    ids = [rt.tokenize(p) for p in PROMPTS]
    eng = engine(rt, policy)
    rids = [eng.add_request(x, greedy(10)) for x in ids[:3]]
    tokens = {}
    for _ in range(4):                                  # the three are mid-decode
        for o in eng.step():
            tokens.setdefault(o.rid, []).append(o.token)
    assert all(len(tokens[r]) >= 2 for r in rids)
    late = eng.add_request(ids[3], greedy(10))
    drain(eng, tokens)
    assert eng.stats.max_seqs_in_step == 4              # it joined the running batch
    for rid, x in zip(rids + [late], ids):
        assert tokens[rid] == alone(rt, policy, x, 10), rid
    eng.close()


@pytest.mark.parametrize("policy", ["dense", "a2ats"])
def test_abort_frees_the_requests_kv(rt, policy, tmp_path):
    eng = engine(rt, policy, spill_dir=tmp_path, cache_seqs=0)
    keep = eng.add_request(rt.tokenize(PROMPTS[0]), greedy(30))
    eng.step()
    before = eng.kv_bytes()
    rid = eng.add_request(rt.tokenize(PROMPTS[1]), greedy(30))
    for _ in range(3):
        eng.step()
    seq = eng.requests[rid].seq
    assert eng.kv_bytes() > before
    if policy != "dense":
        assert len(list(tmp_path.iterdir())) == 0       # spill files are unlinked at once
        assert seq in eng.kv.storage.stores
        store = eng.kv.storage.stores[seq]
    grown = eng.kv_bytes() - eng.kv.nbytes(eng.requests[keep].seq)
    assert eng.abort(rid) and not eng.abort(rid)
    assert seq not in eng.kv.lengths and seq not in eng.kv.storage.bufs
    assert eng.kv_bytes() == eng.kv.nbytes(eng.requests[keep].seq) < grown + eng.kv_bytes()
    if policy != "dense":
        assert seq not in eng.kv.storage.stores and store.data is None and store._mm is None
    assert eng.requests.keys() == {keep}
    drain(eng)
    assert eng.kv_bytes() == 0                           # cache_seqs=0: nothing kept
    eng.close()


def test_abort_of_a_waiting_request_and_kv_bytes_return(rt):
    eng = engine(rt, cache_seqs=0)
    base = eng.kv_bytes()
    rid = eng.add_request(rt.tokenize(PROMPTS[0]), greedy(5))
    eng.step()
    assert eng.kv_bytes() > base
    eng.abort(rid)
    assert eng.kv_bytes() == base and not eng.has_unfinished()


def test_long_prompt_is_chunked_and_never_stalls_running_sequences(rt):
    eng = engine(rt, max_step_tokens=512)
    running = [eng.add_request(rt.tokenize(p), greedy(40)) for p in PROMPTS[:3]]
    for _ in range(2):
        eng.step()
    text = " ".join(PROMPTS) * 80
    long_ids = rt.tokenize(text)[:4096]
    big = eng.add_request(long_ids, greedy(2))
    per_step, tokens = [], {}
    while big not in tokens:
        outs = eng.step()
        per_step.append({o.rid for o in outs})
        for o in outs:
            tokens.setdefault(o.rid, []).append(o.token)
    # 4096 prompt rows in chunks of at most 512 - 3 rows: at least 9 steps, each of which
    # gave every running sequence its token
    assert len(per_step) >= 9
    assert all(set(running) <= s for s in per_step)
    assert eng.stats.last_step["rows"] <= 512
    eng.close()


def test_admission_waits_for_kv_memory_and_refuses_what_never_fits(rt):
    ids = [rt.tokenize(p) for p in PROMPTS]
    probe = engine(rt)
    one = probe.kv_manager.need(ids[0], greedy(8))
    eng = engine(rt, kv_budget=int(2.5 * one), cache_seqs=0)
    rids = [eng.add_request(x, greedy(8)) for x in ids]
    tokens = {}
    for o in eng.step():
        tokens.setdefault(o.rid, []).append(o.token)
    assert eng.num_running == 2 and eng.num_waiting == 2       # two fit, two wait
    with pytest.raises(CapacityError, match="KV budget"):
        eng.add_request(ids[0], greedy(4000))                  # can never fit
    drain(eng, tokens)
    assert set(tokens) == set(rids)                            # the others are unaffected
    for rid, x in zip(rids, ids):
        assert tokens[rid] == alone(rt, "dense", x, 8)
    with pytest.raises(ContextOverflowError, match="4608"):
        eng.add_request([2] * 4608, greedy(1))
    eng.close()


def test_prefix_reuse_gives_the_same_tokens_without_recomputing(rt):
    first = rt.tokenize(PROMPTS[0])
    eng = engine(rt)
    r1 = eng.add_request(first, greedy(6))
    out1 = drain(eng)[r1]
    # the next "turn": the previous prompt + its reply + new text
    second = first + out1[:-1] + rt.tokenize(" And then", add_bos=False)
    rows_before = eng.stats.prompt_tokens
    r2 = eng.add_request(second, greedy(6))
    out2 = drain(eng)[r2]
    reused = eng.stats.reused_tokens
    assert reused == len(first) + len(out1) - 1                   # everything the KV held
    assert eng.stats.prompt_tokens - rows_before == len(second) - reused
    assert out2 == alone(rt, "dense", second, 6)
    # an identical prompt reuses all but its last token
    r3 = eng.add_request(second, greedy(6))
    assert drain(eng)[r3] == out2
    eng.close()


def test_runtime_facade_input_checks(default_model, rt):
    ids = rt.tokenize("Hello there")
    as_numpy = list(np.array(ids))                          # numpy ints: one prompt, not a batch
    assert isinstance(rt.generate(as_numpy, max_tokens=2, temperature=0), str)
    assert rt.generate(np.array(ids), max_tokens=2, temperature=0) == \
        rt.generate(ids, max_tokens=2, temperature=0)
    with pytest.raises(ValueError, match="integers"):
        rt.eval_logits([2.7, 3.2])
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="n_ctx"):
            Runtime(default_model, n_ctx=bad)


def test_chat_reuses_the_previous_turn(rt):
    msgs = [{"role": "user", "content": "Name a colour."}]
    reply = rt.chat(msgs, max_tokens=4, temperature=0)
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": "Another one?"}]
    rt.chat(msgs, max_tokens=4, temperature=0)
    assert rt.timings.reused_tokens > 5


def test_per_request_kv_policy_and_budget(rt):
    """One a2ats engine serves a request asking kv 'dense' (every position), one with a
    whole-context budget, and one with the engine's budget, all in the same steps: each
    gives the tokens of the same request alone (the first two: of the request alone with
    every position selected), and the selections show it; requests the engine cannot
    serve are refused at once. (Exact attention over the host store is not bit-identical
    to a dense engine's: prefill chunks of retrieval layers attend as one block.)"""
    ids = [rt.tokenize(p) for p in PROMPTS[:3]]
    eng = engine(rt, "a2ats")
    sel = {}

    class Lens:
        def on_select(self, layer, seq, pos, q_rot, s):
            sel.setdefault(seq, []).append((pos, min(len(x) for x in s), max(len(x) for x in s)))
    eng.kv.observers.append(Lens())
    asks = [dict(kv="dense"), dict(budget=rt.n_ctx), {}]
    rids = [eng.add_request(x, replace(greedy(8), **a)) for x, a in zip(ids, asks)]
    tokens = drain(eng)
    assert eng.stats.max_seqs_in_step == 3
    for rid, x in zip(rids[:2], ids):
        assert tokens[rid] == alone(rt, "a2ats", x, 8, kv="dense")
    assert tokens[rids[2]] == alone(rt, "a2ats", ids[2], 8)
    seqs = sorted(sel)            # admission order
    for s in seqs[:2]:            # every position, at every step and layer
        assert all(lo == pos + 1 for pos, lo, _ in sel[s])
    assert any(hi < pos + 1 for pos, _, hi in sel[seqs[2]])     # the engine budget selects
    with pytest.raises(ValueError, match="may ask for kv 'a2ats' or 'dense', not 'quest'"):
        eng.add_request(ids[0], replace(greedy(2), kv="quest"))
    with pytest.raises(ValueError, match="budget must be"):
        eng.add_request(ids[0], replace(greedy(2), budget=2.5))
    eng.close()
    dense = engine(rt, "dense")
    with pytest.raises(ValueError, match="budget applies to a retrieval KV policy"):
        dense.add_request(ids[0], replace(greedy(2), budget=0.1))
    dense.close()
