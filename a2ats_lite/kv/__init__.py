"""KV cache policies. Every policy implements kv.base.KVCache; the forward
pass never knows which one it is talking to."""
from .base import AttnLayer, KVCache, make_kv_cache, POLICIES  # noqa: F401
