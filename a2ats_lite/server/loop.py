"""The engine loop: the background thread that steps the Engine for the server.

HTTP handlers (on the asyncio event loop) hand this thread commands through a
thread-safe queue (add a request, abort one, run a function) and wake it with an Event.
While the engine has work the loop steps it back to back, so every running request
decodes in the same forward pass; each RequestOutput goes to its handler's
asyncio.Queue through loop.call_soon_threadsafe. An abort runs before the next step,
freeing the request's KV. After every step the loop publishes a Snapshot of the
engine's numbers for /health and /metrics.

The engine is reached through the Runtime's Driver (engine/driver.py), which serializes
it: a program that serves a Runtime and also calls its generate() from other threads
shares the engine safely (whoever steps hands each output to its request's owner).
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import queue
import threading
import time
from dataclasses import dataclass, field

from ..sampling import SamplingParams

RATE_WINDOW_S = 10.0            # tokens/s in /metrics: generated in the last this many seconds


class ShuttingDown(Exception):
    """The engine loop stopped (server shutdown) before the request finished."""


class QueueFullError(Exception):
    """Too many requests are waiting: answer 503."""


@dataclass
class Handle:
    """One request's link between its HTTP handler and the engine loop."""
    prompt: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue       # ("out", RequestOutput) or ("error", exception)
    rid: int | None = None
    cancelled: bool = False
    done: bool = False


@dataclass
class Snapshot:
    """Engine numbers published by the engine loop after every step (read by any thread)."""
    running: int = 0
    waiting: int = 0
    kv_bytes: int = 0
    stats: dict = field(default_factory=dict)
    tok_per_s: float = 0.0


class EngineLoop:
    """Owns the Engine in its own thread; any thread submits, aborts or calls through it."""

    def __init__(self, runtime):
        self.rt = runtime
        self.eng = runtime.engine
        self.driver = runtime.driver
        self._cmds: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pending = 0                      # submitted, not yet handed to the engine
        self._live: dict[int, Handle] = {}     # rid -> handle (engine thread only)
        self._thread: threading.Thread | None = None
        self._closed = False                   # stopped for good (shutdown)
        self._rate: collections.deque = collections.deque()   # (time, generated_tokens)
        self.snapshot = Snapshot()
        self.rejected = 0                      # requests answered 503
        self.errors = 0                        # step() failures
        self._publish()

    # -- lifetime ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self._closed:
                return
            if self._thread is None or not self._thread.is_alive():
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="a2ats-engine", daemon=True)
                self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop for good: live requests end with an error event; timeout=0 does not wait."""
        self._closed = True
        self._stop.set()
        self._wake.set()
        t = self._thread
        if t is not None and t is not threading.current_thread() and timeout > 0:
            t.join(timeout)

    # -- called from any thread ------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        return self._pending + self.snapshot.waiting

    def submit(self, h: Handle, queue_size: int) -> None:
        """Queue a request for the engine; QueueFullError if queue_size are already waiting."""
        self.start()
        with self._lock:
            if self._closed:
                raise QueueFullError("the server is shutting down")
            if self._pending + self.snapshot.waiting >= queue_size:
                self.rejected += 1
                raise QueueFullError(f"{self._pending + self.snapshot.waiting} requests are "
                                     f"already waiting (the queue holds {queue_size})")
            self._pending += 1
        self._cmds.put(("add", h))
        self._wake.set()

    def abort(self, h: Handle) -> None:
        h.cancelled = True
        self._cmds.put(("abort", h))
        self._wake.set()

    def call(self, fn, timeout: float = 30.0):
        """Run fn(engine) in the engine thread and return its result (tests, admin)."""
        self.start()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._cmds.put(("call", (fn, fut)))
        self._wake.set()
        return fut.result(timeout)

    # -- the engine thread ---------------------------------------------------------------------
    def _send(self, h: Handle, event) -> None:
        try:
            h.loop.call_soon_threadsafe(h.events.put_nowait, event)
        except RuntimeError:       # its event loop is closed (server shutting down)
            h.done = True

    def _drain(self, stopping: bool = False) -> None:
        """Run the queued commands. stopping: the loop is gone, so an add or a call that is
        still queued fails with ShuttingDown instead of reaching the engine."""
        while True:
            try:
                kind, arg = self._cmds.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._pending -= 1
                if stopping:
                    self._send(arg, ("error", ShuttingDown("the server is shutting down")))
                elif not arg.cancelled:
                    self._add(arg)
            elif kind == "abort":
                h = arg
                if h.rid is not None and self._live.pop(h.rid, None) is not None:
                    self.driver.abort(h.rid)
            elif kind == "call":
                fn, fut = arg
                if stopping:
                    fut.set_exception(ShuttingDown("the engine loop has stopped"))
                    continue
                try:
                    with self.driver.exclusive():
                        fut.set_result(fn(self.eng))
                except Exception as e:
                    fut.set_exception(e)

    def _add(self, h: Handle) -> None:
        try:
            with self.driver.exclusive():      # the rid is live before any step can see it
                h.rid = self.driver.add(h.prompt, h.params, functools.partial(self._deliver, h))
                self._live[h.rid] = h
        except Exception as e:          # overflow, capacity, bad ids: to its handler
            h.done = True
            self._send(h, ("error", e))

    def _deliver(self, h: Handle, o) -> None:
        """One output of h's request (called by whichever thread stepped the engine); a
        request that failed in its own sampling or text ends with its error."""
        if o.finished:
            self._live.pop(o.rid, None)
            h.done = True
        self._send(h, ("out", o) if o.error is None else ("error", o.error))

    def _run(self) -> None:
        eng = self.eng
        while not self._stop.is_set():
            self._drain()
            if not eng.has_unfinished():
                self._publish()
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.driver.step()                  # outputs reach their handles (_deliver)
            except Exception as e:              # never let one bad step kill the server
                self.errors += 1
                for rid, h in list(self._live.items()):
                    self.driver.abort(rid)
                    h.done = True
                    self._send(h, ("error", e))
                self._live.clear()
            self._publish()
        # stopping: abort what is left so no handler waits forever
        self._drain()
        for rid, h in list(self._live.items()):
            self.driver.abort(rid)
            self._send(h, ("error", ShuttingDown("the server is shutting down")))
        self._live.clear()
        self._drain(stopping=True)              # requests that arrived meanwhile
        self._publish()

    def _publish(self) -> None:
        eng, now = self.eng, time.monotonic()
        st = eng.stats
        stats = {k: getattr(st, k) for k in ("steps", "prompt_tokens", "reused_tokens",
                                             "generated_tokens", "max_seqs_in_step", "seqs_in_steps",
                                             "forward_s", "requests_finished", "requests_aborted",
                                             "requests_failed")}
        self._rate.append((now, stats["generated_tokens"]))
        while len(self._rate) > 2 and self._rate[1][0] < now - RATE_WINDOW_S:
            self._rate.popleft()
        t0, g0 = self._rate[0]
        rate = (stats["generated_tokens"] - g0) / (now - t0) if now - t0 > 1e-3 else 0.0
        with self.driver.exclusive():          # another thread may be stepping it
            counts = eng.num_running, eng.num_waiting, eng.kv_bytes()
        self.snapshot = Snapshot(*counts, stats, rate)
