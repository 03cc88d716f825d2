"""KVManager: the KV memory of one engine, owned by the scheduler (vLLM v1's
KVCacheManager under its scheduler, nano-vllm's BlockManager).

    km = KVManager(kv, budget=None, cache_seqs=2)
    km.check(prompt, params)            # at add time: can this request ever run here?
    if km.can_admit(prompt, params):    # now, evicting cached prefixes if it must
        seq, reused = km.admit(prompt, params)
    km.release(seq, tokens)             # finished: kept as a cached prefix (or freed)
    km.free(seq)                        # aborted: freed now

Admission is by bytes: with a budget, the reservations of admitted sequences (their KV
at prompt + max_tokens, as KVCache.estimate_bytes counts it) plus what cached prefixes
hold must fit it; cached prefixes are evicted oldest first to make room. A finished
sequence's KV is kept (up to cache_seqs of them) so that a request whose prompt starts
with its tokens (a chat's next turn, a shared system prompt) truncates and reuses it.
"""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from ..errors import CapacityError
from ..kv.policies import check_budget


class KVManager:
    def __init__(self, kv, budget: int | None = None, cache_seqs: int = 2):
        self.kv, self.n_ctx = kv, kv.n_ctx
        self.budget = None if budget is None else int(budget)
        self.cache_seqs = max(0, int(cache_seqs))
        self.reserved: dict[int, int] = {}                      # admitted seq -> bytes
        self.cached: OrderedDict[int, list[int]] = OrderedDict()  # idle seq -> its tokens

    # -- requests -------------------------------------------------------------------------
    def need(self, prompt, params) -> int:
        """Bytes a request reserves: its KV at its largest (prompt + max_tokens, within the
        context)."""
        return self.kv.estimate_bytes(min(self.n_ctx, len(prompt) + params.max_tokens))

    def check(self, prompt, params) -> None:
        """Raise now for a request this cache can never run: a KV policy or budget it cannot
        serve (ValueError), more memory than the whole budget (CapacityError)."""
        self._check_policy(params)
        need = self.need(prompt, params)
        if self.budget is not None and need > self.budget:
            where = " of GPU memory" if self.kv.device_memory else ""
            raise CapacityError(
                f"request needs {need / 2**20:.1f} MiB{where} of KV cache for "
                f"{min(self.n_ctx, len(prompt) + params.max_tokens)} tokens; the engine's KV "
                f"budget is {self.budget / 2**20:.1f} MiB{where}: lower the context size or max "
                f"tokens, or use a retrieval policy (a2ats keeps the full KV in host memory)")

    def _check_policy(self, p) -> None:
        """A request may ask for the cache's policy (with its own budget) or 'dense'."""
        name = self.kv.name
        if p.kv is not None and p.kv not in (name, "dense"):
            allowed = f"{name!r} or 'dense'" if name != "dense" else "'dense'"
            raise ValueError(f"this engine's KV cache runs {name!r}: a request may ask for kv "
                             f"{allowed}, not {p.kv!r}")
        if p.budget is not None:
            if not self.kv.selects:
                raise ValueError(f"budget applies to a retrieval KV policy; this engine runs "
                                 f"{name!r}")
            if p.kv == "dense":
                raise ValueError("a request cannot give both kv 'dense' and a budget")
            check_budget(p.budget)

    def can_admit(self, prompt, params) -> bool:
        """Whether admit() succeeds now: the request's reservation fits beside those of
        admitted sequences once every cached prefix is evicted (a reused prefix is part
        of the request's own reservation)."""
        if self.budget is None:
            return True
        return sum(self.reserved.values()) + self.need(prompt, params) <= self.budget

    def admit(self, prompt, params) -> tuple[int, int]:
        """A sequence for the request: the cached one sharing the longest prefix with prompt,
        truncated to it, or a new one. Evicts cached prefixes (oldest first) until the
        budget holds. -> (sequence id, prompt tokens whose KV it already holds)."""
        need = self.need(prompt, params)
        # a request scoring its prompt (echo) needs every prompt row run: no reuse
        seq, n = (None, 0) if params.prompt_logprobs else self._reuse(prompt)
        if self.budget is not None:
            held = sum(self.reserved.values()) + need
            while self.cached and held + self.cached_bytes() > self.budget:
                self.kv.remove_sequence(self.cached.popitem(last=False)[0])
        if seq is None:
            seq, n = self.kv.add_sequence(), 0
        self.reserved[seq] = need
        if self.kv.selects:        # the request's own selection budget, if any
            self.kv.set_budget(seq, self.n_ctx if params.kv == "dense" else params.budget)
        return seq, n

    def release(self, seq: int, tokens) -> None:
        """A finished sequence: keep its KV for prefix reuse (tokens: what it was run on;
        the last sampled token never ran), or free it when nothing is kept."""
        self.reserved.pop(seq, None)
        if self.cache_seqs == 0:
            self.kv.remove_sequence(seq)
            return
        self.cached[seq] = list(tokens[:self.kv.length(seq)])
        while len(self.cached) > self.cache_seqs:
            self.kv.remove_sequence(self.cached.popitem(last=False)[0])

    def free(self, seq: int) -> None:
        """An aborted sequence: free everything it holds now."""
        self.reserved.pop(seq, None)
        self.kv.remove_sequence(seq)

    # -- cached prefixes ----------------------------------------------------------------------
    def cached_bytes(self) -> int:
        return sum(self.kv.budget_bytes(s) for s in self.cached)

    def _reuse(self, prompt) -> tuple[int | None, int]:
        """The cached sequence sharing the longest prefix with prompt, taken out of the cache
        and truncated to it (at most len(prompt) - 1 tokens: the last prompt row must run to
        give logits)."""
        best, best_n = None, 0
        p = np.asarray(prompt, dtype=np.int64)
        for seq, toks in self.cached.items():
            m = min(len(toks), len(p) - 1)
            if m <= best_n:
                continue
            t = np.asarray(toks[:m], dtype=np.int64)
            diff = np.flatnonzero(t != p[:m])
            n = int(diff[0]) if diff.size else m
            if n > best_n and self.kv.can_truncate(seq, n):
                best, best_n = seq, n
        if best is None:
            return None, 0
        del self.cached[best]
        self.kv.truncate(best, best_n)
        return best, best_n

    def clear_cache(self) -> None:
        """Free every finished sequence kept for prefix reuse."""
        while self.cached:
            self.kv.remove_sequence(self.cached.popitem()[0])
