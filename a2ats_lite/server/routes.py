"""The HTTP route handlers: module-level Starlette endpoints over the app's AppState.

Each handler reads `request.app.state.server` (an AppState: the runtime, the engine
loop, the model name, the API key and the limits), parses the request with schemas,
hands it to the engine loop, and answers with schemas' objects. A handler whose client
went away (a streaming response cancelled by Starlette, a non-streaming one that polls
request.is_disconnected()) aborts its request, which frees its KV before the next step.
"""
from __future__ import annotations

import asyncio
import functools
import hmac
import json
import time
from dataclasses import dataclass, field, fields

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..errors import A2ATSError, CapacityError, ContextOverflowError, TemplateError, ToolError
from ..sampling import SamplingParams
from .loop import RATE_WINDOW_S, EngineLoop, Handle, QueueFullError, ShuttingDown
from .schemas import (SSE_DONE, APIError, Reply, bad, check_context, error_response, finish_reason,
                      model_list, parse_messages, parse_prompt, sampling_from, sse, stream_flags)
from .structured import Assembler, Shape, parse_shape

RETRY_AFTER_S = 1
LINGER_BYTES = 64 << 20         # at most this much of a refused body is read and dropped
LINGER_S = 5.0                  # for at most this long


@dataclass
class AppState:
    """What the handlers share: set once by create_app, on app.state.server."""
    runtime: object
    engine: EngineLoop
    model_name: str
    api_key: str | None = None
    queue_size: int = 64
    max_body: int = 1 << 20
    body_timeout: float = 30.0                     # seconds for a request body to arrive
    created: float = field(default_factory=time.time)
    n_ctx: int = field(init=False)
    kv_label: str = field(init=False)              # the /metrics label value, quoted

    def __post_init__(self):
        self.n_ctx = self.runtime.n_ctx
        self.kv_label = json.dumps(str(self.runtime.kv_name))

    def seeded(self, params: SamplingParams) -> SamplingParams:
        """--seed: a request without a seed gets the runtime's seed plus its number, so the
        same sequence of requests runs the same (Runtime.sampling_params' rule)."""
        return self.runtime.sampling_params(**{f.name: getattr(params, f.name)
                                               for f in fields(params)})


def _state(request: Request) -> AppState:
    return request.app.state.server


# ---------------------------------------------------------------------------------------------
# request intake
# ---------------------------------------------------------------------------------------------

def check_auth(st: AppState, request: Request) -> None:
    if st.api_key is None:
        return
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    # constant time: how long the comparison takes says nothing about the key
    same = hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"),
                               st.api_key.encode("utf-8", "surrogateescape"))
    if scheme.lower() != "bearer" or not same:
        raise APIError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                       "authentication_error", code="invalid_api_key")


async def read_json(st: AppState, request: Request) -> dict:
    """The body as a JSON object: 413 past max_body (by Content-Length or bytes read), 408
    when it takes longer than body_timeout to arrive."""
    max_body = st.max_body
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            n = int(cl)
        except ValueError:
            raise APIError(400, "bad Content-Length header") from None
        if n > max_body:
            await _linger(request)
            raise APIError(413, f"request body of {n} bytes is over the limit of {max_body} bytes",
                           code="request_too_large")
    try:
        buf = await asyncio.wait_for(_read_body(request, max_body), st.body_timeout)
    except asyncio.TimeoutError:
        raise APIError(408, f"the request body did not arrive within {st.body_timeout:g} s",
                       code="request_timeout") from None
    except ClientDisconnect:
        raise APIError(400, "client disconnected while sending the body") from None
    if buf is None:
        await _linger(request)
        raise APIError(413, f"request body is over the limit of {max_body} bytes",
                       code="request_too_large")
    try:
        body = json.loads(bytes(buf))
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"malformed JSON body: {str(e)[:200]}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the JSON body must be an object")
    return body


async def _read_body(request: Request, max_body: int) -> bytearray | None:
    """The body's bytes, or None as soon as they pass max_body."""
    buf = bytearray()
    async for chunk in request.stream():
        buf += chunk
        if len(buf) > max_body:
            return None
    return buf


async def _linger(request: Request) -> None:
    """Read and drop what the client is still sending (up to LINGER_BYTES, LINGER_S) before an
    early error answer, as nginx's lingering close: a client that sends its whole body
    before reading (no Expect: 100-continue) then gets the answer instead of a reset.
    A client that asked for 100-continue waits for the answer and sends nothing."""
    if "100-continue" in request.headers.get("expect", "").lower():
        return
    async def drain():
        n = 0
        try:
            async for chunk in request.stream():
                n += len(chunk)
                if n > LINGER_BYTES:
                    return
        except (ClientDisconnect, RuntimeError):   # gone, or the stream was partly read
            return
    try:
        await asyncio.wait_for(drain(), LINGER_S)
    except asyncio.TimeoutError:
        pass


async def _chat_prompt(st: AppState, messages: list[dict], shape: Shape) -> list[int]:
    template_vars = {}
    if shape.fmt is not None:                 # tools: rendered as the template expects them
        try:
            messages = shape.fmt.prepare_messages(messages, shape.tools)
        except ToolError as e:
            raise APIError(400, str(e), param="messages") from None
        template_vars = shape.fmt.template_variables(shape.tools)
    try:
        return await anyio.to_thread.run_sync(
            functools.partial(st.runtime.chat_prompt, messages, **template_vars))
    except TemplateError as e:
        raise APIError(400, f"chat template error: {e}", param="messages",
                       code="template_error") from None
    except (A2ATSError, ValueError, TypeError) as e:
        raise APIError(400, f"cannot render the conversation: {e}", param="messages") from None
    except RecursionError:
        raise APIError(400, "the chat template recursed too deeply", param="messages",
                       code="template_error") from None


async def _completion_prompt(st: AppState, body: dict) -> tuple[list[int], str | None]:
    """(prompt ids, prompt text: what an echo repeats)."""
    p = parse_prompt(body, st.runtime)
    if not isinstance(p, str):
        return p, st.runtime.detokenize(p)
    try:
        return await anyio.to_thread.run_sync(st.runtime.tokenize, p), p
    except (A2ATSError, ValueError) as e:
        raise bad("prompt", f"cannot tokenize the prompt: {e}") from None


@dataclass
class Prepared:
    """A generation request, parsed and checked."""
    prompt: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    shape: Shape
    prompt_text: str | None = None


async def prepare(st: AppState, request: Request, chat: bool) -> Prepared:
    check_auth(st, request)
    body = await read_json(st, request)
    # the shape (constraint, tools, logprobs) first: a bad schema or grammar is a 400
    # before any work; the grammar compiles off the event loop
    shape = await anyio.to_thread.run_sync(parse_shape, body, st.runtime, chat, bad)
    prompt_text = None
    if chat:
        messages = parse_messages(body)
        prompt = await _chat_prompt(st, messages, shape)
        extra, param = list(st.runtime.chat_stop(messages)), "messages"
    else:
        prompt, prompt_text = await _completion_prompt(st, body)
        extra, param = [], "prompt"
    if not prompt:
        raise bad(param, "the prompt has no tokens")
    check_context(len(prompt), st.n_ctx, param)
    params = st.seeded(sampling_from(body, len(prompt), st.n_ctx, chat=chat, extra_stop=extra,
                                     shape=shape))
    stream, include_usage = stream_flags(body)
    return Prepared(prompt, params, stream, include_usage, shape, prompt_text)


def submit(st: AppState, prompt: list[int], params: SamplingParams) -> Handle:
    """Hand the request to the engine loop; 503 with Retry-After when its queue is full."""
    h = Handle(prompt, params, asyncio.get_running_loop(), asyncio.Queue())
    try:
        st.engine.submit(h, st.queue_size)
    except QueueFullError as e:
        raise APIError(503, f"server busy: {e}; retry later", "server_error", code="server_busy",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    return h


def engine_error(e: Exception) -> APIError:
    """The HTTP error for an exception the engine loop sent instead of output."""
    if isinstance(e, ShuttingDown):
        return APIError(503, str(e), "server_error", code="server_shutting_down")
    if isinstance(e, ContextOverflowError):
        return APIError(400, str(e), code="context_length_exceeded")
    if isinstance(e, CapacityError):
        return APIError(400, str(e), code="kv_capacity_exceeded")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", "server_error")


# ---------------------------------------------------------------------------------------------
# generation
# ---------------------------------------------------------------------------------------------

async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (its body is read: the next ASGI message is the
    disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def collect(request: Request, h: Handle) -> list:
    """A non-streaming request's events up to the last one, while a watcher waits for the
    client to go away: then the request is aborted at once (its KV freed before the next
    step) and ClientDisconnect raised."""
    gone = asyncio.ensure_future(_client_gone(request))
    events = []
    try:
        while True:
            got = asyncio.ensure_future(h.events.get())
            await asyncio.wait({got, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not got.done():
                got.cancel()
                raise ClientDisconnect()
            kind, ev = got.result()
            events.append((kind, ev))
            if kind == "error" or ev.finished:
                return events
    finally:
        gone.cancel()


async def generate(request: Request, chat: bool):
    st = _state(request)
    try:
        req = await prepare(st, request, chat)
        h = submit(st, req.prompt, req.params)
    except APIError as e:
        return e.response()
    reply = Reply.new(chat, st.model_name, req.include_usage)
    asm = Assembler(req.shape, st.runtime.tokenizer, req.prompt, req.prompt_text, chat)
    if req.stream:
        return StreamingResponse(stream_events(st, h, reply, asm), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        events = await collect(request, h)
    except ClientDisconnect:      # client gone: free the request's KV now
        st.engine.abort(h)
        return Response(status_code=400)
    except BaseException:         # cancelled (shutdown)
        if not h.done:
            st.engine.abort(h)
        raise
    kind, last = events[-1]
    if kind == "error":
        return engine_error(last).response()
    for _, ev in events:
        asm.feed(ev)
    return JSONResponse(reply.completion(asm, last))


async def stream_events(st: AppState, h: Handle, reply: Reply, asm: Assembler):
    """The SSE stream: chunks as the engine sends text (or tool-call deltas), then [DONE];
    an engine error ends it with an error object."""
    try:
        if reply.chat:
            yield sse(reply.chunk("", first=True))
        while True:
            kind, ev = await h.events.get()
            if kind == "error":
                yield sse(engine_error(ev).body())
                break
            payload = asm.feed(ev)
            if payload is not None:
                for c in reply.chunks(payload):
                    yield sse(c)
            if ev.finished:
                yield sse(reply.chunk("", asm.finish_reason(finish_reason(ev))))
                if reply.include_usage:
                    yield sse(reply.usage_chunk(ev))
                break
        yield SSE_DONE
    finally:                      # disconnect (cancelled) or closed early: abort at once
        if not h.done:
            st.engine.abort(h)


async def completions(request: Request):
    return await generate(request, chat=False)


async def chat_completions(request: Request):
    return await generate(request, chat=True)


# ---------------------------------------------------------------------------------------------
# models, health, metrics
# ---------------------------------------------------------------------------------------------

def authenticated(handler):
    """handler behind the API key check (a 401 with the OpenAI error body when it fails)."""
    @functools.wraps(handler)
    async def checked(request: Request):
        try:
            check_auth(_state(request), request)
        except APIError as e:
            return e.response()
        return await handler(request)
    return checked


@authenticated
async def models(request: Request):
    st = _state(request)
    rt = st.runtime
    return JSONResponse(model_list(st.model_name, st.created, st.n_ctx, rt.config.n_vocab,
                                   str(rt.kv_name)))


async def health(request: Request):
    st = _state(request)
    engine = st.engine
    engine.start()
    if not engine.alive:
        return JSONResponse({"status": "loading"}, status_code=503)
    if engine.waiting >= st.queue_size:
        return JSONResponse({"status": "busy"}, status_code=503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})
    return JSONResponse({"status": "ok"})


def _metric_rows(engine: EngineLoop) -> list[tuple[str, str, str, object]]:
    """(name, type, help, value) of every /metrics series."""
    s = engine.snapshot
    st = s.stats
    mean = st["seqs_in_steps"] / st["steps"] if st["steps"] else 0.0
    return [
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
        ("requests_failed_total", "counter", "Requests ended by an error of their own.",
         st["requests_failed"]),
        ("requests_rejected_total", "counter", "Requests answered 503 (queue full).",
         engine.rejected),
    ]


@authenticated
async def metrics(request: Request):
    """Prometheus text: a2ats_<name>{kv="<policy>"} <value> per series."""
    st = _state(request)
    lab = f'{{kv={st.kv_label}}}'
    out = []
    for name, kind, help_, v in _metric_rows(st.engine):
        out += [f"# HELP a2ats_{name} {help_}", f"# TYPE a2ats_{name} {kind}",
                f"a2ats_{name}{lab} {v}"]
    return PlainTextResponse("\n".join(out) + "\n",
                             media_type="text/plain; version=0.0.4; charset=utf-8")


# ---------------------------------------------------------------------------------------------
# error handlers
# ---------------------------------------------------------------------------------------------

async def http_error(request: Request, exc: HTTPException):
    msg = {404: f"no route {request.url.path}", 405: f"method {request.method} is not allowed "
           f"on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return error_response(exc.status_code, msg, code={404: "not_found", 405: "method_not_allowed"}
                          .get(exc.status_code), headers=getattr(exc, "headers", None))


async def server_error(request: Request, exc: Exception):
    return error_response(500, f"internal error: {type(exc).__name__}", "server_error")
