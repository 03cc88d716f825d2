"""OpenAI tool calling: the request's `tools` / `tool_choice` checked and normalized,
and the chat history adapted to the template that will render it.

    req = ToolRequest.from_openai(body.get("tools"), body.get("tool_choice"),
                                  body.get("parallel_tool_calls"))   # ToolError if bad
    fmt = tool_format_for_template(template_source)                  # toolcall.py
    messages = fmt.prepare_messages(body["messages"], req)
    prompt = render_chat(template, messages, **fmt.template_variables(req))
    constraint = fmt.constraint(req, bridge)                         # None: free text
    ... generate, decoding with special=True (markers may be control tokens) ...
    parsed = fmt.parse(text)          # or fmt.stream(): feed(piece) -> deltas

A tool is given to templates in the OpenAI / Hugging Face shape
{"type": "function", "function": {"name", "description", "parameters"}}.
"""
from __future__ import annotations

import hashlib
import json
import re
import secrets
import string
from dataclasses import dataclass, field

from ..errors import GrammarError, ToolError
from .constraint import Constraint

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")     # OpenAI's rule for function names
CHOICES = ("none", "auto", "required")
_ALNUM = string.ascii_letters + string.digits


@dataclass(frozen=True)
class Tool:
    """One function a model may call."""
    name: str
    parameters: dict          # a JSON schema of type object
    description: str | None = None

    def openai(self) -> dict:
        """The OpenAI / Hugging Face template shape."""
        fn = {"name": self.name}
        if self.description is not None:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


def validate_tools(tools) -> list[Tool]:
    """OpenAI `tools` -> Tools; ToolError for a bad shape, a name given twice or
    parameters that are not a valid JSON schema of an object."""
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolError(f"tools must be a list, got {type(tools).__name__}")
    out: list[Tool] = []
    seen: set[str] = set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise ToolError(f'{where} must be an object with "type": "function"')
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f'{where}.function must be an object with a "name"')
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            raise ToolError(f"{where}.function.name must be 1-64 letters, digits, '_' or "
                            f"'-', got {name!r}")
        if name in seen:
            raise ToolError(f"tool name {name!r} is given twice (tools must have unique "
                            "names)")
        seen.add(name)
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ToolError(f"{where}.function.description must be a string")
        out.append(Tool(name, _check_parameters(fn.get("parameters"), f"{where} ({name})"),
                        desc))
    return out


def _check_parameters(params, where: str) -> dict:
    if params is None:   # OpenAI: a function without parameters takes none
        return {"type": "object", "properties": {}}
    if not isinstance(params, dict):
        raise ToolError(f"{where}: parameters must be a JSON schema object, got "
                        f"{type(params).__name__}")
    if params.get("type", "object") != "object":
        raise ToolError(f"{where}: parameters must be a JSON schema of type 'object', "
                        f"got type {params.get('type')!r}")
    try:
        Constraint.from_json_schema(params)
    except GrammarError as e:
        raise ToolError(f"{where}: {e}") from None
    return params


@dataclass(frozen=True)
class ToolRequest:
    """What a chat request allows: `choice` is "none", "auto", "required" or "named"
    (then `name` is the function); `parallel`: several calls in one reply."""
    tools: tuple[Tool, ...]
    choice: str = "auto"
    name: str | None = None
    parallel: bool = True
    by_name: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_openai(cls, tools, tool_choice=None, parallel_tool_calls=None
                    ) -> "ToolRequest | None":
        """None when the request has no tools (and tool_choice is absent or "none");
        ToolError for invalid tools, tool_choice or parallel_tool_calls."""
        checked = validate_tools(tools)
        choice, name = parse_tool_choice(tool_choice, checked)
        if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
            raise ToolError("parallel_tool_calls must be true or false")
        if not checked:
            return None
        return cls(tuple(checked), choice, name, parallel_tool_calls is not False,
                   {t.name: t for t in checked})

    @property
    def callable_tools(self) -> tuple[Tool, ...]:
        """The tools a reply may call (just the named one for a named choice)."""
        if self.choice == "named":
            return (self.by_name[self.name],)
        return () if self.choice == "none" else self.tools


def parse_tool_choice(tool_choice, tools: list[Tool]) -> tuple[str, str | None]:
    """(choice, name) from OpenAI's tool_choice: "none" | "auto" | "required" |
    {"type": "function", "function": {"name": ...}} naming one of `tools`."""
    names = {t.name for t in tools}
    if tool_choice is None:
        return ("auto" if tools else "none"), None
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise ToolError(f"tool_choice must be 'none', 'auto', 'required' or a function, "
                            f"got {tool_choice!r}")
        if tool_choice == "required" and not tools:
            raise ToolError("tool_choice 'required' needs a non-empty tools list")
        return tool_choice, None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if (not isinstance(tool_choice, dict) or tool_choice.get("type") != "function"
            or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)):
        raise ToolError('tool_choice must be "none", "auto", "required" or '
                        '{"type": "function", "function": {"name": ...}}')
    if fn["name"] not in names:
        known = ", ".join(sorted(names)) or "none"
        raise ToolError(f"tool_choice names function {fn['name']!r}, which is not in "
                        f"tools (known: {known})")
    return "named", fn["name"]


def new_call_id(alnum9: bool = False) -> str:
    """A tool-call id: OpenAI's "call_" + 24 characters, or 9 letters/digits (the
    only ids Mistral's templates accept)."""
    n = 9 if alnum9 else 24
    tail = "".join(secrets.choice(_ALNUM) for _ in range(n))
    return tail if alnum9 else "call_" + tail


def alnum9_id(call_id: str) -> str:
    """A client's tool-call id as 9 letters/digits, the same for the same id."""
    if isinstance(call_id, str) and len(call_id) == 9 and call_id.isalnum() \
            and call_id.isascii():
        return call_id
    digest = int.from_bytes(hashlib.sha256(str(call_id).encode()).digest()[:8], "big")
    out = []
    for _ in range(9):
        digest, k = divmod(digest, len(_ALNUM))
        out.append(_ALNUM[k])
    return "".join(out)


def history_tool_calls(message: dict, index: int) -> list[dict]:
    """An assistant message's tool_calls with arguments decoded to objects (what HF
    templates render with `| tojson`); ToolError when malformed."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        raise ToolError(f"messages[{index}].tool_calls must be a list")
    out = []
    for k, tc in enumerate(calls):
        where = f"messages[{index}].tool_calls[{k}]"
        fn = tc.get("function") if isinstance(tc, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ToolError(f'{where} must be {{"id", "type": "function", '
                            f'"function": {{"name", "arguments"}}}}')
        args = fn.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError as e:
                raise ToolError(f"{where}.function.arguments is not valid JSON: {e}") from None
        out.append({"id": str(tc.get("id") or ""), "type": "function",
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def tool_call_names(messages) -> dict[str, str]:
    """tool_call id -> function name over a history's assistant tool_calls."""
    names = {}
    for m in messages:
        for tc in (m.get("tool_calls") or []) if isinstance(m, dict) else []:
            if isinstance(tc, dict) and isinstance(tc.get("function"), dict):
                names[str(tc.get("id"))] = tc["function"].get("name")
    return names


def generic_tools_prompt(req: ToolRequest) -> str:
    """The text (system message, else first user turn) that teaches a model whose
    template has no tool support the generic format (toolcall.GenericFormat)."""
    tools = [{"name": t.name, **({"description": t.description} if t.description else {}),
              "parameters": t.parameters} for t in req.callable_tools]
    lines = ["You can call the following tools (functions). Their parameters are given "
             "as JSON schemas:",
             *(json.dumps(t, ensure_ascii=False) for t in tools), "",
             "To call tools, reply with only a JSON object of this form:",
             '{"tool_calls": [{"name": "<tool name>", "arguments": {<the arguments, '
             'matching the tool\'s parameters>}}]}']
    if req.choice == "auto":
        lines.append("If no tool is needed, answer normally in plain text instead.")
    elif req.choice == "required":
        lines.append("You must call at least one tool.")
    else:
        lines.append(f"You must call the tool {req.name!r}.")
    if not req.parallel:
        lines.append("Call one tool at a time.")
    return "\n".join(lines)
