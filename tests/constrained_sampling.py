"""Random generation under a grammar's masks, standing in for a model: each step fills
the matcher's mask, picks a random allowed token and feeds it back. The pick leans
towards structure (tokens holding JSON punctuation, EOS once allowed) so random JSON
closes its strings and objects in tens of tokens instead of thousands."""
import re

import numpy as np

from a2ats_lite.structured import allocate_bitmask, allowed_ids

_STRUCTURAL = b'"{}[],:'


def structural_tokens(bridge, chars: bytes = _STRUCTURAL, leading: bool = False) -> np.ndarray:
    """(n_vocab,) bool: the token holds one of `chars` (JSON punctuation by default),
    or starts with one when `leading`."""
    pat = re.compile((b"^" if leading else b"") + b"[" + re.escape(chars) + b"]")
    return np.array([pat.search(t) is not None for t in bridge.token_bytes], dtype=bool)


def generate(matcher, bridge, rng, max_tokens=400, structural=None, p_struct=0.6,
             p_eos=0.5, prefix=()):
    """Token ids of one random constrained generation (after feeding `prefix`), stopped
    when the matcher is done, at EOS, or after max_tokens (then the test fails)."""
    assert matcher.accept_tokens(prefix), matcher.error
    bitmask = allocate_bitmask(1, bridge.n_vocab)
    eos = np.array(bridge.eos_ids)
    out = list(prefix)
    for _ in range(max_tokens):
        if matcher.is_done():
            return out
        matcher.fill_mask(bitmask, 0)
        ids = allowed_ids(bitmask[0], bridge.n_vocab)
        assert len(ids), "a live matcher allowed no token"
        ends = ids[np.isin(ids, eos)]
        if len(ends) and rng.random() < p_eos:
            tok = int(rng.choice(ends))
        else:
            pool = ids[structural[ids]] if structural is not None else ids
            tok = int(rng.choice(pool if len(pool) and rng.random() < p_struct else ids))
        assert matcher.accept(tok), matcher.error
        if tok in bridge.eos_ids:
            return out
        out.append(tok)
    raise AssertionError(f"no end after {max_tokens} tokens: "
                         f"{bridge.ll.decode_str(out)[-200:]!r}")


def text_of(bridge, ids) -> str:
    """The text of generated ids as the grammar saw it (special tokens by their text)."""
    return b"".join(bridge.token_bytes[i][1:] if bridge.is_special(i) else bridge.token_bytes[i]
                    for i in ids).decode("utf-8")
