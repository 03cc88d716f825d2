"""Offline text for calibration and evaluation.

Every CPython installation ships pydoc_data.topics: ~465 KB of English prose
(the language reference's topic pages). We split it deterministically into a
calibration half and an evaluation half (never the same text in both), and add
random identifier strings as the A2ATS reference does (so that queries that
look up arbitrary ids are represented in the query statistics).
"""
from __future__ import annotations

import random
import uuid


def _topics() -> list[tuple[str, str]]:
    import pydoc_data.topics as t
    return sorted(t.topics.items())


def natural_text(split: str = "calib") -> str:
    """Concatenated prose of one split: 'calib' or 'eval' (disjoint halves)."""
    if split not in ("calib", "eval"):
        raise ValueError("split must be 'calib' or 'eval'")
    parts = [text for i, (_, text) in enumerate(_topics()) if (i % 2 == 0) == (split == "calib")]
    return "\n\n".join(parts)


def random_identifiers(n_chars: int, seed: int = 0) -> str:
    """Lines of random UUIDs with keys, about n_chars long."""
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_chars:
        line = f"id {rng.randrange(10**6):06d}: {uuid.UUID(int=rng.getrandbits(128), version=4)}"
        lines.append(line)
        size += len(line) + 1
    return "\n".join(lines)


def documents(tokenizer, n_tokens: int, doc_tokens: int, id_fraction: float = 0.2,
              split: str = "calib", seed: int = 0) -> list[list[int]]:
    """Token documents totalling about n_tokens: natural prose in doc_tokens-long
    pieces plus id_fraction of random identifiers, each starting with BOS."""
    n_id = int(n_tokens * id_fraction)
    prose = tokenizer.encode(natural_text(split), add_bos=False)
    # repeat the prose if asked for more than one pass holds (the doc says how much is unique)
    while len(prose) < n_tokens - n_id:
        prose = prose + prose
    ids = tokenizer.encode(random_identifiers(n_id * 3, seed), add_bos=False)[:n_id]
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    n_prose = n_tokens - n_id
    docs = [bos + prose[i:min(i + doc_tokens, n_prose)] for i in range(0, n_prose, doc_tokens)]
    docs = [d for d in docs if len(d) > len(bos)]
    if ids:
        docs += [bos + ids[i:i + doc_tokens] for i in range(0, len(ids), doc_tokens)]
    return docs
