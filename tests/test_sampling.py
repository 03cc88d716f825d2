"""Sampler chain against direct float64 references on fresh random logits, seeding,
the empirical draw distribution, and the streaming stop-string matcher."""
import math
from collections import Counter

import numpy as np
import pytest

from a2ats_lite.errors import A2ATSError
from a2ats_lite.sampling import (Sampler, SamplingError, SamplingParams, StopMatcher,
                                 apply_penalties, min_p, sample_batch, softmax, top_k, top_p,
                                 typical)

OFF = dict(top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0)  # every filter disabled


def _logits(rng, n, scale=2.0):
    return (rng.standard_normal(n) * scale).astype(np.float32)


def _ref_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.array([math.exp(v - x.max()) for v in x])
    return e / e.sum()


# -- single stages vs float64 references ---------------------------------------------

def test_penalties_formula():
    rng = np.random.default_rng(1)
    n = 500
    x = _logits(rng, n)
    hist = list(rng.integers(0, 60, 200))        # many repeats, positive and negative logits
    r, fp, pp, last_n = 1.3, 0.2, 0.5, 64
    out = apply_penalties(x, hist, r, last_n, fp, pp)
    ref = x.astype(np.float64).copy()
    for t, c in Counter(int(t) for t in hist[-last_n:]).items():
        v = float(x[t])
        v = v / r if v > 0 else v * r
        ref[t] = v - (c * fp + pp)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    assert (out != x).sum() == len(set(hist[-last_n:]))       # only the window is touched
    assert np.all(out[list(set(hist[-last_n:]))] < x[list(set(hist[-last_n:]))])
    # last_n = -1: the whole history; 0 or neutral values: unchanged (same object, no copy)
    full = apply_penalties(x, hist, r, -1, 0.0, 0.0)
    assert (full != x).sum() == len(set(hist))
    assert apply_penalties(x, hist, r, 0, fp, pp) is x
    assert apply_penalties(x, hist, 1.0, 64, 0.0, 0.0) is x
    with pytest.raises(SamplingError):
        apply_penalties(x, [n], r, 64, 0.0, 0.0)


@pytest.mark.parametrize("n,k", [(1000, 1), (1000, 40), (50, 49), (50, 50), (50, 0)])
def test_top_k(n, k):
    rng = np.random.default_rng(n + k)
    x = _logits(rng, n)
    ids, v = top_k(None, x, k)
    ids = np.arange(n) if ids is None else ids
    want = n if k <= 0 or k >= n else k
    ref = np.argsort(-x.astype(np.float64))[:want]
    assert set(ids.tolist()) == set(ref.tolist())
    np.testing.assert_array_equal(v, x[ids])
    if 0 < k < n:
        assert np.all(np.diff(v) <= 0)           # sorted descending, like llama.cpp


@pytest.mark.parametrize("n,p,scale", [(1000, 0.9, 2.0), (5000, 0.95, 0.5), (5000, 0.5, 4.0),
                                       (300000, 0.95, 3.0), (200, 0.999999, 1.0)])
def test_top_p_minimal_prefix(n, p, scale):
    rng = np.random.default_rng(int(p * 100) + n)
    x = _logits(rng, n, scale)
    ids, v = top_p(np.arange(n), x, p)
    probs = softmax(x) if n > 10000 else _ref_softmax(x)
    order = np.argsort(-probs, kind="stable")
    cum = np.cumsum(probs[order])
    m = int(np.argmax(cum >= p)) + 1 if cum[-1] >= p else n
    assert set(ids.tolist()) == set(order[:m].tolist())
    kept = probs[ids].sum()
    assert kept >= p or m == n                          # enough mass ...
    assert kept - probs[ids].min() < p                  # ... and minimal
    np.testing.assert_array_equal(v, x[ids])


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_min_p(p):
    rng = np.random.default_rng(int(p * 100))
    x = _logits(rng, 2000, 2.0)
    ids, v = min_p(None, x, p)
    probs = _ref_softmax(x)
    ref = np.flatnonzero(probs >= p * probs.max())
    assert sorted(ids.tolist()) == ref.tolist()
    np.testing.assert_array_equal(v, x[ids])


def _ref_typical(x, p):
    probs = _ref_softmax(x)
    ent = -sum(q * math.log(q) for q in probs if q > 0)
    order = sorted(range(len(x)), key=lambda i: abs(-math.log(probs[i]) - ent))
    cum, kept = 0.0, []
    for i in order:
        cum += probs[i]
        kept.append(i)
        if cum > p:
            break
    return kept


@pytest.mark.parametrize("p", [0.2, 0.6, 0.95])
def test_typical(p):
    rng = np.random.default_rng(int(p * 100) + 7)
    x = _logits(rng, 300, 2.0)
    ids, v = typical(None, x, p)
    assert ids.tolist() == _ref_typical(x, p)
    np.testing.assert_array_equal(v, x[ids])


@pytest.mark.parametrize("temp", [0.3, 1.0, 1.7])
def test_temperature_scales_the_distribution(temp):
    rng = np.random.default_rng(int(temp * 10))
    x = _logits(rng, 400)
    ids, probs = Sampler(SamplingParams(temperature=temp, **OFF), 400).probs(x)
    np.testing.assert_array_equal(ids, np.arange(400))
    np.testing.assert_allclose(probs, _ref_softmax(x.astype(np.float64) / temp), rtol=1e-9)


def test_chain_order_matches_reference():
    """penalties -> top_k -> typical -> top_p -> min_p -> temperature, each stage
    renormalizing over the survivors of the previous one."""
    rng = np.random.default_rng(11)
    n = 3000
    x = _logits(rng, n, 2.0)
    hist = list(rng.integers(0, n, 100)) + [int(np.argmax(x))] * 3
    prm = SamplingParams(temperature=0.7, top_k=200, typical_p=0.9, top_p=0.8, min_p=0.1,
                         repeat_penalty=1.5, frequency_penalty=0.1, presence_penalty=0.2)
    ids, probs = Sampler(prm, n).probs(x, hist)

    y = x.astype(np.float64)
    for t, c in Counter(hist[-64:]).items():
        y[t] = (y[t] / 1.5 if y[t] > 0 else y[t] * 1.5) - (c * 0.1 + 0.2)
    sizes = [n]
    cand = list(np.argsort(-y, kind="stable")[:200])                       # top_k
    sizes.append(len(cand))
    cand = [cand[i] for i in _ref_typical(y[cand], 0.9)]                   # typical
    sizes.append(len(cand))
    q = _ref_softmax(y[cand])                                              # top_p
    order = np.argsort(-q, kind="stable")
    m = int(np.argmax(np.cumsum(q[order]) >= 0.8)) + 1
    cand = [cand[i] for i in order[:m]]
    sizes.append(len(cand))
    q = _ref_softmax(y[cand])                                              # min_p
    cand = [c for c, qi in zip(cand, q) if qi >= 0.1 * q.max()]
    sizes.append(len(cand))
    ref = dict(zip(cand, _ref_softmax(y[cand] / 0.7)))                      # temperature
    assert all(a > b for a, b in zip(sizes, sizes[1:])) and sizes[-1] > 1, sizes  # all bite
    assert sorted(ids.tolist()) == sorted(ref)
    np.testing.assert_allclose(probs, [ref[i] for i in ids.tolist()], rtol=1e-6)


def test_boundaries_on_exact_ties():
    """Uniform logits give exact cumulative sums: top_p stops at cum >= p, typical at
    cum > p (llama.cpp's comparisons), min_p keeps p_i == min_p * p_max."""
    x = np.zeros(8, np.float32)
    assert len(top_p(None, x, 0.5)[0]) == 4
    assert len(typical(None, x, 0.5)[0]) == 5
    assert len(min_p(None, x, 1.0)[0]) == 8
    assert len(top_p(None, x, 0.51)[0]) == 5


# -- sampling ---------------------------------------------------------------------------

def test_greedy_is_argmax():
    rng = np.random.default_rng(3)
    for _ in range(5):
        x = _logits(rng, 5000)
        assert Sampler(SamplingParams(temperature=0.0), 5000).sample(x) == int(np.argmax(x))
        assert Sampler(SamplingParams(temperature=0.0, top_k=0), 5000).sample(x) \
            == int(np.argmax(x))
    # penalties apply before the argmax: the repeated best token loses to the runner-up
    x = np.zeros(10, np.float32)
    x[3], x[7] = 2.0, 1.9
    s = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.2), 10)
    assert s.sample(x, []) == 3 and s.sample(x, [3]) == 7
    # with typical_p the argmax of the survivors (which may exclude the overall argmax)
    x = _logits(rng, 300)
    s = Sampler(SamplingParams(temperature=0.0, top_k=0, typical_p=0.3), 300)
    kept = _ref_typical(x, 0.3)
    assert s.sample(x) == max(kept, key=lambda i: x[i])
    ids, probs = s.probs(x)
    assert ids.tolist() == [max(kept, key=lambda i: x[i])] and probs.tolist() == [1.0]


def test_seeding():
    rng = np.random.default_rng(4)
    xs = [_logits(rng, 2000, 0.5) for _ in range(30)]

    def run(seed):
        s = Sampler(SamplingParams(seed=seed, top_k=0, min_p=0.0), 2000)
        return [s.sample(x) for x in xs]

    assert run(123) == run(123)
    assert run(123) != run(124)
    assert run(None) != run(None)     # fresh OS entropy (1 in ~1e80 to collide)


def test_empirical_distribution_matches_softmax():
    rng = np.random.default_rng(5)
    n, draws, temp = 20, 40000, 0.7
    x = _logits(rng, n, 1.0)
    s = Sampler(SamplingParams(temperature=temp, seed=99, **OFF), n)
    counts = np.bincount([s.sample(x) for _ in range(draws)], minlength=n)
    expected = _ref_softmax(x.astype(np.float64) / temp) * draws
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 50.0                # df = 19: P(chi2 > 50) ~ 1e-4 for a correct sampler
    # a wrong temperature is clearly rejected by the same statistic
    wrong = _ref_softmax(x.astype(np.float64)) * draws
    assert float(((counts - wrong) ** 2 / wrong).sum()) > 200.0


def test_draws_stay_in_the_filtered_set_with_the_right_mass():
    rng = np.random.default_rng(6)
    n = 1000
    x = _logits(rng, n, 1.5)
    s = Sampler(SamplingParams(seed=7), n)              # llama.cpp defaults
    ids, probs = s.probs(x)
    draws = np.array([s.sample(x) for _ in range(20000)])
    assert set(draws.tolist()) <= set(ids.tolist())
    freq = np.array([(draws == i).mean() for i in ids])
    assert np.abs(freq - probs).max() < 0.02


def test_ignore_eos_bans_eog_tokens():
    x = np.zeros(50, np.float32)
    x[1] = 10.0                                          # EOS is by far the most likely
    s = Sampler(SamplingParams(ignore_eos=True, seed=0, temperature=1.0), 50, eog_ids=[1])
    assert all(s.sample(x) != 1 for _ in range(200))
    assert Sampler(SamplingParams(ignore_eos=True, temperature=0), 50, eog_ids=[1]).sample(x) != 1
    assert Sampler(SamplingParams(temperature=0), 50, eog_ids=[1]).sample(x) == 1
    # the caller's logits are never modified (banning and penalties work on copies)
    before = x.copy()
    Sampler(SamplingParams(ignore_eos=True, repeat_penalty=2.0), 50, eog_ids=[1]).sample(x, [1, 2])
    np.testing.assert_array_equal(x, before)
    with pytest.raises(SamplingError, match="eog_ids"):
        Sampler(SamplingParams(ignore_eos=True), 50, eog_ids=[50])


def test_sample_batch_equals_individual_samplers():
    rng = np.random.default_rng(8)
    logits = np.stack([_logits(rng, 700, 0.7) for _ in range(4)])
    hists = [list(rng.integers(0, 700, 10)) for _ in range(4)]
    mk = lambda: [Sampler(SamplingParams(seed=10 + i, repeat_penalty=1.1), 700) for i in range(4)]
    a, b = mk(), mk()
    for _ in range(5):
        got = sample_batch(a, logits, hists)
        assert got.tolist() == [s.sample(l, h) for s, l, h in zip(b, logits, hists)]
    with pytest.raises(SamplingError):
        sample_batch(a, logits[:2], hists)


def test_bad_inputs_raise_package_errors():
    s = Sampler(SamplingParams(), 100)
    with pytest.raises(SamplingError, match="shape"):
        s.sample(np.zeros(99, np.float32))
    bad = np.zeros(100, np.float32)
    bad[5] = np.nan
    with pytest.raises(SamplingError, match="NaN"):
        s.sample(bad)
    with pytest.raises(SamplingError, match="all -inf"):
        s.sample(np.full(100, -np.inf, np.float32))
    bad[5] = np.inf
    with pytest.raises(SamplingError, match=r"\+inf"):
        s.sample(bad)
    with pytest.raises(SamplingError, match="out of range"):
        Sampler(SamplingParams(repeat_penalty=1.1), 100).sample(np.ones(100, np.float32), [100])
    for kw in [dict(temperature=float("nan")), dict(top_k=1.5), dict(repeat_penalty=0.0),
               dict(max_tokens=0), dict(repeat_last_n=-2), dict(stop="###"), dict(seed=1.5)]:
        with pytest.raises(SamplingError):
            SamplingParams(**kw)
    assert issubclass(SamplingError, A2ATSError)


@pytest.mark.parametrize("name, bad, good", [
    ("temperature", [-1.0, 2.5], [0.0, 2.0]), ("top_p", [-0.1, 1.5], [0.0, 1.0]),
    ("min_p", [-0.5, 2.0], [0.0, 1.0]), ("typical_p", [-1.0, 1.01], [0.0, 1.0]),
    ("presence_penalty", [-1e300, 2.5], [-2.0, 2.0]), ("frequency_penalty", [-3.0, 1e300], [-2.0, 2.0]),
    ("repeat_penalty", [0.0, 1e300], [0.01, 100.0]),
])
def test_every_option_is_range_checked_once(name, bad, good):
    """Issue 22: min_p=2 used to empty the candidate set inside a step and abort the whole
    batch; unbounded penalties overflowed the logits. Every value in range samples a token."""
    for v in bad:
        with pytest.raises(SamplingError, match=name):
            SamplingParams(**{name: v})
    rng = np.random.default_rng()
    x = _logits(rng, 500)
    for v in good:
        for temp in (0.0, 0.9):
            kw = {"temperature": temp, "top_k": 0, name: v}
            tok = Sampler(SamplingParams(**kw), 500).sample(x, list(rng.integers(0, 500, 20)))
            assert 0 <= tok < 500
    assert SamplingParams(stop=None).stop == ()


# -- stop strings ------------------------------------------------------------------------

def _run(stops, pieces):
    m = StopMatcher(stops)
    out, stopped = "", False
    for p in pieces:
        text, stopped = m.feed(p)
        out += text
        if stopped:
            break
    if not stopped:
        out += m.flush()[0]
    return out, stopped


def test_stop_matcher_across_pieces():
    assert _run(["</s>"], ["Hello <", "/", "s> world"]) == ("Hello ", True)
    assert _run(["</s>"], ["a<", "b"]) == ("a<b", False)            # held back, then released
    m = StopMatcher(["STOP"])
    assert m.feed("abc ST") == ("abc ", False)                        # "ST" may start STOP
    assert m.feed("O") == ("", False)
    assert m.feed("P and more") == ("", True)
    assert m.feed("later") == ("", True)
    # the earliest of several stop strings wins, even if another completes in the same piece
    assert _run(["world", "lo w"], ["hel", "lo world"]) == ("hel", True)
    assert _run(["\n\n", "User:"], ["Fine.\n", "\nUser: hi"]) == ("Fine.", True)
    assert _run([], ["a", "b"]) == ("ab", False)
    assert _run([""], ["a", "b"]) == ("ab", False)                   # empty stops are ignored
    m = StopMatcher(["xyz"])
    assert m.feed("abcxy") == ("abc", False) and m.flush() == ("xy", False)


def test_stop_matcher_random_chunks():
    rng = np.random.default_rng(9)
    for _ in range(300):
        text = "".join(rng.choice(list("abc "), size=int(rng.integers(0, 40))))
        stops = ["".join(rng.choice(list("abc"), size=int(rng.integers(1, 4))))
                 for _ in range(int(rng.integers(1, 3)))]
        cuts = sorted(rng.integers(0, len(text) + 1, size=int(rng.integers(0, 8))).tolist())
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        want = (text[:min(hits)], True) if hits else (text, False)
        got = _run(stops, pieces)
        assert got == want, (text, stops, pieces)
        assert not any(s in got[0] for s in stops)
