"""Who runs in the next step: FCFS, under a per-step token budget and KV memory.

Every running sequence that is decoding gets one row per step first; prompts
that are still prefilling get the rest of the budget in chunks (FCFS), so a long
prompt never stalls running sequences for more than one chunk per step; then
waiting requests are admitted while there is room (a limit on live sequences,
and KV memory: the scheduler's KVManager decides, FCFS, so the head of the queue
is never overtaken). The scheduler owns the KV manager: requests get their KV
sequence when admitted and give it back when they finish or are aborted.
"""
from __future__ import annotations

from collections import deque

from .kv_manager import KVManager
from .sequence import Request, Status


class Scheduler:
    def __init__(self, max_seqs: int, max_step_tokens: int, kv: KVManager):
        if max_seqs < 1 or max_step_tokens < 1:
            raise ValueError(f"max_seqs and max_step_tokens must be >= 1, got {max_seqs}, "
                             f"{max_step_tokens}")
        self.max_seqs, self.max_step_tokens = int(max_seqs), int(max_step_tokens)
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []           # admitted, in admission order

    def add(self, r: Request) -> None:
        """Queue a request (KVManager.check has accepted it)."""
        self.waiting.append(r)

    def finish(self, r: Request) -> None:
        """r is done: its KV is kept as a cached prefix (or freed)."""
        self._remove(r)
        if r.seq is not None:
            self.kv.release(r.seq, r.tokens)

    def abort(self, r: Request) -> None:
        """r leaves now: its KV is freed."""
        self._remove(r)
        if r.seq is not None:
            self.kv.free(r.seq)

    def _remove(self, r: Request) -> None:
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)

    def schedule(self) -> list[tuple[Request, int]]:
        """-> [(request, rows this step)]: decode rows, then prefill chunks, then newly
        admitted requests' first chunks, within max_step_tokens rows."""
        budget, plan = self.max_step_tokens, []
        for r in self.running:
            if r.status is Status.DECODE and budget > 0:
                plan.append((r, 1))
                budget -= 1
        for r in self.running:
            if r.status is Status.PREFILL and budget > 0:
                n = min(r.prefill_left, budget)
                plan.append((r, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs:
            r = self.waiting[0]
            if not self.kv.can_admit(r.prompt, r.params):
                break
            self.waiting.popleft()
            r.seq, r.n_computed = self.kv.admit(r.prompt, r.params)
            r.n_reused, r.status = r.n_computed, Status.PREFILL
            self.running.append(r)
            n = min(r.prefill_left, budget)
            plan.append((r, n))
            budget -= n
        return plan
