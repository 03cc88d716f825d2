"""Who runs in the next step: FCFS, under a per-step token budget.

Every running sequence that is decoding gets one row per step first; prompts
that are still prefilling get the rest of the budget in chunks (FCFS), so a long
prompt never stalls running sequences for more than one chunk per step; then
waiting requests are admitted while there is room (a limit on live sequences,
and KV memory: the engine's admit() decides, FCFS, so the head of the queue is
never overtaken).
"""
from __future__ import annotations

from collections import deque

from .sequence import Request, Status


class Scheduler:
    def __init__(self, max_seqs: int, max_step_tokens: int):
        if max_seqs < 1 or max_step_tokens < 1:
            raise ValueError(f"max_seqs and max_step_tokens must be >= 1, got {max_seqs}, "
                             f"{max_step_tokens}")
        self.max_seqs, self.max_step_tokens = int(max_seqs), int(max_step_tokens)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []           # admitted, in admission order

    def add(self, r: Request) -> None:
        self.waiting.append(r)

    def remove(self, r: Request) -> None:
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)

    def schedule(self, admit) -> list[tuple[Request, int]]:
        """-> [(request, rows this step)]; admit(request) -> bool takes a waiting request's
        KV (False: not now, it stays at the head of the queue)."""
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
            if not admit(r):
                break
            self.waiting.popleft()
            self.running.append(r)
            n = min(r.prefill_left, budget)
            plan.append((r, n))
            budget -= n
        return plan
