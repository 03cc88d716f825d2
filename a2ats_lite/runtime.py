"""Runtime: the embeddable API (llama-cpp-python's shape, gpt-fast's loop).

    rt = Runtime()                                   # default model, CPU, dense KV
    rt.generate("The capital of France is", max_tokens=16)
    rt.generate(["prompt a", "prompt b"])            # one batch, decoded together
    for piece in rt.stream("Once upon a time"): ...
    rt.chat([{"role": "user", "content": "Hi"}])
    rt.eval_logits(ids)                              # (len(ids), n_vocab) float32

generate = prefill(prompts) then decode_step() until every sequence stops;
each step is one batched forward pass over all live sequences.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .config import ModelConfig
from .errors import ContextOverflowError, DeviceError
from .gguf import GGUFFile
from .sampling import Sampler, SamplingParams, StopMatcher
from .tokenizer import Tokenizer


@dataclass
class Timings:
    load_s: float = 0.0
    prompt_tokens: int = 0
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0

    def line(self) -> str:
        def rate(n, s):
            return f"{n / s:.2f} tok/s" if s > 0 else "-"
        return (f"load {self.load_s * 1e3:.0f} ms | prompt {self.prompt_tokens} tok, "
                f"{self.prompt_s * 1e3:.0f} ms ({rate(self.prompt_tokens, self.prompt_s)}) | "
                f"generation {self.gen_tokens} tok, {self.gen_s * 1e3:.0f} ms "
                f"({rate(self.gen_tokens, self.gen_s)})")


@dataclass
class _Seq:
    """One sequence being generated: its KV slot, tokens and text state."""
    slot: int
    prompt: list[int]
    sampler: Sampler
    stop: StopMatcher
    out: list[int] = field(default_factory=list)
    text: str = ""            # decoded text emitted so far (before stop-string filtering)
    anchor: list[int] = field(default_factory=list)  # last prompt token, decoded as a prefix
    anchor_text: str = ""
    done: str | None = None   # finish reason: 'stop' | 'length' | 'eos'


def check_device(device: str) -> str:
    """Fail with one clear line unless the device is usable (never a silent CPU fallback)."""
    if device == "cpu":
        return device
    if device != "cuda":
        raise DeviceError(f"unknown device {device!r}; choose cpu or cuda")
    try:
        import cupy
    except ImportError:
        raise DeviceError("--device cuda needs CuPy: pip install 'a2ats-lite[cuda12]' "
                          "(or [cuda13]) on a machine with an NVIDIA GPU") from None
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # driver missing, no device, ...
        raise DeviceError(f"--device cuda: no usable CUDA GPU ({e})") from None
    if n == 0:
        raise DeviceError("--device cuda: no CUDA GPU found")
    raise DeviceError("--device cuda: the CUDA backend is not part of this build yet; use --device cpu")


class Runtime:
    def __init__(self, model=None, *, n_ctx: int | None = None, device: str = "cpu",
                 kv: str = "dense", seed: int | None = None, n_batch: int = 512,
                 kv_params: dict | None = None, sidecar=None, verbose: bool = False):
        """sidecar: calibration file for kv='a2ats'/'vq' (default: MODEL.a2ats next to the model)."""
        from .kv import make_kv_cache
        from .model import Model

        check_device(device)
        t0 = time.perf_counter()
        if model is None:
            from .default_model import default_model_path
            model = default_model_path()
        self.model_path = Path(model)
        self.file = GGUFFile(self.model_path)
        self.config = ModelConfig.from_gguf(self.file)
        self.tokenizer = Tokenizer.from_gguf(self.file)
        with tqdm(total=1, desc="loading model", delay=1.0, disable=not verbose, leave=False) as bar:
            self.model = Model.from_gguf(self.file, self.config, n_batch=n_batch)
            bar.update(1)
        self.sidecar = Path(sidecar) if sidecar is not None else None
        self._calib = None          # the sidecar's Calibration, loaded on first need
        self.n_ctx = int(n_ctx or self.config.n_ctx_train)
        if self.n_ctx <= 0:
            raise ValueError(f"n_ctx must be positive, got {self.n_ctx}")
        self.kv_name = kv
        self.kv = make_kv_cache(kv, self.model.attn_layers, self.n_ctx,
                                **self._kv_params(kv, kv_params or {}))
        self.seed = seed
        self._calls = 0
        self.timings = Timings(load_s=time.perf_counter() - t0)
        self.last_finish_reasons: list[str] = []

    def _kv_params(self, kv: str, params: dict) -> dict:
        if kv in ("a2ats", "vq") and "calib" not in params:
            from .vq import load_sidecar_for  # coded policies need their calibration
            if self._calib is None:     # loaded once, shared by every cache
                self._calib = load_sidecar_for(self.model_path, self.sidecar)
            params = dict(params, calib=self._calib)
        return params

    # -- text <-> tokens --------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    # -- logits ------------------------------------------------------------
    def eval_logits(self, token_ids) -> np.ndarray:
        """Logits at every position of a fresh sequence: (len(token_ids), n_vocab) float32."""
        ids = np.asarray(token_ids, dtype=np.int64)
        self._check_tokens(ids)
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"{len(ids)} tokens exceed the context size {self.n_ctx}")
        slot = self.kv.add_sequence()
        try:
            return self.model.forward([ids], [slot], self.kv, logits="all")[0]
        finally:
            self.kv.remove_sequence(slot)

    def _check_tokens(self, ids: np.ndarray) -> None:
        if ids.ndim != 1 or len(ids) == 0:
            raise ValueError("token_ids must be a non-empty 1-D sequence")
        bad = ids[(ids < 0) | (ids >= self.config.n_vocab)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} out of range [0, {self.config.n_vocab})")

    # -- generation --------------------------------------------------------
    def _params(self, kw: dict) -> SamplingParams:
        names = {f.name for f in fields(SamplingParams)}
        unknown = set(kw) - names
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        p = replace(SamplingParams(), **kw)
        if p.seed is None and self.seed is not None:
            # same Runtime seed -> same outputs for the same sequence of calls
            p = replace(p, seed=self.seed + self._calls)
        self._calls += 1
        return p

    def _prompt_ids(self, prompt, truncate: bool, max_tokens: int) -> list[int]:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        self._check_tokens(np.asarray(ids))
        limit = self.n_ctx - 1  # leave room for at least one generated token
        if len(ids) > limit:
            if not truncate:
                raise ContextOverflowError(
                    f"prompt of {len(ids)} tokens does not fit the context size {self.n_ctx} "
                    f"(raise n_ctx / -c, or pass truncate=True to keep the last tokens)")
            keep = max(1, limit - max(0, min(max_tokens, limit // 2)))
            head = ids[:1] if ids[0] == self.tokenizer.bos_id else []
            ids = head + ids[len(ids) - (keep - len(head)):]
        return ids

    def _events(self, prompts: list[list[int]], p: SamplingParams) -> Iterator[tuple[int, str]]:
        """Yield (sequence index, text piece) as tokens are produced, batch-decoded."""
        seqs = []
        for i, ids in enumerate(prompts):
            sp = replace(p, seed=None if p.seed is None else p.seed + i)
            seqs.append(_Seq(self.kv.add_sequence(), ids,
                             Sampler(sp, self.config.n_vocab, eog_ids=self.tokenizer.eog_ids),
                             StopMatcher(list(p.stop or ()))))
        t = Timings(load_s=self.timings.load_s)
        self.timings = t
        try:
            t0 = time.perf_counter()
            logits = self.model.forward([np.asarray(s.prompt) for s in seqs],
                                        [s.slot for s in seqs], self.kv, logits="last")
            t.prompt_s, t.prompt_tokens = time.perf_counter() - t0, sum(len(s.prompt) for s in seqs)
            t0 = time.perf_counter()
            live = list(range(len(seqs)))
            while live:
                for j, i in enumerate(live):
                    piece = self._accept(seqs[i], logits[j], p)
                    if piece:
                        yield i, piece
                live = [i for i in live if seqs[i].done is None]
                if not live:
                    break
                t.gen_tokens += len(live)
                logits = self.model.forward([np.asarray(seqs[i].out[-1:]) for i in live],
                                            [seqs[i].slot for i in live], self.kv, logits="last")
                t.gen_s = time.perf_counter() - t0
            t.gen_s = time.perf_counter() - t0
        finally:
            self.last_finish_reasons = [s.done or "stop" for s in seqs]
            for s in seqs:
                self.kv.remove_sequence(s.slot)

    def _accept(self, s: _Seq, logits: np.ndarray, p: SamplingParams) -> str:
        """Sample one token for s, update its state; returns the text safe to emit."""
        tok = s.sampler.sample(logits, s.prompt + s.out)
        if tok in self.tokenizer.eog_ids and not p.ignore_eos:
            s.done = "eos"
            text, _ = s.stop.flush()
            return text
        s.out.append(tok)
        # decode after the last prompt token so SentencePiece keeps the first piece's leading space
        if not s.anchor:
            s.anchor = s.prompt[-1:]
            s.anchor_text = self.tokenizer.decode(s.anchor)
        full = self.tokenizer.decode(s.anchor + s.out)[len(s.anchor_text):]
        piece = ""
        if not full.endswith("\ufffd"):  # hold back incomplete UTF-8 sequences
            piece, s.text = full[len(s.text):], full
        text, stopped = s.stop.feed(piece)
        if stopped:
            s.done = "stop"
        elif len(s.out) >= p.max_tokens or len(s.prompt) + len(s.out) >= self.n_ctx:
            s.done = "length"
        if s.done and not stopped:
            tail, _ = s.stop.flush()
            text += tail
        return text

    def generate(self, prompt, *, truncate: bool = False, **kw):
        """Complete a prompt (str or token ids); a list of prompts is decoded as one batch."""
        batch = isinstance(prompt, list) and (not prompt or not isinstance(prompt[0], int))
        prompts = prompt if batch else [prompt]
        if not prompts:
            return []
        p = self._params(kw)
        ids = [self._prompt_ids(x, truncate, p.max_tokens) for x in prompts]
        outs = [""] * len(ids)
        for i, piece in self._events(ids, p):
            outs[i] += piece
        return outs if batch else outs[0]

    def stream(self, prompt, *, truncate: bool = False, **kw) -> Iterator[str]:
        """Yield text pieces of one completion as they are produced (whole UTF-8 characters)."""
        p = self._params(kw)
        ids = self._prompt_ids(prompt, truncate, p.max_tokens)
        for _, piece in self._events([ids], p):
            yield piece

    def chat_prompt(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template."""
        from .chat import prompt_for_chat
        tok = self.tokenizer
        text, add_bos = prompt_for_chat(self.file.get("tokenizer.chat_template"), messages,
                                        bos_token=tok.token_to_piece(tok.bos_id) if tok.bos_id is not None else "",
                                        eos_token=tok.token_to_piece(tok.eos_id) if tok.eos_id is not None else "")
        return tok.encode(text, add_bos=add_bos, special=True)

    def chat(self, messages: list[dict], *, stream: bool = False, **kw):
        """Reply to a conversation; stream=True yields pieces instead of returning the text."""
        ids = self.chat_prompt(messages)
        return self.stream(ids, **kw) if stream else self.generate(ids, **kw)

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        kv = getattr(self, "kv", None)
        if kv is not None:
            kv.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
