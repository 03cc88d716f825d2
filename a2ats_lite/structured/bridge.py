"""llguidance's view of a model's vocabulary, built once per tokenizer.

llguidance computes token masks from a trie of every token's bytes, so the bridge
turns the GGUF vocabulary of `a2ats_lite.tokenizer.Tokenizer` into those bytes as
llama.cpp's token_to_piece renders them: SentencePiece '▁' -> space, `<0xNN>`
byte tokens -> that byte, byte-level BPE characters -> their bytes. Control,
unknown and unused tokens are special: their text is prefixed with llguidance's
0xFF marker, so a grammar can name them (`<[id]>`, `<|python_tag|>`) but no text
terminal ever matches them. User-defined tokens (Gemma's newline runs, Qwen's
`<tool_call>`) are text, as the tokenizer's decode treats them.

The end-of-generation ids are llguidance's EOS set: a mask allows them exactly when
the grammar is complete. The tokenize callback is the tokenizer's own encode
without BOS or SentencePiece's dummy space prefix: llguidance tokenizes text a
grammar forces with it, so forced text gets the model's canonical tokens.
"""
from __future__ import annotations

import threading
import weakref

import llguidance
import numpy as np

from ..errors import GrammarError
from ..tokenizer import (A_BYTE, A_CONTROL, A_NORMAL, A_UNKNOWN, A_UNUSED, A_USER_DEFINED,
                         Tokenizer, _bpe_text_to_bytes)

SPECIAL_MARKER = b"\xff"   # llguidance's TokTrie::SPECIAL_TOKEN_MARKER
_SPM_SPACE = "\u2581"


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _split_joined(texts: list[str], transform) -> list[bytes] | None:
    """Every text through `transform` in one pass (join, transform, split); None when
    a text holds the separator."""
    joined = "\x00".join(texts)
    if joined.count("\x00") != len(texts) - 1:
        return None
    return transform(joined).split(b"\x00")


def token_bytes_table(tok: Tokenizer) -> list[bytes]:
    """Every token's bytes as llama.cpp's token_to_piece(special=True) renders them,
    with special tokens (control, unknown, unused, undefined) behind SPECIAL_MARKER."""
    n = tok.n_vocab
    attrs = tok.attrs
    special = (attrs & (A_CONTROL | A_UNKNOWN | A_UNUSED)) != 0   # (n,) before NORMAL, as llama.cpp
    plain = ((attrs & A_NORMAL) != 0) & ~special
    normal = np.flatnonzero(plain)                                      # (n_normal,)
    texts = [tok.tokens[i] for i in normal]
    if tok.model == "llama":
        pieces = _split_joined(texts, lambda s: _raw(s.replace(_SPM_SPACE, " ")))
        if pieces is None:
            pieces = [_raw(t.replace(_SPM_SPACE, " ")) for t in texts]
    else:   # byte-level BPE: one character per byte
        pieces = [_bpe_text_to_bytes(t) for t in texts]
    out: list[bytes] = [b""] * n
    for i, p in zip(normal.tolist(), pieces):
        out[i] = p
    for i in np.flatnonzero(~plain).tolist():
        a, text = int(attrs[i]), tok.tokens[i]
        if special[i]:
            out[i] = SPECIAL_MARKER + _raw(text)
        elif a & A_USER_DEFINED:
            out[i] = _raw(text)
        elif a & A_BYTE:
            try:
                out[i] = bytes([int(text[3:5], 16)])
            except ValueError:
                out[i] = SPECIAL_MARKER + _raw(text)
        else:   # undefined type: rendered as nothing by llama.cpp, never generated here
            out[i] = SPECIAL_MARKER + _raw(text)
    for i in np.flatnonzero(np.fromiter(map(len, out), np.int64, n) == 0).tolist():
        out[i] = SPECIAL_MARKER + _raw(tok.tokens[i])   # an empty piece matches nothing
    return out


class _Wrapper:
    """The duck-typed object llguidance.LLTokenizer reads (its TokenizerWrapper shape)."""

    is_tokenizer_wrapper = True

    def __init__(self, bridge: "TokenizerBridge", tokens: list[bytes], eos: int, bos):
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = bos
        self.special_token_ids: list[int] = []   # marked in `tokens` already
        # weak references: the LLTokenizer holds this object from Rust, where the
        # garbage collector cannot see it, so strong ones would keep both alive forever
        self._tokenizer = weakref.ref(bridge.tokenizer)
        self._bridge = weakref.ref(bridge)

    def __call__(self, text: str) -> list[int]:
        # llguidance unwraps the result in Rust: an exception here would abort, so the
        # greedy tokenization stands in for text the tokenizer refuses
        try:
            return self._tokenizer().encode(text, add_bos=False, space_prefix=False)
        except Exception:   # noqa: BLE001 - never let an error cross into llguidance
            bridge = self._bridge()
            ll = bridge.ll if bridge is not None else None
            return ll.greedy_tokenize(text) if ll is not None else []


class TokenizerBridge:
    """An llguidance LLTokenizer for one Tokenizer (build once per model: bridge_for).

    n_vocab: the width of the model's logits when it exceeds the vocabulary (padding
    rows become special tokens no grammar allows)."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int | None = None):
        self.tokenizer = tokenizer
        table = token_bytes_table(tokenizer)
        n = tokenizer.n_vocab if n_vocab is None else int(n_vocab)
        if n < tokenizer.n_vocab:
            raise GrammarError(f"n_vocab {n} is smaller than the vocabulary "
                               f"({tokenizer.n_vocab} tokens)")
        table += [SPECIAL_MARKER + b"<pad_%d>" % i for i in range(tokenizer.n_vocab, n)]
        eos = sorted(tokenizer.eog_ids | ({tokenizer.eos_id} - {None}))
        if not eos:
            raise GrammarError("the vocabulary has no end-of-generation token; "
                               "constrained decoding needs one to end a sequence")
        self.token_bytes: list[bytes] = table
        self.eos_ids: tuple[int, ...] = tuple(eos)
        self.n_vocab = n
        self.ll: llguidance.LLTokenizer | None = None
        wrapper = _Wrapper(self, table, eos[0], tokenizer.bos_id)
        self.ll = llguidance.LLTokenizer(wrapper, eos_token=list(eos))
        # marker + text (never empty); a lone 0xFF is the byte token <0xFF>
        self._special = {t[1:]: i for i, t in enumerate(table)
                         if t[:1] == SPECIAL_MARKER and len(t) > 1}

    def special_id(self, text: str) -> int | None:
        """The id of the special (control) token whose text is `text`, or None."""
        return self._special.get(_raw(text))

    def is_special(self, token: int) -> bool:
        """A control / unknown / unused token: grammars name it, text never matches it."""
        t = self.token_bytes[token]
        return t[:1] == SPECIAL_MARKER and len(t) > 1

    def __repr__(self):
        return f"TokenizerBridge(n_vocab={self.n_vocab}, eos={list(self.eos_ids)})"


_LOCK = threading.Lock()


def bridge_for(tokenizer: Tokenizer, n_vocab: int | None = None) -> TokenizerBridge:
    """The TokenizerBridge of `tokenizer` (and logits width n_vocab), built on first
    use and kept on the tokenizer object, so it goes when the tokenizer goes."""
    with _LOCK:
        cache = tokenizer.__dict__.setdefault("_llguidance_bridges", {})
        bridge = cache.get(n_vocab)
        if bridge is None:
            bridge = cache[n_vocab] = TokenizerBridge(tokenizer, n_vocab)
        return bridge
