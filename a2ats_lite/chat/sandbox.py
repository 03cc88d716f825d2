"""The resource-bounded jinja2 sandbox that every chat template renders in.

A GGUF's `tokenizer.chat_template` is untrusted input (a template that reaches
`__globals__` / `__subclasses__` is a known remote-code-execution vector in
model files), so:
  - rendering uses jinja2's ImmutableSandboxedEnvironment, and an unsafe
    attribute access fails at once (jinja's default only fails when the
    Undefined it returns is used, so `{{ ''.__class__ }}` would render "");
  - resource guards, so a template can neither hang the process nor exhaust
    memory (limits: the MAX_* constants below): a step budget (every loop
    iteration, call and filter) and a wall-clock deadline checked at each step;
    the size of every intermediate string/list/int (`~`, `+`, `*`, `**`, `%`,
    filters such as replace/tojson/join/indent/center/format/wordwrap, str
    methods such as .replace/.join/.center/.format) estimated *before* it is
    built; a total of characters built and captured ({% set %} blocks, macros);
    the template source size and the output length. jinja forbids custom AST
    nodes, so loops, `~` and capture buffers are routed through the guards by a
    subclass of its code generator.
Every failure of render() is one TemplateError. What is rendered (conversations,
special tokens) is chat/templates.py's business.

Longer than ~500 lines on purpose: one role (the guards and the environment that
routes every operation through them are read together: each estimate mirrors an
intercept), and the MAX_* limits must live in the one module whose functions read
them at each render, so lowering one (tests, embedders) reaches every guard.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import time
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.runtime
import jinja2.utils
from jinja2.compiler import CodeGenerator
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from ..errors import TemplateError

# Resource limits of one render (module constants: read at each render, so tests and
# embedders can lower them). An untrusted template may loop, recurse and build strings
# and lists, but within these budgets; any breach is a TemplateError "resource limit".
MAX_TEMPLATE_CHARS = 256 << 10  # template source (real ones are a few KB, <= ~25 KB)
MAX_OUTPUT_CHARS = 4 << 20      # rendered text cap (plus twice the input size)
MAX_RANGE_ITEMS = 1_000_000     # total items all range() calls may yield in one render
MAX_SIZE = 1 << 22              # largest string/list/int argument any single operation
                                # (`~`, `+`, `*`, `%`, a filter, a method call) may build
MAX_BUILT = 64 << 20            # total characters built by such operations and captured
                                # by {% set %}/macro/filter blocks in one render (plus 16x input)
MAX_STEPS = 1_000_000           # loop iterations + calls + filter applications per render
MAX_RENDER_SECONDS = 2.0        # wall-clock deadline, checked at every step and output piece
MAX_INT_BITS = 1 << 16          # largest integer `*`, `**` or `+` may produce
_BIG_WIDTH = re.compile(r"\d{7,}")  # a format width/precision of >= 7 digits


class _Raised(Exception):
    """raise_exception() called by the template itself (e.g. an unsupported role)."""


class _TooBig(Exception):
    """A resource guard tripped."""


def _raise_exception(message):
    raise _Raised(str(message))


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


# -- the per-render budget -------------------------------------------------------------

class _Budget:
    """Steps, characters and time one render may still spend."""

    __slots__ = ("steps", "built", "deadline", "seconds", "max_size")

    def __init__(self, steps: int, built: int, seconds: float, max_size: int):
        self.steps, self.built, self.seconds, self.max_size = steps, built, seconds, max_size
        self.deadline = time.monotonic() + seconds

    def step(self, n: int = 1) -> None:
        self.steps -= n
        if self.steps < 0:
            raise _TooBig(f"more than {MAX_STEPS} loop iterations, calls and filters")
        self.check_time()

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise _TooBig(f"rendering took longer than {self.seconds:g} s")

    def build(self, n: int) -> None:
        self.built -= n
        if self.built < 0:
            raise _TooBig("the template built too much text in total")
        self.check_time()


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("a2ats_chat_budget",
                                                                        default=None)


def _step() -> None:
    b = _BUDGET.get()
    if b is not None:   # None while compiling (jinja folds constant expressions then)
        b.step()


def _max_size() -> int:
    """Largest single string/list: MAX_SIZE, or twice the input when that is larger
    (a huge message may still be copied, trimmed or printed once or twice)."""
    b = _BUDGET.get()
    return MAX_SIZE if b is None else b.max_size


def _built(n: int, what: str = "result") -> None:
    limit = _max_size()
    if n > limit:
        raise _TooBig(f"{what} of {n} items/characters exceeds {limit}")
    b = _BUDGET.get()
    if b is not None:
        b.build(n)


def _size(x, limit: int | None = None) -> int:
    """Length of str(x), estimated without building it: exact for strings, an upper-ish
    bound for containers (walked iteratively, stopping once over `limit`)."""
    if isinstance(x, str):
        return len(x)
    limit = MAX_SIZE if limit is None else limit
    total, stack = 0, [x]
    while stack and total <= limit:
        v = stack.pop()
        total += 2
        if isinstance(v, str):
            total += len(v) + 2
        elif isinstance(v, (bytes, bytearray)):
            total += 4 * len(v)
        elif isinstance(v, bool) or v is None:
            total += 5
        elif isinstance(v, int):
            total += v.bit_length() // 3 + 2
        elif isinstance(v, float):
            total += 24
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
        elif isinstance(v, jinja2.utils.Namespace):
            stack.append(object.__getattribute__(v, "_Namespace__attrs"))
            total += 12
        else:
            total += 64     # other objects print as short reprs (<Undefined>, macros, ...)
    return total


def _check_est(n: int, what: str) -> None:
    limit = _max_size()
    if n > limit:
        raise _TooBig(f"{what} would build {n} characters/items (more than {limit})")


def _check_result(v):
    """After an operation: count what it built; refuse anything over MAX_SIZE."""
    if isinstance(v, (str, list, tuple, dict, bytes)):
        _built(len(v))
    return v


def _check_int(v, what):
    if isinstance(v, int) and not isinstance(v, bool) and v.bit_length() > MAX_INT_BITS:
        raise _TooBig(f"{what}: integer larger than {MAX_INT_BITS} bits")


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # as HF transformers: jinja's own tojson HTML-escapes <, >, & and ' which would
    # corrupt tool schemas; HF's version also exposes indent/separators/sort_keys
    _check_est(_json_size(x, indent, separators), "tojson")
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _json_size(x, indent, separators) -> int:
    """Rough size of json.dumps(x, indent=..., separators=...) (strings as len + 2;
    escapes can add at most 6x, checked afterwards), stopping once over MAX_SIZE."""
    if isinstance(indent, int) and not isinstance(indent, bool):
        ind = max(indent, 0)
        pretty = True
    elif isinstance(indent, str):
        ind, pretty = len(indent), True
    else:
        ind, pretty = 0, False
    if separators is not None:
        try:
            item_sep, key_sep = (len(str(s)) for s in separators)
        except (TypeError, ValueError):
            item_sep = key_sep = 2
    else:
        item_sep, key_sep = (1 if pretty else 2), 2
    total, stack = 0, [(x, 0)]
    while stack and total <= MAX_SIZE:
        v, depth = stack.pop()
        if isinstance(v, (dict, list, tuple)):
            n = len(v)
            total += 2 + n * item_sep + (n + 1) * (1 + (depth + 1) * ind if pretty else 0)
            if isinstance(v, dict):
                total += n * key_sep
                stack.extend((k, depth + 1) for k in v.keys())
                stack.extend((w, depth + 1) for w in v.values())
            else:
                stack.extend((w, depth + 1) for w in v)
        else:
            total += _size(v)
    return total


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


def _fmt_estimate(fmt: str, args, kwargs, marker: str) -> int:
    """Upper bound of a %- or {}-format: every field may repeat every argument."""
    fields = fmt.count(marker)
    return len(fmt) + max(fields, 1) * sum(_size(a) for a in (*args, *kwargs.values()))


def _str_method_estimate(name: str, s: str, args, kwargs) -> None:
    """Refuse str methods called from a template whose result would exceed MAX_SIZE."""
    if name == "replace" and len(args) >= 2:
        old, new = str(args[0]), str(args[1])
        n = s.count(old) if old else len(s) + 1
        if len(args) > 2 and isinstance(args[2], int) and args[2] >= 0:
            n = min(n, args[2])
        _check_est(len(s) + n * max(0, len(new) - len(old)), "str.replace")
    elif name in ("center", "ljust", "rjust", "zfill") and args:
        if isinstance(args[0], int):
            _check_est(args[0], f"str.{name}")
    elif name == "expandtabs":
        tab = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tab, int):
            _check_est(len(s) + s.count("\t") * max(tab, 0), "str.expandtabs")
    elif name in ("format", "format_map"):
        _check_width(s)
        _check_est(_fmt_estimate(s, args, kwargs, "{"), f"str.{name}")


def _join_estimate(sep: str, items) -> int:
    return sum(_size(x) for x in items) + max(len(items) - 1, 0) * len(sep)


class _GuardedIter:
    """A for-loop's iterable: each item is one step of the render's budget."""

    __slots__ = ("it",)

    def __init__(self, it):
        self.it = it

    def __iter__(self):
        b = _BUDGET.get()
        for x in self.it:
            if b is not None:
                b.step()
            yield x

    def __len__(self):      # loop.length / loop.last stay cheap when the iterable has a len
        return len(self.it)


class _Buffer(list):
    """Output captured by {% set %}...{% endset %}, macros, caller(), filter blocks and
    recursive loops: every piece counts against the render's character budget."""

    __slots__ = ()

    def append(self, piece):
        _account_piece(len(piece))
        super().append(piece)

    def extend(self, pieces):
        pieces = tuple(pieces)
        _account_piece(sum(len(p) for p in pieces))
        super().extend(pieces)


def _account_piece(n: int) -> None:
    b = _BUDGET.get()
    if b is not None:
        b.build(n)


def _guarded_concat(values) -> str:
    """`a ~ b ~ c`: estimated before building, counted after."""
    _check_est(sum(_size(v) for v in values), "`~` concatenation")
    return _check_result("".join([str(v) for v in values]))


def _env_concat(pieces) -> str:
    """environment.concat (block references): pieces counted as they come."""
    out = []
    for p in pieces:
        _account_piece(len(p))
        out.append(p)
    return "".join(out)


def _finalize(value):
    """Every {{ expression }} passes here before str(): refuse containers whose text
    would be huge (a string's length is checked by the output/buffer caps)."""
    if not isinstance(value, str):
        _check_est(_size(value), "printing a value")
    return value


class _CodeGenerator(CodeGenerator):
    """jinja's code generator, routing loops, `~` and captured output through the guards
    (jinja forbids custom AST nodes, so the for-loop iterable is wrapped while written)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loop_iters: set[int] = set()

    def buffer(self, frame):
        frame.buffer = self.temporary_identifier()
        self.writeline(f"{frame.buffer} = environment.guarded_buffer()")

    def visit_Concat(self, node, frame):
        self.write("environment.guarded_concat((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")

    def visit_For(self, node, frame):
        self._loop_iters.add(id(node.iter))
        super().visit_For(node, frame)

    def visit(self, node, *args, **kwargs):
        if id(node) in self._loop_iters:
            self._loop_iters.discard(id(node))
            self.write("environment.guard_iter(")
            super().visit(node, *args, **kwargs)
            self.write(")")
            return None
        return super().visit(node, *args, **kwargs)


class _Env(ImmutableSandboxedEnvironment):
    """The HF sandbox plus: unsafe access raises at once, and the resource guards."""

    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"*", "**", "%", "+"})
    guarded_buffer = staticmethod(_Buffer)
    guarded_concat = staticmethod(_guarded_concat)
    guard_iter = staticmethod(_GuardedIter)

    def unsafe_undefined(self, obj, attribute):
        raise SecurityError(f"access to attribute {attribute!r} of "
                            f"{type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * max(n, 0) > MAX_SIZE:
                        raise _TooBig("sequence repetition too large")
            if isinstance(left, int) and isinstance(right, int) \
                    and left.bit_length() + right.bit_length() > MAX_INT_BITS + 1:
                raise _TooBig(f"`*`: integer larger than {MAX_INT_BITS} bits")
        elif operator == "**":
            if isinstance(right, (int, float)) and isinstance(left, (int, float)) \
                    and abs(left) > 1 and right > 1024:
                raise _TooBig("exponent too large")
        elif operator == "%":
            _check_width(left)
            if isinstance(left, str):
                args = right if isinstance(right, tuple) else (right,)
                _check_est(_fmt_estimate(left, args, {}, "%"), "`%` formatting")
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _check_est(len(left) + len(right), "`+`")
        rv = super().call_binop(context, operator, left, right)
        _check_int(rv, f"`{operator}`")
        return _check_result(rv) if operator != "**" else rv

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's convention)
        _step()
        _check_sizes(args)
        _check_sizes(kwargs.values())
        name = getattr(__obj, "__name__", "")
        target = getattr(__obj, "__wrapped__", __obj)   # str.format arrives wrapped
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            if name == "join" and len(args) == 1 and not kwargs:
                items = list(_GuardedIter(args[0]))
                _check_est(_join_estimate(owner, items), "str.join")
                args = (items,)
            else:
                _str_method_estimate(name, owner, args, kwargs)
        elif isinstance(__obj, jinja2.runtime.LoopContext) and args:
            args = (_GuardedIter(args[0]), *args[1:])    # recursive loop(...) calls
        return _check_result(super().call(__context, __obj, *args, **kwargs))


_PASS_ARG = jinja2.utils._PassArg if hasattr(jinja2.utils, "_PassArg") else None


def _filter_estimate(name: str, a: list, kw: dict) -> list:
    """Refuse filter calls whose result would exceed MAX_SIZE, before running them.
    `a` is the positional arguments after the value's context argument (value first).
    Returns the (possibly materialized) positional arguments."""
    def arg(i, key, default=None):
        return a[i] if len(a) > i else kw.get(key, default)

    if not a:
        return a
    v = a[0]
    if name in ("replace", "indent") and not isinstance(v, str):
        _check_est(_size(v), name)      # the filter converts it with str()
        v = str(v)
    if name == "replace":
        old, new, count = arg(1, "old"), arg(2, "new"), arg(3, "count")
        if old is not None and new is not None:
            _str_method_estimate("replace", v, (str(old), str(new),
                                                -1 if count is None else count), {})
    elif name == "indent":
        width, s = arg(1, "width", 4), v
        w = width if isinstance(width, int) else len(str(width))
        _check_est(len(s) + (s.count("\n") + 1) * max(w, 0), "indent")
    elif name == "center":
        width = arg(1, "width", 80)
        _check_est(max(_size(v), width if isinstance(width, int) else 0), "center")
    elif name == "wordwrap":
        wrap = arg(3, "wrapstring")
        n = _size(v)
        _check_est(n + (n + 1) * (len(str(wrap)) if wrap is not None else 1), "wordwrap")
    elif name == "join":
        items = list(_GuardedIter(v)) if not isinstance(v, str) else list(v)
        _check_est(_join_estimate(str(arg(1, "d", "")), items), "join")
        a = [items, *a[1:]]
    elif name == "format":
        if isinstance(v, str):
            _check_width(v)
            _check_est(_fmt_estimate(v, a[1:], kw, "%"), "format")
    elif name in ("string", "pprint", "xmlattr", "urlencode", "e", "escape", "forceescape"):
        _check_est(_size(v) * (6 if name in ("e", "escape", "forceescape", "urlencode") else 1),
                   name)
    elif name == "urlize":
        extra = sum(_size(kw.get(k) or "") for k in ("target", "rel"))
        _check_est(_size(v) * (16 + extra), "urlize")
    elif name == "sum":
        start = arg(2, "start", 0)
        if not isinstance(start, (int, float)):
            items = list(_GuardedIter(v))
            if len(items) > 10_000:
                raise _TooBig("sum() of sequences over more than 10000 items")
            _check_est(_size(start) + sum(_size(x) for x in items), "sum")
            a = [items, *a[1:]]
    return a


def _guarded_filter(name, f):
    offset = 1 if (_PASS_ARG is not None and _PASS_ARG.from_obj(f) is not None) else 0

    @functools.wraps(f)  # keeps jinja's pass_environment / pass_eval_context marks
    def wrapper(*args, **kwargs):
        _step()
        _check_sizes(args)
        _check_sizes(kwargs.values())
        if f is _format_filter and len(args) > offset:
            _check_width(args[offset])
        rest = _filter_estimate(name, list(args[offset:]), kwargs)
        return _check_result(f(*args[:offset], *rest, **kwargs))
    return wrapper


_format_filter = jinja2.filters.FILTERS["format"]


@functools.lru_cache(maxsize=1)
def _env() -> _Env:
    # the same settings as HF transformers' _compile_jinja_template
    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
               finalize=_finalize)
    env.concat = _env_concat
    env.filters["tojson"] = _tojson
    for name, f in list(env.filters.items()):
        env.filters[name] = _guarded_filter(name, f)
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


def check_source(template) -> None:
    """Refuse a template that is not a string or whose source is over MAX_TEMPLATE_CHARS."""
    if not isinstance(template, str):
        raise TemplateError(f"chat template must be a string, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise TemplateError(f"chat template exceeded a resource limit: {len(template)} "
                            f"characters (at most {MAX_TEMPLATE_CHARS})")


def value_size(values) -> int:
    """Characters the values would print as, estimated without building them (each
    capped near MAX_OUTPUT_CHARS): part of the input size render() scales budgets by."""
    return sum(_size(v, MAX_OUTPUT_CHARS) for v in values)


def render(template: str, context: dict, input_size: int) -> str:
    """Render a template checked by check_source() with `context` inside the guards.

    input_size (characters of the messages and variables) raises the output cap, the
    built-characters total and the largest single value, so a large but legitimate
    input can still be copied or printed a few times. `range` in the context is
    replaced by the counted one. Raises TemplateError for syntax errors,
    raise_exception() calls, unsafe operations, resource guards and any other
    rendering failure.
    """
    try:
        tmpl = _compile(template)
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"chat template syntax error at line {e.lineno}: {e.message}") from None
    except (RecursionError, MemoryError) as e:
        raise TemplateError(f"chat template too complex to compile: {type(e).__name__}") from None
    ctx = {**context, "range": _counted_range([MAX_RANGE_ITEMS])}

    cap = MAX_OUTPUT_CHARS + 2 * input_size
    budget = _Budget(MAX_STEPS, MAX_BUILT + 16 * input_size, MAX_RENDER_SECONDS,
                     max(MAX_SIZE, 2 * input_size))
    token = _BUDGET.set(budget)
    out, n = [], 0
    try:
        for piece in tmpl.generate(ctx):  # streamed, so a runaway output is cut early
            n += len(piece)
            if n > cap:
                raise _TooBig(f"output longer than {cap} characters")
            budget.check_time()
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
    finally:
        _BUDGET.reset(token)
    return "".join(out)
