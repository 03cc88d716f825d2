"""One request's state through the engine: its tokens, sampler and text."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from ..sampling import Sampler, SamplingError, SamplingParams, StopMatcher


class Status(enum.Enum):
    WAITING = "waiting"       # queued, no KV yet
    PREFILL = "prefill"       # admitted; prompt rows still to run
    DECODE = "decode"         # one new row per step
    FINISHED = "finished"


@dataclass
class Request:
    rid: int
    prompt: list[int]
    params: SamplingParams
    sampler: Sampler
    stop: StopMatcher
    seq: int | None = None           # KV sequence id once admitted
    n_computed: int = 0              # prompt tokens whose KV is cached (reused or run)
    n_reused: int = 0                # of which reused from an earlier sequence
    out: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    finish_reason: str | None = None  # 'stop' | 'length' | 'eos' | 'abort'
    text: str = ""                   # decoded text so far (before stop-string filtering)
    anchor: list[int] = field(default_factory=list)   # last prompt token, decoded as a prefix
    anchor_text: str = ""
    arrival: float = 0.0
    first_token_time: float | None = None
    matcher: object | None = None    # structured.Matcher of params.constraint
    prompt_logprobs: list = field(default_factory=list)   # TokenLogprob per prompt token (echo)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.out

    @property
    def prefill_left(self) -> int:
        return len(self.prompt) - self.n_computed

    def accept(self, tok: int, tokenizer, n_ctx: int) -> str:
        """Record a sampled token; returns the text now safe to emit. Sets finish_reason."""
        p = self.params
        if tok in tokenizer.eog_ids and not p.ignore_eos:
            self.finish_reason = "eos"
            return self.stop.flush()[0]
        self.out.append(tok)
        if self.matcher is not None:
            if not self.matcher.accept(tok):
                raise SamplingError(f"token {tok} breaks the output's constraint: "
                                    f"{self.matcher.error}")
            if self.matcher.is_done():        # the grammar is complete: nothing may follow
                self.finish_reason = "stop"
        # decode after the last prompt token so SentencePiece keeps the first piece's leading space
        if not self.anchor:
            self.anchor = self.prompt[-1:]
            self.anchor_text = tokenizer.decode(self.anchor)
        full = tokenizer.decode(self.anchor + self.out)[len(self.anchor_text):]
        piece = ""
        if not full.endswith("\ufffd"):  # hold back incomplete UTF-8 sequences
            piece, self.text = full[len(self.text):], full
        text, stopped = self.stop.feed(piece)
        if stopped:
            self.finish_reason = "stop"
        elif self.finish_reason is None and (len(self.out) >= p.max_tokens
                                             or len(self.prompt) + len(self.out) >= n_ctx):
            self.finish_reason = "length"
        if self.finish_reason and not stopped:
            text += self.stop.flush()[0]
        return text


def make_request(rid: int, prompt: list[int], params: SamplingParams, n_vocab: int,
                 eog_ids, arrival: float, bridge=None) -> Request:
    """bridge: the model's structured.TokenizerBridge, for a request with a constraint
    (its matcher is made here: a grammar that does not fit the vocabulary fails now)."""
    matcher = None if params.constraint is None else params.constraint.matcher(bridge)
    return Request(rid, list(prompt), params, Sampler(params, n_vocab, eog_ids=eog_ids),
                   StopMatcher(list(params.stop or ())), arrival=arrival, matcher=matcher)
