"""Constrained decoding (a2ats_lite.structured): the llguidance vocabulary bridge, masks,
random generation under JSON schemas / regexes / GBNF and Lark grammars on the default
model's SentencePiece vocabulary and a byte-level BPE one, bad and hostile input."""
import functools
import json
import re
import time

import jsonschema
import numpy as np
import pytest
from constrained_sampling import generate, structural_tokens, text_of

from a2ats_lite.errors import GrammarError
from a2ats_lite.structured import (Constraint, TokenizerBridge, allocate_bitmask, allowed_ids,
                                   apply_bitmask, bridge_for, fill_masks)
from a2ats_lite.structured.gbnf import gbnf_to_lark
from a2ats_lite.tokenizer import (A_BYTE, A_CONTROL, A_NORMAL, A_UNKNOWN, A_UNUSED,
                                  A_USER_DEFINED, Tokenizer)

VOCABS = ["ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf", "ggml-vocab-qwen2.gguf",
          "ggml-vocab-phi-3.gguf"]
TEXTS = ["Hello world", "  two  spaces\nand\n\nnewlines\t tab", "héllo wörld — ünïcødé",
         'JSON: {"a": [1, 2.5e3], "b": null}', "数学 and 日本語", "emoji 🙂👍🏽 mixed",
         "<tool_call> [TOOL_CALLS]"]
DATE = r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])"
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "owner": {"type": "object",
                  "properties": {"city": {"type": "string", "maxLength": 10},
                                 "verified": {"type": "boolean"},
                                 "scores": {"type": "array", "items": {"type": "number"},
                                            "maxItems": 2}},
                  "required": ["city"], "additionalProperties": False},
    },
    "required": ["name", "kind", "owner"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def gemma(default_model):
    tok = Tokenizer.from_gguf(default_model)
    t = time.perf_counter()
    bridge = bridge_for(tok)
    bridge.build_seconds = time.perf_counter() - t
    return bridge


@functools.lru_cache(maxsize=None)
def vocab_bridge(path: str) -> TokenizerBridge:   # BPE bridges take seconds: once each
    return bridge_for(Tokenizer.from_gguf(path))


@pytest.fixture(scope="module")
def qwen(shared_dir):
    return vocab_bridge(str(shared_dir / "vocab" / "ggml-vocab-qwen2.gguf"))


@pytest.fixture(scope="module", params=["gemma", "qwen2-bpe"])
def vocab(request):
    """The default model's SentencePiece vocabulary and a byte-level BPE one."""
    return request.getfixturevalue("gemma" if request.param == "gemma" else "qwen")


def encode(bridge, text):
    return bridge.tokenizer.encode(text, add_bos=False, space_prefix=False)


# -- the bridge ------------------------------------------------------------------------
@pytest.mark.parametrize("name", VOCABS)
def test_bridge_spells_every_vocabulary(shared_dir, name):
    bridge = vocab_bridge(str(shared_dir / "vocab" / name))
    tok = bridge.tokenizer
    assert bridge.n_vocab == tok.n_vocab == bridge.ll.vocab_size
    assert set(bridge.eos_ids) == set(tok.eog_ids) | {tok.eos_id}
    for text in TEXTS:
        ids = encode(bridge, text)
        assert b"".join(bridge.token_bytes[i] for i in ids) == text.encode()
        assert bridge.ll.tokenize_str(text) == ids          # the tokenize callback
    special = (tok.attrs & (A_CONTROL | A_UNKNOWN | A_UNUSED)) != 0
    text = ((tok.attrs & (A_NORMAL | A_USER_DEFINED | A_BYTE)) != 0) & ~special
    marked = np.array([bridge.is_special(i) for i in range(tok.n_vocab)])
    assert marked[special].all() and not marked[text].any()


def test_bridge_default_model(gemma):
    tok = gemma.tokenizer
    print(f"bridge build for {tok.n_vocab} tokens: {gemma.build_seconds:.2f} s")
    assert gemma.build_seconds < 60          # hang guard, not a speed target
    assert bridge_for(tok) is gemma          # built once per tokenizer
    assert gemma.n_vocab == tok.n_vocab and set(gemma.eos_ids) == set(tok.eog_ids)
    for text in TEXTS:
        ids = encode(gemma, text)
        assert b"".join(gemma.token_bytes[i] for i in ids) == text.encode()
    assert gemma.special_id("<end_of_turn>") == tok.token_id("<end_of_turn>")
    assert gemma.token_bytes[tok.token_id("\n")] == b"\n"          # user-defined: text
    assert gemma.token_bytes[tok.token_id("<0xC3>")] == b"\xc3"      # byte fallback


# -- masks -----------------------------------------------------------------------------
def test_yes_no_grammar_allows_exactly_the_prefixes(gemma):
    m = Constraint.from_gbnf('root ::= "yes" | "no"').matcher(gemma)
    bitmask = allocate_bitmask(2, gemma.n_vocab)
    m.fill_mask(bitmask, 1)
    want = {i for i, b in enumerate(gemma.token_bytes)
            if b and not gemma.is_special(i) and (b"yes".startswith(b) or b"no".startswith(b))}
    assert set(allowed_ids(bitmask[1], gemma.n_vocab).tolist()) == want
    assert {gemma.token_bytes[i] for i in want} >= {b"yes", b"no", b"y", b"n"}
    assert (bitmask[0] == -1).all()                        # the other row is untouched
    assert m.accept(gemma.tokenizer.token_id("yes")) and m.is_done()
    assert m.stop_reason == "NoExtension" and m.error is None


def test_json_schema_generation_validates(vocab, rng):
    c = Constraint.from_json_schema(SCHEMA)
    structural = structural_tokens(vocab)
    for _ in range(20):
        m = c.matcher(vocab)
        text = text_of(vocab, generate(m, vocab, rng, structural=structural))
        jsonschema.validate(json.loads(text), SCHEMA)
        assert m.is_done() and m.error is None, text


def test_json_object_generation_parses(vocab, rng):
    c = Constraint.json_object()
    closers = structural_tokens(vocab, b'"}]', leading=True)   # short random objects
    for _ in range(20):
        m = c.matcher(vocab)
        text = text_of(vocab, generate(m, vocab, rng, structural=closers, max_tokens=600))
        assert isinstance(json.loads(text), dict) and m.is_done(), text


def test_date_regex_is_always_matched(vocab, rng):
    c = Constraint.from_regex(DATE)
    for _ in range(20):
        m = c.matcher(vocab)
        text = text_of(vocab, generate(m, vocab, rng))
        assert re.fullmatch(DATE, text, re.ASCII), text    # \d is 0-9 only
        assert m.is_done()


def test_special_tokens_in_grammars(qwen):
    end = qwen.special_id("<|im_end|>")
    for src in ('start: "ok" <|im_end|>', f'start: "ok" <[{end}]>'):
        m = Constraint.from_lark(src).matcher(qwen)
        assert m.accept_tokens(encode(qwen, "ok"))
        bitmask = allocate_bitmask(1, qwen.n_vocab)
        m.fill_mask(bitmask, 0)
        assert allowed_ids(bitmask[0], qwen.n_vocab).tolist() == [end]


# -- the mask helpers ------------------------------------------------------------------
def test_apply_bitmask_masks_listed_rows_only(rng):
    words = 32                                   # 1024 tokens' bits
    n = 32 * words
    logits = rng.standard_normal((3, n + 40)).astype(np.float32)   # logits past the mask
    bitmask = rng.integers(-2**31, 2**31, size=(3, words)).astype(np.int32)
    before = logits.copy()
    apply_bitmask(logits, bitmask, rows=[1])
    bits = np.array([(int(bitmask[1, t // 32]) >> (t % 32)) & 1 for t in range(n)], bool)
    assert np.array_equal(logits[1, :n][bits], before[1, :n][bits])
    assert np.isneginf(logits[1, :n][~bits]).all() and np.isneginf(logits[1, n:]).all()
    assert logits[[0, 2]].tobytes() == before[[0, 2]].tobytes()   # bit for bit
    row = before[0, :n].copy()
    apply_bitmask(row, bitmask[0])
    assert np.isneginf(row).sum() == n - np.unpackbits(bitmask[0].view(np.uint8)).sum()


def test_fill_masks_equals_one_by_one(qwen):
    prefixes = ['{"name": "ab', '{"name": "x", "kind": "', '{', "", '{"name": "", "kind": "cat", ']
    c = Constraint.from_json_schema(SCHEMA)

    def matchers():
        out = []
        for p in prefixes:
            m = c.matcher(qwen)
            assert m.accept_tokens(encode(qwen, p))
            out.append(m)
        return out

    rows = [4, 0, 6, 2, 3]
    seq = allocate_bitmask(8, qwen.n_vocab)
    for m, r in zip(matchers(), rows):
        m.fill_mask(seq, r)
    par = allocate_bitmask(8, qwen.n_vocab)
    par[[1, 5, 7]] = 12345                                  # rows no matcher owns
    job = fill_masks(list(zip(matchers(), rows)), par)
    job.result(timeout=60)
    assert np.array_equal(par[rows], seq[rows])
    assert (par[[1, 5, 7]] == 12345).all()
    assert fill_masks([], par).result() is None
    with pytest.raises(GrammarError):
        fill_masks([(matchers()[0], 1), (matchers()[1], 1)], par)


def test_refused_token_and_rollback(qwen):
    c = Constraint.from_json_schema({"type": "object", "properties": {"a": {"type": "integer"}},
                                     "required": ["a"]})
    m = c.matcher(qwen)
    ids = encode(qwen, '{"a": 12}')
    assert m.accept_tokens(ids[:3]) and not m.is_done()
    assert m.rollback(2) and m.n_accepted == 1
    assert m.accept_tokens(ids[1:]) and m.is_done() and m.is_accepting()
    bad = c.matcher(qwen)
    assert not bad.accept(encode(qwen, "x")[0])
    assert bad.is_done() and "doesn't satisfy the grammar" in bad.error
    bitmask = allocate_bitmask(1, qwen.n_vocab)
    bad.fill_mask(bitmask, 0)                # in error: only end-of-generation tokens
    assert set(allowed_ids(bitmask[0], qwen.n_vocab).tolist()) == set(qwen.eos_ids)
    with pytest.raises(GrammarError):
        bad.accept(qwen.n_vocab)


# -- building constraints --------------------------------------------------------------
@pytest.mark.parametrize("make, message", [
    (lambda: Constraint.from_json_schema({"type": "foo"}), "Invalid type: foo"),
    (lambda: Constraint.from_json_schema("{not json"), "not valid JSON"),
    (lambda: Constraint.from_json_schema([1]), "must be a JSON object"),
    (lambda: Constraint.from_regex("a(b"), "unclosed group"),
    (lambda: Constraint.from_lark("start: foo"), 'unknown name: "foo"'),
    (lambda: Constraint.from_gbnf('root ::= "a" b'), "'b' is used but not defined"),
    (lambda: Constraint.from_gbnf('root ::= "a'), "Unexpected end of input"),
    (lambda: Constraint.from_gbnf('item ::= "a"'), "no 'root' rule"),
    (lambda: Constraint.from_grammar("start: /[/"), "invalid grammar"),
    (lambda: Constraint.from_request(json_schema={}, regex="a"), "at most one"),
    (lambda: Constraint.from_response_format({"type": "json_schema"}), '"json_schema"'),
    (lambda: Constraint.from_response_format({"type": "xml"}), "response_format type"),
])
def test_invalid_input_raises_with_the_parsers_message(make, message):
    with pytest.raises(GrammarError, match=re.escape(message)) as e:
        make()
    assert isinstance(e.value, ValueError)


def test_grammar_needing_the_vocabulary_fails_at_matcher(qwen):
    c = Constraint.from_lark('start: "a" <|python_tag|>')      # fine without a vocabulary
    with pytest.raises(GrammarError, match="unknown special token"):
        c.matcher(qwen)


def test_request_shapes():
    assert Constraint.from_request() is None
    assert Constraint.from_request(response_format={"type": "text"}) is None
    assert Constraint.from_request(response_format={"type": "json_object"}).kind == "json_object"
    rf = {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    assert Constraint.from_request(response_format=rf).kind == "json_schema"
    assert Constraint.from_response_format({"type": "json_object",
                                            "schema": SCHEMA}).kind == "json_schema"
    assert Constraint.from_request(grammar='root ::= "a"').kind == "gbnf"
    assert Constraint.from_request(grammar='start: "a"').kind == "lark"
    assert Constraint.from_request(regex="a+").kind == "regex"
    assert Constraint.from_request(json_schema=json.dumps(SCHEMA)).kind == "json_schema"


def _nested(depth):
    s = {"type": "integer"}
    for _ in range(depth):
        s = {"type": "object", "properties": {"a": s}, "required": ["a"]}
    return s


@pytest.mark.parametrize("make", [
    lambda: Constraint.from_json_schema(_nested(300)),
    lambda: Constraint.from_json_schema('{"type": "array", "items": ' * 3000 + "{}" + "}" * 3000),
    lambda: Constraint.from_json_schema({"enum": [f"value{i}" for i in range(100_000)]}),
    lambda: Constraint.from_json_schema({"enum": [f"v{i}" for i in range(20_000)]}),
    lambda: Constraint.from_json_schema({"anyOf": [
        {"type": "object", "properties": {f"k{i}": {"type": "string"}}, "required": [f"k{i}"]}
        for i in range(3000)]}),
    lambda: Constraint.from_regex("((a{1,100}){1,100}){1,100}b"),
    lambda: Constraint.from_regex("(a|b)*a(a|b){24}c"),
    lambda: Constraint.from_regex("[a-z]{100000}"),
    lambda: Constraint.from_regex("|".join(f"w{i}x" for i in range(20_000))),
    lambda: Constraint.from_gbnf('root ::= root "a" | "a"'),
    lambda: Constraint.from_gbnf('root ::= x "a" | "b"\nx ::= root "c" | x x | "d"'),
    lambda: Constraint.from_lark('start: s\ns: s s | "a" | ""'),
])
def test_hostile_input_is_refused_or_bounded(make, qwen, rng):
    """Refused when built, or each step bounded by LIMITS (a hang guard, not a speed
    target): construction plus 60 random steps in a few seconds."""
    t = time.perf_counter()
    try:
        m = make().matcher(qwen)
        try:
            generate(m, qwen, rng, max_tokens=60)
        except AssertionError:
            pass    # no end within 60 tokens, or the matcher hit a limit mid-way
    except GrammarError:
        pass
    assert time.perf_counter() - t < 15


# -- GBNF ------------------------------------------------------------------------------
JSON_GBNF = r'''
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws
object ::= "{" ws ( string ":" ws value ("," ws string ":" ws value)* )? "}" ws
array  ::= "[" ws ( value ("," ws value)* )? "]" ws
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) )* "\"" ws
number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws
# optional space after literal characters
ws ::= | " " | "\n" [ \t]{0,20}
'''
LIST_GBNF = r'''root ::= item+
item ::= "- " [^\r\n\x0b\x0c\x85\u2028\u2029]+ "\n"
'''
ARITHMETIC_GBNF = r'''root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*
'''


def _matches(bridge, constraint, text) -> bool:
    m = constraint.matcher(bridge)
    return m.accept_tokens(encode(bridge, text)) and m.is_accepting()


@pytest.mark.parametrize("grammar, good, bad", [
    (JSON_GBNF, ['{"a": [1, 2.5e3, "x\\n"], "b": {"c": null}}', "{}", '{\n  "k": true}'],
     ['{"a" 1}', "[1]", '{"a": tru}']),
    (LIST_GBNF, ["- apples\n- pears\n", "- x\n"], ["- apples", "* x\n", "-  \u2028\n"]),
    (ARITHMETIC_GBNF, ["a+b=c\n", "(1 +x)*2 = 3\nx=y\n", "n = 4 \n"], ["a+=b\n", "a=b"]),
    ('root ::= [\\u00e9-\\u00ff]+ "\\u00e9" . "\\x41"', ["üé\nA", "ééxA"], ["aé\nA", "ééA"]),
    ('root ::= "yes" | "no"', ["yes", "no"], ["yes no", "maybe"]),
])
def test_gbnf_grammars_keep_their_meaning(qwen, grammar, good, bad):
    c = Constraint.from_gbnf(grammar)
    assert all(_matches(qwen, c, t) for t in good)
    assert not any(_matches(qwen, c, t) for t in bad)


def test_gbnf_terminals_only_where_greedy_lexing_is_safe():
    json_lark = gbnf_to_lark(JSON_GBNF)       # whitespace never precedes ':' ',' '}' ...
    assert "\nSTRING: " in json_lark and "\nWS: " in json_lark
    arith = gbnf_to_lark(ARITHMETIC_GBNF)     # ws may swallow the "\n" that ends a line
    assert "\nws: " in arith and "\nnum: " in arith and "WS" not in arith


def test_gbnf_random_generation(qwen, rng):
    c = Constraint.from_gbnf(LIST_GBNF)
    newlines = structural_tokens(qwen, b"\n")
    for _ in range(10):
        text = text_of(qwen, generate(c.matcher(qwen), qwen, rng, p_struct=0.3,
                                      structural=newlines, max_tokens=300))
        assert re.fullmatch(r"(- [^\r\n\x0b\x0c\x85\u2028\u2029]+\n)+", text), text
