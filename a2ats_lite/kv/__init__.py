"""KV cache: storage (where K/V live), selection policies (which positions a decode
step attends) and the host store, composed by KVCache."""
from .cache import KVCache, make_kv_cache  # noqa: F401
from .registry import POLICIES, make_policy, needs_calibration  # noqa: F401
