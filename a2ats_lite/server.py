"""OpenAI-compatible HTTP server on the Engine (`a2ats-lite serve`).

    app = create_app(runtime, model_name="gemma-3-270m")      # a Starlette app
    serve(runtime, "127.0.0.1", 8080)                         # uvicorn, until Ctrl-C

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with SSE
streaming), GET /v1/models, GET /health, GET /metrics (Prometheus text).

The Engine is not thread-safe, so one background thread, the engine loop, owns
it: HTTP handlers (on the asyncio event loop) hand it commands through a
thread-safe queue (add a request, abort one, run a function) and wake it with an
Event. While the engine has work the loop calls step() back to back, so every
running request decodes in the same forward pass; each RequestOutput goes to its
handler's asyncio.Queue through loop.call_soon_threadsafe. A handler whose client
went away (a streaming response cancelled by Starlette, a non-streaming one that
polls request.is_disconnected()) sends an abort, which the loop runs before its
next step, freeing the request's KV.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import itertools
import json
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

from .errors import A2ATSError, CapacityError, ContextOverflowError, TemplateError
from .sampling import SamplingParams

try:  # the `server` extra
    import anyio
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route
except ImportError as e:  # pragma: no cover - checked by the CLI before anything loads
    raise ImportError("the server needs starlette and uvicorn: pip install 'a2ats-lite[server]'") from e

RETRY_AFTER_S = 1
RATE_WINDOW_S = 10.0            # tokens/s in /metrics: generated in the last this many seconds


# ---------------------------------------------------------------------------------------------
# the engine loop: the one thread that touches the Engine
# ---------------------------------------------------------------------------------------------

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
    events: asyncio.Queue
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
    def __init__(self, runtime):
        self.rt = runtime
        self.eng = runtime.engine
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
                                     f"already waiting (--queue-size {queue_size})")
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

    def _drain(self) -> None:
        while True:
            try:
                kind, arg = self._cmds.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                with self._lock:
                    self._pending -= 1
                h = arg
                if h.cancelled:
                    continue
                try:
                    h.rid = self.eng.add_request(h.prompt, h.params)
                except Exception as e:          # overflow, capacity, bad ids: to its handler
                    h.done = True
                    self._send(h, ("error", e))
                    continue
                self._live[h.rid] = h
            elif kind == "abort":
                h = arg
                if h.rid is not None and self._live.pop(h.rid, None) is not None:
                    self.eng.abort(h.rid)
            elif kind == "call":
                fn, fut = arg
                try:
                    fut.set_result(fn(self.eng))
                except Exception as e:
                    fut.set_exception(e)

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
                outs = eng.step()
            except Exception as e:              # never let one bad step kill the server
                self.errors += 1
                for rid, h in list(self._live.items()):
                    eng.abort(rid)
                    h.done = True
                    self._send(h, ("error", e))
                self._live.clear()
                self._publish()
                continue
            for o in outs:
                h = self._live.get(o.rid)
                if h is None:
                    continue
                if o.finished:
                    del self._live[o.rid]
                    h.done = True
                self._send(h, ("out", o))
            self._publish()
        # stopping: abort what is left so no handler waits forever
        self._drain()
        for rid, h in list(self._live.items()):
            eng.abort(rid)
            self._send(h, ("error", ShuttingDown("the server is shutting down")))
        while True:                             # requests that arrived meanwhile
            try:
                kind, arg = self._cmds.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                with self._lock:
                    self._pending -= 1
                self._send(arg, ("error", ShuttingDown("the server is shutting down")))
            elif kind == "call":
                arg[1].set_exception(ShuttingDown("the engine loop has stopped"))
        self._live.clear()
        self._publish()

    def _publish(self) -> None:
        eng, now = self.eng, time.monotonic()
        st = eng.stats
        stats = {k: getattr(st, k) for k in ("steps", "prompt_tokens", "reused_tokens",
                                             "generated_tokens", "max_seqs_in_step", "seqs_in_steps",
                                             "forward_s", "requests_finished", "requests_aborted")}
        self._rate.append((now, stats["generated_tokens"]))
        while len(self._rate) > 2 and self._rate[1][0] < now - RATE_WINDOW_S:
            self._rate.popleft()
        t0, g0 = self._rate[0]
        rate = (stats["generated_tokens"] - g0) / (now - t0) if now - t0 > 1e-3 else 0.0
        self.snapshot = Snapshot(eng.num_running, eng.num_waiting, eng.kv_bytes(), stats, rate)


# ---------------------------------------------------------------------------------------------
# errors and request parsing
# ---------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _api_error(e: APIError) -> JSONResponse:
    return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


_NUM = (int, float)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v)


def _get(body: dict, name: str, check, what: str, default=None):
    """body[name] if it passes check (None counts as absent), else a 400 naming the field."""
    v = body.get(name)
    if v is None:
        return default
    if not check(v):
        raise _bad(name, f"'{name}' must be {what}, got {json.dumps(v)[:80]}")
    return v


def _stop_list(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > 16:
            raise _bad("stop", "'stop' takes at most 16 strings")
        return [s for s in v if s]
    raise _bad("stop", "'stop' must be a string or a list of strings")


def sampling_from(body: dict, prompt_len: int, n_ctx: int, *, chat: bool,
                  extra_stop: list[str] = ()) -> SamplingParams:
    """The request's SamplingParams (OpenAI fields + llama.cpp extras); APIError 400 if bad."""
    n = _get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise _bad("n", "only n=1 is supported")
    _get(body, "stream", lambda v: isinstance(v, bool), "a boolean")
    _get(body, "model", lambda v: isinstance(v, str), "a string")
    _get(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    names = ["max_tokens"] + (["max_completion_tokens"] if chat else [])
    max_tokens = None
    for name in names:
        v = _get(body, name, _is_int, "an integer")
        if v is not None:
            if v < 1:
                raise _bad(name, f"'{name}' must be at least 1, got {v}")
            max_tokens = v if max_tokens is None else min(max_tokens, v)
    if max_tokens is None:
        max_tokens = max(1, n_ctx - prompt_len)      # until the context is full (llama.cpp's -1)
    kw = {"max_tokens": max_tokens}
    for name, key in (("temperature", "temperature"), ("top_p", "top_p"), ("min_p", "min_p"),
                      ("repeat_penalty", "repeat_penalty"), ("presence_penalty", "presence_penalty"),
                      ("frequency_penalty", "frequency_penalty"), ("typical_p", "typical_p")):
        v = _get(body, name, _is_num, "a number")
        if v is not None:
            kw[key] = float(v)
    for name in ("top_k", "repeat_last_n"):
        v = _get(body, name, _is_int, "an integer")
        if v is not None:
            kw[name] = v
    if "temperature" in kw and not 0 <= kw["temperature"] <= 2:
        raise _bad("temperature", f"'temperature' must be in [0, 2], got {kw['temperature']:g}")
    if "top_p" in kw and not 0 <= kw["top_p"] <= 1:
        raise _bad("top_p", f"'top_p' must be in [0, 1], got {kw['top_p']:g}")
    seed = _get(body, "seed", _is_int, "an integer")
    if seed is not None:
        kw["seed"] = seed
    kv = _get(body, "kv", lambda v: isinstance(v, str), "a KV policy name")
    if kv is not None:
        kw["kv"] = kv
    budget = _get(body, "budget", _is_num, "a number")
    if budget is not None:
        kw["budget"] = budget
    ignore_eos = _get(body, "ignore_eos", lambda v: isinstance(v, bool), "a boolean")
    if ignore_eos:
        kw["ignore_eos"] = True
    stop = _stop_list(body) + [s for s in extra_stop]
    kw["stop"] = list(dict.fromkeys(stop))
    unsupported = {"logprobs": body.get("logprobs") not in (None, False, 0),
                   "top_logprobs": body.get("top_logprobs") not in (None, 0),
                   "echo": body.get("echo") not in (None, False),
                   "suffix": body.get("suffix") not in (None, ""),
                   "best_of": body.get("best_of") not in (None, 1)}
    for name, bad in unsupported.items():
        if bad:
            raise _bad(name, f"'{name}' is not supported by this server")
    try:
        return SamplingParams(**kw)
    except ValueError as e:                              # SamplingError
        raise APIError(400, str(e)) from None


def _message_text(m, i: int):
    c = m.get("content")
    if c is None or isinstance(c, str):
        return c
    if isinstance(c, list):              # content parts: only text ones
        out = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content",
                           "only text content parts ({'type': 'text', 'text': ...}) are supported")
            out.append(part["text"])
        return "".join(out)
    raise _bad(f"messages[{i}].content", "message content must be a string or a list of text parts")


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "'messages' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "each message must be an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise _bad(f"messages[{i}].role", "each message needs a string 'role'")
        msg = {"role": role, "content": _message_text(m, i)}
        if msg["content"] is None:
            msg["content"] = ""
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out


def parse_prompt(body: dict, rt) -> list[int] | str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                                   # a batch of one
    if isinstance(p, str):
        if not p:
            raise _bad("prompt", "'prompt' is empty")
        return p
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        n_vocab = rt.config.n_vocab
        bad = [t for t in p if not 0 <= t < n_vocab]
        if bad:
            raise _bad("prompt", f"token id {bad[0]} out of range [0, {n_vocab})")
        return list(p)
    if isinstance(p, list) and len(p) > 1:
        raise _bad("prompt", "only one prompt per request is supported")
    raise _bad("prompt", "'prompt' must be a string or a list of token ids")


# ---------------------------------------------------------------------------------------------
# the app
# ---------------------------------------------------------------------------------------------

_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def create_app(runtime, *, model_name: str, api_key: str | None = None, queue_size: int = 64,
               max_body: int = 1 << 20):
    """The Starlette app. Its engine loop starts with the app's lifespan (or on the first
    request when the app is driven without one, e.g. by httpx's ASGITransport) and
    stops at shutdown; app.state.engine is the EngineLoop."""
    engine = EngineLoop(runtime)
    n_ctx = runtime.n_ctx
    calls = itertools.count()
    kv_label = json.dumps(str(runtime.kv_name))

    def check_auth(request: Request) -> None:
        if api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or token.strip() != api_key:
            raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                           "authentication_error", code="invalid_api_key")

    async def read_json(request: Request) -> dict:
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                n = int(cl)
            except ValueError:
                raise APIError(400, "bad Content-Length header") from None
            if n > max_body:
                raise APIError(413, f"request body of {n} bytes is over the limit of {max_body} bytes",
                               code="request_too_large")
        buf = bytearray()
        try:
            async for chunk in request.stream():
                buf += chunk
                if len(buf) > max_body:
                    raise APIError(413, f"request body is over the limit of {max_body} bytes",
                                   code="request_too_large")
        except ClientDisconnect:
            raise APIError(400, "client disconnected while sending the body") from None
        try:
            body = json.loads(bytes(buf))
        except (ValueError, RecursionError) as e:
            raise APIError(400, f"malformed JSON body: {str(e)[:200]}") from None
        if not isinstance(body, dict):
            raise APIError(400, "the JSON body must be an object")
        return body

    def context_check(n_prompt: int, param: str) -> None:
        if n_prompt >= n_ctx:
            raise APIError(400, f"the prompt is {n_prompt} tokens, but the context size is {n_ctx} "
                                f"tokens (it needs room for at least one more)",
                           param=param, code="context_length_exceeded")

    async def run_request(request: Request, prompt: list[int], params: SamplingParams) -> Handle:
        h = Handle(prompt, params, asyncio.get_running_loop(), asyncio.Queue())
        try:
            engine.submit(h, queue_size)
        except QueueFullError as e:
            raise APIError(503, f"server busy: {e}; retry later", "server_error", code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return h

    def engine_error(e: Exception) -> APIError:
        if isinstance(e, ShuttingDown):
            return APIError(503, str(e), "server_error", code="server_shutting_down")
        if isinstance(e, ContextOverflowError):
            return APIError(400, str(e), code="context_length_exceeded")
        if isinstance(e, CapacityError):
            return APIError(400, str(e), code="kv_capacity_exceeded")
        if isinstance(e, ValueError):
            return APIError(400, str(e))
        return APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")

    async def next_event(request: Request, h: Handle, poll: bool):
        """The handle's next event; with poll, checks every second that the client is there."""
        if not poll:
            return await h.events.get()
        while True:
            try:
                return await asyncio.wait_for(h.events.get(), 1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientDisconnect() from None

    async def prepare(request: Request, chat: bool):
        check_auth(request)
        body = await read_json(request)
        if chat:
            messages = parse_messages(body)
            try:
                prompt = await anyio.to_thread.run_sync(runtime.chat_prompt, messages)
            except TemplateError as e:
                raise APIError(400, f"chat template error: {e}", param="messages",
                               code="template_error") from None
            except (A2ATSError, ValueError, TypeError) as e:
                raise APIError(400, f"cannot render the conversation: {e}", param="messages") from None
            except RecursionError:
                raise APIError(400, "the chat template recursed too deeply", param="messages",
                               code="template_error") from None
            extra = list(runtime.chat_stop())
            param = "messages"
        else:
            p = parse_prompt(body, runtime)
            if isinstance(p, str):
                try:
                    prompt = await anyio.to_thread.run_sync(runtime.tokenize, p)
                except (A2ATSError, ValueError) as e:
                    raise _bad("prompt", f"cannot tokenize the prompt: {e}") from None
            else:
                prompt = p
            extra, param = [], "prompt"
        if not prompt:
            raise _bad(param, "the prompt has no tokens")
        context_check(len(prompt), param)
        params = sampling_from(body, len(prompt), n_ctx, chat=chat, extra_stop=extra)
        if params.seed is None and getattr(runtime, "seed", None) is not None:
            # --seed: reproducible runs of the same sequence of requests
            params = replace(params, seed=runtime.seed + next(calls))
        so = body.get("stream_options") or {}
        include_usage = _get(so, "include_usage", lambda v: isinstance(v, bool), "a boolean", False)
        return body, prompt, params, bool(body.get("stream")), include_usage

    def usage(o) -> dict:
        return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
                "total_tokens": o.prompt_tokens + o.completion_tokens}

    async def generate(request: Request, chat: bool):
        try:
            body, prompt, params, stream, include_usage = await prepare(request, chat)
            h = await run_request(request, prompt, params)
        except APIError as e:
            return _api_error(e)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        if stream:
            return StreamingResponse(stream_events(request, h, chat, rid, created, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        text, last = [], None
        try:
            while True:
                kind, ev = await next_event(request, h, poll=True)
                if kind == "error":
                    return _api_error(engine_error(ev))
                text.append(ev.text)
                if ev.finished:
                    last = ev
                    break
        except ClientDisconnect:      # client gone: free the request's KV now
            engine.abort(h)
            return Response(status_code=400)
        except BaseException:         # cancelled (shutdown)
            if not h.done:
                engine.abort(h)
            raise
        out = "".join(text)
        finish = _FINISH.get(last.finish_reason, "stop")
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out},
                      "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": out, "logprobs": None, "finish_reason": finish}
        return JSONResponse({"id": rid, "object": obj, "created": created, "model": model_name,
                             "system_fingerprint": None, "choices": [choice], "usage": usage(last)})

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    async def stream_events(request: Request, h: Handle, chat: bool, rid: str, created: int,
                            include_usage: bool):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece, finish=None, first=False):
            if chat:
                delta = {"role": "assistant", "content": piece} if first else \
                    ({"content": piece} if piece or finish is None else {})
                c = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": piece, "logprobs": None, "finish_reason": finish}
            d = {"id": rid, "object": obj, "created": created, "model": model_name,
                 "system_fingerprint": None, "choices": [c]}
            if include_usage:
                d["usage"] = None
            return sse(d)

        try:
            if chat:
                yield chunk("", first=True)
            while True:
                kind, ev = await h.events.get()
                if kind == "error":
                    e = engine_error(ev)
                    yield sse({"error": {"message": e.message, "type": e.type, "param": e.param,
                                         "code": e.code}})
                    break
                if ev.finished:
                    finish = _FINISH.get(ev.finish_reason, "stop")
                    if ev.text:
                        yield chunk(ev.text)
                    yield chunk("", finish)
                    if include_usage:
                        yield sse({"id": rid, "object": obj, "created": created, "model": model_name,
                                   "system_fingerprint": None, "choices": [], "usage": usage(ev)})
                    break
                if ev.text:
                    yield chunk(ev.text)
            yield "data: [DONE]\n\n"
        finally:                      # disconnect (cancelled) or closed early: abort at once
            if not h.done:
                engine.abort(h)

    async def completions(request: Request):
        return await generate(request, chat=False)

    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def models(request: Request):
        try:
            check_auth(request)
        except APIError as e:
            return _api_error(e)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": int(runtime_created), "owned_by": "a2ats-lite",
             "meta": {"n_ctx": n_ctx, "n_vocab": runtime.config.n_vocab, "kv": str(runtime.kv_name)}}]})

    async def health(request: Request):
        engine.start()
        if not engine.alive:
            return JSONResponse({"status": "loading"}, status_code=503)
        if engine.waiting >= queue_size:
            return JSONResponse({"status": "busy"}, status_code=503,
                                headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request):
        try:
            check_auth(request)
        except APIError as e:
            return _api_error(e)
        s = engine.snapshot
        st = s.stats
        mean = st["seqs_in_steps"] / st["steps"] if st["steps"] else 0.0
        lab = f'{{kv={kv_label}}}'
        rows = [
            ("requests_running", "gauge", "Requests admitted to the engine (prefill or decode).", s.running),
            ("requests_waiting", "gauge", "Requests waiting for admission.", engine.waiting),
            ("prompt_tokens_total", "counter", "Prompt tokens run (reused prefixes excluded).",
             st["prompt_tokens"]),
            ("reused_tokens_total", "counter", "Prompt tokens whose KV was reused.", st["reused_tokens"]),
            ("generated_tokens_total", "counter", "Tokens generated.", st["generated_tokens"]),
            ("tokens_per_second", "gauge", f"Tokens generated per second over the last "
                                           f"{RATE_WINDOW_S:g} s.", round(s.tok_per_s, 3)),
            ("kv_cache_bytes", "gauge", "KV cache bytes in use (running and cached sequences).",
             s.kv_bytes),
            ("steps_total", "counter", "Engine steps (forward passes).", st["steps"]),
            ("seqs_per_step_mean", "gauge", "Mean sequences per engine step.", round(mean, 4)),
            ("seqs_per_step_max", "gauge", "Most sequences in one engine step.", st["max_seqs_in_step"]),
            ("forward_seconds_total", "counter", "Seconds spent in forward passes.",
             round(st["forward_s"], 6)),
            ("requests_finished_total", "counter", "Requests finished.", st["requests_finished"]),
            ("requests_aborted_total", "counter", "Requests aborted (client gone).",
             st["requests_aborted"]),
            ("requests_rejected_total", "counter", "Requests answered 503 (queue full).",
             engine.rejected),
        ]
        out = []
        for name, kind, help_, v in rows:
            out += [f"# HELP a2ats_{name} {help_}", f"# TYPE a2ats_{name} {kind}",
                    f"a2ats_{name}{lab} {v}"]
        return PlainTextResponse("\n".join(out) + "\n",
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    async def http_error(request: Request, exc: HTTPException):
        msg = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed "
               f"on {request.url.path}"}.get(exc.status_code, str(exc.detail))
        return error_response(exc.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}
                              .get(exc.status_code), headers=getattr(exc, "headers", None))

    async def server_error(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    runtime_created = time.time()
    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ], exception_handlers={HTTPException: http_error, Exception: server_error}, lifespan=lifespan)
    app.state.engine = engine
    app.state.model_name = model_name
    return app


def serve(runtime, host: str = "127.0.0.1", port: int = 8080, *, model_name: str | None = None,
          api_key: str | None = None, queue_size: int = 64, max_body: int = 1 << 20,
          log_level: str = "warning", on_ready=None) -> None:
    """Run the server until Ctrl-C / SIGTERM (uvicorn handles the signals)."""
    import uvicorn

    name = model_name or runtime.model_path.name
    app = create_app(runtime, model_name=name, api_key=api_key, queue_size=queue_size,
                     max_body=max_body)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=3)
    class _Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            # end open streams now (an error event, then [DONE]) so shutdown does not wait
            app.state.engine.stop(timeout=0)
            super().handle_exit(sig, frame)

    server = _Server(config)
    if on_ready is not None:
        orig = server.startup

        async def startup(sockets=None):
            await orig(sockets=sockets)
            if server.started:
                on_ready(server)
        server.startup = startup
    try:
        server.run()
    except KeyboardInterrupt:      # uvicorn re-raises the Ctrl-C it handled: we are done
        pass
    if not server.started:
        raise OSError(f"could not start the server on {host}:{port} (is the port in use?)")
