"""Token sampling: llama.cpp's default sampler chain on numpy logits.

llama.cpp's common_sampler default order is
    penalties; dry; top_n_sigma; top_k; typ_p; top_p; min_p; xtc; temperature; dist
DRY, top-n-sigma and XTC are off by default there (dry_multiplier=0,
top_n_sigma=-1, xtc_probability=0) and are not implemented here. Every stage
acts on a candidate set (token ids + logits), renormalizing as it goes, so
top_p / min_p see the probabilities left by the stages before them and
temperature only reshapes what survived the filters. temperature <= 0 is
greedy: argmax of the (penalized, filtered) candidates, as llama.cpp's
temperature stage does.

A 262144-entry vocab is never fully sorted when top_k is set (argpartition),
and top_p without top_k sorts only as many of the top tokens as it needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .errors import A2ATSError
from .ops import softmax as _softmax


MAX_SEED = 2 ** 63
MAX_LOGPROBS = 20           # top entries per token, as OpenAI's top_logprobs
MAX_REPEAT_PENALTY = 100.0   # logits at most 100x larger in magnitude: no float32 overflow


def _finite(v) -> bool:
    """True for any int (however large) and finite floats; np.isfinite fails on big ints."""
    if isinstance(v, (int, np.integer)):
        return True
    try:
        return math.isfinite(v)
    except (OverflowError, TypeError, ValueError):
        return False


class SamplingError(A2ATSError, ValueError):
    """Invalid sampling parameters, logits or history."""


@dataclass
class SamplingParams:
    """Generation options; defaults are llama.cpp's common_params_sampling ones."""
    temperature: float = 0.8      # <= 0: greedy
    top_k: int = 40               # <= 0: off
    top_p: float = 0.95           # >= 1: off
    min_p: float = 0.05           # <= 0: off
    typical_p: float = 1.0        # >= 1: off
    repeat_penalty: float = 1.0   # 1: off
    repeat_last_n: int = 64       # tokens the penalties look back at; 0: off, -1: whole history
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None       # None or < 0: random; must be in [-2**63, 2**63)
    max_tokens: int = 128
    stop: list[str] | tuple[str, ...] = ()
    ignore_eos: bool = False
    # the request's KV selection (a retrieval engine only): kv "dense" attends every position;
    # budget overrides the policy's (a fraction of the context, or a whole token count)
    kv: str | None = None
    budget: float | int | None = None
    # structured output: a structured.Constraint the tokens must follow (JSON schema, regex,
    # grammar); the sequence finishes when it is complete
    constraint: object | None = None
    # log-probabilities (after penalties and the constraint's mask, before top-k/p and
    # temperature, as OpenAI reports them): of the sampled token plus this many top entries
    logprobs: int | None = None
    prompt_logprobs: bool = False    # also score the prompt's tokens (completions' echo)

    def __post_init__(self):
        """Every option checked here, once, for the Runtime, the CLI and the server: OpenAI's
        ranges where OpenAI defines one (temperature, top_p, the two penalties), llama.cpp's
        meaning otherwise, bounded so that no value can empty the candidate set or overflow
        the logits."""
        if self.stop is None:
            self.stop = ()
        for name, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0),
                             ("min_p", 0.0, 1.0), ("typical_p", 0.0, 1.0),
                             ("frequency_penalty", -2.0, 2.0), ("presence_penalty", -2.0, 2.0),
                             ("repeat_penalty", 0.0, MAX_REPEAT_PENALTY)):
            _check(name, getattr(self, name), lo=lo, hi=hi)
        if self.repeat_penalty <= 0:
            raise SamplingError(f"repeat_penalty must be > 0, got {self.repeat_penalty!r}")
        _check("top_k", self.top_k, integer=True)
        _check("repeat_last_n", self.repeat_last_n, lo=-1, integer=True)
        _check("max_tokens", self.max_tokens, lo=1, integer=True)
        if self.seed is not None:
            _check("seed", self.seed, integer=True)
            if not -MAX_SEED <= self.seed < MAX_SEED:
                # numpy seeds anything >= 0, but the Runtime offsets seeds per call and
                # per batch row: keep them in int64 range instead of failing later
                raise SamplingError(f"seed must be in [-2**63, 2**63) (negative: random), "
                                    f"got {self.seed!r}")
        if self.kv is not None and not isinstance(self.kv, str):
            raise SamplingError(f"kv must be a policy name, got {self.kv!r}")
        if self.budget is not None:
            _check("budget", self.budget)
            if self.budget <= 0:
                raise SamplingError(f"budget must be > 0, got {self.budget!r}")
        if isinstance(self.stop, str) or not all(isinstance(s, str) for s in self.stop):
            raise SamplingError(f"stop must be a list of strings, got {self.stop!r}")
        if self.logprobs is not None:
            _check("logprobs", self.logprobs, lo=0, hi=MAX_LOGPROBS, integer=True)
        if self.constraint is not None:
            from .structured import Constraint     # llguidance loads only when asked for
            if not isinstance(self.constraint, Constraint):
                raise SamplingError(f"constraint must be a structured.Constraint, got "
                                    f"{type(self.constraint).__name__}")


def _check(name: str, v, lo=None, hi=None, integer: bool = False) -> None:
    ok = isinstance(v, (int, np.integer)) if integer else isinstance(v, (int, float, np.number))
    if isinstance(v, (bool, np.bool_)) or not ok or not _finite(v) or \
            (lo is not None and v < lo) or (hi is not None and v > hi):
        kind = "an integer" if integer else "a finite number"
        if lo is not None and hi is not None:
            kind += f" in [{lo:g}, {hi:g}]"
        elif lo is not None:
            kind += f" >= {lo}"
        raise SamplingError(f"{name} must be {kind}, got {v!r}")


# -- stages: each takes and returns (ids (n,) int64, logits (n,) float32/64) ---------------------
# ids=None stands for arange(n_vocab), so the full vocab is never materialized as ids.

def _take(ids, idx: np.ndarray) -> np.ndarray:
    return idx.astype(np.int64, copy=False) if ids is None else ids[idx]


def softmax(x: np.ndarray) -> np.ndarray:
    """float64 softmax of a 1-D array of logits (-inf allowed, not all): ops.softmax."""
    return _softmax(np.asarray(x, dtype=np.float64))


def apply_penalties(logits: np.ndarray, history, repeat_penalty: float = 1.0, last_n: int = 64,
                    frequency_penalty: float = 0.0, presence_penalty: float = 0.0) -> np.ndarray:
    """llama.cpp's penalties over the last `last_n` history tokens; returns a copy if changed.

    For a token seen c > 0 times:  x = x / r if x > 0 else x * r  (so a repeat is always
    less likely, whatever the sign), then  x -= c * frequency + presence.
    """
    if last_n == 0 or len(history) == 0 or (
            repeat_penalty == 1.0 and frequency_penalty == 0.0 and presence_penalty == 0.0):
        return logits
    window = np.asarray(history if last_n < 0 else history[-last_n:], dtype=np.int64)
    if window.min() < 0 or window.max() >= logits.shape[0]:
        raise SamplingError(f"history token id out of range [0, {logits.shape[0]})")
    ids, counts = np.unique(window, return_counts=True)
    out = logits.copy()
    x = out[ids]
    x = np.where(x > 0, x / repeat_penalty, x * repeat_penalty)
    out[ids] = x - (counts * frequency_penalty + presence_penalty)
    return out


def top_k(ids: np.ndarray | None, x: np.ndarray, k: int):
    """The k highest logits, sorted descending (k <= 0 or >= n: unchanged)."""
    if k <= 0 or k >= x.shape[0]:
        return ids, x
    n = x.shape[0]
    part = np.argpartition(x, n - k)[n - k:]            # O(n), no full sort of the vocab
    part = part[np.argsort(-x[part], kind="stable")]
    return _take(ids, part), x[part]


def typical(ids: np.ndarray | None, x: np.ndarray, p: float):
    """Locally typical sampling: keep tokens whose surprisal is closest to the entropy,
    the fewest whose mass exceeds p (llama.cpp's `cum_sum > p`)."""
    if p >= 1.0:
        return ids, x
    probs = softmax(x)
    nz = probs > 0                                       # 0 * log 0 = 0, not NaN
    logp = np.full_like(probs, -np.inf)
    logp[nz] = np.log(probs[nz])
    entropy = -np.sum(probs[nz] * logp[nz])
    order = np.argsort(np.abs(-logp - entropy), kind="stable")
    cum = np.cumsum(probs[order])
    keep = int(np.searchsorted(cum, p, side="right")) + 1  # first i with cum[i] > p, inclusive
    order = order[:min(keep, order.shape[0])]
    return _take(ids, order), x[order]


def _sorted_prefix(probs: np.ndarray, mass: float) -> np.ndarray:
    """Indices of the top probabilities, sorted descending, at least covering `mass`
    (all of them if it is never reached): sorts only the head of the vocab."""
    n, k = probs.shape[0], 256
    while k < n:
        part = np.argpartition(probs, n - k)[n - k:]
        if probs[part].sum() >= mass:
            return part[np.argsort(-probs[part], kind="stable")]
        k *= 8
    return np.argsort(-probs, kind="stable")


def top_p(ids: np.ndarray | None, x: np.ndarray, p: float):
    """Nucleus: the minimal highest-probability prefix whose mass is >= p, sorted descending."""
    if p >= 1.0:
        return ids, x
    probs = softmax(x)
    order = _sorted_prefix(probs, p)
    cum = np.cumsum(probs[order])
    keep = int(np.searchsorted(cum, p, side="left")) + 1  # first i with cum[i] >= p, inclusive
    order = order[:min(keep, order.shape[0])]
    return _take(ids, order), x[order]


def min_p(ids: np.ndarray | None, x: np.ndarray, p: float):
    """Keep tokens with prob >= p * max prob, i.e. logit >= max logit + log p."""
    if p <= 0.0:
        return ids, x
    keep = np.flatnonzero(x >= np.max(x) + np.log(p))   # the max itself always passes (p <= 1)
    return _take(ids, keep), x[keep]


# -- the chain ---------------------------------------------------------------

class Sampler:
    """One sequence's sampler: the parameters plus a private, seeded random generator.

    eog_ids: end-of-generation tokens, banned when params.ignore_eos (as llama.cpp's
    logit bias of -inf), so generation runs to max_tokens.
    """

    def __init__(self, params: SamplingParams, n_vocab: int, eog_ids=()):
        if not isinstance(params, SamplingParams):
            raise SamplingError(f"params must be SamplingParams, got {type(params).__name__}")
        if n_vocab <= 0:
            raise SamplingError(f"n_vocab must be > 0, got {n_vocab}")
        self.params, self.n_vocab = params, int(n_vocab)
        seed = params.seed if params.seed is not None and params.seed >= 0 else None
        self.rng = np.random.default_rng(seed)
        self.banned = np.asarray(list(eog_ids) if params.ignore_eos else [], dtype=np.int64)
        if self.banned.size and (self.banned.min() < 0 or self.banned.max() >= n_vocab):
            raise SamplingError(f"eog_ids must be in [0, {n_vocab}), got {list(eog_ids)}")

    def candidates(self, logits: np.ndarray, history=()) -> tuple[np.ndarray, np.ndarray]:
        """(ids, logits) left after penalties, top_k, typical_p, top_p and min_p,
        before temperature."""
        return self._filtered(self.prepare(logits, history))

    def _filtered(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        ids, x = top_k(None, x, p.top_k)
        ids, x = typical(ids, x, p.typical_p)
        ids, x = top_p(ids, x, p.top_p)
        ids, x = min_p(ids, x, p.min_p)
        return (np.arange(x.shape[0], dtype=np.int64) if ids is None else ids), x

    def probs(self, logits: np.ndarray, history=()) -> tuple[np.ndarray, np.ndarray]:
        """(ids, probabilities) the next draw is made from (greedy: the argmax, p=1)."""
        ids, x = self.candidates(logits, history)
        if self.params.temperature <= 0:
            return ids[[int(np.argmax(x))]], np.ones(1)
        return ids, softmax(x.astype(np.float64) / self.params.temperature)

    @property
    def plain_greedy(self) -> bool:
        """The next token is the first maximal logit as it is (no penalties, no banned
        tokens): the backend may pick it where the logits are (Model.step(greedy=True))."""
        p = self.params
        return (p.temperature <= 0 and p.typical_p >= 1.0 and not self.banned.size
                and p.constraint is None and p.logprobs is None and not p.prompt_logprobs
                and (p.repeat_last_n == 0 or (p.repeat_penalty == 1.0 and p.frequency_penalty == 0.0
                                              and p.presence_penalty == 0.0)))

    def sample(self, logits: np.ndarray, history=()) -> int:
        """Next token id from logits (n_vocab,) given the tokens so far (prompt + output)."""
        return self.choose(self.prepare(logits, history))

    def choose(self, x: np.ndarray) -> int:
        """Next token id from prepared logits (prepare(): penalties applied)."""
        p = self.params
        if p.temperature <= 0 and p.typical_p >= 1.0:
            # greedy: top_k / top_p / min_p always keep the argmax, so skip them
            return int(np.argmax(x))
        ids, x = self._filtered(x)
        if p.temperature <= 0:
            return int(ids[np.argmax(x)])
        probs = softmax(x.astype(np.float64) / p.temperature)
        cum = np.cumsum(probs)
        i = int(np.searchsorted(cum, self.rng.random() * cum[-1], side="right"))
        # u * total can round up to total: fall back to the last token with p > 0
        return int(ids[min(i, int(np.flatnonzero(probs)[-1]))])

    def prepare(self, logits, history=()) -> np.ndarray:
        """Checked logits with banned tokens at -inf and the penalties applied."""
        x = np.asarray(logits)
        if x.shape != (self.n_vocab,):
            raise SamplingError(f"logits must have shape ({self.n_vocab},), got {x.shape}")
        if x.dtype not in (np.float32, np.float64):
            x = x.astype(np.float32)
        if self.banned.size:
            x = x.copy()
            x[self.banned] = -np.inf
        if not np.isfinite(np.max(x)):  # max is NaN if any entry is
            raise SamplingError("logits are NaN, +inf or all -inf (model produced no usable scores)")
        p = self.params
        return apply_penalties(x, history, p.repeat_penalty, p.repeat_last_n,
                               p.frequency_penalty, p.presence_penalty)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the n most likely tokens' at its position."""
    token: int
    logprob: float
    top: tuple = ()               # ((token id, logprob), ...), most likely first


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-softmax of a 1-D array of logits (-inf entries stay -inf)."""
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x)
    return x - (m + np.log(np.sum(np.exp(x - m))))


def token_logprob(x: np.ndarray, tok: int, n_top: int = 0) -> TokenLogprob:
    """tok's log-probability under logits x (n_vocab,) and the n_top most likely tokens'
    (ties: the lower id first)."""
    lp = log_softmax(x)
    top = ()
    if n_top > 0:
        n = min(int(n_top), lp.shape[0])
        part = np.argpartition(-lp, n - 1)[:n]
        part = part[np.lexsort((part, -lp[part]))]
        top = tuple((int(i), float(lp[i])) for i in part)
    return TokenLogprob(int(tok), float(lp[int(tok)]), top)


def sample_batch(samplers: list[Sampler], logits: np.ndarray, histories) -> np.ndarray:
    """One token per sequence: logits (n_seq, n_vocab), one Sampler and history each."""
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[0] != len(samplers) or len(histories) != len(samplers):
        raise SamplingError(f"sample_batch: {len(samplers)} samplers, {len(histories)} histories "
                            f"and logits of shape {logits.shape} do not match")
    return np.array([s.sample(row, h) for s, row, h in zip(samplers, logits, histories)],
                    dtype=np.int64)


# -- stop strings --------------------------------------------------------------

class StopMatcher:
    """Streaming stop-string filter.

    feed(piece) -> (text safe to emit now, stopped). Text that could be the start of
    a stop string is held back until the next piece decides; on a match the text
    before the earliest stop string is emitted and everything after is dropped.
    flush() -> (held-back text, stopped) at the end of generation.
    """

    def __init__(self, stop_strings=()):
        if isinstance(stop_strings, str):
            stop_strings = [stop_strings]
        self.stops = [s for s in stop_strings if s]
        self.held = ""
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self.held + piece
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return buf[:min(hits)], True
        n = len(buf) - self._partial(buf)
        self.held = buf[n:]
        return buf[:n], False

    def flush(self) -> tuple[str, bool]:
        text, self.held = self.held, ""
        return text, self.stopped

    def _partial(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of a stop string."""
        best = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
