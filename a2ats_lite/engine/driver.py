"""Driver: one engine shared by the threads of a program (the Runtime's calls).

    d = Driver(engine)
    rids = d.submit([prompt_ids, ...], [params, ...])
    for out in d.outputs(rids):        # this call's outputs only, as they are produced
        ...

Every call adds its requests, then the waiting threads take turns stepping the engine:
whichever holds the lock runs one step and files each output under its request, and
each thread takes only its own. Requests of different threads share steps; a request's
numbers do not depend on what it is batched with, so every thread gets the tokens it
would get alone. Leaving the loop early (an exception, a closed generator) aborts the
call's unfinished requests and frees their KV.

A request may instead have a sink, a function called with each of its outputs by the
thread that stepped (the server's engine loop adds its requests so, and steps with
step()): then the server and direct Runtime calls share the engine safely.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator

from .engine import Engine, RequestOutput


class Driver:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._lock = threading.RLock()
        self._outbox: dict[int, deque[RequestOutput]] = {}
        self._sinks: dict[int, Callable[[RequestOutput], None]] = {}

    @contextmanager
    def exclusive(self):
        """The engine (and its KV cache) to the caller alone: for work beside the engine
        (a forward pass of its own) and for reading its state."""
        with self._lock:
            yield self.engine

    def submit(self, prompts: list, params: list) -> list[int]:
        """Queue one request per prompt; all or none (a refused prompt raises, nothing runs)."""
        with self._lock:
            rids = []
            try:
                for ids, p in zip(prompts, params):
                    rid = self.engine.add_request(ids, p)
                    self._outbox[rid] = deque()
                    rids.append(rid)
            except BaseException:
                self._drop(rids)
                raise
            return rids

    def add(self, ids, params, sink: Callable[[RequestOutput], None]) -> int:
        """One request whose outputs go to sink(output) (called under the engine's lock)."""
        with self._lock:
            rid = self.engine.add_request(ids, params)
            self._sinks[rid] = sink
            return rid

    def abort(self, rid: int) -> bool:
        with self._lock:
            self._sinks.pop(rid, None)
            self._outbox.pop(rid, None)
            return self.engine.abort(rid)

    def step(self) -> list[RequestOutput]:
        """One engine step; every output filed or handed to its sink."""
        with self._lock:
            outs = self.engine.step()
            self._route(outs)
            return outs

    def _route(self, outs) -> None:
        for o in outs:
            box = self._outbox.get(o.rid)
            if box is not None:
                box.append(o)
                continue
            sink = self._sinks.get(o.rid)
            if sink is not None:
                if o.finished:
                    del self._sinks[o.rid]
                sink(o)

    def outputs(self, rids: list[int], on_step: Callable[[float, dict], None] | None = None
                ) -> Iterator[RequestOutput]:
        """Yield the outputs of rids until every one has finished. on_step(seconds, info)
        is called after each step this thread runs (info: the engine's last_step)."""
        left = set(rids)
        try:
            while left:
                with self._lock:
                    got = self._take(rids)
                    if not got:
                        if not self.engine.has_unfinished():
                            return
                        t0 = time.perf_counter()
                        self.step()
                        if on_step is not None:
                            on_step(time.perf_counter() - t0, self.engine.stats.last_step)
                        got = self._take(rids)
                for o in got:
                    if o.finished:
                        left.discard(o.rid)
                    yield o
        finally:
            with self._lock:
                self._drop(rids)

    def _take(self, rids) -> list[RequestOutput]:
        out = []
        for rid in rids:
            box = self._outbox.get(rid)
            while box:
                out.append(box.popleft())
        return out

    def _drop(self, rids) -> None:
        for rid in rids:
            self.engine.abort(rid)          # no-op for finished requests
            self._outbox.pop(rid, None)
