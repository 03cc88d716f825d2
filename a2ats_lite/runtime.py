"""Runtime: the embeddable API (llama-cpp-python's shape), a thin facade over the Engine.

    rt = Runtime()                                   # default model, CPU, dense KV
    rt.generate("The capital of France is", max_tokens=16)
    rt.generate(["prompt a", "prompt b"])            # several prompts, decoded together
    for piece in rt.stream("Once upon a time"): ...
    rt.chat([{"role": "user", "content": "Hi"}])     # reuses the previous turn's KV
    rt.eval_logits(ids)                              # (len(ids), n_vocab) float32

generate/stream add requests to the engine and step it until they finish; the
engine keeps finished sequences' KV so that the next call whose prompt extends
an earlier one (a chat's next turn) recomputes only the new tokens.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .backend import check_cuda, get_backend
from .config import ModelConfig
from .errors import ContextOverflowError, DeviceError
from .gguf import GGUFFile
from .sampling import SamplingParams
from .tokenizer import Tokenizer


@dataclass
class Timings:
    load_s: float = 0.0
    prompt_tokens: int = 0      # prompt rows run (a reused prefix is not run again)
    prompt_s: float = 0.0
    gen_tokens: int = 0
    gen_s: float = 0.0
    reused_tokens: int = 0      # prompt tokens whose KV came from an earlier call

    def line(self) -> str:
        def rate(n, s):
            return f"{n / s:.2f} tok/s" if s > 0 else "-"
        reused = f" (+{self.reused_tokens} cached)" if self.reused_tokens else ""
        return (f"load {self.load_s * 1e3:.0f} ms | prompt {self.prompt_tokens} tok{reused}, "
                f"{self.prompt_s * 1e3:.0f} ms ({rate(self.prompt_tokens, self.prompt_s)}) | "
                f"generation {self.gen_tokens} tok, {self.gen_s * 1e3:.0f} ms "
                f"({rate(self.gen_tokens, self.gen_s)})")


def check_device(device: str) -> str:
    """Fail with one clear line unless the device is usable (never a silent CPU fallback)."""
    if device == "cpu":
        return device
    if device != "cuda":
        raise DeviceError(f"unknown device {device!r}; choose cpu or cuda")
    check_cuda()
    return device


GPU_RESERVE = 1 << 30       # device memory kept free for activations, logits and workspaces


def device_kv_budget(backend) -> int | None:
    """Bytes of KV the engine may hold on a GPU: what is free once the weights are loaded,
    less a reserve (the larger of 1 GiB and 10% of the device). None on the CPU (no limit
    but the host's). The engine admits requests against it (device bytes: a retrieval
    policy's host store does not count)."""
    info = backend.memory_info()
    if info is None:
        return None
    free, total = info
    return max(0, int(free) - max(GPU_RESERVE, int(total) // 10))


class Runtime:
    def __init__(self, model=None, *, n_ctx: int | None = None, device: str = "cpu",
                 kv: str = "dense", seed: int | None = None, n_batch: int = 512,
                 kv_params: dict | None = None, sidecar=None, verbose: bool = False,
                 max_seqs: int = 16, kv_budget: int | None = None, cache_seqs: int = 2,
                 cache_type_k: str = "f16", cache_type_v: str | None = None,
                 backend_options: dict | None = None):
        """sidecar: calibration file for kv='a2ats'/'vq' (default: MODEL.a2ats next to the model).
        max_seqs, kv_budget (bytes), cache_seqs: the engine's limits (see engine/engine.py).
        cache_type_k/_v: 'f16' (default, as llama.cpp) or 'f32' K/V storage.
        backend_options: the backend's own settings (cuda: {"sparse": "host"} attends a
        retrieval policy's selected rows in host memory instead of copying them up)."""
        from .engine import Engine
        from .kv import make_kv_cache
        from .model import Model

        check_device(device)
        if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, (int, np.integer))
                                  or n_ctx <= 0):
            raise ValueError(f"n_ctx must be a positive integer (or None for the model's "
                             f"training context), got {n_ctx!r}")
        t0 = time.perf_counter()
        if model is None:
            from .default_model import default_model_path
            model = default_model_path()
        self.model_path = Path(model)
        self.file = GGUFFile(self.model_path)
        self.config = ModelConfig.from_gguf(self.file)
        self.tokenizer = Tokenizer.from_gguf(self.file)
        self.backend = get_backend(device, **(backend_options or {}))
        with tqdm(total=1, desc="loading model", delay=1.0, disable=not verbose, leave=False) as bar:
            self.model = Model.from_gguf(self.file, self.config, n_batch=n_batch, backend=self.backend)
            bar.update(1)
        self.sidecar = Path(sidecar) if sidecar is not None else None
        self._calib = None          # the sidecar's Calibration, loaded on first need
        self.n_ctx = int(n_ctx or self.config.n_ctx_train)
        self.kv_name = kv
        self.kv = make_kv_cache(kv, self.model.attn_layers, self.n_ctx, backend=self.backend,
                                cache_type=cache_type_k, cache_type_v=cache_type_v,
                                **self.kv_params_for(kv, kv_params or {}))
        if kv_budget is None:
            kv_budget = device_kv_budget(self.backend)
        self.engine = Engine(self.model, self.kv, self.tokenizer, max_seqs=max_seqs,
                             max_step_tokens=n_batch, kv_budget=kv_budget, cache_seqs=cache_seqs)
        self.seed = seed
        self._calls = 0
        self.timings = Timings(load_s=time.perf_counter() - t0)
        self.last_finish_reasons: list[str] = []

    def kv_params_for(self, kv: str, params: dict) -> dict:
        """params for make_kv_cache(kv): a coded policy gets the sidecar's calibration."""
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
        ids = self._ids(token_ids)
        if len(ids) > self.n_ctx:
            raise ContextOverflowError(f"{len(ids)} tokens exceed the context size {self.n_ctx}")
        slot = self.kv.add_sequence()
        try:
            return self.model.forward([np.asarray(ids)], [slot], self.kv, logits="all")[0]
        finally:
            self.kv.remove_sequence(slot)

    def _ids(self, token_ids) -> list[int]:
        """Checked token ids: integers (numpy integers too) in the vocabulary, non-empty."""
        ids = list(token_ids) if not isinstance(token_ids, np.ndarray) else token_ids.reshape(-1).tolist()
        if not ids:
            raise ValueError("token_ids must be a non-empty sequence of integers")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
                raise ValueError(f"token ids must be integers, got {t!r} ({type(t).__name__})")
        bad = [int(t) for t in ids if not 0 <= int(t) < self.config.n_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} out of range [0, {self.config.n_vocab})")
        return [int(t) for t in ids]

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
        ids = self.tokenize(prompt) if isinstance(prompt, str) else self._ids(prompt)
        limit = self.n_ctx - 1  # leave room for at least one generated token
        if len(ids) > limit:
            if not truncate:
                raise ContextOverflowError(
                    f"prompt of {len(ids)} tokens does not fit the context size {self.n_ctx} "
                    f"(raise n_ctx / -c, or pass truncate=True / --truncate to keep the last tokens)")
            keep = max(1, limit - max(0, min(max_tokens, limit // 2)))
            head = ids[:1] if ids[0] == self.tokenizer.bos_id else []
            ids = head + ids[len(ids) - (keep - len(head)):]
        return ids

    def _events(self, prompts: list[list[int]], p: SamplingParams) -> Iterator[tuple[int, str]]:
        """Yield (prompt index, text piece) as tokens are produced; the requests share steps."""
        eng = self.engine
        t = Timings(load_s=self.timings.load_s)
        self.timings = t
        rids = []
        try:
            for i, ids in enumerate(prompts):
                sp = replace(p, seed=None if p.seed is None else p.seed + i)
                rids.append(eng.add_request(ids, sp))
            index = {rid: i for i, rid in enumerate(rids)}
            reasons, seen = {}, set()
            while len(reasons) < len(rids):
                t0 = time.perf_counter()
                outs = eng.step()
                dt = time.perf_counter() - t0
                info = eng.stats.last_step
                if info.get("prefill_rows"):
                    t.prompt_s += dt
                    t.prompt_tokens += info["prefill_rows"]
                else:
                    t.gen_s += dt
                    t.gen_tokens += info.get("seqs", 0)
                for o in outs:
                    if o.rid not in index:
                        continue
                    if o.rid not in seen:
                        seen.add(o.rid)
                        t.reused_tokens += o.reused_tokens
                    if o.text:
                        yield index[o.rid], o.text
                    if o.finished:
                        reasons[o.rid] = o.finish_reason
                if not outs and not eng.has_unfinished():
                    break
            self.last_finish_reasons = [reasons.get(r) or "stop" for r in rids]
        finally:
            for rid in rids:
                eng.abort(rid)          # no-op for finished requests; frees interrupted ones

    def generate(self, prompt, *, truncate: bool = False, **kw):
        """Complete a prompt (str or token ids); a list of prompts is decoded as one batch."""
        batch = isinstance(prompt, list) and bool(prompt) and \
            not isinstance(prompt[0], (int, np.integer))
        if isinstance(prompt, list) and not prompt:
            return []
        prompts = prompt if batch else [prompt]
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

    def chat_stop(self) -> list[str]:
        """Stop strings the model's chat format needs (the plain fallback's turn markers)."""
        from . import chat
        fn = getattr(chat, "chat_stop_strings", None)
        return list(fn(self.file.get("tokenizer.chat_template"))) if fn else []

    def chat(self, messages: list[dict], *, stream: bool = False, **kw):
        """Reply to a conversation; stream=True yields pieces instead of returning the text."""
        ids = self.chat_prompt(messages)
        kw.setdefault("stop", self.chat_stop())
        return self.stream(ids, **kw) if stream else self.generate(ids, **kw)

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        eng = getattr(self, "engine", None)
        if eng is not None:
            eng.close()
        kv = getattr(self, "kv", None)
        if kv is not None:
            kv.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
