"""Tokenizers rebuilt from GGUF metadata that reproduce llama.cpp's token ids.

llama.cpp (src/llama-vocab.cpp) tokenizes in two stages, mirrored here:

1. Special-token partition: the text is cut around every occurrence of the
   vocabulary's special tokens, longest token first. Control and unknown-type
   tokens are cut out only when `special=True`; user-defined tokens are cut out
   always (llama.cpp, like HF tokenizers, pre-splits added tokens even when
   special parsing is off; Gemma's "\\n" and runs of spaces are such tokens).
2. Each remaining text fragment goes through the vocabulary's model:
   - 'llama' (SPM): llama.cpp escapes spaces as U+2581 and adds one leading
     space to a fragment that starts the text or follows a special token
     (when add_space_prefix), then merges symbol pairs by piece score with
     byte fallback. That merge loop is SentencePiece's BPE algorithm, so the
     vocabulary is rebuilt as a SentencePiece ModelProto and encoded there
     (every non-byte piece typed NORMAL so merges may form any token text,
     as llama.cpp's text_to_token lookup does; the spaces are pre-escaped and
     SentencePiece's own normalizer is the identity).
   - 'gpt2' (byte-level BPE): HF `tokenizers` BPE from tokens + merges with
     the pre-tokenizer regexes that llama.cpp selects by tokenizer.ggml.pre.

Decoding follows llama_detokenize (remove_special=false): per-token pieces
(control tokens only when `special=True`), the first token's leading space
dropped when add_space_prefix, and the "clean spaces" passes for the BPE
pre-types that use them; the bytes are decoded as UTF-8 with U+FFFD only for
invalid or truly incomplete sequences.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .errors import ModelError, TokenizerError
from .gguf import GGUFFile


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


class Tokenizer:
    """A GGUF vocabulary's tokenizer: llama.cpp-identical encode/decode."""

    def __init__(self, path, md: dict):
        self.path = Path(path) if path is not None else None
        self.model = self._require(md, "tokenizer.ggml.model", str)
        if self.model in ("no_vocab", "none"):
            raise ModelError(self.path, "the file has no vocabulary (tokenizer.ggml.model "
                             f"= {self.model!r})")
        if self.model not in ("llama", "gpt2"):
            raise ModelError(self.path, f"unsupported tokenizer model {self.model!r} "
                             "(supported: 'llama' (SentencePiece), 'gpt2' (byte-level BPE))")
        self.pre = md.get("tokenizer.ggml.pre") or "default"
        tokens = self._require(md, "tokenizer.ggml.tokens", list)
        n = len(tokens)
        if n == 0 or not isinstance(tokens[0], str):   # GGUF arrays are homogeneous
            raise ModelError(self.path, "tokenizer.ggml.tokens must be a non-empty string array")
        if "" in tokens:  # llama.cpp renames empty tokens so they stay unique
            tokens = [t if t else f"[EMPTY_{i}]" for i, t in enumerate(tokens)]
        self.tokens: list[str] = tokens
        self._token_to_id = dict(zip(tokens, range(n)))
        if len(self._token_to_id) != n:
            seen = {}
            for i, t in enumerate(tokens):
                if t in seen:
                    raise ModelError(self.path, f"duplicate token {t!r} in the vocabulary "
                                     f"(ids {seen[t]} and {i})")
                seen[t] = i
        types = self._array(md, "tokenizer.ggml.token_type", n, np.integer)
        self.types = np.full(n, T_NORMAL, np.int32) if types is None else types.astype(np.int32)
        scores = self._array(md, "tokenizer.ggml.scores", n, np.number)
        self.scores = np.zeros(n, np.float32) if scores is None else scores.astype(np.float32)
        self.attrs = _TYPE_TO_ATTR[np.clip(self.types, 0, 255)]

        spm_type = self.model == "llama"
        if spm_type:
            bos, eos, unk = 1, 2, 0
            self.add_space_prefix, self.clean_spaces, add_bos = True, False, True
        else:
            if self.pre not in _BPE_PRE:
                raise ModelError(self.path, f"unsupported BPE pre-tokenizer {self.pre!r} "
                                 f"(tokenizer.ggml.pre); supported: {', '.join(sorted(_BPE_PRE))}")
            pre = _BPE_PRE[self.pre]
            bos, eos, unk = 11, 11, None
            self.add_space_prefix, self.clean_spaces = False, pre["clean_spaces"]
            add_bos = pre["add_bos"]
        self.add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix",
                                            self.add_space_prefix))
        ids = {"bos": bos, "eos": eos, "unk": unk, "eot": None, "eom": None,
               "fim_pad": None, "fim_rep": None, "fim_sep": None}
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"),
                          ("eot", "eot_token_id"), ("eom", "eom_token_id"),
                          ("unk", "unknown_token_id"), ("fim_pad", "fim_pad_token_id"),
                          ("fim_rep", "fim_rep_token_id"), ("fim_sep", "fim_sep_token_id")):
            if ids[name] is not None and ids[name] >= n:   # default out of range: disabled
                ids[name] = None
            v = md.get("tokenizer.ggml." + key)
            if isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n:
                ids[name] = v
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        for flag, name in ((self.add_bos, "bos"), (self.add_eos, "eos")):
            if flag and ids[name] is None:
                raise ModelError(self.path, f"tokenizer.ggml.add_{name}_token is true, but "
                                 f"there is no {name.upper()} token")
        self._detect_specials(ids, md)

        if spm_type:
            unk = ids["unk"]
            if unk is None:
                found = np.nonzero(self.types == T_UNKNOWN)[0]
                unk = int(found[0]) if len(found) else None
            self._model = _SPMModel(self.path, tokens, self.scores, self.types, unk)
        else:
            merges = self._require(md, "tokenizer.ggml.merges", list)
            if merges and not isinstance(merges[0], str):
                raise ModelError(self.path, "tokenizer.ggml.merges must be a string array")
            self._model = _BPEModel(self.path, tokens, merges, _BPE_PRE[self.pre])
        self._pieces: tuple[dict, dict] = ({}, {})   # id -> bytes, for special False/True

    # -- construction helpers ----------------------------------------------------------
    @classmethod
    def from_gguf(cls, src) -> "Tokenizer":
        """Build from a GGUF path or an open GGUFFile (tensors are not needed)."""
        if isinstance(src, GGUFFile):
            return cls(src.path, src.metadata)
        with GGUFFile(src) as f:
            return cls(f.path, f.metadata)

    def _require(self, md, key, kind):
        if key not in md:
            raise ModelError(self.path, f"missing tokenizer metadata {key}")
        v = md[key]
        if not isinstance(v, kind):
            raise ModelError(self.path, f"{key} has the wrong type ({type(v).__name__})")
        return v

    def _array(self, md, key, n, kind):
        if key not in md:
            return None
        v = md[key]
        if not isinstance(v, np.ndarray) or not np.issubdtype(v.dtype, kind):
            raise ModelError(self.path, f"{key} must be a numeric array")
        if len(v) != n:
            raise ModelError(self.path, f"{key} has {len(v)} entries but the vocabulary "
                             f"has {n} tokens")
        return v

    def _find_text(self, texts) -> int | None:
        for t in texts:
            i = self._token_to_id.get(t)
            if i is not None:
                return i
        return None

    def _detect_specials(self, ids: dict, md: dict) -> None:
        """Text-detected EOT/EOM/FIM tokens, EOG set and attribute fix-ups, as llama.cpp."""
        attrs = self.attrs

        def mark_control(i):
            attrs[i] |= A_CONTROL

        for name, texts in (("eot", _EOT_TEXTS), ("eom", _EOM_TEXTS), ("fim_pad", _FIM_PAD_TEXTS),
                            ("fim_rep", _FIM_REP_TEXTS), ("fim_sep", _FIM_SEP_TEXTS)):
            if ids[name] is None:
                ids[name] = self._find_text(texts)
                if ids[name] is not None:
                    mark_control(ids[name])
        for i in np.nonzero(attrs & A_CONTROL)[0]:   # control tokens named "unused"
            if "unused" in self.tokens[i]:
                attrs[i] |= A_UNUSED
        eog = {ids[k] for k in ("fim_pad", "fim_rep", "fim_sep") if ids[k] is not None}
        for t in _EOG_TEXTS:
            i = self._token_to_id.get(t)
            if i is not None:
                eog.add(i)
                mark_control(i)
        for t in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss
            i = self._token_to_id.get(t)
            if i is not None:
                attrs[i] = A_USER_DEFINED
        eog |= {ids[k] for k in ("eos", "eot", "eom") if ids[k] is not None}
        texts = {self.tokens[i] for i in eog}
        end = self._token_to_id.get("<|end|>")
        if end in eog and "<|end|>" in texts and (
                ({"<|return|>", "<|call|>"} <= texts) or
                ({"<|calls|>", "<|flush|>"} <= texts)):   # harmony / solar-open
            eog.discard(end)
            attrs[end] = A_USER_DEFINED
        s = self._token_to_id.get("</s>")
        if s in eog and "<|tool_response>" in texts:         # gemma4 / paddleocr
            eog.discard(s)
            attrs[s] = A_NORMAL

        # special-token partition order: longest text (in bytes) first
        special = np.nonzero(attrs & (A_CONTROL | A_USER_DEFINED | A_UNKNOWN))[0]
        name = str(md.get("general.name", "")).lower()
        if "phi-3" in name or "phi3" in name:   # llama.cpp's per-model RSTRIP attributes
            attrs[special] |= A_RSTRIP
            for t, on in (("</s>", True), ("<unk>", False), ("<s>", False),
                          ("<|endoftext|>", False)):
                i = self._token_to_id.get(t)
                if i is not None:
                    attrs[i] = attrs[i] | A_RSTRIP if on else attrs[i] & ~A_RSTRIP
        entries = [(len(_raw(self.tokens[i])), int(i)) for i in special]
        entries.sort(key=lambda e: -e[0])  # stable: ties keep id order
        specials = [(self.tokens[i], i, int(attrs[i])) for _, i in entries]
        # indexed by `special`: False splits out user-defined tokens only, True all of them
        self._specials = ([e for e in specials if not e[2] & (A_CONTROL | A_UNKNOWN)], specials)
        # index by the first two characters: a text is checked only against the
        # specials whose prefix it contains (Gemma has 6k "<unusedN>" tokens)
        self._special_index = []
        for lst in self._specials:
            index: dict[str, list[int]] = {}
            for k, (t, _, _) in enumerate(lst):
                index.setdefault(t[:2], []).append(k)
            self._special_index.append(index)

        self.bos_id: int | None = ids["bos"]
        self.eos_id: int | None = ids["eos"]
        self.eot_id: int | None = ids["eot"]
        self.unk_id: int | None = ids["unk"]
        self.eog_ids: frozenset[int] = frozenset(int(i) for i in eog)

    # -- queries ---------------------------------------------------------------------
    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def _check_id(self, i) -> int:
        try:
            i = int(i)
        except (TypeError, ValueError):
            raise TokenizerError(f"token id {i!r} is not an integer") from None
        if not 0 <= i < len(self.tokens):
            raise TokenizerError(f"token id {i} is outside the vocabulary "
                                 f"(0..{len(self.tokens) - 1})")
        return i

    def is_control(self, i: int) -> bool:
        return bool(self.attrs[self._check_id(i)] & A_CONTROL)

    def is_eog(self, i: int) -> bool:
        return int(i) in self.eog_ids

    def token_id(self, text: str) -> int | None:
        """The id of a token by its exact vocabulary text, or None."""
        return self._token_to_id.get(text)

    # -- encode ------------------------------------------------------------------------
    def _partition(self, text: str, special: bool) -> list:
        """llama.cpp's tokenizer_st_partition: str fragments and int token ids."""
        specials = self._specials[special]
        hits = sorted(k for prefix, ks in self._special_index[special].items()
                      if prefix in text for k in ks)   # keeps the longest-first order
        frags: list = [text]
        for k in hits:
            tok, tid, attr = specials[k]
            if tok not in text:
                continue
            out = []
            for frag in frags:
                if type(frag) is int or tok not in frag:
                    out.append(frag)
                    continue
                start, end = 0, len(frag)
                while True:
                    m = frag.find(tok, start)
                    if m < 0:
                        if start < end:
                            out.append(frag[start:])
                        break
                    left = frag[start:m]
                    if attr & A_LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        out.append(left)
                    out.append(tid)
                    start = m + len(tok)
                    if attr & A_RSTRIP:
                        while start < end and frag[start] in _C_SPACE:
                            start += 1
            frags = out
        return frags

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        """Token ids of text, as llama_tokenize(add_special, parse_special=special).

        add_bos=None: as the file says (tokenizer.ggml.add_bos_token, else llama.cpp's
        default for the vocab type, plus EOS when add_eos); False: no BOS/EOS.
        special=True splits out control tokens such as <start_of_turn> (chat
        templates need it); user-defined tokens are split out either way."""
        if not isinstance(text, str):
            raise TokenizerError(f"text must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise TokenizerError(f"text is not valid Unicode: {e}") from None
        # add_bos=False is llama.cpp's add_special=false: no BOS and no EOS
        add_special = add_bos is None or bool(add_bos)
        add_bos = self.add_bos if add_bos is None else bool(add_bos)
        if add_bos and self.bos_id is None:
            raise TokenizerError("add_bos requested, but the vocabulary has no BOS token")
        out = [self.bos_id] if add_bos else []
        frags = self._partition(text, bool(special)) if text else []
        if self.model == "llama":
            prev_special = True   # a fragment that starts the text gets the space prefix
            for frag in frags:
                if type(frag) is int:
                    out.append(frag)
                    prev_special = True
                    continue
                if self.add_space_prefix and prev_special:
                    frag = " " + frag
                out += self._model.encode(frag.replace(" ", _SPM_SPACE))
                prev_special = False
        else:
            for frag in frags:
                if type(frag) is int:
                    out.append(frag)
                else:
                    out += self._model.encode(frag)
        if self.add_eos and add_special:
            out.append(self.eos_id)
        return out

    # -- decode ------------------------------------------------------------------------
    def _piece(self, i: int, special: bool) -> bytes:
        cache = self._pieces[bool(special)]
        p = cache.get(i)
        if p is None:
            p = cache[i] = self._make_piece(self._check_id(i), special)
        return p

    def _make_piece(self, i: int, special: bool) -> bytes:
        """llama_vocab::token_to_piece (lstrip handled by decode)."""
        attr, text = int(self.attrs[i]), self.tokens[i]
        if attr & (A_UNKNOWN | A_CONTROL) and not special:
            return b""
        if attr & (A_UNKNOWN | A_CONTROL | A_USER_DEFINED):
            return _raw(text)
        if attr & A_NORMAL:
            if self.model == "llama":
                return _raw(text.replace(_SPM_SPACE, " "))
            return _bpe_text_to_bytes(text)
        if attr & A_BYTE:
            try:
                return bytes([int(text[3:5], 16)])
            except ValueError:
                return b""
        return b""   # unused / undefined types render as nothing

    def decode_bytes(self, ids, special: bool = False) -> bytes:
        parts = [self._piece(i, special) for i in ids]
        if parts and self.add_space_prefix and parts[0][:1] == b" ":
            parts[0] = parts[0][1:]
        data = b"".join(parts)
        if self.clean_spaces:
            data = _clean_spaces(data)
        return data

    def decode(self, ids, special: bool = False) -> str:
        """Text of token ids, as llama_detokenize(remove_special=false,
        unparse_special=special). Invalid or incomplete UTF-8 becomes U+FFFD."""
        return self.decode_bytes(ids, special).decode("utf-8", errors="replace")

    def token_to_piece(self, i: int, special: bool = True) -> str:
        """Text of one token (control tokens included unless special=False)."""
        return self._piece(i, special).decode("utf-8", errors="replace")

    def __repr__(self):
        return (f"Tokenizer({self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
                f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})")


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


__all__ = ["Tokenizer", "TokenizerError"]
