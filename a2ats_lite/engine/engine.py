"""Engine: continuous batching over one model and one KV cache.

    engine = Engine(model, kv, tokenizer)
    rid = engine.add_request(prompt_ids, SamplingParams(...))
    while engine.has_unfinished():
        for out in engine.step():          # schedule, run, postprocess
            print(out.rid, out.text, out.finished)
    engine.abort(rid)                      # frees its KV at once

Requests join and leave between steps. Prompts prefill in chunks mixed with the
decode rows of running sequences under a per-step token budget (scheduler.py).
The scheduler owns the KV manager (kv_manager.py): admission by KV memory,
prompt-prefix reuse from finished sequences, eviction of cached prefixes. The
engine runs the model and turns logits into tokens and text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..batch import Batch
from ..prompts import check_context, token_ids
from ..sampling import SamplingError, SamplingParams, TokenLogprob, token_logprob
from .kv_manager import KVManager
from .masks import StepMasks
from .scheduler import Scheduler
from .sequence import Request, Status, make_request


@dataclass
class RequestOutput:
    rid: int
    token: int | None          # the token sampled this step (None: nothing sampled)
    text: str                  # text now safe to emit (whole characters, stops removed)
    finished: bool
    finish_reason: str | None  # 'stop' | 'length' | 'eos' | 'abort' | 'error'
    prompt_tokens: int
    completion_tokens: int
    reused_tokens: int = 0     # prompt tokens whose KV came from an earlier sequence
    error: Exception | None = None   # finish_reason 'error': what failed for this request only
    logprob: TokenLogprob | None = None    # of `token` (params.logprobs)
    prompt_logprobs: list | None = None    # first output only (params.prompt_logprobs): one
                                           # TokenLogprob per prompt token, None for the first


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
    requests_failed: int = 0       # finished by an error in their own sampling or text
    last_step: dict = field(default_factory=dict)


class Engine:
    def __init__(self, model, kv, tokenizer, max_seqs: int = 16, max_step_tokens: int | None = None,
                 kv_budget: int | None = None, cache_seqs: int = 2):
        self.model, self.kv, self.tokenizer = model, kv, tokenizer
        self.n_ctx = kv.n_ctx
        self.scheduler = Scheduler(max_seqs, max_step_tokens or model.n_batch,
                                   KVManager(kv, kv_budget, cache_seqs))
        self.requests: dict[int, Request] = {}
        self.stats = Stats()
        self._next_rid = 0

    @property
    def kv_manager(self) -> KVManager:
        return self.scheduler.kv

    @property
    def cache_seqs(self) -> int:
        """Finished sequences kept for prefix reuse."""
        return self.kv_manager.cache_seqs

    @cache_seqs.setter
    def cache_seqs(self, n: int) -> None:
        self.kv_manager.cache_seqs = max(0, int(n))

    # -- requests ------------------------------------------------------------------------
    def add_request(self, prompt_ids, params: SamplingParams | None = None) -> int:
        """Queue a request; returns its id. Raises at once for a prompt that can never run:
        EmptyPromptError / TokenizerError (ids), ContextOverflowError, CapacityError,
        ValueError (a KV policy or budget this engine cannot serve)."""
        params = params or SamplingParams()
        n_vocab = self.model.config.n_vocab
        prompt = token_ids(prompt_ids, n_vocab)
        check_context(len(prompt), self.n_ctx)
        self.kv_manager.check(prompt, params)
        rid = self._next_rid
        self._next_rid += 1
        bridge = None
        if params.constraint is not None:        # built once per model, on first need
            from ..structured import bridge_for
            bridge = bridge_for(self.tokenizer, n_vocab)
        r = make_request(rid, prompt, params, n_vocab, self.tokenizer.eog_ids, time.perf_counter(),
                         bridge)
        self.requests[rid] = r
        self.scheduler.add(r)
        return rid

    def abort(self, rid: int) -> bool:
        """Stop a request now and free its KV; False if it is unknown or finished."""
        r = self.requests.pop(rid, None)
        if r is None:
            return False
        self.scheduler.abort(r)
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
        plan = self.scheduler.schedule()
        if not plan:
            return []
        batch, sampled = self._batch(plan)
        # every sampled row greedy as it is: the backend picks the tokens (no logits copied)
        greedy = all(r.sampler.plain_greedy and not r.params.prompt_logprobs
                     for r, _ in plan if sampled[r.rid][0])
        masks = StepMasks.start([r for r, _ in plan if sampled[r.rid][0] and r.matcher],
                                self.model.config.n_vocab)
        t1 = time.perf_counter()
        try:
            logits = self.model.step(batch, self.kv, greedy=greedy)
        finally:
            masks.wait()
        t2 = time.perf_counter()
        outputs = self._postprocess(plan, sampled, logits, masks)
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
        """The step's Batch; sampled[rid] = (a token is sampled this step, a decode row)."""
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
                # a request scoring its prompt gets logits for every row
                rows.append(list(range(n)) if r.params.prompt_logprobs else [n - 1] if last else [])
                sampled[r.rid] = (last, False)
        return Batch.make([r.seq for r, _ in plan], toks, starts, rows), sampled

    def _postprocess(self, plan, sampled, logits, masks: StepMasks) -> list[RequestOutput]:
        outputs, j, now = [], 0, time.perf_counter()
        for r, n in plan:
            prefill = r.status is Status.PREFILL
            if prefill:
                if r.n_computed == r.n_reused:      # its first chunk
                    self.stats.reused_tokens += r.n_reused
                if r.params.prompt_logprobs:        # rows 0..n-1 predict prompt tokens a+1..
                    j = self._score_prompt(r, n, logits, j)
                r.n_computed += n
                self.stats.prompt_tokens += n
            else:
                self.stats.decode_rows += 1
            if not sampled[r.rid][0]:
                continue
            row = logits[j]
            j += 1
            if r.first_token_time is None:
                r.first_token_time = now
            r.status = Status.DECODE
            outputs.append(self._emit(r, row, masks))
        return outputs

    def _score_prompt(self, r: Request, n: int, logits, j: int) -> int:
        """Log-probabilities of the prompt tokens the chunk's rows predict (every row but a
        final chunk's last, whose logits give the first generated token)."""
        a = r.n_computed
        if a == 0:
            r.prompt_logprobs.append(None)          # the first token has no context
        k = r.params.logprobs or 0
        for i in range(n):
            if a + i + 1 >= len(r.prompt):
                return j + i                        # the last row: sampled by the caller
            tok = r.prompt[a + i + 1]
            r.prompt_logprobs.append(token_logprob(logits[j + i], tok, k))
        return j + n

    def _emit(self, r: Request, row, masks: StepMasks) -> RequestOutput:
        """Sample r's token from its logits row (or take the backend's greedy id), record it
        and its text. What fails here is r's own doing (its sampling options, its grammar,
        its text): r finishes with the error and the other requests of the step go on."""
        tok, text, error, lp = None, "", None, None
        first = not r.out and r.finish_reason is None
        try:
            if row.ndim == 0:
                tok = int(row)
                if tok < 0:    # the backend's greedy pick found no finite logit in this row
                    raise SamplingError("logits are NaN, +inf or all -inf (model produced "
                                        "no usable scores)")
            else:
                x = r.sampler.prepare(masks.apply(r, row), r.tokens)   # penalties, mask
                tok = r.sampler.choose(x)
                if r.params.logprobs is not None:
                    lp = token_logprob(x, tok, r.params.logprobs)
            text = r.accept(tok, self.tokenizer, self.n_ctx)
            self.stats.generated_tokens += 1
        except Exception as e:                   # noqa: BLE001 (isolated to this request)
            error, r.finish_reason = e, "error"
            self.stats.requests_failed += 1
        if r.finish_reason:
            self._finish(r)
        return RequestOutput(r.rid, tok, text, r.finish_reason is not None, r.finish_reason,
                             len(r.prompt), len(r.out), r.n_reused, error, lp,
                             r.prompt_logprobs if first and r.params.prompt_logprobs else None)

    def _finish(self, r: Request) -> None:
        r.status = Status.FINISHED
        self.scheduler.finish(r)
        self.requests.pop(r.rid, None)
        self.stats.requests_finished += 1

    def clear_cache(self) -> None:
        """Free every finished sequence kept for prefix reuse."""
        self.kv_manager.clear_cache()

    def close(self) -> None:
        for rid in list(self.requests):
            self.abort(rid)
        self.clear_cache()
