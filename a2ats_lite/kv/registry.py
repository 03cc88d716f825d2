"""The KV policies by name: make_policy(name, **params), and what a name needs."""
from __future__ import annotations

from .coded import A2ATS, VQ
from .policies import Oracle, Policy, Quest, Window, WRoPE

POLICIES = {p.name: p for p in (Policy, Window, Oracle, WRoPE, Quest, A2ATS, VQ)}


def needs_calibration(name: str) -> bool:
    """Whether policy `name` needs a calibration sidecar (its `calib` parameter)."""
    return name in POLICIES and POLICIES[name].needs_calibration


def make_policy(name: str, **params) -> Policy:
    if name not in POLICIES:
        raise ValueError(f"unknown kv policy {name!r}; choose one of {', '.join(sorted(POLICIES))}")
    if name == "dense":
        if params:
            raise ValueError(f"kv policy 'dense' takes no parameters, got {', '.join(sorted(params))}")
        return Policy()
    return POLICIES[name](**params)
