"""Continuous batching (nano-vllm's shape): one file per role.

    sequence.py   a request's state: prompt, sampler, output tokens, text, stops
    scheduler.py  who runs in the next step (FCFS, token budget, KV memory admission)
    engine.py     Engine: add_request / step / abort; step() = schedule, run, postprocess
"""
from .engine import Engine, RequestOutput  # noqa: F401
from .sequence import Request  # noqa: F401
