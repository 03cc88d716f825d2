"""Chat templates: render a conversation to prompt text, as HF transformers'
apply_chat_template does, inside a jinja2 sandbox.

A GGUF's `tokenizer.chat_template` is untrusted input (a template that reaches
`__globals__` / `__subclasses__` is a known remote-code-execution vector in
model files), so:
  - rendering uses jinja2's ImmutableSandboxedEnvironment, and an unsafe
    attribute access fails at once (jinja's default only fails when the
    Undefined it returns is used, so `{{ ''.__class__ }}` would render "");
  - cheap resource guards: total `range` iterations per render, sizes of
    `*`, `**`, `%`-formatting and of int arguments to calls, output length.
Every failure is one TemplateError.

Without a template (the default model is a base model) FALLBACK_TEMPLATE is
used, see its comment.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from .errors import TemplateError

# Plain format for models without a chat template (base models):
#     "System: {content}\n\nUser: {content}\n\nAssistant: {content}\n\n...Assistant:"
# i.e. each message as "<Role>: <content>" (role capitalized) followed by a blank
# line; with add_generation_prompt the prompt ends with "Assistant:" and no
# trailing space, because SentencePiece vocabularies glue the space to the next
# word (" Hello"), so the model itself produces it. No BOS text: the tokenizer
# adds BOS per the model's metadata.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: "
    "{{ message['content'] if message['content'] is not none else '' }}\n\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

MAX_OUTPUT_CHARS = 4 << 20     # rendered text cap (plus twice the input size)
MAX_RANGE_ITEMS = 1_000_000    # total items all range() calls may yield in one render
MAX_SIZE = 1 << 22             # largest string/list a single `*`, `%` or call may build
_BIG_WIDTH = re.compile(r"\d{7,}")  # a format width/precision of >= 7 digits


class _Raised(Exception):
    """raise_exception() called by the template itself (e.g. an unsupported role)."""


class _TooBig(Exception):
    """A resource guard tripped."""


def _raise_exception(message):
    raise _Raised(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # as HF transformers: jinja's own tojson HTML-escapes <, >, & and ' which would
    # corrupt tool schemas; HF's version also exposes indent/separators/sort_keys
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _lipsum(n=5, html=True, min=20, max=100):
    if not isinstance(n, int) or n > 100 or (isinstance(max, int) and max > 1000):
        raise _TooBig("lipsum() arguments too large")
    return jinja2.utils.generate_lorem_ipsum(n, html, min, max)


def _check_width(fmt):
    if isinstance(fmt, str) and _BIG_WIDTH.search(fmt):
        raise _TooBig("format width too large")


def _check_sizes(values):
    for v in values:
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SIZE:
            raise _TooBig(f"argument {v} too large")


class _Env(ImmutableSandboxedEnvironment):
    """The HF sandbox plus: unsafe access raises at once, and size guards."""

    intercepted_binops = frozenset({"*", "**", "%"})

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of "
                            f"{type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * max(n, 0) > MAX_SIZE:
                        raise _TooBig("sequence repetition too large")
        elif operator == "**":
            if isinstance(right, (int, float)) and isinstance(left, (int, float)) \
                    and abs(left) > 1 and right > 1024:
                raise _TooBig("exponent too large")
        elif operator == "%":
            _check_width(left)
        return super().call_binop(context, operator, left, right)

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's convention)
        _check_sizes(args)
        _check_sizes(kwargs.values())
        if getattr(__obj, "__name__", "") in ("format", "format_map"):
            # str.format arrives wrapped by the sandbox (see wrap_str_format)
            _check_width(getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None))
        return super().call(__context, __obj, *args, **kwargs)


def _guarded_filter(f):
    @functools.wraps(f)  # keeps jinja's pass_environment / pass_eval_context marks
    def wrapper(*args, **kwargs):
        _check_sizes(args)
        _check_sizes(kwargs.values())
        if f is _format_filter and args:
            _check_width(args[0])
        return f(*args, **kwargs)
    return wrapper


_format_filter = jinja2.filters.FILTERS["format"]


@functools.lru_cache(maxsize=1)
def _env() -> _Env:
    # the same settings as HF transformers' _compile_jinja_template
    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    for name in ("center", "indent", "wordwrap", "truncate", "format", "batch", "slice"):
        env.filters[name] = _guarded_filter(env.filters[name])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["lipsum"] = _lipsum
    return env


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _env().from_string(template)


def _counted_range(budget: list[int]):
    """range() whose items, over all calls in one render, are capped (nested loops)."""
    def rng(*args):
        r = range(*args)
        budget[0] -= len(r)
        if budget[0] < 0:
            raise _TooBig(f"range() loops exceed {MAX_RANGE_ITEMS} items in total")
        return r
    return rng


def _check_messages(messages) -> int:
    if not isinstance(messages, (list, tuple)):
        raise TemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    size = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise TemplateError(f"message {i} must be a dict with a string 'role', got {m!r:.80}")
        size += len(str(m.get("content", "")))
    return size


def render_chat(template: str, messages: list[dict], add_generation_prompt: bool = True,
                **variables) -> str:
    """Render `messages` with a jinja chat template as HF apply_chat_template does.

    `variables` become template variables: special tokens (bos_token, eos_token, ...)
    and optional extras (tools, documents, date_string, ...). As in HF, `tools` and
    `documents` are passed as None unless given.
    Raises TemplateError for syntax errors, raise_exception() calls, unsafe
    operations, resource guards and any other rendering failure.
    """
    if not isinstance(template, str):
        raise TemplateError(f"chat template must be a string, got {type(template).__name__}")
    size = _check_messages(messages)
    try:
        tmpl = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None
    except (RecursionError, MemoryError) as e:
        raise TemplateError(f"chat template too complex to compile: {type(e).__name__}") from None
    ctx = {"tools": None, "documents": None, **variables,
           "messages": messages, "add_generation_prompt": bool(add_generation_prompt),
           "range": _counted_range([MAX_RANGE_ITEMS])}
    cap = MAX_OUTPUT_CHARS + 2 * size
    out, n = [], 0
    try:
        for piece in tmpl.generate(ctx):  # streamed, so a runaway output is cut early
            n += len(piece)
            if n > cap:
                raise _TooBig(f"output longer than {cap} characters")
            out.append(piece)
    except SecurityError as e:
        raise TemplateError(f"chat template tried an unsafe operation: {e}") from None
    except _Raised as e:
        raise TemplateError(f"chat template raised an error: {e}") from None
    except _TooBig as e:
        raise TemplateError(f"chat template exceeded a resource limit: {e}") from None
    except jinja2.TemplateError as e:  # UndefinedError, runtime TemplateSyntaxError, ...
        raise TemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from None
    except (RecursionError, MemoryError, OverflowError) as e:
        raise TemplateError(f"chat template exceeded a resource limit: {type(e).__name__}") from None
    except Exception as e:  # TypeError, KeyError, ... from template expressions
        raise TemplateError(f"chat template failed to render: {type(e).__name__}: {e}") from None
    return "".join(out)


def chat_template_for(metadata_template) -> str:
    """The template to use: the GGUF's `tokenizer.chat_template`, else FALLBACK_TEMPLATE."""
    if metadata_template is None or (isinstance(metadata_template, str)
                                     and not metadata_template.strip()):
        return FALLBACK_TEMPLATE
    if not isinstance(metadata_template, str):
        raise TemplateError(f"tokenizer.chat_template must be a string, "
                            f"got {type(metadata_template).__name__}")
    return metadata_template


def strip_duplicate_bos(text: str, bos_text: str) -> tuple[str, bool]:
    """Remove one leading BOS text; returns (text, whether the template emitted it).

    The tokenizer then adds BOS as a token id, so the prompt never starts with two
    BOS tokens (what llama.cpp's chat code does when the vocab adds BOS itself).
    """
    if bos_text and text.startswith(bos_text):
        return text[len(bos_text):], True
    return text, False


def prompt_for_chat(template, messages: list[dict], bos_token: str = "", eos_token: str = "",
                    add_generation_prompt: bool = True, **variables) -> tuple[str, bool | None]:
    """Prompt text for a conversation and the add_bos flag to tokenize it with.

    `template` is the GGUF metadata value (None -> FALLBACK_TEMPLATE). add_bos is
    True when the template emitted the BOS text (stripped here, so the tokenizer's
    BOS is the only one), else None: the tokenizer's own default (the model's
    add_bos metadata), as llama.cpp. Tokenize the text with special=True.
    """
    text = render_chat(chat_template_for(template), messages, add_generation_prompt,
                       bos_token=bos_token, eos_token=eos_token, **variables)
    text, had_bos = strip_duplicate_bos(text, bos_token)
    return text, (True if had_bos else None)
