"""OpenAI tool calling (a2ats_lite.structured.tools / toolcall / toolstream): request
checks, the real tool-capable templates rendering tools, and per format the grammar,
the parser and the streaming parser agreeing on random constrained replies."""
import functools
import json
import random
import re

import jsonschema
import pytest
from constrained_sampling import generate, structural_tokens, text_of

from a2ats_lite.chat import render_chat
from a2ats_lite.errors import ToolError
from a2ats_lite.structured import bridge_for
from a2ats_lite.structured.toolcall import FORMATS, tool_format, tool_format_for_template
from a2ats_lite.structured.tools import ToolRequest, alnum9_id, parse_tool_choice, validate_tools
from a2ats_lite.tokenizer import Tokenizer


def fn(name, params, description=None):
    f = {"name": name, "parameters": params}
    if description:
        f["description"] = description
    return {"type": "function", "function": f}


TOOLS = [
    fn("get_weather", {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city"], "additionalProperties": False}, "Current weather in a city"),
    fn("add", {"type": "object", "properties": {
        "a": {"type": "integer", "minimum": -99, "maximum": 99},
        "b": {"type": "integer", "minimum": -99, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": False}),
    fn("search", {"type": "object", "properties": {
        "query": {"type": "string", "maxLength": 12},
        "filters": {"type": "object", "properties": {
            "lang": {"enum": ["en", "fr"]}, "tags": {"type": "array", "maxItems": 2,
                                                     "items": {"type": "string", "maxLength": 5}}},
            "additionalProperties": False}},
        "required": ["query"], "additionalProperties": False}),
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
TEMPLATES = {"hermes": "Qwen-Qwen2.5-7B-Instruct",
             "llama3_json": "meta-llama-Llama-3.1-8B-Instruct",
             "mistral": "mistralai-Mistral-Nemo-Instruct-2407"}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_8f2kQ0x1ZzT4", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_8f2kQ0x1ZzT4", "content": "18 C and sunny"},
]


@functools.lru_cache(maxsize=None)
def _bridge(path: str):
    return bridge_for(Tokenizer.from_gguf(path))


@pytest.fixture(scope="module")
def qwen(shared_dir):
    return _bridge(str(shared_dir / "vocab" / "ggml-vocab-qwen2.gguf"))


@pytest.fixture(scope="module")
def templates(shared_dir):
    return {p.stem: p.read_text() for p in (shared_dir / "templates").glob("*.jinja")}


def merge_deltas(deltas):
    """Streamed deltas put back together: (content or None, [(name, arguments)])."""
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], ["", ""])
            if "id" in tc:
                assert tc["type"] == "function" and tc["id"] and not call[0]
                call[0] = tc["function"]["name"]
            call[1] += tc["function"].get("arguments", "")
    assert sorted(calls) == list(range(len(calls)))
    return content or None, [tuple(calls[i]) for i in sorted(calls)]


def streamed(fmt, text, rng):
    stream, deltas, i = fmt.stream(), [], 0
    while i < len(text):
        k = rng.randint(1, 6)
        deltas += stream.feed(text[i:i + k])
        i += k
    return merge_deltas(deltas + stream.finish()), stream.has_tool_calls


# -- the request -----------------------------------------------------------------------
@pytest.mark.parametrize("tools, message", [
    ({"type": "function"}, "tools must be a list"),
    ([{"function": {"name": "f"}}], '"type": "function"'),
    ([{"type": "function", "function": "f"}], "function must be an object"),
    ([fn("bad name!", {"type": "object"})], "1-64 letters"),
    ([fn("f", {"type": "object"}), fn("f", {"type": "object"})], "given twice"),
    ([fn("f", ["a"])], "parameters must be a JSON schema object"),
    ([fn("f", {"type": "string"})], "of type 'object'"),
    ([fn("f", {"type": "object", "properties": {"a": {"type": "nope"}}})], "Invalid type"),
    ([{"type": "function", "function": {"name": "f", "description": 3}}], "description"),
])
def test_invalid_tools(tools, message):
    with pytest.raises(ToolError, match=re.escape(message)) as e:
        validate_tools(tools)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("choice, message", [
    ("sometimes", "tool_choice must be"),
    ({"type": "function", "function": {"name": "nope"}}, "not in tools"),
    ({"type": "function"}, "tool_choice must be"),
    ({"function": {"name": "add"}}, "tool_choice must be"),
])
def test_invalid_tool_choice(choice, message):
    with pytest.raises(ToolError, match=re.escape(message)):
        ToolRequest.from_openai(TOOLS, choice)


def test_tool_choices():
    tools = validate_tools(TOOLS)
    assert parse_tool_choice(None, tools) == ("auto", None)
    assert parse_tool_choice(None, []) == ("none", None)
    assert parse_tool_choice("required", tools) == ("required", None)
    named = ToolRequest.from_openai(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert named.choice == "named" and [t.name for t in named.callable_tools] == ["add"]
    assert ToolRequest.from_openai(TOOLS, "none").callable_tools == ()
    assert ToolRequest.from_openai(None) is None and ToolRequest.from_openai([], "none") is None
    assert not ToolRequest.from_openai(TOOLS, parallel_tool_calls=False).parallel
    with pytest.raises(ToolError, match="needs a non-empty tools"):
        ToolRequest.from_openai([], "required")
    with pytest.raises(ToolError, match="parallel_tool_calls"):
        ToolRequest.from_openai(TOOLS, parallel_tool_calls="yes")
    assert validate_tools([fn("f", None)])[0].parameters == {"type": "object", "properties": {}}


def test_call_ids():
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", FORMATS["hermes"].new_call_id())
    assert re.fullmatch(r"[A-Za-z0-9]{9}", FORMATS["mistral"].new_call_id())
    assert alnum9_id("abcDEF123") == "abcDEF123"
    assert alnum9_id("call_x") == alnum9_id("call_x") != alnum9_id("call_y")
    assert re.fullmatch(r"[A-Za-z0-9]{9}", alnum9_id("call_x"))
    with pytest.raises(ToolError):
        tool_format("xml")


# -- templates -------------------------------------------------------------------------
def test_format_detection(templates):
    assert {name: tool_format_for_template(t).name for name, t in templates.items()} == {
        "Qwen-Qwen2.5-7B-Instruct": "hermes", "meta-llama-Llama-3.1-8B-Instruct": "llama3_json",
        "mistralai-Mistral-Nemo-Instruct-2407": "mistral", "google-gemma-2-2b-it": "generic",
        "microsoft-Phi-3.5-mini-instruct": "generic"}
    assert tool_format_for_template(None).name == "generic"


@pytest.mark.parametrize("fmt_name", sorted(TEMPLATES))
def test_real_templates_render_tools_and_history(templates, fmt_name):
    template = templates[TEMPLATES[fmt_name]]
    fmt = tool_format_for_template(template)
    req = ToolRequest.from_openai(TOOLS)
    messages = HISTORY if fmt_name != "mistral" else HISTORY[1:]   # Nemo: no system turn
    out = render_chat(template, fmt.prepare_messages(messages, req), bos_token="<s>",
                      eos_token="</s>", **fmt.template_variables(req))
    for t in TOOLS:                               # every tool, with its schema
        assert f'"name": "{t["function"]["name"]}"' in out
    assert "Current weather in a city" in out and '"maxLength": 12' in out
    assert '{"city": "Paris"}' in out and '\\"city\\"' not in out     # arguments as JSON
    assert "18 C and sunny" in out
    if fmt_name == "mistral":                     # ids rewritten to the 9 characters it needs
        cid = alnum9_id("call_8f2kQ0x1ZzT4")
        assert f'"id": "{cid}"' in out and f'"call_id": "{cid}"' in out
    none = render_chat(template, fmt.prepare_messages(HISTORY[1:2], None),
                       **fmt.template_variables(ToolRequest.from_openai(TOOLS, "none")))
    assert "get_weather" not in none


def test_generic_format_history(templates):
    fmt = FORMATS["generic"]
    req = ToolRequest.from_openai(TOOLS, "required")
    history = HISTORY[1:] + [{"role": "tool", "tool_call_id": "x", "name": "add", "content": "3"},
                             {"role": "user", "content": "Thanks!"}]
    messages = fmt.prepare_messages(history, req)
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"].startswith("You can call the following tools")
    assert "must call at least one tool" in messages[0]["content"]
    assert json.loads(messages[1]["content"]) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    assert "get_weather:\n18 C and sunny" in messages[2]["content"]
    assert "add:\n3" in messages[2]["content"] and messages[2]["content"].endswith("Thanks!")
    out = render_chat(templates["google-gemma-2-2b-it"], messages, bos_token="<bos>")
    assert "get_weather" in out and "Thanks!" in out     # a template with no system role
    with_system = fmt.prepare_messages(HISTORY, req)
    assert with_system[0]["role"] == "system" and "Be brief." in with_system[0]["content"]
    assert fmt.template_variables(req) == {}
    with pytest.raises(ToolError, match="not valid JSON"):
        fmt.prepare_messages([{"role": "assistant", "tool_calls": [
            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{x"}}]}], req)


# -- grammar, parser and stream, per format --------------------------------------------
CHOICES = ["required", {"type": "function", "function": {"name": "search"}}, "auto"]
# "auto" replies forced into a call: (text before the calls, the start of the calls)
AUTO_PREFIX = {"hermes": ("Let me check.\n", "<tool_call>"), "mistral": ("", "[TOOL_CALLS]"),
               "generic": ("Sure. ", '{"tool_calls":'), "llama3_json": ("", "{")}


@pytest.mark.parametrize("choice", CHOICES, ids=["required", "named", "auto"])
@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_constrained_calls_parse_and_stream(qwen, fmt_name, choice, rng):
    fmt = FORMATS[fmt_name]
    req = ToolRequest.from_openai(TOOLS, choice)
    constraint = fmt.constraint(req, qwen)
    structural = structural_tokens(qwen)
    names = {t.name for t in req.callable_tools}
    chunks = random.Random(int(rng.integers(1 << 30)))
    before, marker = AUTO_PREFIX[fmt_name] if choice == "auto" else ("", "")
    prefix = before + marker
    for _ in range(5):
        m = constraint.matcher(qwen)
        ids = generate(m, qwen, rng, structural=structural,
                       prefix=qwen.tokenizer.encode(prefix, add_bos=False) if prefix else ())
        text = text_of(qwen, ids)
        parsed = fmt.parse(text)
        assert parsed.tool_calls, text
        assert len(parsed.tool_calls) == 1 or (fmt_name != "llama3_json" and req.parallel)
        for call in parsed.tool_calls:
            assert call["type"] == "function" and call["id"]
            name, args = call["function"]["name"], call["function"]["arguments"]
            assert name in names, text
            jsonschema.validate(json.loads(args), PARAMS[name])
        assert parsed.content == (before or None)
        merged, has_calls = streamed(fmt, text, chunks)
        assert has_calls and merged == (parsed.content, [
            (c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls])


@pytest.mark.parametrize("fmt_name", sorted(FORMATS))
def test_auto_allows_a_plain_text_reply(qwen, fmt_name, rng):
    fmt = FORMATS[fmt_name]
    constraint = fmt.constraint(ToolRequest.from_openai(TOOLS, "auto"), qwen)
    chunks = random.Random(int(rng.integers(1 << 30)))
    for _ in range(5):
        text = text_of(qwen, generate(constraint.matcher(qwen), qwen, rng, p_eos=0.2))
        parsed = fmt.parse(text)
        assert parsed.tool_calls == [] and parsed.content == (text or None)
        assert streamed(fmt, text, chunks) == ((text or None, []), False)


@pytest.mark.parametrize("fmt_name, text, content, calls", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_weather", "arguments": {"city": "P\\"}"}}\n'
               '</tool_call>',
     "Sure.\n", [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "P\\"}"}')]),
    ("hermes", "I would use <tool_call> here", "I would use <tool_call> here", []),
    ("llama3_json", '<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}', None,
     [("add", '{"a": 1, "b": 2}')]),
    ("llama3_json", ' {"name":"add","parameters":{}}', " ", [("add", "{}")]),
    ("llama3_json", 'Use {"name": "add"}', 'Use {"name": "add"}', []),
    ("mistral", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1}, "id": "abcdefghi"},'
                '{"name": "search", "arguments": {"query": "x"}}]', None,
     [("add", '{"a": 1}'), ("search", '{"query": "x"}')]),
    ("generic", 'On it: { "tool_calls" : [ {"arguments": {"a": [1]}, "name": "add"} ] }',
     "On it: ", [("add", '{"a": [1]}')]),
    ("generic", 'Cut: {"tool_calls": [{"na', 'Cut: {"tool_calls": [{"na', []),
])
def test_parse_and_stream_written_replies(fmt_name, text, content, calls):
    fmt = FORMATS[fmt_name]
    parsed = fmt.parse(text)
    assert parsed.content == content
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in parsed.tool_calls] == calls
    for seed in range(10):
        assert streamed(fmt, text, random.Random(seed))[0] == (content, calls)


def test_generic_calls_on_the_default_model(default_model, rng):
    gemma = bridge_for(Tokenizer.from_gguf(default_model))
    fmt = FORMATS["generic"]
    req = ToolRequest.from_openai(TOOLS, "required", parallel_tool_calls=False)
    constraint = fmt.constraint(req, gemma)
    structural = structural_tokens(gemma)
    for _ in range(5):
        text = text_of(gemma, generate(constraint.matcher(gemma), gemma, rng,
                                       structural=structural))
        (call,) = fmt.parse(text).tool_calls
        assert text.startswith('{"tool_calls": [{"name": "')
        jsonschema.validate(json.loads(call["function"]["arguments"]),
                            PARAMS[call["function"]["name"]])
