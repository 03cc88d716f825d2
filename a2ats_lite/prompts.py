"""One validation of prompts for every entry point (Runtime, Engine, server, CLI).

    ids = token_ids(prompt, n_vocab)           # integers in [0, n_vocab), at least one
    check_context(len(ids), n_ctx)             # room for the prompt and one generated token

One exception type per failure: EmptyPromptError (no token), TokenizerError (an id
that is not an integer or not in the vocabulary), ContextOverflowError (too long).
All three are ValueErrors. Messages say what is wrong, not which flag to change:
the CLI and the server add their own hints.
"""
from __future__ import annotations

import numpy as np

from .errors import ContextOverflowError, EmptyPromptError, TokenizerError


def token_ids(ids, n_vocab: int) -> list[int]:
    """Checked token ids as Python ints: a non-empty sequence of integers (numpy integers
    too, not bools, not bytes or str) in [0, n_vocab)."""
    if isinstance(ids, (str, bytes, bytearray, memoryview)):
        raise TokenizerError(f"token ids must be a sequence of integers, got {type(ids).__name__}")
    if isinstance(ids, np.ndarray):
        if ids.size and not np.issubdtype(ids.dtype, np.integer):
            raise TokenizerError(f"token ids must be integers, got an array of {ids.dtype}")
        ids = ids.reshape(-1).tolist()
    else:
        try:
            ids = list(ids)
        except TypeError:
            raise TokenizerError(f"token ids must be a sequence of integers, got "
                                 f"{type(ids).__name__}") from None
    if not ids:
        raise EmptyPromptError("a prompt needs at least one token")
    for t in ids:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise TokenizerError(f"token ids must be integers, got {t!r} ({type(t).__name__})")
        if not 0 <= t < n_vocab:
            raise TokenizerError(f"token id {int(t)} out of range [0, {n_vocab})")
    return [int(t) for t in ids]


def check_context(n_tokens: int, n_ctx: int, cached: int = 0, room: int = 1) -> None:
    """Raise ContextOverflowError unless cached + n_tokens tokens, plus `room` more (a prompt
    needs one generated token; a plain forward pass none), fit n_ctx."""
    if cached + n_tokens + room > n_ctx:
        what = f"{cached} cached + {n_tokens} new tokens" if cached else \
            f"prompt of {n_tokens} tokens"
        more = " (it needs room for one more token)" if room else ""
        raise ContextOverflowError(f"{what} does not fit the context size {n_ctx}{more}")


def fit_prompt(ids: list[int], n_ctx: int, max_tokens: int, bos_id: int | None) -> list[int]:
    """llama.cpp's --truncate: keep BOS and the last tokens, leaving room to generate
    (min(max_tokens, half the context) tokens, at least one)."""
    limit = n_ctx - 1
    if len(ids) <= limit:
        return ids
    keep = max(1, limit - max(0, min(max_tokens, limit // 2)))
    head = ids[:1] if ids[0] == bos_id else []
    return head + ids[len(ids) - (keep - len(head)):]
