"""Per-sequence grammar state and the token bitmasks it yields.

A step of a batch with constrained rows goes:

    bitmask = allocate_bitmask(n_rows, bridge.n_vocab)       # once, reused every step
    job = fill_masks([(matcher, row), ...], bitmask)          # before the forward pass
    logits = forward(...)                                     # masks fill meanwhile
    job.result()                                              # after it
    apply_bitmask(logits, bitmask, rows=[row, ...])           # constrained rows only
    token = sample(logits[row]); matcher.accept(token)
    if matcher.is_done(): finish the sequence (the grammar is complete)

Bit t of bitmask[row] (int32 words, little-endian bit order: llguidance's layout) is 1
when token t may come next. Rows that are not listed are never read or written, so
unconstrained rows keep their logits bit for bit.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
from llguidance.numpy import fill_next_token_bitmask, fill_next_token_bitmask_par

from .. import native
from ..errors import GrammarError


def llg_message(message: str) -> str:
    """llguidance's error text without its empty state dump (verbose_errors=False)."""
    return message.replace("<non-verbose/>", "").strip()


def bitmask_words(n_vocab: int) -> int:
    return (int(n_vocab) + 31) // 32


def allocate_bitmask(n_rows: int, n_vocab: int) -> np.ndarray:
    """(n_rows, ceil(n_vocab / 32)) int32, every token allowed."""
    return np.full((int(n_rows), bitmask_words(n_vocab)), -1, dtype=np.int32)


def _bits(bitmask_rows: np.ndarray, n: int) -> np.ndarray:
    """(..., W) int32 words -> (..., n) uint8 0/1 per token."""
    words = np.ascontiguousarray(bitmask_rows, dtype="<i4")
    return np.unpackbits(words.view(np.uint8), axis=-1, bitorder="little", count=n)


def allowed_ids(bitmask_row: np.ndarray, n_vocab: int) -> np.ndarray:
    """The token ids a (W,) bitmask row allows, ascending."""
    n = min(int(n_vocab), 32 * bitmask_row.shape[-1])
    return np.flatnonzero(_bits(bitmask_row, n))


def apply_bitmask(logits: np.ndarray, bitmask: np.ndarray, rows=None) -> None:
    """In place: logits[r, t] = -inf where bitmask[r] disallows token t.

    logits (n_rows, V) float32 with bitmask (n_rows, W), or one (V,) row with a (W,)
    row; rows: the row indices to mask (default all). Tokens past 32*W (logits wider
    than the vocabulary) are disallowed. Other rows are not touched."""
    if logits.ndim == 1:
        _apply_row(logits, bitmask.reshape(-1))
        return
    for r in (range(logits.shape[0]) if rows is None else rows):
        _apply_row(logits[int(r)], bitmask[int(r)])


def _apply_row(row: np.ndarray, mask_row: np.ndarray) -> None:
    if row.dtype == np.float32 and row.flags.c_contiguous and row.flags.writeable:
        native.fused.apply_bitmask(row, mask_row)        # one pass in C (a step's hot path)
        return
    n = min(row.shape[0], 32 * mask_row.shape[0])
    np.copyto(row[:n], -np.inf, where=_bits(mask_row, n) == 0)     # (n,)
    row[n:] = -np.inf


class Matcher:
    """One sequence's position in a grammar (made by Constraint.matcher(bridge)).

    Not thread-safe: the engine fills its mask (fill_mask / fill_masks) and feeds it
    tokens (accept) in turn, never at once."""

    def __init__(self, grammar: str, bridge, limits, what: str = "grammar"):
        self.bridge = bridge
        self._m = llguidance.LLMatcher(bridge.ll, grammar, log_level=0, limits=limits)
        if not self._m.is_error():   # the first mask now: limits it hits refuse the grammar
            self._m.compute_bitmask()   # here, not as an empty reply (llguidance caches it)
        if self._m.is_error():
            raise GrammarError(f"invalid {what}: {llg_message(self._m.get_error())}")
        self.n_accepted = 0

    def fill_mask(self, bitmask: np.ndarray, row: int = 0) -> None:
        """Write the allowed next tokens into bitmask[row] (EOS only once in error)."""
        _check_bitmask(bitmask, self.bridge.n_vocab)
        fill_next_token_bitmask(self._m, bitmask, int(row))
        self._fix_error_row(bitmask, int(row))

    def _fix_error_row(self, bitmask: np.ndarray, row: int) -> None:
        # a matcher in error allows nothing; the sampler still needs a token, and the
        # engine ends the sequence on it (is_done() is True)
        if self._m.is_error():
            words = bitmask[row].view(np.uint32)          # (W,)
            words[:] = 0
            for t in self.bridge.eos_ids:
                words[t >> 5] |= np.uint32(1 << (t & 31))

    def accept(self, token: int) -> bool:
        """Advance by one sampled token; False (and `error` says why) when the grammar
        does not allow it here, after which the matcher stays in error."""
        token = int(token)
        if not 0 <= token < self.bridge.n_vocab:
            raise GrammarError(f"token id {token} is outside the vocabulary")
        ok = self._m.consume_token(token)
        if ok:
            self.n_accepted += 1
        return ok

    def accept_tokens(self, tokens) -> bool:
        """accept() for each token in order; False at the first refused one."""
        return all(self.accept(t) for t in tokens)

    def is_accepting(self) -> bool:
        """The output so far is a complete match (EOS would be allowed now)."""
        return self._m.is_accepting()

    def is_done(self) -> bool:
        """Nothing more may follow (the grammar is complete, EOS was taken, or the
        matcher is in error): the sequence must finish."""
        return self._m.is_stopped()

    @property
    def stop_reason(self) -> str:
        """llguidance's StopReason: "NotStopped", "NoExtension" (grammar complete),
        "EndOfSentence", "ParserTooComplex", "LexerTooComplex", ..."""
        return self._m.stop_reason()

    @property
    def error(self) -> str | None:
        """Why the matcher is in error (a refused token, a resource limit), else None."""
        return llg_message(self._m.get_error()) or None

    def forced_tokens(self) -> list[int]:
        """Tokens the grammar forces next (may be empty): they can be appended without
        sampling."""
        return self._m.compute_ff_tokens()

    def rollback(self, n_tokens: int) -> bool:
        """Undo the last n_tokens accepted tokens (speculative decoding, stop strings)."""
        ok = self._m.rollback(int(n_tokens))
        if ok:
            self.n_accepted -= int(n_tokens)
        return ok

    def reset(self) -> None:
        """Back to the start of the grammar."""
        self._m.reset()
        self.n_accepted = 0


def _check_bitmask(bitmask: np.ndarray, n_vocab: int) -> None:
    if (not isinstance(bitmask, np.ndarray) or bitmask.dtype != np.int32 or bitmask.ndim != 2
            or not bitmask.flags["C_CONTIGUOUS"] or bitmask.shape[1] != bitmask_words(n_vocab)):
        raise GrammarError(f"bitmask must be a C-contiguous int32 (n_rows, "
                           f"{bitmask_words(n_vocab)}) array (allocate_bitmask)")


# -- many rows at once, off the calling thread ------------------------------------------
_LOCK = threading.Lock()
_STATE: dict = {"executor": None, "pool": None, "threads": None}


def set_mask_threads(n: int | None) -> None:
    """Threads llguidance's executor uses to fill many rows (None: its default, 80% of
    the CPUs up to 32). Takes effect for fill_masks calls made after it."""
    with _LOCK:
        _STATE["threads"] = None if n is None else max(1, int(n))
        _STATE["executor"] = None


def _executor() -> llguidance.LLExecutor:
    with _LOCK:
        if _STATE["executor"] is None:
            _STATE["executor"] = llguidance.LLExecutor(_STATE["threads"])
        if _STATE["pool"] is None:
            _STATE["pool"] = ThreadPoolExecutor(1, thread_name_prefix="a2ats-masks")
        return _STATE["executor"]


def fill_masks(pairs, bitmask: np.ndarray) -> Future:
    """Fill bitmask[row] for every (matcher, row) pair on llguidance's thread pool,
    from a worker thread (the GIL is released while masks are computed); returns a
    Future whose result() is None once every row is written. Until then neither the
    bitmask nor the matchers may be touched."""
    pairs = [(m, int(row)) for m, row in pairs]
    if not pairs:
        done: Future = Future()
        done.set_result(None)
        return done
    _check_bitmask(bitmask, pairs[0][0].bridge.n_vocab)
    rows = [row for _, row in pairs]
    if len(set(rows)) != len(rows) or min(rows) < 0 or max(rows) >= bitmask.shape[0]:
        raise GrammarError("fill_masks: rows must be distinct indices of the bitmask")
    executor = _executor()

    def work() -> None:
        fill_next_token_bitmask_par(executor, [(m._m, row) for m, row in pairs], bitmask)
        for m, row in pairs:
            m._fix_error_row(bitmask, row)

    return _STATE["pool"].submit(work)

