"""Structured output, tool calls and log-probabilities through the server (issue 24), with
the official openai client against the default model served on a loopback port."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

from serving import served_default_model  # noqa: E402

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "address": {"type": "object",
                    "properties": {"city": {"type": "string", "maxLength": 20},
                                   "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "tags"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                   "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                   "required": ["city"], "additionalProperties": False}}}


rt, srv, client = served_default_model(1024)


def _chat(client, content, **kw):
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                          **kw)


def _stream_text(stream) -> tuple[str, str]:
    text, finish = "", None
    for ch in stream:
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            finish = ch.choices[0].finish_reason or finish
    return text, finish


def test_json_schema_is_always_obeyed(client):
    """20 of 20: the default model (a base model that otherwise writes prose) returns JSON
    that validates against a schema with nested objects, arrays, enums and required fields."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    def one(i):
        kw = dict(response_format=fmt, max_tokens=200, temperature=0.9, seed=i)
        if i % 2:
            return _stream_text(_chat(client, f"Person number {i}:", stream=True, **kw))
        r = _chat(client, f"Person number {i}:", **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(one, range(20)))
    for text, finish in results:
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), PERSON)


def test_json_object_and_llama_cpp_fields(client, srv):
    r = _chat(client, "Describe a cat:", response_format={"type": "json_object"}, max_tokens=120,
              temperature=0.7, seed=3)
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # llama.cpp's own request fields: json_schema and grammar, on completions
    body = {"prompt": "A number:", "json_schema": {"type": "integer", "maximum": 999},
            "max_tokens": 8, "temperature": 1.0, "seed": 2}
    out = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120).json()
    assert 0 <= int(out["choices"][0]["text"]) <= 999


def test_gbnf_and_regex_are_always_obeyed(client, srv):
    yes_no = 'root ::= "yes" | "no"'
    for seed in range(6):
        r = client.completions.create(model="m", prompt="Is water wet? Answer:", max_tokens=8,
                                      temperature=1.0, seed=seed, extra_body={"grammar": yes_no})
        assert r.choices[0].text in ("yes", "no")
    date = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
    fmt = {"type": "json_schema", "json_schema": {"name": "d", "schema": {"type": "string",
                                                                          "pattern": f"^{date}$"}}}
    import re
    for seed in range(4):
        body = {"prompt": "Date:", "max_tokens": 16, "temperature": 1.0, "seed": seed,
                "grammar": 'root ::= [0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])'}
        text = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]
        assert re.fullmatch(date, text), text
        r = _chat(client, "A date:", response_format=fmt, max_tokens=20, temperature=1.0, seed=seed)
        assert re.fullmatch(date, json.loads(r.choices[0].message.content))
        r = client.completions.create(model="m", prompt="On", max_tokens=16, temperature=1.0,
                                      seed=seed, extra_body={"regex": date})
        assert re.fullmatch(date, r.choices[0].text)


def test_tool_round_trip_required_and_named(client):
    """tool_choice required / named: a tool_calls entry whose arguments parse and validate;
    the tool's answer sent back gets a text reply; streamed deltas equal the whole call."""
    msgs = [{"role": "user", "content": "What is the weather in Paris, in Celsius?"}]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        r = client.chat.completions.create(model="m", messages=msgs, tools=[WEATHER, TIME],
                                           tool_choice=choice, max_tokens=80, temperature=0)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        call = c.message.tool_calls[0]
        tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
        if choice != "required":
            assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
        # streamed: the deltas put together equal the non-streamed call
        stream = client.chat.completions.create(model="m", messages=msgs, tools=[WEATHER, TIME],
                                                tool_choice=choice, max_tokens=80, temperature=0,
                                                stream=True)
        calls, finish = {}, None
        for ch in stream:
            if not ch.choices:
                continue
            finish = ch.choices[0].finish_reason or finish
            for d in ch.choices[0].delta.tool_calls or []:
                e = calls.setdefault(d.index, {"name": "", "arguments": ""})
                e["name"] += d.function.name or ""
                e["arguments"] += d.function.arguments or ""
        assert finish == "tool_calls"
        assert calls[0] == {"name": call.function.name, "arguments": call.function.arguments}
    # the tool's result back in the history: a text answer
    history = msgs + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function",
         "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"}]
    r = client.chat.completions.create(model="m", messages=history, tools=[WEATHER, TIME],
                                       tool_choice="none", max_tokens=20, temperature=0)
    assert r.choices[0].message.content and not r.choices[0].message.tool_calls


def test_real_tool_template_renders_the_tools(shared_dir):
    from a2ats_lite.chat import chat_prompt_text
    from a2ats_lite.structured import ToolRequest, tool_format_for_template
    req = ToolRequest.from_openai([WEATHER], "auto")
    for name in ("Qwen-Qwen2.5-7B-Instruct", "meta-llama-Llama-3.1-8B-Instruct",
                 "mistralai-Mistral-Nemo-Instruct-2407"):
        src = (shared_dir / "templates" / f"{name}.jinja").read_text()
        fmt = tool_format_for_template(src)
        assert fmt.name != "generic", name
        text, _, _ = chat_prompt_text(src, [{"role": "user", "content": "Weather in Oslo?"}],
                                      bos_token="<s>", eos_token="</s>",
                                      **fmt.template_variables(req))
        assert "get_weather" in text and "Current weather of a city" in text, name


def test_logprobs_equal_log_softmax_of_eval_logits(client, rt):
    prompt = "The capital of France is"
    r = client.completions.create(model="m", prompt=prompt, max_tokens=6, temperature=0,
                                  logprobs=3, echo=True)
    lp = r.choices[0].logprobs
    ids = rt.tokenize(prompt)
    n = len(ids)
    gen = []                                 # greedy by eval_logits, one token at a time
    for _ in range(6):
        gen.append(int(np.argmax(rt.eval_logits(ids + gen)[-1])))
    assert lp.tokens[n:] == [rt.tokenizer.token_to_piece(t) for t in gen]
    logits = rt.eval_logits(ids + gen[:-1]).astype(np.float64)
    ref = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    seq = ids + gen
    assert lp.token_logprobs[0] is None                          # echo: the first token
    for i in range(1, len(seq)):
        assert abs(lp.token_logprobs[i] - ref[i - 1, seq[i]]) < 1e-4, i
        if i >= n:                                               # greedy: the top entry
            assert seq[i] == int(np.argmax(ref[i - 1]))
    assert r.choices[0].text.startswith(prompt)
    # chat: logprobs + top_logprobs in OpenAI's shape
    c = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                       max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    e = c.choices[0].logprobs.content[0]
    assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob == pytest.approx(e.logprob)
    assert bytes(e.bytes).decode() == e.token


def test_constrained_requests_beside_free_ones(client, rt, srv):
    """8 concurrent requests, half constrained by different schemas, half free: each free
    one's tokens equal its tokens run alone; each constrained one obeys its schema."""
    schemas = [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
               {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
               {"enum": ["red", "green", "blue"]},
               {"type": "object", "properties": {"s": {"type": "string", "maxLength": 8}},
                "required": ["s"]}]
    free = ["Once upon a time", "The three primary colours are", "def add(a, b):", "1, 2, 3,"]
    alone = [client.completions.create(model="m", prompt=p, max_tokens=12, temperature=0)
             .choices[0].text for p in free]

    def run(i):
        if i % 2:
            return client.completions.create(model="m", prompt=free[i // 2], max_tokens=12,
                                             temperature=0).choices[0].text
        s = schemas[i // 2]
        return httpx.post(f"{srv.url}/v1/completions", json={
            "prompt": "Answer in JSON:", "max_tokens": 40, "temperature": 0.8, "seed": i,
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": s}}},
            timeout=300).json()["choices"][0]["text"]
    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(run, range(8)))
    for i in range(8):
        if i % 2:
            assert out[i] == alone[i // 2], i
        else:
            jsonschema.validate(json.loads(out[i]), schemas[i // 2])


@pytest.mark.parametrize("path, body, status, param", [
    ("chat", {"response_format": {"type": "json_schema", "json_schema": {"name": "x",
              "schema": {"type": "nonsense"}}}}, 400, "response_format"),
    ("chat", {"response_format": {"type": "xml"}}, 400, "response_format"),
    ("completions", {"grammar": "root ::= ("}, 400, "grammar"),
    ("completions", {"grammar": "root ::= root"}, 400, "grammar"),               # left recursion
    ("completions", {"json_schema": {"type": "string", "pattern": "(a+)+$" * 400}}, 400, "json_schema"),
    ("chat", {"tools": [WEATHER, WEATHER]}, 400, "tools"),                        # names collide
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
     400, "tools"),
    ("chat", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     400, "tool_choice"),
    ("chat", {"top_logprobs": 3}, 400, "top_logprobs"),
    ("completions", {"logprobs": 9}, 400, "logprobs"),
])
def test_bad_structured_input_is_a_400_and_the_next_request_runs(srv, client, path, body, status, param):
    base = {"messages": [{"role": "user", "content": "hi"}]} if path == "chat" else {"prompt": "hi"}
    url = f"{srv.url}/v1/{'chat/completions' if path == 'chat' else 'completions'}"
    r = httpx.post(url, json={**base, "max_tokens": 4, **body}, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]
    ok = client.completions.create(model="m", prompt="Hello", max_tokens=2, temperature=0)
    assert ok.choices[0].finish_reason == "length"


def test_a_grammar_that_never_finishes_stops_at_max_tokens(client):
    r = client.completions.create(model="m", prompt="Letters:", max_tokens=5, temperature=0,
                                  extra_body={"grammar": 'root ::= [a-z]+ "!"'})
    assert r.choices[0].finish_reason == "length" and r.choices[0].text.isalpha()
