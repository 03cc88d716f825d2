"""What a request constrains its output to: a JSON schema, any JSON object, a regex,
a Lark grammar (llguidance's dialect) or a GBNF grammar (llama.cpp's format).

A Constraint is compiled and checked when it is made, before any token: a bad
schema, grammar or regex raises GrammarError (a ValueError) with llguidance's own
message. Every compile runs under LIMITS, llguidance's resource bounds, so hostile
input (deep nesting, huge enums, exploding regexes, ambiguous grammars) is refused
or bounded per step instead of hanging a worker; sources over MAX_SOURCE_CHARS are
refused before compiling. `constraint.matcher(bridge)` starts one sequence.
"""
from __future__ import annotations

import json

import llguidance
from llguidance.gbnf_to_lark import is_lark_syntax

from ..errors import GrammarError
from .gbnf import gbnf_to_lark
from .matcher import Matcher, llg_message

# llguidance's resource bounds for every grammar. The lexer and Earley budgets cap
# the work of one mask step (about 15 ms and 3 ms at llguidance's stated speeds); a
# step over budget puts that matcher in error (its sequence ends) instead of stalling
# the batch. The lexer-state cap bounds a matcher's memory (~1-2 kB a state) at a
# fifth of the library default, which a server running many sequences cannot afford.
# JSON schema keywords llguidance does not implement (uniqueItems, not, if/then) are
# refused rather than ignored, so an accepted schema is always enforced.
LIMITS = llguidance.LLParserLimits(
    max_items_in_row=2000,          # Earley items in one row (ambiguity)
    initial_lexer_fuel=1_000_000,   # regex analysis when the grammar is built
    step_lexer_fuel=200_000,        # lexer work of one mask step
    step_max_items=50_000,          # Earley items of one mask step
    max_lexer_states=50_000,        # lazily built DFA states of one matcher
    max_grammar_size=500_000,       # symbols in the grammar's productions
    precompute_large_lexemes=True,
    verbose_errors=False,           # messages name the problem, not the parser's state
)
MAX_SOURCE_CHARS = 256 << 10        # a schema / grammar / regex text (real ones: a few KB)

# JSON is written as Python's json.dumps writes it ({"a": 1, "b": [2, 3]}): fixed
# separators and no other whitespace. Free whitespace (llguidance's default) lets a
# small model pad or loop on newlines without end, and a whitespace pattern cannot
# bound it (it applies again between every two tokens); this is also the spacing
# chat templates render tool calls with.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _check_text(text, what: str) -> None:
    """A grammar or regex source: a string of at most MAX_SOURCE_CHARS."""
    if not isinstance(text, str):
        raise GrammarError(f"{what} must be a string, got {type(text).__name__}")
    _check_size(text, what)


def _check_size(text: str, what: str) -> None:
    if len(text) > MAX_SOURCE_CHARS:
        raise GrammarError(f"{what} too large: {len(text)} characters "
                           f"(at most {MAX_SOURCE_CHARS})")


def _schema_text(schema, what: str = "JSON schema") -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except (json.JSONDecodeError, RecursionError) as e:
            raise GrammarError(f"{what} is not valid JSON: {e}") from None
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    if not isinstance(schema, dict):
        raise GrammarError(f"{what} must be a JSON object, got {type(schema).__name__}")
    try:
        text = json.dumps(schema, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError) as e:
        raise GrammarError(f"{what} cannot be serialized: {e}") from None
    _check_size(text, what)
    return text


def _json_grammar(text: str) -> str:
    try:   # llguidance parses the schema here: too deep a nesting is refused already
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def lark_schema(schema) -> str:
    """`%json {...}`: a JSON schema inlined in a Lark grammar (checked for size)."""
    return "%json " + _schema_text(schema)


class Constraint:
    """A compiled, checked output constraint; `matcher(bridge)` makes one per sequence.

    Made with the classmethods (from_json_schema, json_object, from_regex, from_lark,
    from_gbnf, from_grammar, from_request, from_response_format), each raising
    GrammarError for invalid or too costly input."""

    def __init__(self, kind: str, source: str, grammar: str):
        self.kind = kind          # "json_schema" | "json_object" | "regex" | "lark" | "gbnf"
        self.source = source      # what the user gave (schema JSON text, regex, grammar)
        self.grammar = grammar    # the llguidance grammar (JSON text or Lark)
        is_error, problems = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, None, limits=LIMITS)
        if is_error:
            raise GrammarError(f"invalid {self.what}: {llg_message(problems[0])}")

    @property
    def what(self) -> str:
        return _KIND_NAMES[self.kind]

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def from_json_schema(cls, schema) -> "Constraint":
        """JSON that validates against `schema` (a dict or its JSON text)."""
        text = _schema_text(schema)
        return cls("json_schema", text, _json_grammar(text))

    @classmethod
    def json_object(cls) -> "Constraint":
        """Any JSON object (OpenAI's response_format {"type": "json_object"})."""
        text = '{"type": "object"}'
        return cls("json_object", text, _json_grammar(text))

    @classmethod
    def from_regex(cls, pattern: str) -> "Constraint":
        """Text the regex matches in full (Rust regex syntax; \\d and \\w are ASCII, as
        in JSON schema patterns, so a date regex yields 0-9 digits)."""
        _check_text(pattern, "regex")
        lark = "start: /" + llguidance.regex_to_lark(pattern, "dw") + "/"
        return cls("regex", pattern, llguidance.LLMatcher.grammar_from_lark(lark))

    @classmethod
    def from_lark(cls, text: str) -> "Constraint":
        """A grammar in llguidance's Lark dialect (`start:` is the whole output)."""
        _check_text(text, "grammar")
        return cls("lark", text, llguidance.LLMatcher.grammar_from_lark(text))

    @classmethod
    def from_gbnf(cls, text: str) -> "Constraint":
        """A llama.cpp GBNF grammar (`root ::= ...`), converted to Lark."""
        _check_text(text, "grammar")
        try:
            lark = gbnf_to_lark(text)
        except Exception as e:  # noqa: BLE001 - the converter raises plain Exception too
            raise GrammarError(f"invalid GBNF grammar: {e}") from None
        return cls("gbnf", text, llguidance.LLMatcher.grammar_from_lark(lark))

    @classmethod
    def from_grammar(cls, text: str) -> "Constraint":
        """llama.cpp's `grammar` field: Lark when it starts with `%llguidance` or has a
        `start:` rule (as llama.cpp built with llguidance), else GBNF."""
        if isinstance(text, str) and is_lark_syntax(text):
            return cls.from_lark(text)
        return cls.from_gbnf(text)

    @classmethod
    def from_response_format(cls, response_format) -> "Constraint | None":
        """OpenAI's `response_format`: {"type": "text"} -> None, {"type": "json_object"}
        (llama.cpp: optional "schema"), {"type": "json_schema", "json_schema":
        {"name", "schema", "strict"}}."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise GrammarError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            schema = response_format.get("schema")
            return cls.json_object() if schema is None else cls.from_json_schema(schema)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec:
                raise GrammarError('response_format {"type": "json_schema"} needs '
                                   '"json_schema": {"name": ..., "schema": {...}}')
            return cls.from_json_schema(spec["schema"])
        raise GrammarError(f"response_format type must be 'text', 'json_object' or "
                           f"'json_schema', got {kind!r}")

    @classmethod
    def from_request(cls, *, json_schema=None, grammar=None, regex=None,
                     response_format=None) -> "Constraint | None":
        """The one constraint a request asks for (None: unconstrained); GrammarError
        when it names more than one."""
        given = [k for k, v in (("json_schema", json_schema), ("grammar", grammar),
                                ("regex", regex), ("response_format", response_format))
                 if v is not None and not (k == "response_format"
                                           and isinstance(v, dict) and v.get("type") == "text")]
        if len(given) > 1:
            raise GrammarError(f"give at most one of json_schema, grammar, regex and "
                               f"response_format (got {', '.join(given)})")
        if json_schema is not None:
            return cls.from_json_schema(json_schema)
        if grammar is not None:
            return cls.from_grammar(grammar)
        if regex is not None:
            return cls.from_regex(regex)
        return cls.from_response_format(response_format)

    # -- use ---------------------------------------------------------------------------
    def matcher(self, bridge) -> Matcher:
        """A fresh per-sequence Matcher on `bridge`'s vocabulary; GrammarError when the
        grammar does not fit the vocabulary (e.g. it names a special token it lacks)."""
        return Matcher(self.grammar, bridge, LIMITS, self.what)

    def __repr__(self):
        src = self.source if len(self.source) <= 60 else self.source[:57] + "..."
        return f"Constraint({self.kind}, {src!r})"


_KIND_NAMES = {"json_schema": "JSON schema", "json_object": "JSON object schema",
               "regex": "regex", "lark": "grammar", "gbnf": "GBNF grammar"}
