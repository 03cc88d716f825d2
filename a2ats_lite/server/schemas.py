"""The OpenAI wire format: request parsing and validation, errors, response objects.

Requests: parse_prompt (/v1/completions), parse_messages (/v1/chat/completions),
check_context, stream_flags, and sampling_from, the one place a request body becomes
SamplingParams. A bad field raises APIError (400 naming the field as `param`).

Responses: APIError and error_response (the OpenAI error body), Reply (one request's
completion object, streaming chunks and usage chunk), model_list, and sse() for the
text/event-stream framing. Nothing here touches the engine or the HTTP connection.
"""
from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass

from starlette.responses import JSONResponse

from .. import prompts
from ..errors import ContextOverflowError
from ..prompts import token_ids
from ..sampling import SamplingParams

SSE_DONE = "data: [DONE]\n\n"
_FINISH = {"eos": "stop", "stop": "stop", "length": "length"}   # engine -> OpenAI finish_reason


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------

def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class APIError(Exception):
    """An HTTP error answered with the OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, self.param, self.code,
                              self.headers)


def bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param)


# ---------------------------------------------------------------------------------------------
# request fields
# ---------------------------------------------------------------------------------------------

_NUM = (int, float)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v)


def _is_bool(v) -> bool:
    return isinstance(v, bool)


def _get(body: dict, name: str, check, what: str, default=None):
    """body[name] if it passes check (None counts as absent), else a 400 naming the field."""
    v = body.get(name)
    if v is None:
        return default
    if not check(v):
        raise bad(name, f"'{name}' must be {what}, got {json.dumps(v)[:80]}")
    return v


def _stop_list(body: dict) -> list[str]:
    v = body.get("stop")
    if v is None:
        return []
    if isinstance(v, str):
        return [v] if v else []
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        if len(v) > 16:
            raise bad("stop", "'stop' takes at most 16 strings")
        return [s for s in v if s]
    raise bad("stop", "'stop' must be a string or a list of strings")


def _max_tokens(body: dict, prompt_len: int, n_ctx: int, chat: bool) -> int:
    names = ["max_tokens"] + (["max_completion_tokens"] if chat else [])
    max_tokens = None
    for name in names:
        v = _get(body, name, _is_int, "an integer")
        if v is not None:
            if v < 1:
                raise bad(name, f"'{name}' must be at least 1, got {v}")
            max_tokens = v if max_tokens is None else min(max_tokens, v)
    if max_tokens is None:
        max_tokens = max(1, n_ctx - prompt_len)      # until the context is full (llama.cpp's -1)
    return max_tokens


def sampling_from(body: dict, prompt_len: int, n_ctx: int, *, chat: bool,
                  extra_stop: list[str] = (), shape=None) -> SamplingParams:
    """The request's SamplingParams (OpenAI fields + llama.cpp extras; shape: the
    structured.Shape's constraint and logprobs); APIError 400 if bad. The values'
    ranges are SamplingParams' own checks (one place for the API, CLI and server)."""
    n = _get(body, "n", _is_int, "an integer", 1)
    if n != 1:
        raise bad("n", "only n=1 is supported")
    _get(body, "stream", _is_bool, "a boolean")
    _get(body, "model", lambda v: isinstance(v, str), "a string")
    _get(body, "stream_options", lambda v: isinstance(v, dict), "an object")
    kw = {"max_tokens": _max_tokens(body, prompt_len, n_ctx, chat)}
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
    seed = _get(body, "seed", _is_int, "an integer")
    if seed is not None:
        kw["seed"] = seed
    kv = _get(body, "kv", lambda v: isinstance(v, str), "a KV policy name")
    if kv is not None:
        kw["kv"] = kv
    budget = _get(body, "budget", _is_num, "a number")
    if budget is not None:
        kw["budget"] = budget
    ignore_eos = _get(body, "ignore_eos", _is_bool, "a boolean")
    if ignore_eos:
        kw["ignore_eos"] = True
    stop = _stop_list(body) + [s for s in extra_stop]
    kw["stop"] = list(dict.fromkeys(stop))
    _refuse_unsupported(body)
    if shape is not None:
        kw.update(constraint=shape.constraint, logprobs=shape.logprobs,
                  prompt_logprobs=shape.echo and shape.logprobs is not None)
    try:
        return SamplingParams(**kw)
    except ValueError as e:                              # SamplingError
        param = str(e).split(" ", 1)[0]
        raise APIError(400, str(e), param=param if param in body else None) from None


def _refuse_unsupported(body: dict) -> None:
    unsupported = {"suffix": body.get("suffix") not in (None, ""),
                   "best_of": body.get("best_of") not in (None, 1)}
    for name, is_set in unsupported.items():
        if is_set:
            raise bad(name, f"'{name}' is not supported by this server")


def stream_flags(body: dict) -> tuple[bool, bool]:
    """(stream, stream_options.include_usage)."""
    so = body.get("stream_options") or {}
    include_usage = _get(so, "include_usage", _is_bool, "a boolean", False)
    return bool(body.get("stream")), include_usage


def _message_text(m, i: int):
    c = m.get("content")
    if c is None or isinstance(c, str):
        return c
    if isinstance(c, list):              # content parts: only text ones
        out = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                raise bad(f"messages[{i}].content",
                          "only text content parts ({'type': 'text', 'text': ...}) are supported")
            out.append(part["text"])
        return "".join(out)
    raise bad(f"messages[{i}].content", "message content must be a string or a list of text parts")


# OpenAI's roles; "developer" is its current name for the system role
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant",
         "tool": "tool"}


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "'messages' must be a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise bad(f"messages[{i}]", "each message must be an object")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise bad(f"messages[{i}].role", "each message needs a string 'role'")
        if role not in ROLES:
            raise bad(f"messages[{i}].role", f"unknown role {role[:40]!r}: one of "
                                             f"{', '.join(ROLES)}")
        msg = {"role": ROLES[role], "content": _message_text(m, i)}
        if msg["content"] is None:
            msg["content"] = ""
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if m.get("tool_calls") is not None:          # an assistant turn that called tools
            if role != "assistant" or not isinstance(m["tool_calls"], list):
                raise bad(f"messages[{i}].tool_calls", "'tool_calls' is a list, on assistant "
                                                       "messages")
            msg["tool_calls"] = m["tool_calls"]
        if role == "tool":
            if not isinstance(m.get("tool_call_id"), str):
                raise bad(f"messages[{i}].tool_call_id", "a tool message needs the "
                                                         "'tool_call_id' it answers")
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    return out


def parse_prompt(body: dict, rt) -> list[int] | str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                                   # a batch of one
    if isinstance(p, str):
        if not p:
            raise bad("prompt", "'prompt' is empty")
        return p
    if isinstance(p, list) and p and all(_is_int(t) for t in p):
        try:
            return token_ids(p, rt.config.n_vocab)
        except ValueError as e:
            raise bad("prompt", str(e)) from None
    if isinstance(p, list) and len(p) > 1:
        raise bad("prompt", "only one prompt per request is supported")
    raise bad("prompt", "'prompt' must be a string or a list of token ids")


def check_context(n_prompt: int, n_ctx: int, param: str) -> None:
    try:
        prompts.check_context(n_prompt, n_ctx)
    except ContextOverflowError as e:
        raise APIError(400, str(e), param=param, code="context_length_exceeded") from None


# ---------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------

def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage(o) -> dict:
    return {"prompt_tokens": o.prompt_tokens, "completion_tokens": o.completion_tokens,
            "total_tokens": o.prompt_tokens + o.completion_tokens}


def finish_reason(o) -> str:
    return _FINISH.get(o.finish_reason, "stop")


@dataclass(frozen=True)
class Reply:
    """The OpenAI objects answering one request: one id, creation time and model in each."""
    chat: bool
    model: str
    include_usage: bool
    id: str
    created: int

    @classmethod
    def new(cls, chat: bool, model: str, include_usage: bool = False) -> Reply:
        return cls(chat, model, include_usage, f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                   int(time.time()))

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"

    def completion(self, asm, last) -> dict:
        """The non-streaming answer from the request's Assembler; last = the finishing
        RequestOutput."""
        if self.chat:
            message = asm.message()              # parses tool calls: before finish_reason
            choice = {"index": 0, "message": message, "logprobs": asm.logprobs(),
                      "finish_reason": asm.finish_reason(finish_reason(last))}
        else:
            choice = {"index": 0, "text": asm.completion_text(), "logprobs": asm.logprobs(),
                      "finish_reason": finish_reason(last)}
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": [choice], "usage": usage(last)}

    def chunk(self, piece: str = "", finish: str | None = None, first: bool = False,
              delta: dict | None = None, logprobs=None) -> dict:
        """One streaming chunk; first opens a chat stream with the assistant role; delta
        (chat) replaces the content delta (a tool call's)."""
        if self.chat:
            if delta is None:
                delta = {"role": "assistant", "content": piece} if first else \
                    ({"content": piece} if piece or finish is None else {})
            c = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            c = {"index": 0, "text": piece, "logprobs": logprobs, "finish_reason": finish}
        d = {**self._head(self._chunk_object), "choices": [c]}
        if self.include_usage:
            d["usage"] = None
        return d

    def chunks(self, payload: dict) -> list[dict]:
        """The chunks of one Assembler payload (a chat payload may hold several deltas)."""
        if "deltas" in payload:
            deltas = payload["deltas"] or [{}]
            return [self.chunk(delta=d, logprobs=payload["logprobs"] if i == len(deltas) - 1
                               else None) for i, d in enumerate(deltas)]
        if self.chat:
            return [self.chunk(payload["content"], logprobs=payload["logprobs"])]
        return [self.chunk(payload["text"], logprobs=payload["logprobs"])]

    def usage_chunk(self, last) -> dict:
        """The stream's last chunk when stream_options.include_usage is set."""
        return {**self._head(self._chunk_object), "choices": [], "usage": usage(last)}


def model_list(model_name: str, created: float, n_ctx: int, n_vocab: int, kv: str) -> dict:
    return {"object": "list", "data": [
        {"id": model_name, "object": "model", "created": int(created), "owned_by": "a2ats-lite",
         "meta": {"n_ctx": n_ctx, "n_vocab": n_vocab, "kv": kv}}]}
