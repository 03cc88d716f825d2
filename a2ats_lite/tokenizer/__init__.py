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

from pathlib import Path

import numpy as np

from ..errors import ModelError, TokenizerError
from ..gguf import GGUFFile
from .models import (A_BYTE, A_CONTROL, A_LSTRIP, A_NORMAL, A_RSTRIP, A_UNKNOWN,  # noqa: F401
                     A_UNUSED, A_USER_DEFINED, T_NORMAL, T_UNKNOWN, _BPE_PRE, _C_SPACE,
                     _EOG_TEXTS, _EOM_TEXTS, _EOT_TEXTS, _FIM_PAD_TEXTS, _FIM_REP_TEXTS,
                     _FIM_SEP_TEXTS, _SPM_SPACE, _TYPE_TO_ATTR, _BPEModel, _SPMModel,
                     _bpe_text_to_bytes, _clean_spaces, _raw)


def _overlaps(a: int, b: int, spans) -> bool:
    return any(a < e and s < b for s, e in spans)


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

    def has_control_text(self, text: str) -> bool:
        """Whether text holds the text of a control token (one special=True splits out)."""
        return any(type(f) is int for f in self._partition(text, True)) and \
            self._partition(text, True) != self._partition(text, False)

    def token_id(self, text: str) -> int | None:
        """The id of a token by its exact vocabulary text, or None."""
        return self._token_to_id.get(text)

    # -- encode ------------------------------------------------------------------------
    def _partition(self, text: str, special: bool, plain=()) -> list:
        """llama.cpp's tokenizer_st_partition: str fragments and int token ids.
        plain: (start, end) character spans of text where only the tokens special=False
        splits out may match (message contents inside a rendered chat template)."""
        specials = self._specials[special]
        always = {tok for tok, _, _ in self._specials[False]} if plain else set()
        hits = sorted(k for prefix, ks in self._special_index[special].items()
                      if prefix in text for k in ks)   # keeps the longest-first order
        frags: list = [(0, text)]                      # (offset in text, str) or token id
        for k in hits:
            tok, tid, attr = specials[k]
            if tok not in text:
                continue
            guarded = plain if tok not in always else ()
            out = []
            for frag in frags:
                if type(frag) is int or tok not in frag[1]:
                    out.append(frag)
                    continue
                off, frag = frag
                start, end = 0, len(frag)
                while True:
                    m = frag.find(tok, start)
                    while m >= 0 and _overlaps(off + m, off + m + len(tok), guarded):
                        m = frag.find(tok, m + 1)
                    if m < 0:
                        if start < end:
                            out.append((off + start, frag[start:]))
                        break
                    left, lstart = frag[start:m], start
                    if attr & A_LSTRIP:
                        left = left.rstrip(_C_SPACE)
                    if left:
                        out.append((off + lstart, left))
                    out.append(tid)
                    start = m + len(tok)
                    if attr & A_RSTRIP:
                        while start < end and frag[start] in _C_SPACE:
                            start += 1
            frags = out
        return [f if type(f) is int else f[1] for f in frags]

    def encode(self, text: str, add_bos: bool | None = None, special: bool = False,
               space_prefix: bool = True, plain=()) -> list[int]:
        """Token ids of text, as llama_tokenize(add_special, parse_special=special).

        add_bos=None: as the file says (tokenizer.ggml.add_bos_token, else llama.cpp's
        default for the vocab type, plus EOS when add_eos); False: no BOS/EOS.
        special=True splits out control tokens such as <start_of_turn> (chat
        templates need it); user-defined tokens are split out either way.
        space_prefix=False: no SentencePiece dummy space before the text's first
        fragment (text that continues earlier output, as a grammar engine tokenizes it).
        plain: (start, end) character spans read with special=False even when special is
        True: a chat's message contents, so that text a user wrote never becomes a
        control token (the template's own markers outside them still do)."""
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
        frags = self._partition(text, bool(special), plain) if text else []
        if self.model == "llama":
            prev_special = space_prefix   # a fragment that starts the text gets the space prefix
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

    def token_bytes(self, i: int, special: bool = True) -> bytes:
        """Bytes of one token (a piece of a multi-byte character is not valid UTF-8)."""
        return self._piece(i, special)

    def token_to_piece(self, i: int, special: bool = True) -> str:
        """Text of one token (control tokens included unless special=False)."""
        return self._piece(i, special).decode("utf-8", errors="replace")

    def __repr__(self):
        return (f"Tokenizer({self.model!r}, pre={self.pre!r}, n_vocab={self.n_vocab}, "
                f"bos={self.bos_id}, eos={self.eos_id}, add_bos={self.add_bos})")


__all__ = ["Tokenizer", "TokenizerError"]
