"""Incremental tool-call parsing for streamed chat replies.

    stream = fmt.stream()
    for piece in generated_text_pieces:
        for delta in stream.feed(piece): send(delta)     # OpenAI chunk `delta`s
    for delta in stream.finish(): send(delta)

Deltas are OpenAI's: {"content": text}; a call's first delta
{"tool_calls": [{"index": i, "id", "type": "function", "function": {"name", "arguments": ""}}]}
then {"tool_calls": [{"index": i, "function": {"arguments": fragment}}]}. Text that may
be the start of the format's marker is held back until it is known not to be; the
argument fragments are the characters of the arguments object as the model writes
them. Put together they equal fmt.parse() of the whole text, for a reply whose calls
are complete (a reply cut inside a call keeps the part already sent).
"""
from __future__ import annotations

import json
import re

from .toolcall import HermesFormat, Llama3Format, ToolFormat

_SPACE = re.compile(r"\s+")


def _literal_steps(fmt: ToolFormat) -> list[str] | None:
    """The separator between two calls as literals, each after optional whitespace."""
    if isinstance(fmt, Llama3Format):
        return None
    if isinstance(fmt, HermesFormat):
        return ["</tool_call>", "<tool_call>"]
    return [","]


def _match_steps(steps: list[str], s: str) -> tuple[str, int]:
    """("full", end) / ("partial", 0) / ("fail", 0): s against ws? lit ws? lit ..."""
    i = 0
    for lit in steps:
        i = len(s) - len(s[i:].lstrip())
        rest = s[i:]
        if rest.startswith(lit):
            i += len(lit)
        elif lit.startswith(rest):
            return "partial", 0
        else:
            return "fail", 0
    return "full", i


class ToolCallStream:
    """The streaming twin of ToolFormat.parse (see the module docstring)."""

    def __init__(self, fmt: ToolFormat, new_id=None):
        self.fmt = fmt
        self.new_id = new_id or fmt.new_call_id
        self.buf = ""
        self.mode = "content"        # content | calls | done | text
        self.sent = 0                # buf[:sent] is out as content (content mode)
        self.calls_start = 0         # where the calls section starts in buf
        self.pos = 0                 # next character to scan (calls mode)
        self.n_calls = 0             # calls whose header was sent
        self._out: list[dict] = []
        self._new_call()

    @property
    def has_tool_calls(self) -> bool:
        """A call was started (the reply's finish_reason is "tool_calls")."""
        return self.n_calls > 0

    # -- public ------------------------------------------------------------------------
    def feed(self, text: str) -> list[dict]:
        self.buf += text
        if self.mode in ("content", "text"):
            self._scan_content(final=False)
        if self.mode == "calls":
            self._scan_calls()
        return self._take()

    def finish(self) -> list[dict]:
        if self.mode == "content":
            self._scan_content(final=True)
        if self.mode in ("content", "text") or (self.mode in ("calls", "done")
                                                and self.n_calls == 0):
            self._content(self.buf[self.sent:])   # no call after all: all of it is text
            self.sent = len(self.buf)
        self.mode = "done"
        return self._take()

    # -- content -----------------------------------------------------------------------
    def _scan_content(self, final: bool) -> None:
        if self.mode == "text":
            self._content(self.buf[self.sent:])
            self.sent = len(self.buf)
            return
        state, a, b = self._find_start(self.buf)
        if state == "found":
            self._content(self.buf[self.sent:a])
            self.sent, self.calls_start, self.pos, self.mode = a, a, b, "calls"
        elif state == "maybe" and not final:
            self._content(self.buf[self.sent:a])
            self.sent = max(self.sent, a)
        else:
            if state == "never":
                self.mode = "text"
            self._content(self.buf[self.sent:])
            self.sent = len(self.buf)

    def _find_start(self, buf: str) -> tuple[str, int, int]:
        """("found", section start, first call start) | ("maybe", hold from, 0) |
        ("none", 0, 0): nothing yet | ("never", 0, 0): this reply has no calls."""
        found = self.fmt.find_start(buf)
        if found is not None:
            return "found", found[0], found[1]
        if isinstance(self.fmt, Llama3Format):
            return self._llama_prefix(buf)
        marker = self.fmt.marker
        i = buf.find(marker)
        if i >= 0:   # the marker, then maybe the rest of the opening
            after = buf[i + len(marker):].lstrip()
            return ("maybe", i, 0) if self.fmt.open_text.startswith(after) else ("never", 0, 0)
        if marker.startswith("{"):   # generic: `{ "tool_calls" : [` with any spacing
            for j in (k for k in range(max(0, len(buf) - 256), len(buf)) if buf[k] == "{"):
                if (marker + self.fmt.open_text).startswith(_SPACE.sub("", buf[j:])):
                    return "maybe", j, 0
            return "none", 0, 0
        for k in range(min(len(marker) - 1, len(buf)), 0, -1):
            if buf.endswith(marker[:k]):
                return "maybe", len(buf) - k, 0
        return "none", 0, 0

    def _llama_prefix(self, buf: str) -> tuple[str, int, int]:
        t = buf.lstrip()
        lead = len(buf) - len(t)
        tag = self.fmt.marker
        if t.startswith(tag):
            t = t[len(tag):].lstrip()
        elif tag.startswith(t):
            return "maybe", lead, 0
        if '{"name"'.startswith(_SPACE.sub("", t)):
            return "maybe", lead, 0
        return "never", 0, 0

    # -- calls -------------------------------------------------------------------------
    def _new_call(self) -> None:
        self.phase = "before"        # before | object | after
        self.depth = 0
        self.in_str = self.esc = False
        self.expect = "key"          # at depth 1: key | colon | value | in_value
        self.tok_start = 0
        self.key = None
        self.name = None
        self.args_on = self.args_done = False
        self.pending = ""            # argument text not sent yet (name not known yet)

    def _scan_calls(self) -> None:
        buf = self.buf
        while self.mode == "calls" and self.pos < len(buf):
            if self.phase == "before":
                rest = buf[self.pos:].lstrip()
                if not rest:
                    return
                self.pos = len(buf) - len(rest)
                if rest[0] != "{":
                    self.mode = "done"
                    return
                self.phase = "object"
            elif self.phase == "object":
                self._scan_object()
            else:
                steps = _literal_steps(self.fmt)
                if steps is None:
                    self.mode = "done"
                    return
                state, end = _match_steps(steps, buf[self.pos:])
                if state == "partial":
                    return
                if state == "fail":
                    self.mode = "done"
                    return
                self.pos += end
                self._new_call()

    def _scan_object(self) -> None:
        buf, i = self.buf, self.pos
        while i < len(buf):
            c = buf[i]
            if self.args_on:
                self.pending += c
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.depth == 1:
                        self._string_done(buf[self.tok_start:i + 1])
            elif c == '"':
                self.in_str = True
                if self.depth == 1 and self.expect in ("key", "value"):
                    self.tok_start = i
            elif c in "{[":
                if self.depth == 1 and self.expect == "value":
                    self.expect = "in_value"
                    if c == "{" and self.key == self.fmt.args_key and not self.args_done:
                        self.args_on, self.pending = True, self.pending + c
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 1 and self.args_on:
                    self.args_on, self.args_done = False, True
                elif self.depth == 0:
                    self.pos = i + 1
                    self._flush_args()
                    self._call_done()
                    return
            elif self.depth == 1 and c == ":":
                self.expect = "value"
            elif self.depth == 1 and c == ",":
                self.expect = "key"
            elif self.depth == 1 and self.expect == "value" and not c.isspace():
                self.expect = "in_value"       # a number or literal
            i += 1
        self.pos = i
        self._flush_args()

    def _string_done(self, token: str) -> None:
        if self.expect == "key":
            self.key, self.expect = json.loads(token), "colon"
        elif self.expect == "value":
            self.expect = "in_value"
            if self.key == "name" and self.name is None:
                self.name = json.loads(token)
                self._header()

    def _header(self) -> None:
        self._out.append({"tool_calls": [{
            "index": self.n_calls, "id": self.new_id(), "type": "function",
            "function": {"name": self.name, "arguments": ""}}]})
        self.n_calls += 1

    def _flush_args(self) -> None:
        if self.pending and self.name is not None:
            self._out.append({"tool_calls": [{"index": self.n_calls - 1,
                                              "function": {"arguments": self.pending}}]})
            self.pending = ""

    def _call_done(self) -> None:
        if self.name is None or not self.args_done:
            self.mode = "done"       # not a call: parse() stops here as well
            return
        self.phase = "after"

    # -- output ------------------------------------------------------------------------
    def _content(self, text: str) -> None:
        if text:
            self._out.append({"content": text})

    def _take(self) -> list[dict]:
        """The deltas since the last call, neighbours of one kind merged."""
        out: list[dict] = []
        for d in self._out:
            prev = out[-1] if out else None
            if prev is not None and "content" in d and "content" in prev:
                prev["content"] += d["content"]
            elif (prev is not None and "tool_calls" in d and "tool_calls" in prev
                  and "id" not in d["tool_calls"][0]
                  and prev["tool_calls"][0]["index"] == d["tool_calls"][0]["index"]):
                prev["tool_calls"][0]["function"]["arguments"] += \
                    d["tool_calls"][0]["function"]["arguments"]
            else:
                out.append(d)
        self._out = []
        return out
