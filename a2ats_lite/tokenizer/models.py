"""The vocabulary models under the Tokenizer (see the package docstring): token types and
attributes, llama.cpp's BPE pre-tokenizer table, the SentencePiece ModelProto rebuilt
from GGUF metadata (_SPMModel) and HF tokenizers' byte-level BPE (_BPEModel), and the
byte / clean-spaces helpers of decoding."""
from __future__ import annotations

import json
import re

import numpy as np

from ..errors import ModelError, TokenizerError


# GGUF token types (== SentencePiece piece types) -> llama.cpp token attributes
T_NORMAL, T_UNKNOWN, T_CONTROL, T_USER_DEFINED, T_UNUSED, T_BYTE = 1, 2, 3, 4, 5, 6
A_UNKNOWN, A_UNUSED, A_NORMAL, A_CONTROL = 1 << 0, 1 << 1, 1 << 2, 1 << 3
A_USER_DEFINED, A_BYTE, A_LSTRIP, A_RSTRIP = 1 << 4, 1 << 5, 1 << 7, 1 << 8
_TYPE_TO_ATTR = np.zeros(256, dtype=np.int32)   # unknown type codes -> UNDEFINED (0)
_TYPE_TO_ATTR[[T_NORMAL, T_UNKNOWN, T_CONTROL, T_USER_DEFINED, T_UNUSED, T_BYTE]] = [
    A_NORMAL, A_UNKNOWN, A_CONTROL, A_USER_DEFINED, A_UNUSED, A_BYTE]

_C_SPACE = " \t\n\v\f\r"   # C isspace(): what LSTRIP/RSTRIP strip
_SPM_SPACE = "\u2581"      # SentencePiece's escaped space

# -- llama.cpp's text-detected special tokens (llama_vocab::impl::load) ------------
_EOT_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
              "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
              "<end_of_utterance>")
_EOM_TEXTS = ("<|eom_id|>",)
_FIM_PAD_TEXTS = ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]")
_FIM_REP_TEXTS = ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>")
_FIM_SEP_TEXTS = ("<|file_sep|>",)
_EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
              "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
              "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
              "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[")

# -- byte-level BPE pre-tokenizers, by tokenizer.ggml.pre -----------------------------
# The regexes are the HF tokenizer.json originals (the test vectors llama.cpp is
# checked against come from HF); llama.cpp's rewrites of them are equivalent.
_RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_RE_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
              r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_RE_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _RE_GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")


def _pre(regexes, ignore_merges=False, clean_spaces=True, add_bos=False):
    return {"regexes": tuple(regexes), "ignore_merges": ignore_merges,
            "clean_spaces": clean_spaces, "add_bos": add_bos}


_BPE_PRE = {"default": _pre(_RE_DEFAULT)}
for _n in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
           "lfm2", "jina-v5-nano"):
    _BPE_PRE[_n] = _pre([_RE_LLAMA3], ignore_merges=True, add_bos=True)
for _n in ("dbrx", "smaug-bpe"):
    _BPE_PRE[_n] = _pre([_RE_LLAMA3])
for _n in ("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2"):
    _BPE_PRE[_n] = _pre([_RE_QWEN2], clean_spaces=False)
for _n in ("stablelm2", "megrez"):
    _BPE_PRE[_n] = _pre([_RE_QWEN2])
for _n in ("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de",
           "a.x-4.0", "mellum", "modern-bert", "mpt", "olmo", "jais", "exaone4"):
    _BPE_PRE[_n] = _pre([_RE_GPT2])
for _n in ("trillion", "granite-docling"):
    _BPE_PRE[_n] = _pre([_RE_GPT2], clean_spaces=False)
for _n in ("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"):
    _BPE_PRE[_n] = _pre([r"\p{N}", _RE_GPT2])
for _n in ("command-r", "smollm"):
    _BPE_PRE[_n] = _pre([r"\p{N}", _RE_GPT2], clean_spaces=False)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_DECODER = {c: b for b, c in _bytes_to_unicode().items()}


def _raw(text: str) -> bytes:
    # token texts that were not valid UTF-8 in the file come back surrogate-escaped
    return text.encode("utf-8", "surrogateescape")


# -- SentencePiece ModelProto built without per-piece protobuf objects -------------------
def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 128:
        out.append((n & 127) | 128)
        n >>= 7
    out.append(n)
    return bytes(out)


def _varint_len(v: np.ndarray) -> np.ndarray:
    n = np.ones(len(v), np.int64)
    for k in range(1, 5):
        n += v >= (1 << (7 * k))
    return n


def _put_varints(out: np.ndarray, pos: np.ndarray, v: np.ndarray, vlen: np.ndarray) -> None:
    for k in range(int(vlen.max(initial=1))):
        sel = vlen > k
        byte = ((v[sel] >> (7 * k)) & 127) | np.where(vlen[sel] > k + 1, 128, 0)
        out[pos[sel] + k] = byte


def _spm_model_proto(tokens: list[str], scores: np.ndarray, types: np.ndarray,
                     byte_fallback: bool) -> bytes:
    """Serialized sentencepiece ModelProto (BPE, identity normalizer).

    262k pb2 messages (or a Python loop writing them) cost about a second;
    a piece's wire format is tiny (field 1 string, field 2 float, field 3 enum),
    so all records are laid out at once with numpy.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    n = len(tokens)
    joined = np.frombuffer(_raw("\x00".join(tokens)), np.uint8)
    seps = np.flatnonzero(joined == 0)
    if len(seps) == n - 1:           # no token holds a NUL: split at the separators
        lens = np.diff(np.concatenate(([-1], seps, [len(joined)]))) - 1
        blob = joined[joined != 0]
    else:
        raws = [_raw(t) for t in tokens]
        lens = np.array([len(r) for r in raws], np.int64)
        blob = np.frombuffer(b"".join(raws), np.uint8)
    lens = lens.astype(np.int64)
    typed = types != T_NORMAL        # NORMAL is the default: no field 3
    vl = _varint_len(lens)
    body = 1 + vl + lens + 5 + 2 * typed
    vb = _varint_len(body)
    rec = 1 + vb + body
    start = np.cumsum(rec) - rec
    out = np.zeros(int(rec.sum()), np.uint8)
    out[start] = 0x0A                               # pieces, length-delimited
    _put_varints(out, start + 1, body, vb)
    p = start + 1 + vb
    out[p] = 0x0A                                   # .piece
    _put_varints(out, p + 1, lens, vl)
    ps = p + 1 + vl
    first = np.cumsum(lens) - lens
    out[np.repeat(ps - first, lens) + np.arange(len(blob))] = blob
    q = ps + lens
    out[q] = 0x15                                   # .score (fixed32)
    f32 = np.ascontiguousarray(scores, "<f4").view(np.uint8).reshape(n, 4)
    out[q[:, None] + np.arange(1, 5)] = f32
    r = q[typed] + 5
    out[r] = 0x18                                   # .type (varint < 128)
    out[r + 1] = types[typed]
    trainer = pb.TrainerSpec(model_type=pb.TrainerSpec.BPE, vocab_size=n,
                             byte_fallback=byte_fallback).SerializeToString()
    norm = pb.NormalizerSpec(name="identity", add_dummy_prefix=False,
                             remove_extra_whitespaces=False,
                             escape_whitespaces=False).SerializeToString()
    return b"".join([out.tobytes(), b"\x12", _varint(len(trainer)), trainer,
                     b"\x1a", _varint(len(norm)), norm])


class _SPMModel:
    """llama.cpp's SPM merge loop, run by SentencePiece on pre-escaped text."""

    def __init__(self, path, tokens, scores, types, unk_id):
        import sentencepiece as spm

        n = len(tokens)
        ptypes = np.where(types == T_BYTE, T_BYTE, T_NORMAL).astype(np.int64)
        pieces = tokens
        self.extra_unk = None
        if unk_id is None:  # SentencePiece insists on an unknown piece: add one past the vocab
            pieces = tokens + ["\x01<a2ats-unk>\x01"]
            scores = np.append(scores, np.float32(0))
            ptypes = np.append(ptypes, T_UNKNOWN)
            self.extra_unk = n
        else:
            ptypes[unk_id] = T_UNKNOWN
        n_bytes = int((ptypes == T_BYTE).sum())
        proto = _spm_model_proto(pieces, scores, ptypes, byte_fallback=n_bytes == 256)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(proto)
        except Exception as e:  # noqa: BLE001 - sentencepiece raises plain RuntimeError
            raise ModelError(path, f"SentencePiece rejected the vocabulary: {e}") from None

    def encode(self, text: str) -> list[int]:
        ids = self.sp.encode(text)
        if self.extra_unk is not None and self.extra_unk in ids:
            raise TokenizerError(f"text {text!r} has characters outside the vocabulary "
                                 "and the vocabulary has no byte or unknown tokens")
        return ids


class _BPEModel:
    """Byte-level BPE (HF tokenizers) with llama.cpp's pre-tokenizer for one pre type."""

    def __init__(self, path, tokens, merges, pre: dict):
        from tokenizers import Tokenizer as HFTokenizer

        vocab = dict(zip(tokens, range(len(tokens))))
        splits = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated",
                   "invert": False} for r in pre["regexes"]]
        spec = {
            "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "post_processor": None, "decoder": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": splits + [
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                 "use_regex": False}]},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": pre["ignore_merges"], "vocab": vocab,
                      "merges": merges},
        }
        try:
            self.tk = HFTokenizer.from_str(json.dumps(spec, ensure_ascii=False))
        except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception
            raise ModelError(path, f"cannot build the BPE tokenizer: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids


def _bpe_text_to_bytes(text: str) -> bytes:
    """llama_decode_text: byte-level characters back to bytes."""
    out = bytearray()
    for ch in text:
        b = _BYTE_DECODER.get(ch)
        if b is not None:
            out.append(b)
        else:   # not a byte-level character: llama.cpp's marker
            out += b"[UNK_BYTE_0x" + _raw(ch).hex().encode() + _raw(text) + b"]"
    return bytes(out)


_CLEAN_1 = re.compile(rb" (?=[?!.,])")
_CLEAN_2 = re.compile(rb" ' ")
_CLEAN_3 = re.compile(rb" '(?=[sm]|re|ve)")


def _clean_spaces(data: bytes) -> bytes:
    """llama.cpp's three clean_spaces passes (" ," -> ",", " ' " -> "'", " 's" -> "'s")."""
    data = _CLEAN_1.sub(b"", data)
    data = _CLEAN_2.sub(b"'", data)
    return _CLEAN_3.sub(b"'", data)
