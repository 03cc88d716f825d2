"""The OpenAI-compatible server (a2ats_lite/server/): one uvicorn server per module on a
loopback port, driven by the official openai client, raw httpx and httpx's ASGITransport."""
from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from types import SimpleNamespace

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

from a2ats_lite.engine.driver import Driver  # noqa: E402
from a2ats_lite.runtime import Runtime  # noqa: E402
from a2ats_lite.sampling import SamplingParams  # noqa: E402
from a2ats_lite.server import create_app  # noqa: E402
from a2ats_lite.server.loop import EngineLoop, Handle, QueueFullError, ShuttingDown  # noqa: E402
from a2ats_lite.server.schemas import APIError, Reply, sampling_from, sse, stream_flags  # noqa: E402
from a2ats_lite.server.structured import Assembler, Shape  # noqa: E402
from serving import Server  # noqa: E402

KEY = "sk-test-key"
N_CTX = 512
PROMPTS = ["The capital of France is", "Once upon a time"]
# Prompts whose greedy continuations (8 tokens) win by a logit margin of more than 1: the
# engine's forward pass is not batch-invariant (a row's float rounding depends on the rows
# batched with it, up to ~0.05 in the logits after Gemma 3's post-norms), so a near-tie
# could flip a greedy token; with these, concurrent and sequential texts must be equal.
STEADY = ["7, 8, 9, 10,", "10, 11, 12, 13,", "1, 2, 3, 4,", "100, 101, 102, 103,", "ab ab ab ab",
          "20, 21, 22, 23,", "one, two, three, four,", "A B C D E", "1 2 3 4 5", "2, 4, 6, 8,",
          "1.1, 1.2, 1.3,", "x y z x y z x y", "1000, 2000, 3000,", "the the the the",
          "5, 10, 15, 20,", "3, 6, 9, 12,"]


@pytest.fixture(scope="module")
def rt(default_model):
    r = Runtime(default_model, n_ctx=N_CTX, max_seqs=16, cache_seqs=16)
    yield r
    r.close()


@pytest.fixture(scope="module")
def srv(rt):
    with Server(create_app(rt, model_name="gemma-test", api_key=KEY)) as s:
        yield s


@pytest.fixture(scope="module")
def client(srv):
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def _metrics(srv) -> dict[str, float]:
    text = httpx.get(f"{srv.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    out = {}
    for line in text.splitlines():
        m = re.match(r'a2ats_(\w+)\{kv="dense"\} (\S+)$', line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def _reference(srv, rt, prompts, max_tokens):
    """Greedy texts of the prompts run one at a time from an empty prefix cache, in the
    engine's own thread."""
    def run(eng):
        out = []
        for p in prompts:
            eng.clear_cache()
            out.append(rt.generate(p, max_tokens=max_tokens, temperature=0))
        return out
    return srv.engine.call(run, timeout=300)


def _fresh(srv):
    """Forget the prefix cache, so the next request runs its whole prompt. Comparisons of
    two requests' texts start each from here: a reused prefix is computed by steps of other
    shapes, and the engine's kernels round differently for different row counts (enough to
    flip a near-tie of a greedy or sampled token)."""
    srv.engine.call(lambda e: e.clear_cache())


# -- the official client ---------------------------------------------------------------------------

def test_models_and_health(srv, client):
    assert [m.id for m in client.models.list().data] == ["gemma-test"]
    r = httpx.get(f"{srv.url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_completion_usage_and_stream(srv, rt, client):
    p = PROMPTS[0]
    _fresh(srv)
    r = client.completions.create(model="gemma-test", prompt=p, max_tokens=8, temperature=0)
    c = r.choices[0]
    assert r.object == "text_completion" and c.finish_reason == "length" and c.text
    assert r.usage.prompt_tokens == len(rt.tokenize(p))
    assert r.usage.completion_tokens == 8 and r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert c.text == _reference(srv, rt, [p], 8)[0]
    # token-id prompt: same text
    _fresh(srv)
    r2 = client.completions.create(model="x", prompt=rt.tokenize(p), max_tokens=8, temperature=0)
    assert r2.choices[0].text == c.text
    # streamed: same text, finish_reason on the last choice chunk, usage in the last chunk
    _fresh(srv)
    chunks = list(client.completions.create(model="x", prompt=p, max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == "length" and all(f is None for f in finals[:-1])
    assert chunks[-1].usage.completion_tokens == 8
    assert chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens


def test_chat_and_stream(srv, rt, client):
    # 15 prompt tokens: at most 16 rows run through the engine's quantized kernels, wider
    # steps dequantize every weight (slow on a busy machine)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A colour?"}]
    _fresh(srv)
    r = client.chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=0)
    m = r.choices[0].message
    assert r.object == "chat.completion" and m.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == len(rt.chat_prompt(msgs))
    for s in rt.chat_stop():
        assert s not in m.content
    _fresh(srv)
    chunks = list(client.chat.completions.create(model="x", messages=msgs, max_completion_tokens=8,
                                                 temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == m.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason


def test_stop_strings_and_seed(srv, client):
    p = "The three primary colours are"
    _fresh(srv)
    full = client.completions.create(model="x", prompt=p, max_tokens=16, temperature=0).choices[0].text
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    _fresh(srv)
    r = client.completions.create(model="x", prompt=p, max_tokens=16, temperature=0, stop=[stop, "zzqx"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]
    # the same seed at temperature 1 gives the same text twice
    texts = []
    for _ in range(2):
        _fresh(srv)
        texts.append(client.completions.create(model="x", prompt=p, max_tokens=12, temperature=1.0,
                                               seed=1234).choices[0].text)
    assert texts[0] == texts[1]


# -- concurrency -----------------------------------------------------------------------------------

def test_concurrent_streams_share_steps(srv, rt, client):
    """16 streaming clients at once: each gets exactly its own request's complete text, the
    requests share engine steps, and the greedy texts equal the same prompts run one at a
    time (STEADY prompts: no near-ties for batch rounding to flip)."""
    n_tok = 8
    want = _reference(srv, rt, STEADY, n_tok)
    record: dict[int, list] = {}
    prompts: dict[int, list[int]] = {}

    def install(e):
        step, add = e.step, e.add_request

        def rec_step():
            outs = step()
            for o in outs:
                record.setdefault(o.rid, []).append(o)
            return outs

        def rec_add(ids, params=None):
            rid = add(ids, params)
            prompts[rid] = list(ids)
            return rid
        e.step, e.add_request = rec_step, rec_add

    srv.engine.call(install)
    results, errors = [None] * len(STEADY), []
    start = threading.Barrier(len(STEADY))

    def worker(i):
        try:
            start.wait(30)
            s = client.completions.create(model="x", prompt=STEADY[i], max_tokens=n_tok,
                                          temperature=0, stream=True)
            results[i] = "".join(ch.choices[0].text for ch in s if ch.choices)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    try:
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(STEADY))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        srv.engine.call(lambda e: (delattr(e, "step"), delattr(e, "add_request")))
    assert not errors
    assert _metrics(srv)["seqs_per_step_max"] > 1
    by_prompt = {tuple(ids): rid for rid, ids in prompts.items()}
    assert len(by_prompt) == len(STEADY)
    for i, p in enumerate(STEADY):
        outs = record[by_prompt[tuple(rt.tokenize(p))]]
        assert outs[-1].finished and outs[-1].completion_tokens == n_tok
        assert results[i] == "".join(o.text for o in outs)          # its own text, complete
    bad = [(p, r, w) for p, r, w in zip(STEADY, results, want) if r != w]
    assert not bad, f"{len(bad)} concurrent texts differ from the sequential run: {bad[:3]}"


def test_disconnect_aborts_and_frees_kv(srv):
    eng = srv.engine
    saved = eng.call(lambda e: e.cache_seqs)
    eng.call(lambda e: (setattr(e, "cache_seqs", 0), e.clear_cache()))
    try:
        before = eng.call(lambda e: (e.kv_bytes(), e.stats.requests_aborted))
        body = {"prompt": "Tell me a long story about a dragon.", "max_tokens": 300,
                "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", f"{srv.url}/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        break
                steps_at_close = eng.call(lambda e: e.stats.steps)
        t0 = time.time()
        while True:
            running, kv, aborted, steps = eng.call(lambda e: (e.num_running, e.kv_bytes(),
                                                               e.stats.requests_aborted, e.stats.steps))
            if running == 0 and aborted == before[1] + 1:
                break
            assert time.time() - t0 < 10, "the dropped request was not aborted"
            time.sleep(0.02)
        assert kv == before[0]
        assert steps - steps_at_close <= 3
        assert _metrics(srv)["requests_aborted_total"] >= 1
    finally:
        eng.call(lambda e: setattr(e, "cache_seqs", saved))


# -- errors ----------------------------------------------------------------------------------------

def _err(r, status):
    assert r.status_code == status, r.text
    e = r.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    return e


def test_bad_requests(srv):
    auth = {"Authorization": f"Bearer {KEY}"}
    url = f"{srv.url}/v1/completions"
    with httpx.Client(timeout=30) as c:
        _err(c.post(url, content=b'{"prompt": ', headers=auth), 400)
        _err(c.post(url, content=b'[1, 2]', headers=auth), 400)
        for field, value in [("max_tokens", "10"), ("temperature", "hot"), ("stop", 5),
                             ("seed", 1.5), ("top_k", True), ("stream", "yes"), ("prompt", {"a": 1}),
                             ("n", 2), ("max_tokens", 0), ("prompt", [10 ** 9])]:
            body = {"prompt": "hi", "max_tokens": 2, field: value}
            e = _err(c.post(url, json=body, headers=auth), 400)
            assert e["param"] == field or field == "n" and e["param"] == "n"
        e = _err(c.post(f"{srv.url}/v1/chat/completions", json={"messages": "hi"}, headers=auth), 400)
        assert e["param"] == "messages"
        # per-request KV selection: a dense server serves kv "dense", refuses a budget or
        # another policy with one JSON error
        for field, value in [("budget", "lots"), ("kv", 3)]:
            e = _err(c.post(url, json={"prompt": "hi", "max_tokens": 2, field: value}, headers=auth), 400)
            assert e["param"] == field
        for body, msg in [({"budget": 0.1}, "budget applies to a retrieval KV policy"),
                          ({"kv": "a2ats"}, "may ask for kv 'dense'")]:
            e = _err(c.post(url, json={"prompt": "hi", "max_tokens": 2, **body}, headers=auth), 400)
            assert msg in e["message"]
        r = c.post(url, json={"prompt": "hi", "max_tokens": 2, "kv": "dense"}, headers=auth)
        assert r.status_code == 200
        # unknown extra fields are ignored
        r = c.post(url, json={"prompt": "hi", "max_tokens": 2, "user": "u", "foo": [1]}, headers=auth)
        assert r.status_code == 200
        # a prompt longer than the context: both numbers in the message
        e = _err(c.post(url, json={"prompt": [2] + [1000] * 600, "max_tokens": 2}, headers=auth), 400)
        assert "601" in e["message"] and str(N_CTX) in e["message"]
        assert e["code"] == "context_length_exceeded"
        # body over the limit, by Content-Length and by the bytes read (chunked, no length)
        big = json.dumps({"prompt": "x" * (1 << 20)}).encode()
        _err(c.post(url, content=big, headers=auth), 413)
        _err(c.post(url, content=iter([big[i:i + 65536] for i in range(0, len(big), 65536)]),
                    headers=auth), 413)
        # api key
        _err(c.post(url, json={"prompt": "hi"}), 401)
        _err(c.post(url, json={"prompt": "hi"}, headers={"Authorization": "Bearer nope"}), 401)
        _err(c.get(f"{srv.url}/v1/models"), 401)
        # unknown route, wrong method
        _err(c.get(f"{srv.url}/v1/nothing", headers=auth), 404)
        _err(c.get(url, headers=auth), 405)
        # still serving
        r = c.post(url, json={"prompt": "hi", "max_tokens": 2}, headers=auth)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


@pytest.fixture
def rt_small(default_model):
    r = Runtime(default_model, n_ctx=256, max_seqs=2, cache_seqs=0)
    yield r
    r.close()


def _asgi(app, coro_fn):
    async def main():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as c:
            return await coro_fn(c)
    try:
        return asyncio.run(main())
    finally:
        app.state.engine.stop()


HOSTILE = ["{{ raise_exception('no chat for you') }}",
           "{% for i in range(10**9) %}x{% endfor %}",
           "{{ ''.__class__.__mro__[1].__subclasses__() }}",
           "{{ messages[0]['content'] * 100000000 }}",
           "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
           "{% for m in messages %}{{ m.content }"]


def test_hostile_template_and_busy(rt_small, monkeypatch):
    f = rt_small.file
    orig = f.get
    template = {"t": None}
    monkeypatch.setattr(f, "get", lambda k, d=None: template["t"] if k == "tokenizer.chat_template"
                        else orig(k, d))
    app = create_app(rt_small, model_name="m")

    async def go(c):
        for t in HOSTILE:
            template["t"] = t
            r = await c.post("/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            assert r.status_code in (400, 500), (t, r.status_code, r.text)
            assert r.json()["error"]["message"]
        template["t"] = None
        r = await c.post("/v1/chat/completions",
                         json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"
    _asgi(app, go)

    busy = create_app(rt_small, model_name="m", queue_size=0)

    async def go_busy(c):
        r = await c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        _err(r, 503)
        assert r.headers["retry-after"]
        h = await c.get("/health")
        assert h.status_code == 503 and h.json() == {"status": "busy"}
        m = await c.get("/metrics")
        assert 'a2ats_requests_rejected_total{kv="dense"} 1' in m.text
    _asgi(busy, go_busy)


# -- the pieces without a model: the wire format and the engine loop on a fake engine --------------

def test_sampling_from_and_reply_shapes():
    body = {"max_tokens": 9, "max_completion_tokens": 5, "temperature": 0, "stop": ["a", "b", "a"],
            "seed": 7, "stream": True, "stream_options": {"include_usage": True}}
    p = sampling_from(body, prompt_len=10, n_ctx=64, chat=True, extra_stop=["b", "<end>"])
    assert (p.max_tokens, p.temperature, p.seed) == (5, 0.0, 7)
    assert list(p.stop) == ["a", "b", "<end>"]
    assert stream_flags(body) == (True, True)
    # no max_tokens: until the context is full; max_completion_tokens counts for chat only
    assert sampling_from({"max_completion_tokens": 5}, 10, 64, chat=False).max_tokens == 54
    for field, value in [("n", 2), ("top_p", 1.5), ("temperature", float("nan")),
                         ("stop", ["x"] * 17)]:
        with pytest.raises(APIError) as e:
            sampling_from({field: value}, 1, 64, chat=False)
        assert e.value.status == 400 and e.value.param == field
    with pytest.raises(APIError) as e:
        stream_flags({"stream_options": {"include_usage": "yes"}})
    assert e.value.param == "include_usage"

    class Out:
        text, finish_reason, prompt_tokens, completion_tokens = "hi", "eos", 3, 2
        token, error, logprob, prompt_logprobs, finished = None, None, None, None, True
    chat = Reply.new(chat=True, model="m", include_usage=True)
    assert chat.id.startswith("chatcmpl-")
    asm = Assembler(Shape(), None, [1], None, chat=True)
    asm.feed(Out())
    done = chat.completion(asm, Out())
    assert done["object"] == "chat.completion" and done["choices"][0]["finish_reason"] == "stop"
    assert done["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert done["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    first, last = chat.chunk("", first=True), chat.chunk("", "length")
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert chat.usage_chunk(Out())["choices"] == []
    text = Reply.new(chat=False, model="m")
    c = text.chunk("x")
    assert c["object"] == "text_completion" and c["choices"][0]["text"] == "x" and "usage" not in c
    assert sse(c) == f"data: {json.dumps(c)}\n\n"


class FakeEngine:
    """The Engine surface the loop uses: each request finishes after `steps` steps; step()
    raises while `fail` is set."""

    def __init__(self, steps: int):
        self.stats = SimpleNamespace(steps=0, prompt_tokens=0, reused_tokens=0, generated_tokens=0,
                                     max_seqs_in_step=0, seqs_in_steps=0, forward_s=0.0,
                                     requests_finished=0, requests_aborted=0, requests_failed=0)
        self.steps, self.fail = steps, False
        self.requests: dict[int, int] = {}       # rid -> steps left
        self.aborted: list[int] = []
        self.num_running = self.num_waiting = 0
        self._rids = iter(range(1, 1000))

    def kv_bytes(self) -> int:
        return 0

    def add_request(self, prompt, params):
        if not prompt:
            raise ValueError("empty prompt")
        rid = next(self._rids)
        self.requests[rid] = self.steps
        return rid

    def abort(self, rid):
        self.aborted.append(rid)
        return self.requests.pop(rid, None) is not None

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self):
        if self.fail:
            raise RuntimeError("step failed")
        time.sleep(0.001)
        outs = []
        for rid in list(self.requests):
            self.requests[rid] -= 1
            fin = self.requests[rid] == 0
            if fin:
                del self.requests[rid]
            outs.append(SimpleNamespace(rid=rid, text="t", finished=fin,
                                        finish_reason="length" if fin else None, error=None))
        return outs


def _events(aio, h, n: int, timeout: float = 5.0) -> list:
    async def take():
        return [await asyncio.wait_for(h.events.get(), timeout) for _ in range(n)]
    return aio.run_until_complete(take())


def test_engine_loop_on_a_fake_engine():
    eng = FakeEngine(steps=2)
    loop = EngineLoop(SimpleNamespace(engine=eng, driver=Driver(eng)))
    aio = asyncio.new_event_loop()
    try:
        def handle(prompt=(1,)):
            return Handle(list(prompt), SamplingParams(), aio, asyncio.Queue())
        # a request runs to its end; a bad one gets its add_request error
        h = handle()
        loop.submit(h, queue_size=4)
        evs = _events(aio, h, 2)
        assert [k for k, _ in evs] == ["out", "out"] and evs[-1][1].finished and h.done
        bad_h = handle(())
        loop.submit(bad_h, queue_size=4)
        (kind, e), = _events(aio, bad_h, 1)
        assert kind == "error" and isinstance(e, ValueError)
        assert loop.call(lambda e: e.stats.steps) == 0 and loop.waiting == 0
        # a failing step: every live request ends with the error, the loop carries on
        eng.fail, eng.steps = True, 100
        h = handle()
        loop.submit(h, queue_size=4)
        (kind, e), = _events(aio, h, 1)
        assert kind == "error" and str(e) == "step failed" and loop.errors >= 1 and loop.alive
        eng.fail = False
        # an abort frees the request in the engine
        h = handle()
        loop.submit(h, queue_size=4)
        _events(aio, h, 1)
        loop.abort(h)
        assert loop.call(lambda e: h.rid in e.aborted and not e.requests)
        # the queue limit
        with pytest.raises(QueueFullError):
            loop.submit(handle(), queue_size=0)
        assert loop.rejected == 1
        # stop: a live request ends with ShuttingDown; then nothing more is taken
        h = handle()
        loop.submit(h, queue_size=4)
        _events(aio, h, 1)
        loop.stop()
        assert not loop.alive
        kind = "out"
        while kind == "out":                     # the outputs of the steps before stop
            (kind, e), = _events(aio, h, 1)
            assert kind == "error" or not e.finished
        assert isinstance(e, ShuttingDown) and eng.aborted[-1] == h.rid
        with pytest.raises(QueueFullError):
            loop.submit(handle(), queue_size=4)
    finally:
        loop.stop()
        aio.close()


def test_engine_loop_fails_commands_left_at_shutdown():
    """Commands that reach the queue after the loop's last regular drain (a submit racing
    with stop, an admin call): adds and calls fail with ShuttingDown, aborts are no-ops, and
    the waiting count goes back to zero."""
    import concurrent.futures
    eng = FakeEngine(steps=1)
    loop = EngineLoop(SimpleNamespace(engine=eng, driver=Driver(eng)))
    aio = asyncio.new_event_loop()
    try:
        h = Handle([1], SamplingParams(), aio, asyncio.Queue())
        h.rid = 5
        fut = concurrent.futures.Future()
        loop._pending += 1                       # as submit() leaves it
        loop._cmds.put(("add", h))
        loop._cmds.put(("abort", h))
        loop._cmds.put(("call", (lambda e: 1, fut)))
        loop._drain(stopping=True)
        (kind, e), = _events(aio, h, 1)
        assert kind == "error" and isinstance(e, ShuttingDown)
        with pytest.raises(ShuttingDown):
            fut.result(0)
        assert loop.waiting == 0 and eng.aborted == [] and not eng.requests
    finally:
        aio.close()
