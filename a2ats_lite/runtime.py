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

import itertools
import os
import time
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from .backend import check_cuda, get_backend
from .config import ModelConfig
from .errors import ClosedError, ContextWarning, DeviceError
from .gguf import GGUFFile
from .prompts import check_context, fit_prompt, token_ids
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


def check_cache_types(backend, k: str, v: str | None) -> None:
    """The K and V cache types (v None: k's), before the model loads: types the backend's
    attention reads (Caps.kv_types)."""
    ok = backend.caps.kv_types
    for what, t in (("K", k), ("V", k if v is None else v)):
        if t not in ok:
            raise ValueError(f"{what} cache type {t!r} is not supported by the {backend.name} "
                             f"backend; choose one of {', '.join(sorted(ok))}")


def check_offload_dir(path, kv: str):
    """The KV offload directory as a str (None: none), checked now: a writable directory,
    for a policy that keeps a host store (a retrieval policy)."""
    if path is None:
        return None
    from .kv import POLICIES
    if kv not in POLICIES or not POLICIES[kv].retrieves:
        raise ValueError(f"kv_offload_dir holds the full K/V store of a retrieval KV policy "
                         f"(a2ats, vq, quest, ...); kv {kv!r} keeps its K/V in memory")
    p = Path(path)
    if not p.is_dir():
        raise ValueError(f"KV offload directory {p} does not exist or is not a directory")
    if not os.access(p, os.W_OK | os.X_OK):
        raise ValueError(f"KV offload directory {p} is not writable")
    return str(p)


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
                 backend_options: dict | None = None, kv_offload_dir=None):
        """sidecar: calibration file for kv='a2ats'/'vq' (default: MODEL.a2ats next to the model).
        max_seqs, kv_budget (bytes), cache_seqs: the engine's limits (see engine/engine.py).
        cache_type_k/_v: K/V storage, llama.cpp's names: 'f16' (default), 'f32', and on the
        CPU 'q8_0' / 'q4_0' (ggml's blocks, read in place by attention); a type the backend
        does not declare (Caps.kv_types) raises ValueError. A retrieval kv policy's host
        store holds the same types (its readers decode only the rows a step selects).
        backend_options: the backend's own settings (cuda: {"sparse": "host"} attends a
        retrieval policy's selected rows in host memory instead of copying them up).
        kv_offload_dir: a retrieval policy's full K/V store lives in an unlinked file there
        (in the page cache, not in the process's memory): contexts beyond RAM. Nothing is
        left behind, whatever ends the process."""
        from .engine import Engine
        from .engine.driver import Driver
        from .kv import make_kv_cache
        from .model import Model

        check_device(device)
        spill = check_offload_dir(kv_offload_dir, kv)      # before the model loads
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
        check_cache_types(self.backend, cache_type_k, cache_type_v)
        with tqdm(total=1, desc="loading model", delay=1.0, disable=not verbose, leave=False) as bar:
            self.model = Model.from_gguf(self.file, self.config, n_batch=n_batch, backend=self.backend)
            bar.update(1)
        self.sidecar = Path(sidecar) if sidecar is not None else None
        self._calib = None          # the sidecar's Calibration, loaded on first need
        self.n_ctx = int(n_ctx or self.config.n_ctx_train)
        if self.n_ctx > self.config.n_ctx_train:      # llama.cpp warns too
            warnings.warn(f"context size {self.n_ctx} is larger than the model's training "
                          f"context {self.config.n_ctx_train}: output past it may degrade",
                          ContextWarning, stacklevel=2)
        self.kv_name = kv
        self.kv = make_kv_cache(kv, self.model.attn_layers, self.n_ctx, backend=self.backend,
                                cache_type=cache_type_k, cache_type_v=cache_type_v,
                                spill_dir=spill, **self.kv_params_for(kv, kv_params or {}))
        if kv_budget is None:
            kv_budget = device_kv_budget(self.backend)
        self.engine = Engine(self.model, self.kv, self.tokenizer, max_seqs=max_seqs,
                             max_step_tokens=n_batch, kv_budget=kv_budget, cache_seqs=cache_seqs)
        self.seed = seed
        self._calls = itertools.count()            # thread-safe under the GIL
        self.driver = Driver(self.engine)          # the engine, shared by every thread's calls
        self._closed = False
        self.timings = Timings(load_s=time.perf_counter() - t0)
        self.last_finish_reasons: list[str] = []

    def kv_params_for(self, kv: str, params: dict) -> dict:
        """params for make_kv_cache(kv): a coded policy gets the sidecar's calibration."""
        from .kv import needs_calibration
        if needs_calibration(kv) and "calib" not in params:
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
    def eval_logits(self, ids) -> np.ndarray:
        """Logits at every position of a fresh sequence: (len(ids), n_vocab) float32."""
        self._check_open()
        ids = token_ids(ids, self.config.n_vocab)
        check_context(len(ids), self.n_ctx, room=0)
        with self.driver.exclusive():
            slot = self.kv.add_sequence()
            try:
                return self.model.forward([np.asarray(ids)], [slot], self.kv, logits="all")[0]
            finally:
                self.kv.remove_sequence(slot)

    # -- generation --------------------------------------------------------
    def sampling_params(self, **kw) -> SamplingParams:
        """Checked SamplingParams for one call (or server request). Without a seed of its own,
        a Runtime made with seed=S gives its n-th call the seed S + n: the same sequence of
        calls gives the same outputs. Structured output: json_schema= (a dict or JSON text),
        grammar= (GBNF, or Lark with `start:`), regex=: the output follows it (one of them;
        an invalid one raises ValueError before any token)."""
        shape = {k: kw.pop(k) for k in ("json_schema", "grammar", "regex") if k in kw}
        if any(v is not None for v in shape.values()):
            from .structured import Constraint
            kw["constraint"] = Constraint.from_request(**shape)
        names = {f.name for f in fields(SamplingParams)}
        unknown = set(kw) - names
        if unknown:
            raise TypeError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
        p = replace(SamplingParams(), **kw)
        n = next(self._calls)
        if p.seed is None and self.seed is not None:
            # same Runtime seed -> same outputs for the same sequence of calls
            p = replace(p, seed=self.seed + n)
        return p

    def _prompt_ids(self, prompt, truncate: bool, max_tokens: int) -> list[int]:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else \
            token_ids(prompt, self.config.n_vocab)
        if truncate:
            ids = fit_prompt(ids, self.n_ctx, max_tokens, self.tokenizer.bos_id)
        check_context(len(ids), self.n_ctx)
        return ids

    def _events(self, prompts: list[list[int]], p: SamplingParams) -> Iterator[tuple[int, str]]:
        """Yield (prompt index, text piece) as tokens are produced; the requests share steps
        (with each other and with other threads' calls). A request that fails raises its
        error here; the call's other requests are aborted."""
        self._check_open()
        t = Timings(load_s=self.timings.load_s)
        self.timings = t

        def on_step(dt: float, info: dict) -> None:
            if info.get("prefill_rows"):
                t.prompt_s += dt
                t.prompt_tokens += info["prefill_rows"]
            else:
                t.gen_s += dt
                t.gen_tokens += info.get("seqs", 0)

        params = [replace(p, seed=None if p.seed is None else p.seed + i) for i in range(len(prompts))]
        rids = self.driver.submit(prompts, params)
        index = {rid: i for i, rid in enumerate(rids)}
        reasons, seen = {}, set()
        for o in self.driver.outputs(rids, on_step):
            if o.rid not in seen:
                seen.add(o.rid)
                t.reused_tokens += o.reused_tokens
            if o.error is not None:
                raise o.error
            if o.text:
                yield index[o.rid], o.text
            if o.finished:
                reasons[o.rid] = o.finish_reason
        self.last_finish_reasons = [reasons.get(r) or "stop" for r in rids]

    def generate(self, prompt, *, truncate: bool = False, **kw):
        """Complete a prompt (str or token ids); a list of prompts is decoded as one batch."""
        batch = isinstance(prompt, list) and bool(prompt) and \
            isinstance(prompt[0], (str, list, tuple, np.ndarray))
        if isinstance(prompt, list) and not prompt:
            return []
        prompts = prompt if batch else [prompt]
        p = self.sampling_params(**kw)
        ids = [self._prompt_ids(x, truncate, p.max_tokens) for x in prompts]
        outs = [""] * len(ids)
        for i, piece in self._events(ids, p):
            outs[i] += piece
        return outs if batch else outs[0]

    def stream(self, prompt, *, truncate: bool = False, **kw) -> Iterator[str]:
        """Yield text pieces of one completion as they are produced (whole UTF-8 characters)."""
        p = self.sampling_params(**kw)
        ids = self._prompt_ids(prompt, truncate, p.max_tokens)
        for _, piece in self._events([ids], p):
            yield piece

    def chat_prompt(self, messages: list[dict], **template_vars) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template (template_vars:
        extra template variables, e.g. tools=[...] in Hugging Face's shape). Message
        contents are read as text: only the template's own markers become control tokens."""
        from .chat import chat_prompt_text
        from .errors import TemplateError
        tok = self.tokenizer
        text, add_bos, spans = chat_prompt_text(
            self.file.get("tokenizer.chat_template"), messages,
            bos_token=tok.token_to_piece(tok.bos_id) if tok.bos_id is not None else "",
            eos_token=tok.token_to_piece(tok.eos_id) if tok.eos_id is not None else "",
            **template_vars)
        if spans is None:
            for i, m in enumerate(messages):
                c = m.get("content") if isinstance(m, dict) else None
                if isinstance(c, str) and tok.has_control_text(c):
                    raise TemplateError(f"message {i} holds control-token text, and this "
                                        f"template changes message contents, so it cannot be "
                                        f"kept as plain text")
        return tok.encode(text, add_bos=add_bos, special=True, plain=spans or ())

    def chat_stop(self, messages=()) -> list[str]:
        """Stop strings the model's chat format needs (the plain fallback's turn markers,
        including those of the conversation's own roles)."""
        from .chat import chat_stop_strings
        return chat_stop_strings(self.file.get("tokenizer.chat_template"), messages)

    def chat(self, messages: list[dict], *, stream: bool = False, **kw):
        """Reply to a conversation; stream=True yields pieces instead of returning the text."""
        ids = self.chat_prompt(messages)
        kw.setdefault("stop", self.chat_stop(messages))
        return self.stream(ids, **kw) if stream else self.generate(ids, **kw)

    # -- lifetime ------------------------------------------------------------
    def close(self) -> None:
        """Free the KV cache; later generate/stream/chat/eval_logits calls raise ClosedError."""
        if getattr(self, "_closed", True):     # closed, or __init__ never finished
            return
        self._closed = True
        with self.driver.exclusive() as eng:
            eng.close()
            self.kv.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError("this Runtime is closed")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
