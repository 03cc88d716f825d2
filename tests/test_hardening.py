"""Hardening: each test reproduces one reported failure (chat history, hostile chat
templates, flag values, outputs and optional dependencies checked up front, sidecar
files, small CLI/Unix behaviours). Most use fakes; the few that need the model use
the default_model fixture with -c 128 and a handful of tokens."""
import io
import os
import subprocess
import sys
import threading
import time
import tracemalloc
import zipfile

import numpy as np
import pytest
from click.testing import CliRunner

from a2ats_lite import chat as chat_mod
from a2ats_lite.chat import FALLBACK_TEMPLATE, ChatSession, chat_stop_strings, render_chat, sandbox
from a2ats_lite.cli import main
from a2ats_lite.errors import ModelError, SidecarError, TemplateError

CONV = [{"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"}]


def _one_error_line(r, *needles):
    """The CLI contract: exit 2, one `error: ...` line, no traceback."""
    assert r.exit_code == 2, (r.exit_code, r.output)
    assert "Traceback" not in r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def templates(shared_dir):
    d = shared_dir / "templates"
    if not d.is_dir():
        pytest.skip(f"templates not found in {d}")
    return {p.stem: p.read_text(encoding="utf-8") for p in d.glob("*.jinja")}


# -- fakes ---------------------------------------------------------------------------------

class _Timings:
    def line(self):
        return "load 0 ms | prompt 0 tok | generation 0 tok"


class FakeRuntime:
    """Just what the CLI and ChatSession use: chat_prompt/stream/tokenize/n_ctx/timings.
    A 'token' is 4 characters of rendered prompt text."""

    def __init__(self, template=None, n_ctx=128, replies=None, bos="<bos>"):
        self.template, self.n_ctx, self.bos = template, n_ctx, bos
        self.replies = list(replies or [])
        self.calls = []
        self.timings = _Timings()

    def chat_prompt(self, messages):
        text, _ = chat_mod.prompt_for_chat(self.template, messages, bos_token=self.bos,
                                           eos_token="<eos>")
        self.last_prompt = text
        return list(range(1 + len(text) // 4))

    def tokenize(self, text, add_bos=None, special=False):
        return list(range(1 + len(text) // 4))

    def stream(self, prompt, **kw):
        self.calls.append(kw)
        reply = self.replies.pop(0) if self.replies else "ok"
        if isinstance(reply, BaseException):
            raise reply
        for piece in reply:
            if isinstance(piece, BaseException):
                raise piece
            yield piece

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _alternates(messages):
    roles = [m["role"] for m in messages if m["role"] != "system"]
    return roles and roles[0] == "user" and all(
        r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles))


# -- 1. chat history keeps alternation -----------------------------------------------------

def test_chat_drops_whole_turns_with_an_alternating_template(templates):
    rt = FakeRuntime(templates["google-gemma-2-2b-it"], n_ctx=96,
                     replies=[["A reply that is long enough to fill the context quickly."]] * 8)
    s = ChatSession(rt, max_tokens=16)
    for i in range(8):   # the old code raised "Conversation roles must alternate" on turn 3
        assert s.turn(f"question number {i} with some words in it") is not None
        assert _alternates(s.messages), s.messages
    assert s.messages[-1]["role"] == "assistant" and "number 7" in s.messages[-2]["content"]
    assert len(s.messages) < 16            # old turns were dropped


def test_chat_keeps_the_system_message_when_dropping(templates):
    rt = FakeRuntime(templates["meta-llama-Llama-3.1-8B-Instruct"], n_ctx=160,
                     replies=[["Some reply text that takes room."]] * 6)
    s = ChatSession(rt, system="Be brief.", max_tokens=16)
    for i in range(6):
        assert s.turn(f"message {i} " + "word " * 10) is not None
        assert s.messages[0] == {"role": "system", "content": "Be brief."}
        assert _alternates(s.messages)
    assert len(s.messages) < 13


def test_chat_template_error_does_not_end_the_session(templates):
    # Gemma 2 refuses a system message: one error line per turn, the session goes on
    rt = FakeRuntime(templates["google-gemma-2-2b-it"], n_ctx=512)
    s = ChatSession(rt, system="sys", max_tokens=8)
    assert s.turn("hi") is None
    assert s.messages == [{"role": "system", "content": "sys"}]


def test_cli_chat_third_turn_with_alternating_template(default_model, templates, monkeypatch):
    from a2ats_lite.gguf import GGUFFile
    get = GGUFFile.get
    tmpl = templates["google-gemma-2-2b-it"]
    monkeypatch.setattr(GGUFFile, "get", lambda self, key, default=None:
                        tmpl if key == "tokenizer.chat_template" else get(self, key, default))
    # three turns of ~45 tokens: the third needs the first turn dropped at -c 128
    lines = "".join(f"Tell me a story about the number {i}. " + "It should be long, " * 8 + "\n"
                    for i in range(3))
    r = CliRunner().invoke(main, ["chat", str(default_model), "-c", "128", "-n", "6",
                                  "--temp", "0"], input=lines + "/exit\n")
    assert r.exit_code == 0, r.output
    assert "error" not in r.stderr, r.stderr
    assert r.stdout.count("> ") >= 4


# -- 2. hostile templates are bounded in time and memory -----------------------------------

# sizes chosen so that the unguarded renderer builds ~0.3-1 GB (or runs for a long
# time), which the tracemalloc peak below would catch; the guarded one stays small
HOSTILE = {
    "nested loops over a string":
        "{% set s = 'x' * 3000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "nested loops over messages":
        "{% set m = messages * 1000 %}{% for a in m %}{% for b in m %}{% endfor %}{% endfor %}",
    "~ doubling": "{% set ns = namespace(s='x') %}{% for i in range(28) %}"
                  "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "list + doubling": "{% set ns = namespace(l=[1]) %}{% for i in range(26) %}"
                       "{% set ns.l = ns.l + ns.l %}{% endfor %}",
    "string + doubling": "{% set ns = namespace(s='x') %}{% for i in range(28) %}"
                         "{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "tojson huge indent": "{{ messages | tojson(indent=4000000) }}",
    "tojson string indent": "{{ messages | tojson(indent=' ' * 4000000) }}",
    "replace filter": "{{ ('x' * 5000) | replace('x', 'y' * 100000) }}",
    "replace method": "{{ ('x' * 5000).replace('x', 'y' * 100000) }}",
    "join method": "{{ ('y' * 100000).join('x' * 5000) }}",
    "join filter": "{{ ('x' * 5000) | join('y' * 100000) }}",
    "format method": "{{ ('{0}' * 100).format('x' * 4000000) }}",
    "format filter": "{{ ('%s' * 100) | format(*(['x' * 4000000] * 100)) }}",
    "indent filter": "{{ ('x\n' * 100000) | indent(5000) }}",
    "wordwrap filter": "{{ ('x' * 100000) | wordwrap(1, wrapstring='y' * 5000) }}",
    "center retained": "{% set ns = namespace(l=[]) %}{% for i in range(100) %}"
                       "{% set ns.l = ns.l + ['x'.center(4000000)] %}{% endfor %}",
    "distinct strings retained": "{% set ns = namespace(l=[]) %}{% for i in range(100) %}"
                                 "{% set ns.l = ns.l + [('x' * 4000000) ~ i] %}{% endfor %}",
    "captured block": "{% set big = 'x' * 4000000 %}{% set c %}{% for i in range(100) %}"
                      "{{ big }}{% endfor %}{% endset %}",
    "printing a list of big strings": "{% set big = 'x' * 4000000 %}{% set ns = namespace(l=[]) %}"
                                      "{% for i in range(100) %}{% set ns.l = ns.l + [big] %}"
                                      "{% endfor %}{{ ns.l }}",
    "huge integers": "{% set ns = namespace(x=3) %}{% for i in range(22) %}"
                     "{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "exponential macro": "{% macro f(n) %}{% if n > 0 %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}"
                         "{% endmacro %}{{ f(22) }}",
    "recursive loop": "{% for x in [[1]] recursive %}{% for y in 'a' * 3000 %}{% endfor %}"
                      "{{ loop([[1]]) }}{% endfor %}",
    "sum of lists": "{{ ([[1]] * 100000) | sum(start=[]) | length }}",
    "template too large": "{# " + "x" * (300 << 10) + " #}",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_templates_are_bounded(name):
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(TemplateError, match="resource limit"):
            render_chat(HOSTILE[name], CONV)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.monotonic() - t0 < 20          # generous: 2 cores shared by many
    assert peak < 100 << 20, f"{name}: peak {peak >> 20} MiB"


def test_render_deadline(monkeypatch):
    # work under the step budget but over the (lowered) deadline
    monkeypatch.setattr(sandbox, "MAX_RENDER_SECONDS", 0.05)
    t0 = time.monotonic()
    with pytest.raises(TemplateError, match="longer than 0.05 s"):
        render_chat("{% for i in range(900000) %}{% endfor %}", CONV)
    assert time.monotonic() - t0 < 5


def test_step_budget_is_per_render(monkeypatch):
    monkeypatch.setattr(sandbox, "MAX_STEPS", 50)
    tmpl = "{% for m in messages %}{{ m.content | trim }}{% endfor %}"
    for _ in range(5):     # a fresh budget each time
        assert render_chat(tmpl, CONV) == "What is 2+2?4.And 3+3?"
    with pytest.raises(TemplateError, match="resource limit"):
        render_chat(tmpl, CONV * 20)


def test_guards_keep_ordinary_templates_working():
    tmpl = ("{% set ns = namespace(s='') %}{% for m in messages %}"
            "{% set ns.s = ns.s ~ m.role ~ ':' ~ m.content + '|' %}{% endfor %}{{ ns.s }}"
            "{{ messages | map(attribute='role') | join(',') }}{{ ' %s' % 'x' }}"
            "{{ ('a-b' | replace('-', '+')) }}{{ 'x'.center(3) }}{{ ', '.join(['p', 'q']) }}"
            "{% for m in messages %}{{ loop.index }}{% if loop.last %}!{% endif %}{% endfor %}"
            "{% macro f(x) %}<{{ x }}>{% endmacro %}{{ f(1) }}{% set c %}cap{% endset %}{{ c }}"
            "{{ [1, 2] + [3] }}{{ 2 ** 10 }}{{ messages | tojson(indent=1) | length > 0 }}")
    assert render_chat(tmpl, CONV) == (
        "user:What is 2+2?|assistant:4.|user:And 3+3?|user,assistant,user x"
        "a+b x p, q123!<1>cap[1, 2, 3]1024True")


def test_all_real_templates_render_with_long_conversations(templates):
    conv = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i} " * 50}
            for i in range(301)]
    for name, t in templates.items():
        assert render_chat(t, conv, bos_token="<s>", eos_token="</s>").count("message 300") == 50


# -- 3 and 9. budgets, contexts, policies, tasks ------------------------------------------

@pytest.mark.parametrize("budget", ["inf", "-inf", "nan", "1.5", "0", "-3"])
def test_generate_bad_budget_one_line(budget, monkeypatch):
    monkeypatch.setattr("a2ats_lite.runtime.Runtime.__init__",
                        lambda *a, **k: pytest.fail("the model must not load"))
    r = CliRunner().invoke(main, ["generate", "m.gguf", "-p", "x", "--kv", "quest",
                                  "--budget", budget])
    _one_error_line(r, "--budget")


def _no_eval_run(monkeypatch):
    from a2ats_lite import evaluate
    monkeypatch.setattr(evaluate, "run", lambda *a, **k: pytest.fail("eval must not run"))
    monkeypatch.setattr("a2ats_lite.runtime.Runtime.__init__",
                        lambda *a, **k: pytest.fail("the model must not load"))


@pytest.mark.parametrize("args, needle", [
    (["--budget", "inf"], "--budget"),
    (["--budget", "1.5"], "--budget"),
    (["--ctx", "0"], "--ctx"),
    (["--ctx=-100"], "--ctx"),
    (["--ctx", ""], "--ctx"),
    (["--kv", ""], "--kv"),
    (["--kv", ","], "--kv"),
    (["--tasks", ""], "--tasks"),
])
def test_eval_bad_values_one_line(args, needle, monkeypatch):
    _no_eval_run(monkeypatch)
    r = CliRunner().invoke(main, ["eval", "m.gguf", *args])
    _one_error_line(r, needle)


# -- 4. outputs and optional dependencies checked before the work ------------------------

def test_eval_plot_without_matplotlib_fails_first(monkeypatch, tmp_path):
    _no_eval_run(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)     # import -> ImportError
    r = CliRunner().invoke(main, ["eval", "m.gguf", "--plot", str(tmp_path / "p.png")])
    _one_error_line(r, "matplotlib")


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_eval_output_in_missing_directory_fails_first(flag, monkeypatch, tmp_path):
    _no_eval_run(monkeypatch)
    out = tmp_path / "missing" / "out.x"
    r = CliRunner().invoke(main, ["eval", "m.gguf", flag, str(out)])
    _one_error_line(r, str(out), "does not exist")


def test_calibrate_output_in_missing_directory_fails_first(monkeypatch, tmp_path):
    monkeypatch.setattr("a2ats_lite.gguf.GGUFFile.__init__",
                        lambda *a, **k: pytest.fail("the model must not load"))
    out = tmp_path / "missing" / "m.a2ats"
    r = CliRunner().invoke(main, ["calibrate", "m.gguf", "-o", str(out)])
    line = _one_error_line(r, str(out), "does not exist")
    assert ".tmp" not in line


def test_sidecar_save_names_the_sidecar_not_the_temp_file(tmp_path):
    from a2ats_lite.vq import Calibration
    out = tmp_path / "missing" / "m.a2ats"
    with pytest.raises(SidecarError) as e:
        Calibration(params={}, fingerprint="").save(out)
    assert str(out) in str(e.value) and ".tmp" not in str(e.value)


# -- 5 and 6. sidecar loading --------------------------------------------------------------

def _good_arrays(n=8, d=4):
    rng = np.random.default_rng(0)
    L = np.tril(rng.standard_normal((d, d))).astype(np.float32) + 3 * np.eye(d, dtype=np.float32)
    arrays = {"meta.version": np.array(1), "meta.fingerprint": np.array("f" * 64),
              "meta.params": np.array(repr(sorted({"b": 2048, "w": 64, "s": 8,
                                                   "n_centroids": n}.items())))}
    for kind in ("a2ats", "vq"):
        arrays[f"{kind}.5.0.C"] = rng.standard_normal((n, d)).astype(np.float32)
        arrays[f"{kind}.5.0.L"] = L if kind == "a2ats" else np.eye(d, dtype=np.float32)
    return arrays


def _write(path, arrays, extra=None):
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    if extra:
        with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as z:
            for name, data in extra.items():
                z.writestr(name, data)
    return path


def test_good_sidecar_loads(tmp_path):
    from a2ats_lite.vq import Calibration
    cal = Calibration.load(_write(tmp_path / "s.a2ats", _good_arrays()))
    assert cal.params["n_centroids"] == 8 and set(cal.a2ats) == set(cal.vq) == {(5, 0)}


def test_sidecar_unknown_large_member_is_refused_without_reading_it(tmp_path):
    from a2ats_lite.vq import Calibration
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (1 << 23,)})
    blob = header.getvalue() + bytes(64 << 20)          # 64 MiB, compresses to ~64 KiB
    p = _write(tmp_path / "s.a2ats", _good_arrays(), extra={"extra.npy": blob})
    assert p.stat().st_size < 2 << 20
    tracemalloc.start()
    try:
        with pytest.raises(SidecarError, match="unexpected member 'extra.npy'") as e:
            Calibration.load(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(p) in str(e.value) and peak < 8 << 20, peak


def test_sidecar_declared_shape_checked_before_reading(tmp_path):
    from a2ats_lite.vq import Calibration
    arrays = _good_arrays()
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (1 << 20, 4096)})  # 16 GiB declared
    p = _write(tmp_path / "s.a2ats", {k: v for k, v in arrays.items() if k != "a2ats.5.0.C"},
               extra={"a2ats.5.0.C.npy": header.getvalue() + bytes(1024)})
    with pytest.raises(SidecarError, match="unexpected float32 array"):
        Calibration.load(p)
    # a plausible header that does not match the member's size
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (8, 4)})
    p = _write(tmp_path / "t.a2ats", {k: v for k, v in arrays.items() if k != "a2ats.5.0.C"},
               extra={"a2ats.5.0.C.npy": header.getvalue() + bytes(10)})
    with pytest.raises(SidecarError, match="does not match"):
        Calibration.load(p)


def _params(**kw):
    base = {"b": 2048, "w": 64, "s": 8, "n_centroids": 8}
    base.update(kw)
    return np.array(repr(sorted(base.items())))


@pytest.mark.parametrize("change, needle", [
    ({"meta.params": _params(b=1e308)}, "parameter b="),
    ({"meta.params": _params(b="foo")}, "parameter b="),
    ({"meta.params": _params(w=0)}, "parameter w="),
    ({"meta.params": _params(s=True)}, "parameter s="),
    ({"meta.params": _params(b=2 ** 21)}, "parameter b="),
    ({"meta.params": _params(n_centroids=65537)}, "n_centroids="),
    ({"meta.params": _params(n_centroids=9)}, "n_centroids=9"),
    ({"meta.params": np.array("[('b', " * 5000)}, "meta.params"),
    ({"meta.params": np.array("__import__('os')")}, "meta.params"),
    ({"meta.version": np.array(1.5)}, "meta.version"),
    ({"a2ats.5.0.C": np.zeros((0, 4), np.float32)}, "a2ats.5.0.C"),
    ({"a2ats.5.0.C": np.zeros((8, 4), np.int32)}, "a2ats.5.0.C"),
    ({"a2ats.5.0.L": np.ones((4, 4), np.float32)}, "lower-triangular"),
    ({"a2ats.5.0.L": np.zeros((4, 4), np.float32)}, "lower-triangular"),
    ({"a2ats.5.0.L": np.full((4, 4), np.inf, np.float32)}, "infinite"),
    ({"vq.5.0.C": np.zeros((8, 5), np.float32), "vq.5.0.L": np.eye(5, dtype=np.float32)},
     "different key sizes"),
])
def test_sidecar_contents_are_validated(change, needle, tmp_path):
    from a2ats_lite.vq import Calibration
    arrays = _good_arrays()
    arrays.update(change)
    p = _write(tmp_path / "s.a2ats", arrays)
    with pytest.raises(SidecarError) as e:
        Calibration.load(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: ") and needle in msg, msg


def test_sidecar_too_many_centroids_for_uint16_codes(tmp_path):
    from a2ats_lite.vq import Calibration
    arrays = _good_arrays(n=65537, d=2)
    arrays["meta.params"] = _params(n_centroids=65537)
    p = _write(tmp_path / "s.a2ats", arrays)
    with pytest.raises(SidecarError, match=r"\(65537, 2\)"):    # refused from the header
        Calibration.load(p)


def test_garbage_sidecar_is_not_reported_as_pickled_data(tmp_path):
    from a2ats_lite.vq import Calibration
    p = tmp_path / "s.a2ats"
    p.write_bytes(b"\x00garbage")
    with pytest.raises(SidecarError) as e:
        Calibration.load(p)
    msg = str(e.value)
    assert "pickle" not in msg and "not a valid sidecar" in msg and str(p) in msg


# -- 8. values checked before any output ----------------------------------------------------

@pytest.mark.parametrize("flags, needle", [
    (["--temp", "nan"], "temperature"),
    (["--top-p", "nan"], "top_p"),
    (["--repeat-penalty", "0"], "repeat_penalty"),
    (["--min-p", "nan"], "min_p"),
    (["-s", str(2 ** 70)], "seed"),
])
def test_bad_sampling_values_fail_before_output(flags, needle, monkeypatch):
    monkeypatch.setattr("a2ats_lite.runtime.Runtime.__init__",
                        lambda *a, **k: pytest.fail("the model must not load"))
    r = CliRunner().invoke(main, ["generate", "m.gguf", "-p", "PROMPT TEXT", *flags])
    _one_error_line(r, needle)
    assert r.stdout == ""


def test_prompt_too_long_fails_before_echo(tmp_path, monkeypatch):
    monkeypatch.setattr("a2ats_lite.cli.runtime_args._open_runtime",
                        lambda *a, **k: FakeRuntime(n_ctx=64))
    f = tmp_path / "prompt.txt"
    f.write_text("word " * 400)
    r = CliRunner().invoke(main, ["generate", "m.gguf", "-f", str(f)])
    _one_error_line(r, "does not fit the context size 64", "--truncate")
    assert r.stdout == ""


def test_truncate_flag(default_model, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("one two three four five six seven eight nine ten " * 30)
    r = CliRunner().invoke(main, ["generate", str(default_model), "-f", str(f), "-c", "128",
                                  "-n", "3", "--temp", "0", "--no-echo"])
    _one_error_line(r, "--truncate")
    r = CliRunner().invoke(main, ["generate", str(default_model), "-f", str(f), "-c", "128",
                                  "-n", "3", "--temp", "0", "--no-echo", "--truncate"])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() and "tok/s" in r.stderr


# -- 10. fallback stop strings, what the history keeps --------------------------------------

def test_chat_stop_strings(templates):
    stops = chat_stop_strings(None)
    assert "\nUser:" in stops and "\nSystem:" in stops and chat_stop_strings("") == stops
    assert chat_stop_strings(templates["google-gemma-2-2b-it"]) == []
    # every fallback turn boundary the model could write is caught by a stop string
    text = render_chat(FALLBACK_TEMPLATE, [{"role": "system", "content": "s"}] + CONV,
                       add_generation_prompt=False)
    assert all(s in text for s in ("\nUser:", "\nAssistant:"))


def test_fallback_stop_strings_cut_fake_turns(default_model):
    from a2ats_lite import Runtime
    with Runtime(default_model, n_ctx=128, seed=1) as rt:
        msgs = [{"role": "user", "content": "Say hello."}]
        out = rt.generate(rt.chat_prompt(msgs), max_tokens=24, temperature=0,
                          stop=chat_stop_strings(None))
    assert "User:" not in out and "Assistant:" not in out


def test_chat_session_passes_stops_and_drops_bad_replies():
    rt = FakeRuntime(None, n_ctx=512, replies=[
        ["Hello", KeyboardInterrupt()],   # Ctrl-C mid reply
        ["  \n "],                        # empty reply
        [" Fine, thanks."],
    ])
    s = ChatSession(rt, max_tokens=8, stop=chat_stop_strings(None))
    assert s.turn("hi") is None and s.messages == []
    assert s.turn("anyone?") is None and s.messages == []
    assert s.turn("how are you?") == "Fine, thanks."
    assert s.messages == [{"role": "user", "content": "how are you?"},
                          {"role": "assistant", "content": "Fine, thanks."}]
    assert all(c["stop"] == chat_stop_strings(None) for c in rt.calls)


def test_cli_chat_passes_fallback_stops(monkeypatch):
    rt = FakeRuntime(None, n_ctx=512)
    rt.file = {}     # what session_stops reads: no tokenizer.chat_template
    monkeypatch.setattr("a2ats_lite.cli.runtime_args._open_runtime", lambda *a, **k: rt)
    r = CliRunner().invoke(main, ["chat", "m.gguf"], input="hi\n/exit\n")
    assert r.exit_code == 0, r.output
    assert rt.calls and rt.calls[0]["stop"] == chat_stop_strings(None)


# -- 11. small ones -------------------------------------------------------------------------

def test_a2ats_model_pointing_nowhere_is_an_error(monkeypatch, tmp_path):
    from a2ats_lite.default_model import default_model_path
    missing = tmp_path / "nope.gguf"
    monkeypatch.setenv("A2ATS_MODEL", str(missing))
    with pytest.raises(ModelError) as e:
        default_model_path()
    assert "A2ATS_MODEL" in str(e.value) and str(missing) in str(e.value)
    r = CliRunner().invoke(main, ["info"])
    _one_error_line(r, "A2ATS_MODEL", str(missing))


def test_info_on_a_fifo_does_not_hang(tmp_path):
    from a2ats_lite.gguf import GGUFFile
    fifo = tmp_path / "m.gguf"
    os.mkfifo(fifo)
    result = {}

    def run():
        try:
            GGUFFile(fifo)
        except ModelError as e:
            result["error"] = str(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():     # unblock the old code's open() so the thread can end
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        pytest.fail("GGUFFile blocked on a FIFO")
    assert "not a regular file" in result["error"] and str(fifo) in result["error"]
    r = CliRunner().invoke(main, ["info", str(fifo)])
    _one_error_line(r, "not a regular file")


def test_seed_out_of_range():
    from a2ats_lite.sampling import SamplingError, SamplingParams
    with pytest.raises(SamplingError, match="seed"):
        SamplingParams(seed=2 ** 70)
    SamplingParams(seed=2 ** 63 - 1)
    SamplingParams(seed=-1)


def test_broken_pipe_exits_quietly_fake(monkeypatch):
    rt = FakeRuntime(replies=[["a", BrokenPipeError(32, "Broken pipe")]])
    monkeypatch.setattr("a2ats_lite.cli.runtime_args._open_runtime", lambda *a, **k: rt)
    r = CliRunner().invoke(main, ["generate", "m.gguf", "-p", "x"])
    assert r.exit_code == 141 and "error" not in r.stderr and "Traceback" not in r.output


def test_broken_pipe_exits_quietly_real(default_model):
    p = subprocess.Popen([sys.executable, "-m", "a2ats_lite.cli", "generate", str(default_model),
                          "-p", "Hello", "-n", "4", "-c", "128"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()          # the reader is gone before the first write, as `| head -c 0`
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141, err
    assert b"error" not in err and b"Traceback" not in err and b"Exception ignored" not in err


def test_sigint_during_generate_exits_130(monkeypatch):
    rt = FakeRuntime(replies=[[" partial", " text", KeyboardInterrupt()]])
    monkeypatch.setattr("a2ats_lite.cli.runtime_args._open_runtime", lambda *a, **k: rt)
    r = CliRunner().invoke(main, ["generate", "m.gguf", "-p", "Start:"])
    assert r.exit_code == 130, r.output
    assert r.stdout == "Start: partial text\n"
    assert "[interrupted]" in r.stderr and "Traceback" not in r.output


def test_cli_usage_errors_from_commands_are_one_line():
    r = CliRunner().invoke(main, ["generate", "m.gguf"])
    _one_error_line(r, "give a prompt")


def test_sigint_while_loading_exits_130(monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr("a2ats_lite.cli.runtime_args._open_runtime", interrupted)
    r = CliRunner().invoke(main, ["generate", "m.gguf", "-p", "x"])
    assert r.exit_code == 130 and "[interrupted]" in r.stderr and "Traceback" not in r.output


def test_limits_scale_with_a_huge_legitimate_message(templates):
    big = [{"role": "user", "content": "word " * 1_000_000}]     # 5M characters
    for name in ("Qwen-Qwen2.5-7B-Instruct", "google-gemma-2-2b-it",
                 "meta-llama-Llama-3.1-8B-Instruct", "mistralai-Mistral-Nemo-Instruct-2407"):
        assert len(render_chat(templates[name], big, bos_token="<s>")) > 4_900_000
