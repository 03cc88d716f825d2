"""Structured output, tool calls and log-probabilities on the wire.

Request side (parse_shape): OpenAI's `response_format`, llama.cpp's `grammar` and
`json_schema`, a `regex` (as vLLM's guided_regex), `tools` / `tool_choice` / `parallel_tool_calls` (chat), `logprobs` /
`top_logprobs` (chat), `logprobs: N` and `echo` (completions) -> a Shape: the
constraint the engine applies, the tool-call format of the model's template, how many
log-probabilities to report.

Response side (Assembler): one request's engine outputs -> the choice of a non-streamed
answer, or the payload of each streamed chunk: text, or tool calls parsed from the text
decoded with its control tokens (Llama's <|python_tag|>, Mistral's [TOOL_CALLS]), and
the log-probabilities in OpenAI's chat or legacy completions shape.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import GrammarError, ToolError

MAX_COMPLETION_LOGPROBS = 5       # OpenAI's legacy completions allow logprobs 0..5
MAX_TOP_LOGPROBS = 20             # chat's top_logprobs 0..20


@dataclass
class Shape:
    """What a request asks of its output's shape and scores."""
    constraint: object | None = None     # structured.Constraint
    tools: object | None = None          # structured.ToolRequest
    fmt: object | None = None            # structured.ToolFormat of the model's template
    logprobs: int | None = None          # top entries per token (0: the chosen one only)
    echo: bool = False                   # completions: the prompt, scored, before the reply

    @property
    def calls_tools(self) -> bool:
        return self.tools is not None and self.tools.choice != "none"


def parse_shape(body: dict, runtime, chat: bool, bad) -> Shape:
    """The request's Shape; bad(param, message) makes the 400 for a field."""
    from ..structured import Constraint, ToolRequest, bridge_for, tool_format_for_template
    shape = Shape()
    try:
        shape.constraint = Constraint.from_request(
            json_schema=body.get("json_schema"), grammar=body.get("grammar"),
            regex=body.get("regex"), response_format=body.get("response_format"))
    except GrammarError as e:
        raise bad(_shape_param(body), str(e)) from None
    if chat:
        try:
            shape.tools = ToolRequest.from_openai(body.get("tools"), body.get("tool_choice"),
                                                  body.get("parallel_tool_calls"))
        except ToolError as e:
            raise bad("tools" if "tool_choice" not in str(e) else "tool_choice", str(e)) from None
        if shape.tools is not None:
            shape.fmt = tool_format_for_template(runtime.file.get("tokenizer.chat_template"))
        if shape.calls_tools:
            if shape.constraint is not None:
                raise bad("response_format", "a request with tools gives no response_format, "
                                             "grammar or json_schema")
            bridge = bridge_for(runtime.tokenizer, runtime.config.n_vocab)
            try:
                shape.constraint = shape.fmt.constraint(shape.tools, bridge)
            except GrammarError as e:
                raise bad("tools", f"cannot build the tool-call grammar: {e}") from None
    if shape.constraint is not None and not shape.calls_tools:
        try:        # the first mask now: a grammar the vocabulary cannot follow is a 400 here
            shape.constraint.matcher(bridge_for(runtime.tokenizer, runtime.config.n_vocab))
        except GrammarError as e:
            raise bad(_shape_param(body), str(e)) from None
    shape.logprobs, shape.echo = _logprobs(body, chat, bad)
    return shape


def _shape_param(body: dict) -> str:
    for k in ("response_format", "json_schema", "grammar", "regex"):
        if body.get(k) is not None:
            return k
    return "response_format"


def _logprobs(body: dict, chat: bool, bad) -> tuple[int | None, bool]:
    lp, echo = body.get("logprobs"), body.get("echo")
    if chat:
        if lp not in (None, False, True):
            raise bad("logprobs", "'logprobs' must be a boolean")
        top = body.get("top_logprobs")
        if top is not None:
            if isinstance(top, bool) or not isinstance(top, int) or \
                    not 0 <= top <= MAX_TOP_LOGPROBS:
                raise bad("top_logprobs", f"'top_logprobs' must be an integer in "
                                          f"[0, {MAX_TOP_LOGPROBS}]")
            if not lp:
                raise bad("top_logprobs", "'top_logprobs' needs 'logprobs': true")
        if echo not in (None, False):
            raise bad("echo", "'echo' is for /v1/completions")
        return (top or 0) if lp else None, False
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int)
                           or not 0 <= lp <= MAX_COMPLETION_LOGPROBS):
        raise bad("logprobs", f"'logprobs' must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]")
    if echo not in (None, False, True):
        raise bad("echo", "'echo' must be a boolean")
    return lp, bool(echo)


# ---------------------------------------------------------------------------------------------
# responses
# ---------------------------------------------------------------------------------------------

class Assembler:
    """One request's reply from its engine outputs (both the streamed and the whole form)."""

    def __init__(self, shape: Shape, tokenizer, prompt: list[int], prompt_text: str | None,
                 chat: bool):
        self.shape, self.tok, self.chat = shape, tokenizer, chat
        self.prompt, self.prompt_text = prompt, prompt_text
        self.text: list[str] = []
        self.tokens: list[int] = []
        self.entries: list = []                   # TokenLogprob per generated token
        self.prompt_entries: list | None = None   # echo: per prompt token (first: None)
        self._special_text = ""                   # tool requests: decoded with control tokens
        self.stream = shape.fmt.stream() if shape.calls_tools else None
        self.calls: list[dict] = []

    # -- engine outputs ------------------------------------------------------------------
    def feed(self, o) -> dict | None:
        """Record one output; -> the streamed chunk's payload for it, or None when it
        carries nothing to send."""
        if o.prompt_logprobs is not None:
            self.prompt_entries = o.prompt_logprobs
        new = []
        if o.token is not None and o.finish_reason != "eos" and o.error is None:
            self.tokens.append(o.token)
            if o.logprob is not None:
                new.append(o.logprob)
        self.entries += new
        self.text.append(o.text)
        if self.stream is not None:
            deltas = self.stream.feed(self._more_special_text(o.finished))
            if o.finished:
                deltas += self.stream.finish()
            return {"deltas": deltas, "logprobs": self._chat_lp(new)} if deltas or new else None
        if self.chat:
            return {"content": o.text, "logprobs": self._chat_lp(new)} \
                if o.text or new else None
        items, text = [(e.token, e) for e in new], o.text
        if self.shape.echo and len(self.text) == 1:       # the first chunk carries the prompt
            text = (self.prompt_text or "") + text
            if self.prompt_entries is not None:
                items = list(zip(self.prompt, self.prompt_entries)) + items
        offset = 0 if self.shape.echo and len(self.text) == 1 else self._offset()
        return {"text": text, "logprobs": self._legacy_lp(items, offset)} if text or items else None

    def _more_special_text(self, final: bool) -> str:
        """Newly decoded text of the generated tokens, control tokens included (the tool-call
        markers are control tokens); incomplete UTF-8 is held back until it completes."""
        anchor = self.prompt[-1:]
        full = self.tok.decode(anchor + self.tokens, special=True)[
            len(self.tok.decode(anchor, special=True)):]
        if full.endswith("\ufffd") and not final:
            return ""
        piece, self._special_text = full[len(self._special_text):], full
        return piece

    def _offset(self) -> int:
        return len(self.prompt_text or "") * self.shape.echo + sum(len(t) for t in self.text[:-1])

    # -- whole answers ---------------------------------------------------------------------
    def message(self) -> dict:
        """The chat answer's message (content, or tool_calls)."""
        if self.shape.calls_tools:
            self._more_special_text(final=True)
            parsed = self.shape.fmt.parse(self._special_text)
            self.calls = parsed.tool_calls
            if self.calls:
                return {"role": "assistant", "content": parsed.content, "tool_calls": self.calls}
        return {"role": "assistant", "content": "".join(self.text)}

    def completion_text(self) -> str:
        text = "".join(self.text)
        return (self.prompt_text or "") + text if self.shape.echo else text

    def finish_reason(self, base: str) -> str:
        has_calls = self.calls or (self.stream is not None and self.stream.has_tool_calls)
        return "tool_calls" if has_calls else base

    def logprobs(self):
        """The whole answer's logprobs object (None when not asked for)."""
        if self.shape.logprobs is None:
            return None
        if self.chat:
            return self._chat_lp(self.entries)
        items = [(e.token, e) for e in self.entries]
        if not self.shape.echo:
            return self._legacy_lp(items, 0)
        prompt = list(zip(self.prompt, self.prompt_entries or [None] * len(self.prompt)))
        return self._legacy_lp(prompt + items, 0)

    # -- shapes ----------------------------------------------------------------------------
    def _piece(self, tid: int) -> tuple[str, list[int]]:
        b = self.tok.token_bytes(int(tid), special=True)
        return b.decode("utf-8", errors="replace"), list(b)

    def _chat_lp(self, entries) -> dict | None:
        """OpenAI chat: {"content": [{token, logprob, bytes, top_logprobs}]}."""
        if self.shape.logprobs is None:
            return None
        out = []
        for e in entries:
            tok, b = self._piece(e.token)
            top = [{"token": t, "logprob": lp, "bytes": tb}
                   for (t, tb), lp in ((self._piece(i), lp) for i, lp in e.top)]
            out.append({"token": tok, "logprob": e.logprob, "bytes": b, "top_logprobs": top})
        return {"content": out}

    def _legacy_lp(self, items, offset: int) -> dict | None:
        """Legacy completions: tokens, token_logprobs, top_logprobs, text_offset of
        items (token id, TokenLogprob or None: an echoed first prompt token, unscored)."""
        if self.shape.logprobs is None:
            return None
        tokens, lps, tops, offs, pos = [], [], [], [], offset
        for tid, e in items:
            piece = self._piece(tid)[0]
            tokens.append(piece)
            offs.append(pos)
            pos += len(piece)
            lps.append(None if e is None else e.logprob)
            tops.append(None if e is None else {self._piece(i)[0]: lp for i, lp in e.top})
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops,
                "text_offset": offs}
