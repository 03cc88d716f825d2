"""Tokenizer against llama.cpp: its test-tokenizer-0 vectors (shared/vocab), the
default model's reference token ids, special-token parsing, UTF-8 streaming
decode and bad files."""
import functools
import json
import random

import gguf
import numpy as np
import pytest

from a2ats_lite.errors import ModelError
from a2ats_lite.gguf import GGUFFile
from a2ats_lite.tokenizer import Tokenizer, TokenizerError, _clean_spaces

VOCABS = ["ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf",
          "ggml-vocab-qwen2.gguf", "ggml-vocab-phi-3.gguf"]


@pytest.fixture(scope="session")
def vocab_dir(shared_dir):
    d = shared_dir / "vocab"
    if not d.is_dir():
        pytest.skip(f"llama.cpp vocab test files not found in {d}")
    return d


@functools.lru_cache(maxsize=None)
def _tokenizer(path: str) -> Tokenizer:   # BPE vocabularies take ~1 s to build: once each
    return Tokenizer.from_gguf(path)


def tok_for(vocab_dir, name) -> Tokenizer:
    return _tokenizer(str(vocab_dir / name))


def read_cases(vocab_dir, name):
    """llama.cpp's test-tokenizer-0 read_tests(): inputs are the raw .inp text split
    on "\\n__ggml_vocab_test__\\n" (so a case keeps its own inner/trailing newlines and
    the file's final separator ends the last case); outputs are .out lines of ids."""
    raw = (vocab_dir / (name + ".inp")).read_bytes().decode("utf-8")
    outs = (vocab_dir / (name + ".out")).read_bytes().decode("utf-8").split("\n")
    if outs and outs[-1] == "":           # std::getline yields no line after the last \n
        outs.pop()
    sep, inputs, pos = "\n__ggml_vocab_test__\n", [], 0
    while pos < len(raw):
        nxt = raw.find(sep, pos)
        if nxt < 0:
            inputs.append(raw[pos:])
            break
        inputs.append(raw[pos:nxt])
        pos = nxt + len(sep)
    assert len(inputs) == len(outs) > 0
    return [(s, [int(x) for x in o.split()]) for s, o in zip(inputs, outs)]


def llama_clean_spaces(text: str) -> str:
    """Byte-for-byte port of the three clean_spaces loops of llama_vocab::detokenize."""
    t = bytearray(text.encode())
    # pass 1: " ?", " !", " .", " ," lose the space
    n, total = len(t), 1 if t else 0
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == ord(" ") and x in b"?!.,":
            total -= 1
        t[total] = x
        total += 1
    # pass 2: " ' " -> "'"
    n, total, i = total, 1 if total else 0, 1
    while i < n:
        x = t[i]
        if x == ord("'") and i + 1 < n and t[i - 1] == ord(" ") and t[i + 1] == ord(" "):
            total -= 1
            i += 1
            t[i] = 0
        t[total] = x
        total += 1
        i += 1
    # pass 3: " 's", " 'm", " 're", " 've" lose the space
    n, total = total, 1 if total else 0
    for i in range(1, n):
        x = t[i]
        if t[i - 1] == ord(" ") and x == ord("'") and i + 1 < n:
            x1 = t[i + 1]
            if x1 in b"sm" or (i + 2 < n and bytes([x1, t[i + 2]]) in (b"re", b"ve")):
                total -= 1
        t[total] = x
        total += 1
    return bytes(t[:total]).decode()


# -- llama.cpp test vectors ----------------------------------------------------------

@pytest.mark.parametrize("name", VOCABS)
def test_llama_cpp_vectors(vocab_dir, name):
    """test-tokenizer-0 tokenizes with add_special=false, parse_special=false."""
    tok = tok_for(vocab_dir, name)
    cases = read_cases(vocab_dir, name)
    bad = [(s, want, got) for s, want in cases
           if (got := tok.encode(s, add_bos=False, special=False)) != want]
    assert not bad, f"{len(bad)}/{len(cases)} cases differ, first: {bad[0]!r}"


@pytest.mark.parametrize("name", VOCABS)
def test_vectors_roundtrip(vocab_dir, name):
    """decode(encode(x)) is x, except where llama.cpp's detokenizer cleans spaces."""
    tok = tok_for(vocab_dir, name)
    n_cleaned = 0
    for s, want in read_cases(vocab_dir, name):
        expected = llama_clean_spaces(s) if tok.clean_spaces else s
        n_cleaned += expected != s
        assert tok.decode(want, special=True) == expected
        assert tok.decode(want) == expected        # no control tokens in these cases
    assert tok.clean_spaces == (name == "ggml-vocab-llama-bpe.gguf")
    assert (n_cleaned > 0) == tok.clean_spaces     # the exception really is exercised


def test_clean_spaces_matches_llama_loops():
    rng = random.Random(1234)
    for _ in range(3000):
        s = "".join(rng.choice(" 'smrevltdx?!.,") for _ in range(rng.randint(0, 14)))
        assert _clean_spaces(s.encode()).decode() == llama_clean_spaces(s), s


def test_vocab_properties(vocab_dir):
    spm = tok_for(vocab_dir, "ggml-vocab-llama-spm.gguf")
    assert (spm.n_vocab, spm.bos_id, spm.eos_id, spm.eot_id) == (32000, 1, 2, None)
    assert spm.add_bos and not spm.add_eos and spm.add_space_prefix
    assert spm.eog_ids == {2}
    assert spm.is_control(1) and not spm.is_control(15043)
    assert spm.token_to_piece(1) == "<s>" and spm.token_to_piece(1, special=False) == ""
    assert spm.token_to_piece(15043) == " Hello"
    l3 = tok_for(vocab_dir, "ggml-vocab-llama-bpe.gguf")
    assert (l3.n_vocab, l3.bos_id, l3.eos_id, l3.eot_id) == (128256, 128000, 128001, 128009)
    assert l3.add_bos and {128001, 128009} <= l3.eog_ids
    qw = tok_for(vocab_dir, "ggml-vocab-qwen2.gguf")
    assert qw.eot_id == qw.token_id("<|im_end|>") == 151645
    assert not qw.add_bos and {151643, 151645} <= qw.eog_ids
    phi = tok_for(vocab_dir, "ggml-vocab-phi-3.gguf")
    assert phi.eot_id == phi.token_id("<|end|>") and {32000, 32007} <= phi.eog_ids


def test_add_bos_follows_file(vocab_dir):
    spm = tok_for(vocab_dir, "ggml-vocab-llama-spm.gguf")
    assert spm.encode("Hello") == [1, 15043]                 # add_bos_token = true
    assert spm.encode("Hello", add_bos=False) == [15043]
    assert spm.encode("", add_bos=True) == [1] and spm.encode("", add_bos=False) == []
    qw = tok_for(vocab_dir, "ggml-vocab-qwen2.gguf")           # no key: qwen2 default off
    assert qw.encode("Hello") == qw.encode("Hello", add_bos=False) == [9707]
    assert qw.encode("Hello", add_bos=True) == [151643, 9707]


# -- special tokens -------------------------------------------------------------------

def test_control_tokens_parsed_only_when_special(vocab_dir):
    l3 = tok_for(vocab_dir, "ggml-vocab-llama-bpe.gguf")
    text = "Hi<|eot_id|>there"
    on = l3.encode(text, add_bos=False, special=True)
    off = l3.encode(text, add_bos=False, special=False)
    assert on == l3.encode("Hi", add_bos=False) + [128009] + l3.encode("there", add_bos=False)
    assert 128009 not in off and len(off) > 3
    assert l3.decode(off) == text                     # plain text comes back verbatim
    assert l3.decode(on, special=True) == text
    assert l3.decode(on, special=False) == "Hithere"  # control pieces hidden by default

    spm = tok_for(vocab_dir, "ggml-vocab-llama-spm.gguf")
    on = spm.encode("<s>Hi", add_bos=False, special=True)
    # a fragment after a special token gets the SPM space prefix, as in llama.cpp
    assert on == [1] + spm.encode("Hi", add_bos=False)
    off = spm.encode("<s>Hi", add_bos=False, special=False)
    assert 1 not in off and spm.decode(off) == "<s>Hi"


def test_special_prefix_index_changes_nothing(vocab_dir):
    """The first-two-characters index only skips specials absent from the text."""
    phi = Tokenizer.from_gguf(vocab_dir / "ggml-vocab-phi-3.gguf")   # private copy
    rng = random.Random(7)
    specials = [t for t, _, _ in phi._specials[True]]
    pieces = specials + [s[:k] for s in specials for k in (1, 2, 3)] + \
        [" ", "\n", "  ", "x", "ab", "é", "<", "|>", "🦙"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    fast = [(phi.encode(t, special=True), phi.encode(t, special=False)) for t in texts]
    phi._special_index = [{"": list(range(len(lst)))} for lst in phi._specials]  # check all
    slow = [(phi.encode(t, special=True), phi.encode(t, special=False)) for t in texts]
    assert fast == slow
    assert sum(any(phi.is_control(i) for i in f[0]) for f in fast) > 100   # specials were hit


def test_user_defined_tokens_always_split(vocab_dir):
    """llama.cpp pre-splits user-defined (added) tokens even with special parsing off."""
    qw = tok_for(vocab_dir, "ggml-vocab-qwen2.gguf")
    pad = qw.token_id("[PAD151646]")
    assert not qw.is_control(pad)
    for special in (False, True):
        assert qw.encode("a[PAD151646]b", special=special) == [64, pad, 65]
    assert qw.decode([64, pad, 65]) == "a[PAD151646]b"


def test_rstrip_after_phi3_special(vocab_dir):
    """llama.cpp marks phi-3's special tokens RSTRIP: whitespace after them is dropped."""
    phi = tok_for(vocab_dir, "ggml-vocab-phi-3.gguf")
    user = phi.token_id("<|user|>")
    ids = phi.encode("<|user|>  \n Hi", add_bos=False, special=True)
    assert ids == [user] + phi.encode("Hi", add_bos=False)


# -- decode / UTF-8 -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ggml-vocab-llama-spm.gguf", "ggml-vocab-llama-bpe.gguf"])
def test_streaming_decode_utf8(vocab_dir, name):
    tok = tok_for(vocab_dir, name)
    text = "Ärger 😁🦙 東京は日本 ក្រុង ok"
    ids = tok.encode(text, add_bos=False)
    assert tok.decode(ids) == text
    assert any(len(tok.token_to_piece(i).encode()) and "\ufffd" in tok.token_to_piece(i)
               for i in ids)   # some ids are partial characters (byte fallback / BPE bytes)
    for k in range(1, len(ids) + 1):
        part = tok.decode(ids[:k])
        good = part[:-1] if part.endswith("\ufffd") else part
        assert "\ufffd" not in good and text.startswith(good), (k, part)
    assert tok.decode_bytes(ids) == text.encode()


def test_decode_invalid_bytes_and_ids(vocab_dir):
    spm = tok_for(vocab_dir, "ggml-vocab-llama-spm.gguf")
    b = spm.token_id("<0xFF>")
    assert spm.decode([b]) == "\ufffd"
    assert spm.decode([spm.token_id("<0xE6>"), spm.token_id("<0x97>"), 13]) == "\ufffd\n"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        spm.decode([32000])
    with pytest.raises(TokenizerError):
        spm.decode([-1])


# -- default model ------------------------------------------------------------------------

def test_default_model_reference_tokens(default_model, shared_dir):
    ref_path = shared_dir / "reference" / "gemma3-270m-q4_k_m.npz"
    if not ref_path.is_file():
        pytest.skip(f"{ref_path} missing")
    ref = np.load(ref_path)
    prompts = json.loads((shared_dir / "reference" / "prompts.json").read_text())
    with GGUFFile(default_model) as f:
        tok = Tokenizer.from_gguf(f)
    assert tok.n_vocab == 262144 and tok.bos_id == 2 and tok.eot_id == 106
    assert {1, 106} <= tok.eog_ids
    for name, prompt in prompts.items():
        ids = tok.encode(prompt, add_bos=True, special=True)
        assert ids == ref[name + ".tokens"].tolist(), name
        assert tok.decode(ids) == prompt
    chat = "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    ids = tok.encode(chat, special=True)
    assert ids[:2] == [2, 105] and 106 in ids
    assert tok.decode(ids, special=True) == "<bos>" + chat
    nl = tok.token_id("\n\n")   # user-defined whitespace token, split even without special
    assert nl in tok.encode("a\n\nb", special=False)


# -- bad files ----------------------------------------------------------------------------

def _write(path, model="llama", tokens=("<unk>", "<s>", "</s>", "a", "b", "ab"),
           scores=None, types=None, merges=None, pre=None, skip=()):
    w = gguf.GGUFWriter(str(path), "llama")
    if model is not None:
        w.add_tokenizer_model(model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    if "tokens" not in skip:
        w.add_token_list(list(tokens))
    n = len(tokens)
    w.add_token_scores(list(scores) if scores is not None else [0.0] * n)
    w.add_token_types(list(types) if types is not None else [2, 3, 3] + [1] * (n - 3))
    if merges is not None:
        w.add_token_merges(list(merges))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def test_tiny_vocab_file(tmp_path):
    p = _write(tmp_path / "tiny.gguf", scores=[0.0, 0.0, 0.0, -1.0, -1.0, -0.5])
    tok = Tokenizer.from_gguf(p)
    assert tok.n_vocab == 6 and tok.unk_id == 0 and tok.bos_id == 1
    # no space token and no byte tokens: the leading space becomes <unk>, "ab" merges
    assert tok.encode("ab", add_bos=False) == [0, 5]
    assert tok.decode([3, 4, 5]) == "abab"


@pytest.mark.parametrize("kwargs, problem", [
    (dict(model=None), "missing tokenizer metadata tokenizer.ggml.model"),
    (dict(model="wordpiece-x"), "unsupported tokenizer model 'wordpiece-x'"),
    (dict(skip=("tokens",)), "missing tokenizer metadata tokenizer.ggml.tokens"),
    (dict(types=[1, 1, 1]), "tokenizer.ggml.token_type has 3 entries but the vocabulary has 6"),
    (dict(scores=[0.0] * 7), "tokenizer.ggml.scores has 7 entries"),
    (dict(tokens=("a", "b", "a", "c")), "duplicate token 'a'"),
    (dict(model="gpt2", pre="gpt-2"), "missing tokenizer metadata tokenizer.ggml.merges"),
    (dict(model="gpt2", pre="no-such-pre", merges=["a b"]), "unsupported BPE pre-tokenizer"),
])
def test_bad_files(tmp_path, kwargs, problem):
    p = _write(tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(ModelError) as e:
        Tokenizer.from_gguf(p)
    assert str(p) in str(e.value) and problem in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        Tokenizer.from_gguf(tmp_path / "nope.gguf")


def test_bad_text(tmp_path):
    tok = Tokenizer.from_gguf(_write(tmp_path / "tiny.gguf"))
    with pytest.raises(TokenizerError, match="must be a str"):
        tok.encode(b"ab")
    with pytest.raises(TokenizerError, match="not valid Unicode"):
        tok.encode("a\ud800b")
