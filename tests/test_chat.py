"""Chat templates: the real templates in shared/templates against hand-written expected
prompts, HF helpers (raise_exception, strftime_now, tojson), the plain fallback, BOS
de-duplication, and hostile templates that must fail without executing anything."""
import json
from datetime import datetime

import pytest

from a2ats_lite.chat import (FALLBACK_TEMPLATE, ChatSession, chat_template_for, prompt_for_chat,
                             render_chat, strip_duplicate_bos)
from a2ats_lite.errors import TemplateError

SYS = {"role": "system", "content": "You are a terse assistant."}
CONV = [{"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."},
        {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="module")
def templates(shared_dir):
    d = shared_dir / "templates"
    if not d.is_dir():
        pytest.skip(f"templates not found in {d}")
    return {p.stem: p.read_text(encoding="utf-8") for p in d.glob("*.jinja")}


def _t(templates, name):
    if name not in templates:
        pytest.skip(f"template {name} missing")
    return templates[name]


# -- real templates: expected strings written by hand from each model's format -------

def test_qwen25_chatml(templates):
    t = _t(templates, "Qwen-Qwen2.5-7B-Instruct")
    assert render_chat(t, [SYS] + CONV) == (
        "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n"
        "<|im_start|>user\nAnd 3+3?<|im_end|>\n"
        "<|im_start|>assistant\n")
    # no system message: Qwen's default system prompt is inserted
    assert render_chat(t, CONV[:1]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    assert render_chat(t, CONV[:2], add_generation_prompt=False).endswith(
        "<|im_start|>assistant\n4.<|im_end|>\n")


def test_qwen25_tools_use_hf_tojson(templates):
    t = _t(templates, "Qwen-Qwen2.5-7B-Instruct")
    tool = {"type": "function", "function": {"name": "add", "description": "a < b & c"}}
    out = render_chat(t, [SYS] + CONV[:1], tools=[tool])
    # HF's tojson: no HTML escaping of < & >, ", " separators
    assert ('<tools>\n{"type": "function", "function": {"name": "add", '
            '"description": "a < b & c"}}\n</tools>') in out


def test_gemma2(templates):
    t = _t(templates, "google-gemma-2-2b-it")
    assert render_chat(t, CONV, bos_token="<bos>") == (
        "<bos><start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4.<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
        "<start_of_turn>model\n")
    # content is trimmed by this template
    assert render_chat(t, [{"role": "user", "content": "  hi \n"}], bos_token="<bos>") == (
        "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n")


def test_gemma2_rejects_system_and_bad_alternation(templates):
    t = _t(templates, "google-gemma-2-2b-it")
    with pytest.raises(TemplateError, match="System role not supported"):
        render_chat(t, [SYS] + CONV, bos_token="<bos>")
    with pytest.raises(TemplateError, match="must alternate"):
        render_chat(t, [CONV[0], CONV[0]], bos_token="<bos>")


def test_llama31(templates):
    t = _t(templates, "meta-llama-Llama-3.1-8B-Instruct")
    assert render_chat(t, [SYS] + CONV, bos_token="<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n"
        "You are a terse assistant.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnd 3+3?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    # no system message: the preamble stays with an empty system text; date_string is a variable
    assert render_chat(t, CONV[:1], bos_token="<|begin_of_text|>", date_string="01 Jan 2025") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 01 Jan 2025\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_phi35(templates):
    t = _t(templates, "microsoft-Phi-3.5-mini-instruct")
    assert render_chat(t, [SYS] + CONV, eos_token="<|endoftext|>") == (
        "<|system|>\nYou are a terse assistant.<|end|>\n"
        "<|user|>\nWhat is 2+2?<|end|>\n"
        "<|assistant|>\n4.<|end|>\n"
        "<|user|>\nAnd 3+3?<|end|>\n"
        "<|assistant|>\n")
    # without the generation prompt this template ends the text with EOS
    assert render_chat(t, CONV[:2], add_generation_prompt=False, eos_token="<|endoftext|>") == (
        "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n4.<|end|>\n<|endoftext|>")


def test_mistral_nemo(templates):
    t = _t(templates, "mistralai-Mistral-Nemo-Instruct-2407")
    # the system message is prepended to the *last* user turn
    assert render_chat(t, [SYS] + CONV, bos_token="<s>", eos_token="</s>") == (
        "<s>[INST]What is 2+2?[/INST]4.</s>[INST]You are a terse assistant.\n\nAnd 3+3?[/INST]")
    with pytest.raises(TemplateError, match="must alternate"):
        render_chat(t, [CONV[1]], bos_token="<s>", eos_token="</s>")


# -- HF helpers ------------------------------------------------------------------------

def test_helpers():
    before = datetime.now().strftime("%Y-%m-%d")
    assert render_chat("{{ strftime_now('%Y-%m-%d') }}", []) in {
        before, datetime.now().strftime("%Y-%m-%d")}  # either side of a midnight
    data = {"b": [1, 2], "a": "é<>&"}
    assert render_chat("{{ x | tojson }}", [], x=data) == json.dumps(data, ensure_ascii=False)
    assert render_chat("{{ x | tojson(indent=2) }}", [], x=data) == json.dumps(
        data, ensure_ascii=False, indent=2)
    with pytest.raises(TemplateError, match="raised an error: custom failure"):
        render_chat("{{ raise_exception('custom failure') }}", [])
    # the size-guarded filters still work normally
    assert render_chat("{{ 'hello world foo' | truncate(9) }}|{{ 'aaa bbb' | wordwrap(4) }}|"
                       "{{ [1, 2, 3] | slice(2) | list }}|{{ 'x' | center(5) }}|"
                       "{{ '%s-%d' | format('a', 3) }}|{{ 'x\ny' | indent(2) }}", []) == (
        "hello...|aaa\nbbb|[[1, 2], [3]]|  x  |a-3|x\n  y")
    # loopcontrols extension as in HF, undefined variables are falsy
    assert render_chat("{% for i in range(5) %}{% if i == 2 %}{% break %}{% endif %}{{ i }}"
                       "{% endfor %}{% if tools %}T{% endif %}", []) == "01"


def test_bad_templates_and_messages():
    with pytest.raises(TemplateError, match="syntax error at line 2"):
        render_chat("ok\n{{ messages[0 }}", CONV)
    with pytest.raises(TemplateError, match="failed to render"):
        render_chat("{{ messages[0].content + 1 }}", CONV)
    with pytest.raises(TemplateError, match="failed to render"):
        render_chat("{% include 'other.jinja' %}", CONV)
    with pytest.raises(TemplateError, match="'role'"):
        render_chat("{{ 1 }}", [{"content": "no role"}])
    with pytest.raises(TemplateError, match="list of dicts"):
        render_chat("{{ 1 }}", "hello")
    with pytest.raises(TemplateError, match="must be a string"):
        render_chat(None, CONV)


# -- untrusted templates -----------------------------------------------------------------

ATTACKS = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ ''.__class__ }}",  # jinja alone would render this as '' and carry on
    "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
    "{{ joiner.__init__.__globals__['os'].system('touch MARKER') }}",
    "{{ lipsum.__globals__['os'].popen('touch MARKER').read() }}",
    "{{ namespace.__init__.__globals__.__builtins__['__import__']('os').system('touch MARKER') }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch MARKER') }}",
    "{{ raise_exception.__globals__['__builtins__']['open']('MARKER', 'w') }}",
    "{{ messages['__class__'] }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(cycler) }}",
    "{% set x = messages.append(1) %}{{ x }}",
    "{% for m in messages %}{{ m.__class__.__base__.__subclasses__() }}{% endfor %}",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_unsafe_templates_fail_and_execute_nothing(attack, tmp_path):
    marker = tmp_path / "pwned"
    tmpl = attack.replace("MARKER", str(marker))
    with pytest.raises(TemplateError, match="unsafe operation"):
        render_chat(tmpl, CONV)
    assert not marker.exists()
    with pytest.raises(TemplateError, match="unsafe operation"):
        prompt_for_chat(tmpl, CONV, bos_token="<bos>")
    assert not marker.exists()


@pytest.mark.parametrize("tmpl", [
    "{{ 'a' * 1000000000 }}",
    "{{ [1, 2] * 1000000000 }}",
    "{{ 7 ** (10 ** 8) }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for i in range(90000) %}{{ 'x' * 1000 }}{% endfor %}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '{:999999999}'.format(1) }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{{ 'x' | center(1000000000) }}",
    "{{ lipsum(1000000) }}",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}",
])
def test_resource_guards(tmpl):
    with pytest.raises(TemplateError, match="resource limit"):
        render_chat(tmpl, CONV)


# -- fallback and BOS handling -------------------------------------------------------------

def test_fallback_template():
    assert chat_template_for(None) == FALLBACK_TEMPLATE
    assert chat_template_for("") == FALLBACK_TEMPLATE
    assert chat_template_for("{{ 1 }}") == "{{ 1 }}"
    with pytest.raises(TemplateError):
        chat_template_for(["not", "a", "string"])
    assert render_chat(FALLBACK_TEMPLATE, [SYS] + CONV) == (
        "System: You are a terse assistant.\n\nUser: What is 2+2?\n\nAssistant: 4.\n\n"
        "User: And 3+3?\n\nAssistant:")
    assert render_chat(FALLBACK_TEMPLATE, CONV[:2], add_generation_prompt=False) == (
        "User: What is 2+2?\n\nAssistant: 4.\n\n")
    # no BOS text in the fallback: the tokenizer's default decides
    assert prompt_for_chat(None, CONV[:1], bos_token="<bos>") == (
        "User: What is 2+2?\n\nAssistant:", None)


def test_strip_duplicate_bos(templates):
    assert strip_duplicate_bos("<bos>hi", "<bos>") == ("hi", True)
    assert strip_duplicate_bos("<bos><bos>hi", "<bos>") == ("<bos>hi", True)
    assert strip_duplicate_bos("hi <bos>", "<bos>") == ("hi <bos>", False)
    assert strip_duplicate_bos("hi", "") == ("hi", False)
    text, add_bos = prompt_for_chat(_t(templates, "google-gemma-2-2b-it"), CONV,
                                    bos_token="<bos>", eos_token="<eos>")
    assert add_bos is True and text.startswith("<start_of_turn>user\n")
    text, add_bos = prompt_for_chat(_t(templates, "Qwen-Qwen2.5-7B-Instruct"), CONV,
                                    bos_token="", eos_token="<|im_end|>")
    assert add_bos is None and text.startswith("<|im_start|>system\n")


def test_single_bos_with_default_model_tokenizer(default_model, templates):
    """Gemma 3's tokenizer adds BOS itself: a template that also writes <bos> must
    still give exactly one BOS token."""
    from a2ats_lite.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(default_model)
    bos = tok.token_to_piece(tok.bos_id)
    for tmpl in (_t(templates, "google-gemma-2-2b-it"), None):
        text, add_bos = prompt_for_chat(tmpl, CONV, bos_token=bos, eos_token="<eos>")
        ids = tok.encode(text, add_bos=add_bos, special=True)
        assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1
    # the Gemma turn markers are single control tokens
    text, add_bos = prompt_for_chat(_t(templates, "google-gemma-2-2b-it"), CONV[:1],
                                    bos_token=bos, eos_token="<eos>")
    ids = tok.encode(text, add_bos=add_bos, special=True)
    assert ids[1] == tok.token_id("<start_of_turn>")


# -- the chat session's history ----------------------------------------------------------

class _PromptOnlyRuntime:
    """What ChatSession's trimming uses: n_ctx and chat_prompt, here the fallback format
    at one token per 4 characters (plus one)."""

    def __init__(self, n_ctx):
        self.n_ctx = n_ctx

    def chat_prompt(self, messages):
        text, _ = prompt_for_chat(None, messages)
        return list(range(1 + len(text) // 4))


def test_session_drops_oldest_whole_turns_and_keeps_the_system_message():
    # fallback text: system 19 chars, each user 48, each assistant 53, prompt 10; with
    # n_ctx 64 and a 16-token reply the prompt may hold 48 tokens (191 characters)
    s = ChatSession(_PromptOnlyRuntime(n_ctx=64), system="Be brief.", max_tokens=16)
    u = [{"role": "user", "content": f"{i}" * 40} for i in range(3)]
    a = [{"role": "assistant", "content": f"{i}" * 40} for i in range(3)]
    conv = s.messages + [u[0], a[0], a[1], u[1], a[2], u[2]]      # 332 characters: too long
    ids, kept = s._fit(conv)
    # the whole first turn goes (both of its replies), the second stays: 178 characters
    assert kept == [conv[0], u[1], a[2], u[2]]
    assert len(ids) == 1 + 178 // 4 and len(ids) + 16 <= 64
    # a last message too long even alone: everything before it goes but the system message
    big = {"role": "user", "content": "x" * 400}
    ids, kept = s._fit(conv[:-1] + [big])
    assert kept == [conv[0], big] and len(ids) > 64

