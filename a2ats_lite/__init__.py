"""a2ats-lite: a llama.cpp-style GGUF runtime with A2ATS KV cache retrieval."""
from .errors import (A2ATSError, ContextOverflowError, DeviceError, ModelError,  # noqa: F401
                     NativeError, SidecarError, TemplateError)
from .gguf import GGUFFile  # noqa: F401

__version__ = "0.1.0"


def __getattr__(name):
    # Heavy pieces load on first use so `import a2ats_lite` stays fast.
    if name == "Tokenizer":
        from .tokenizer import Tokenizer
        return Tokenizer
    if name == "Runtime":
        from .runtime import Runtime
        return Runtime
    if name == "render_chat":
        from .chat import render_chat
        return render_chat
    if name == "ModelConfig":
        from .config import ModelConfig
        return ModelConfig
    raise AttributeError(f"module 'a2ats_lite' has no attribute {name!r}")
