"""Tool-call formats, one per chat-template family: how a model writes a call, the
grammar that makes it write a valid one, and the parser that reads it back.

- llama3_json (Llama 3.1 / 3.2): [<|python_tag|>]{"name": "f", "parameters": {...}}
- hermes (Qwen 2.5, Hermes 2 / 3): [text]<tool_call>⏎{"name": "f", "arguments": {...}}⏎
  </tool_call>, calls one per line (⏎: a newline)
- mistral (Mistral Nemo): [TOOL_CALLS][{"name": "f", "arguments": {...}}, ...]
- generic (templates without tools): [text]{"tool_calls": [{"name": "f", "arguments": {...}}]}

The generic format is taught by a system message (tools.generic_tools_prompt) and
the history is rewritten into plain turns, so any model can call tools.

Grammars (llguidance Lark, each tool's parameters as a `%json` schema): with
tool_choice "required" or a named function the whole reply is the call(s); with
"auto" the reply is free text until the format's marker, from which on it must be a
valid call (a lazy trigger; for llama3_json a reply starting with `{` is a call).
A marker that is a control token in the vocabulary is named by id (`<[id]>`): the
engine must then decode with special=True for the parser to see it.

Parsed arguments are the model's own JSON text of the arguments object (OpenAI's
`function.arguments` string); the streaming parser (toolstream.py) emits the same
characters, so streamed and non-streamed replies agree.
"""
from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from .constraint import JSON_OPTIONS, Constraint, lark_schema
from .tools import (ToolError, ToolRequest, alnum9_id, generic_tools_prompt,
                    history_tool_calls, new_call_id, tool_call_names)

_DECODER = json.JSONDecoder()
_WS = re.compile(r"\s*")


@dataclass
class ParsedReply:
    """A reply split into leading text and OpenAI tool_calls entries."""
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)


def tool_call_entry(name: str, arguments: str, call_id: str) -> dict:
    return {"id": call_id, "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ToolFormat(ABC):
    """One family's tool-call syntax (instances: FORMATS)."""

    name = ""
    native = True            # the template renders `tools` itself
    args_key = "arguments"
    marker = ""              # text that starts the calls ("" for llama3_json)
    open_text = ""           # between the marker and the first call
    sep_re = re.compile(r"(?!)")   # between two calls (never, by default)
    alnum9_ids = False

    # -- prompt side -------------------------------------------------------------------
    def template_variables(self, req: ToolRequest | None) -> dict:
        """Extra render_chat variables: {"tools": [...]} for a template that renders
        tools (none for tool_choice "none": the model is not offered them)."""
        if req is None or req.choice == "none" or not self.native:
            return {}
        return {"tools": [t.openai() for t in req.tools]}

    def prepare_messages(self, messages: list[dict], req: ToolRequest | None) -> list[dict]:
        """The history as the template expects it: assistant tool_calls with decoded
        arguments (and 9-character ids for Mistral); ToolError when malformed."""
        out = []
        for i, m in enumerate(messages):
            if isinstance(m, dict) and m.get("role") == "assistant" and m.get("tool_calls"):
                calls = history_tool_calls(m, i)
                if self.alnum9_ids:
                    for c in calls:
                        c["id"] = alnum9_id(c["id"])
                m = {**m, "tool_calls": calls}
            elif isinstance(m, dict) and m.get("role") == "tool" and self.alnum9_ids:
                m = {**m, "tool_call_id": alnum9_id(m.get("tool_call_id", ""))}
            out.append(m)
        return out

    def new_call_id(self) -> str:
        return new_call_id(self.alnum9_ids)

    # -- grammar -----------------------------------------------------------------------
    def call_schema(self, tool) -> dict:
        """One call as a JSON schema: the tool's name, then its arguments."""
        return {"type": "object",
                "properties": {"name": {"const": tool.name}, self.args_key: tool.parameters},
                "required": ["name", self.args_key], "additionalProperties": False}

    def one_call(self, req: ToolRequest) -> str:
        schemas = [self.call_schema(t) for t in req.callable_tools]
        body = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
        return lark_schema({**body, "x-guidance": JSON_OPTIONS})

    def grammar(self, req: ToolRequest | None, bridge=None) -> str | None:
        """The Lark grammar of a reply (None: unconstrained, tool_choice "none")."""
        if req is None or req.choice == "none":
            return None
        rules = ["%llguidance {}", "TEXT: /(.|\\n)*/", "call: " + self.one_call(req)]
        rules += self.rules(req, bridge, auto=req.choice == "auto")
        return "\n".join(rules) + "\n"

    def constraint(self, req: ToolRequest | None, bridge=None) -> Constraint | None:
        """grammar() compiled (checked against bridge's vocabulary when given)."""
        text = self.grammar(req, bridge)
        if text is None:
            return None
        c = Constraint.from_lark(text)
        if bridge is not None:
            c.matcher(bridge)
        return c

    @abstractmethod
    def rules(self, req: ToolRequest, bridge, auto: bool) -> list[str]:
        """The format's Lark rules, `start` included (TEXT and call are defined)."""

    @staticmethod
    def _token_or_text(text: str, bridge) -> str:
        """A marker as a special token `<[id]>` when the vocabulary has it as one."""
        tid = bridge.special_id(text) if bridge is not None else None
        return f"<[{tid}]>" if tid is not None else json.dumps(text)

    # -- parsing -----------------------------------------------------------------------
    def find_start(self, text: str) -> tuple[int, int] | None:
        """(start of the calls section, where the first call's text begins) or None."""
        i = text.find(self.marker)
        if i < 0:
            return None
        j = i + len(self.marker)
        k = _WS.match(text, j).end()
        if self.open_text:
            if not text.startswith(self.open_text, k):
                return None
            k += len(self.open_text)
        return i, k

    def parse(self, text: str, new_id=None) -> ParsedReply:
        """Leading text and the complete calls of a reply; text without a complete call
        is all content. new_id() makes each call's id (default: this format's ids)."""
        found = self.find_start(text)
        calls = []
        if found is not None:
            pos = found[1]
            while True:
                call = _parse_call(text, _WS.match(text, pos).end(), self.args_key)
                if call is None:
                    break
                name, args, pos = call
                calls.append(tool_call_entry(name, args, (new_id or self.new_call_id)()))
                sep = self.sep_re.match(text, pos)
                if sep is None:
                    break
                pos = sep.end()
        if not calls:
            return ParsedReply(text or None, [])
        return ParsedReply(text[:found[0]] or None, calls)

    def stream(self, new_id=None):
        """An incremental parser: feed(text) -> OpenAI deltas (toolstream.py)."""
        from .toolstream import ToolCallStream
        return ToolCallStream(self, new_id)


def _parse_call(text: str, pos: int, args_key: str):
    """(name, raw arguments JSON, end) of the call object at pos, or None."""
    if not text.startswith("{", pos):
        return None
    try:
        obj, end = _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) \
            or not isinstance(obj.get(args_key), dict):
        return None
    span = _member_span(text, pos, args_key)
    return obj["name"], text[span[0]:span[1]], end


def _member_span(text: str, pos: int, key: str) -> tuple[int, int]:
    """Where the value of top-level member `key` of the (valid) object at pos lies."""
    i = _WS.match(text, pos + 1).end()
    span = None
    while text[i] != "}":
        k, i = _DECODER.raw_decode(text, i)
        i = _WS.match(text, i).end() + 1                      # past ':'
        start = _WS.match(text, i).end()
        _, i = _DECODER.raw_decode(text, start)
        if k == key:
            span = (start, i)                                 # the last one, as json does
        i = _WS.match(text, i).end()
        if text[i] == ",":
            i = _WS.match(text, i + 1).end()
    return span


class Llama3Format(ToolFormat):
    """Llama 3.1 / 3.2 JSON tool calls: the reply is the call object, optionally after
    <|python_tag|>; one call per reply (the 3.1 template renders no more)."""
    name = "llama3_json"
    args_key = "parameters"
    marker = "<|python_tag|>"
    _START = re.compile(r'(\s*)(?:<\|python_tag\|>\s*)?(?=\{\s*"name")')

    def rules(self, req, bridge, auto):
        # the tag only where the vocabulary has it as a special token: as text it
        # would also be free text, and the call after it unchecked
        tagged = bridge is not None and bridge.special_id(self.marker) is not None
        alts = ["call"] + ([f"{self._token_or_text(self.marker, bridge)} call"] if tagged
                           else [])
        if auto:   # a reply starting with `{` is a call; any other is text
            return ["start: " + " | ".join(alts + ["TEXT_NO_CALL"]),
                    "TEXT_NO_CALL: /[^{](.|\\n)*/"]
        return ["start: " + " | ".join(alts)]

    def find_start(self, text):
        m = self._START.match(text)
        return None if m is None else (m.end(1), m.end())


class HermesFormat(ToolFormat):
    """Qwen 2.5 / Hermes: <tool_call>\\n{json}\\n</tool_call>, calls one per line."""
    name = "hermes"
    marker = "<tool_call>"
    sep_re = re.compile(r"\s*</tool_call>\s*<tool_call>")

    def rules(self, req, bridge, auto):
        tag = self._token_or_text(self.marker, bridge)
        end = self._token_or_text("</tool_call>", bridge)
        more = ' ("\\n" tc)*' if req.parallel else ""
        out = [f'tc: {tag} "\\n" call "\\n" {end}']
        if not auto:
            out.append(f"start: tc{more}")
        elif tag.startswith("<["):   # a special token cannot hide in text: no trigger
            out.append(f"start: TEXT | TEXT tc{more}")
        else:
            out.append(f'start: TEXT | trigger "\\n" call "\\n" {end}{more}')
            out.append(f"trigger[lazy]: TEXT {tag}")
        return out


class MistralFormat(ToolFormat):
    """Mistral: [TOOL_CALLS][{"name": ..., "arguments": ...}, ...]; the template needs
    9-character call ids."""
    name = "mistral"
    marker = "[TOOL_CALLS]"
    open_text = "["
    sep_re = re.compile(r"\s*,")
    alnum9_ids = True

    def call_schema(self, tool):
        s = super().call_schema(tool)   # the model may write its call id after the call
        s["properties"] = {**s["properties"],
                           "id": {"type": "string", "pattern": "^[a-zA-Z0-9]{9}$"}}
        return s

    def rules(self, req, bridge, auto):
        tag = self._token_or_text(self.marker, bridge)
        calls = f'"[" call (", " call)* "]"' if req.parallel else '"[" call "]"'
        out = [f"calls: {calls}"]
        if not auto:
            out.append(f"start: {tag} calls")
        elif tag.startswith("<["):
            out.append(f"start: TEXT | TEXT {tag} calls")
        else:
            out += [f"start: TEXT | trigger calls", f"trigger[lazy]: TEXT {tag}"]
        return out


class GenericFormat(ToolFormat):
    """For templates without tool support: {"tool_calls": [{"name", "arguments"}]},
    taught by a system message; history calls and results become plain turns."""
    name = "generic"
    native = False
    marker = '{"tool_calls":'
    open_text = "["
    sep_re = re.compile(r"\s*,")
    _START = re.compile(r'\{\s*"tool_calls"\s*:\s*\[')

    def rules(self, req, bridge, auto):
        calls = '"[" call (", " call)* "]"' if req.parallel else '"[" call "]"'
        out = [f"calls: {calls}"]
        if not auto:
            out.append('start: "{\\"tool_calls\\": " calls "}"')
        else:
            out += ['start: TEXT | trigger " " calls "}"',
                    f"trigger[lazy]: TEXT {json.dumps(self.marker)}"]
        return out

    def find_start(self, text):
        m = self._START.search(text)
        return None if m is None else (m.start(), m.end())

    def prepare_messages(self, messages, req):
        out: list[dict] = []
        names = tool_call_names(messages)
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                out.append(m)
                continue
            if m.get("role") == "assistant" and m.get("tool_calls"):
                calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                         for c in history_tool_calls(m, i)]
                text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
                m = {"role": "assistant",
                     "content": (m["content"] + "\n" if m.get("content") else "") + text}
            elif m.get("role") == "tool":
                name = m.get("name") or names.get(str(m.get("tool_call_id"))) or "tool"
                m = {"role": "user", "content": f"Result of the tool call {name}:\n"
                                                f"{_text(m.get('content'))}"}
            if out and m.get("role") == "user" and out[-1].get("role") == "user":
                out[-1] = {**out[-1], "content": f"{_text(out[-1].get('content'))}\n\n"
                                                 f"{_text(m.get('content'))}"}
                continue
            out.append(m)
        if req is not None and req.choice != "none":
            # into the system message, else before the first user turn: many templates
            # without tool support refuse a system role (Gemma 2, Mistral v0.1)
            prompt = generic_tools_prompt(req)
            k = next((j for j, m in enumerate(out) if isinstance(m, dict)
                      and m.get("role") in ("system", "user")), None)
            if k is None:
                out.insert(0, {"role": "system", "content": prompt})
            elif out[k]["role"] == "system":
                out[k] = {**out[k], "content": f"{_text(out[k].get('content'))}\n\n{prompt}"}
            else:
                out[k] = {**out[k], "content": f"{prompt}\n\n{_text(out[k].get('content'))}"}
        return out


def _text(content) -> str:
    """A message content as text (OpenAI content parts joined, None -> "")."""
    if content is None:
        return ""
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)


FORMATS = {f.name: f for f in (Llama3Format(), HermesFormat(), MistralFormat(),
                               GenericFormat())}


def tool_format_for_template(template: str | None) -> ToolFormat:
    """The tool-call format a chat template's source implies (generic when it has none)."""
    t = template or ""
    if "[TOOL_CALLS]" in t:
        return FORMATS["mistral"]
    if "<tool_call>" in t:
        return FORMATS["hermes"]
    if "<|python_tag|>" in t or ('"parameters"' in t and "<|start_header_id|>" in t):
        return FORMATS["llama3_json"]
    return FORMATS["generic"]


def tool_format(name: str) -> ToolFormat:
    """A format by name (llama3_json, hermes, mistral, generic)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ToolError(f"unknown tool-call format {name!r} "
                        f"(known: {', '.join(FORMATS)})") from None
