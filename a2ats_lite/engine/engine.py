"""Engine: continuous batching over one model and one KV cache.

    engine = Engine(model, kv, tokenizer)
    rid = engine.add_request(prompt_ids, SamplingParams(...))
    while engine.has_unfinished():
        for out in engine.step():          # schedule, run, postprocess
            print(out.rid, out.text, out.finished)
    engine.abort(rid)                      # frees its KV at once

Requests join and leave between steps. Prompts prefill in chunks mixed with the
decode rows of running sequences under a per-step token budget. Admission is by
KV memory: with kv_budget set, a request waits until its KV fits (finished
sequences kept for prefix reuse are evicted first); one that can never fit is
refused by add_request. A finished sequence's KV is kept (up to cache_seqs of
them) so that a request whose prompt starts with its tokens (the next turn of a
chat, a shared system prompt) truncates and reuses it instead of recomputing.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..batch import Batch
from ..errors import CapacityError, ContextOverflowError
from ..kv.policies import check_budget
from ..sampling import SamplingParams
from .scheduler import Scheduler
from .sequence import Request, Status, make_request


@dataclass
class RequestOutput:
    rid: int
    token: int | None          # the token sampled this step (None: nothing sampled)
    text: str                  # text now safe to emit (whole characters, stops removed)
    finished: bool
    finish_reason: str | None  # 'stop' | 'length' | 'eos' | 'abort'
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int = 0     # prompt tokens whose KV came from an earlier sequence


@dataclass
class Stats:
    steps: int = 0
    prompt_tokens: int = 0         # prompt rows run (reused prefixes excluded)
    reused_tokens: int = 0
    generated_tokens: int = 0
    decode_rows: int = 0
    max_seqs_in_step: int = 0
    seqs_in_steps: int = 0         # sum over steps of the sequences each ran
    forward_s: float = 0.0
    schedule_s: float = 0.0
    requests_finished: int = 0
    requests_aborted: int = 0
    last_step: dict = field(default_factory=dict)


class Engine:
    def __init__(self, model, kv, tokenizer, max_seqs: int = 16, max_step_tokens: int | None = None,
                 kv_budget: int | None = None, cache_seqs: int = 2):
        self.model, self.kv, self.tokenizer = model, kv, tokenizer
        self.n_ctx = kv.n_ctx
        self.scheduler = Scheduler(max_seqs, max_step_tokens or model.n_batch)
        self.kv_budget = None if kv_budget is None else int(kv_budget)
        self.cache_seqs = max(0, int(cache_seqs))
        self.requests: dict[int, Request] = {}
        self.cached: OrderedDict[int, list[int]] = OrderedDict()   # idle seq -> its tokens
        self.stats = Stats()
        self._next_rid = 0

    # -- requests ------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Raises ContextOverflowError / CapacityError
        at once for a prompt that can never run."""
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_ids]
        n_vocab = self.model.config.n_vocab
        if not prompt:
            raise ValueError("a request needs at least one prompt token")
        bad = [t for t in prompt if not 0 <= t < n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {n_vocab})")
        if len(prompt) >= self.n_ctx:
            raise ContextOverflowError(f"prompt of {len(prompt)} tokens does not fit the context "
                                       f"size {self.n_ctx} (it needs room for one more token)")
        self._check_kv_request(params)
        need = self._reserve(prompt, params)
        if self.kv_budget is not None and need > self.kv_budget:
            where = "" if self.kv.B.host else " of GPU memory"
            raise CapacityError(f"request needs {need / 2**20:.1f} MiB{where} of KV cache for "
                                f"{min(self.n_ctx, len(prompt) + params.max_tokens)} tokens; the "
                                f"engine's KV budget is {self.kv_budget / 2**20:.1f} MiB{where}: "
                                f"lower the context size (-c) or max tokens, or use a retrieval "
                                f"policy (--kv a2ats keeps the full KV in host memory)")
        rid = self._next_rid
        self._next_rid += 1
        r = make_request(rid, prompt, params, n_vocab, self.tokenizer.eog_ids, time.perf_counter())
        self.requests[rid] = r
        self.scheduler.add(r)
        return rid

    def abort(self, rid: int) -> bool:
        """Stop a request now and free its KV; False if it is unknown or finished."""
        r = self.requests.pop(rid, None)
        if r is None:
            return False
        self.scheduler.remove(r)
        if r.seq is not None:
            self.kv.remove_sequence(r.seq)
        r.status, r.finish_reason = Status.FINISHED, "abort"
        self.stats.requests_aborted += 1
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    def kv_bytes(self) -> int:
        """KV memory held now (running and cached sequences)."""
        return self.kv.nbytes()

    # -- one step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass over every scheduled row, sample, emit."""
        t0 = time.perf_counter()
        plan = self.scheduler.schedule(self._admit)
        if not plan:
            return []
        batch, sampled = self._batch(plan)
        # every sampled row greedy as it is: the backend picks the tokens (no logits copied)
        greedy = all(r.sampler.plain_greedy for r, _ in plan if sampled[r.rid][0])
        t1 = time.perf_counter()
        logits = self.model.step(batch, self.kv, greedy=greedy)
        t2 = time.perf_counter()
        outputs = self._postprocess(plan, sampled, logits)
        t3 = time.perf_counter()
        st = self.stats
        st.steps += 1
        st.forward_s += t2 - t1
        st.schedule_s += (t1 - t0) + (t3 - t2)
        st.seqs_in_steps += len(plan)
        st.max_seqs_in_step = max(st.max_seqs_in_step, len(plan))
        st.last_step = {"seqs": len(plan), "rows": batch.n_rows,
                        "prefill_rows": sum(n for r, n in plan if not sampled[r.rid][1]),
                        "forward_s": t2 - t1, "other_s": (t1 - t0) + (t3 - t2)}
        return outputs

    def _batch(self, plan):
        toks, starts, rows, sampled = [], [], [], {}
        for r, n in plan:
            if r.status is Status.DECODE:
                toks.append(r.out[-1:])
                starts.append(len(r.prompt) + len(r.out) - 1)
                rows.append([0])
                sampled[r.rid] = (True, True)
            else:
                a = r.n_computed
                toks.append(r.prompt[a:a + n])
                starts.append(a)
                last = a + n == len(r.prompt)
                rows.append([n - 1] if last else [])
                sampled[r.rid] = (last, False)
        return Batch.make([r.seq for r, _ in plan], toks, starts, rows), sampled

    def _postprocess(self, plan, sampled, logits) -> list[RequestOutput]:
        outputs, j, now = [], 0, time.perf_counter()
        for r, n in plan:
            if r.status is Status.PREFILL:
                r.n_computed += n
                self.stats.prompt_tokens += n
            else:
                self.stats.decode_rows += 1
            if not sampled[r.rid][0]:
                continue
            row = logits[j]
            j += 1
            tok = int(row) if row.ndim == 0 else r.sampler.sample(row, r.tokens)
            if r.first_token_time is None:
                r.first_token_time = now
            r.status = Status.DECODE
            text = r.accept(tok, self.tokenizer, self.n_ctx)
            self.stats.generated_tokens += 1
            if r.finish_reason:
                self._finish(r)
            outputs.append(RequestOutput(r.rid, tok, text, r.finish_reason is not None,
                                         r.finish_reason, len(r.prompt), len(r.out), r.n_reused))
        return outputs

    def _finish(self, r: Request) -> None:
        r.status = Status.FINISHED
        self.scheduler.remove(r)
        self.requests.pop(r.rid, None)
        self.stats.requests_finished += 1
        if self.cache_seqs == 0:
            self.kv.remove_sequence(r.seq)
            return
        n = self.kv.length(r.seq)                  # the last sampled token was never run
        self.cached[r.seq] = r.tokens[:n]
        while len(self.cached) > self.cache_seqs:
            self.kv.remove_sequence(self.cached.popitem(last=False)[0])

    def _check_kv_request(self, p: SamplingParams) -> None:
        """A request may ask for the engine's policy (its own budget) or 'dense'."""
        pol = self.kv.policy
        if p.kv is not None and p.kv not in (pol.name, "dense"):
            raise ValueError(f"this engine's KV cache runs {pol.name!r}: a request may ask for "
                             f"kv {pol.name!r} or 'dense', not {p.kv!r}")
        if p.budget is not None:
            if not pol.retrieves:
                raise ValueError(f"budget applies to a retrieval KV policy; this engine runs "
                                 f"{pol.name!r}")
            if p.kv == "dense":
                raise ValueError("a request cannot give both kv 'dense' and a budget")
            check_budget(p.budget)

    # -- admission and prefix reuse -----------------------------------------------------------
    def _reserve(self, prompt, params) -> int:
        return self.kv.estimate_bytes(min(self.n_ctx, len(prompt) + params.max_tokens))

    def _admit(self, r: Request) -> bool:
        r.reserve = self._reserve(r.prompt, r.params)
        seq, n = self._reuse(r.prompt)
        if self.kv_budget is not None:
            held = sum(x.reserve for x in self.scheduler.running)
            while held + r.reserve + self._cached_bytes() > self.kv_budget and self.cached:
                self.kv.remove_sequence(self.cached.popitem(last=False)[0])
            if held + r.reserve + self._cached_bytes() > self.kv_budget:
                if seq is not None:               # keep the (truncated) prefix for later
                    self.cached[seq] = r.prompt[:n]
                return False
        if seq is None:
            seq, n = self.kv.add_sequence(), 0
        r.seq, r.n_computed, r.n_reused = seq, n, n
        if self.kv.policy.retrieves:        # the request's own selection budget, if any
            self.kv.policy.set_budget(seq, self.n_ctx if r.params.kv == "dense" else r.params.budget)
        self.stats.reused_tokens += n
        r.status = Status.PREFILL
        return True

    def _cached_bytes(self) -> int:
        return sum(self.kv.budget_bytes(s) for s in self.cached)

    def _reuse(self, prompt) -> tuple[int | None, int]:
        """The cached sequence sharing the longest prefix with prompt, truncated to it (at
        most len(prompt) - 1 tokens: the last prompt row must run to give logits)."""
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

    def close(self) -> None:
        for rid in list(self.requests):
            self.abort(rid)
        self.clear_cache()
