"""The package's exception types: one base per kind of problem, each message
names the file (or input) and the problem, so the CLI can print one line."""


class A2ATSError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelError(A2ATSError):
    """A model file is missing, malformed, truncated or unsupported."""

    def __init__(self, path, problem: str):
        self.path = str(path) if path is not None else None
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class NativeError(A2ATSError):
    """The native library refused its arguments (bad type, size or index)."""


class ContextOverflowError(A2ATSError, ValueError):
    """A sequence would exceed the context size."""


class CapacityError(A2ATSError):
    """A request can never fit the engine's memory budget (KV cache)."""


class DeviceError(A2ATSError):
    """The requested device (e.g. cuda) is not usable here."""


class TemplateError(A2ATSError):
    """A chat template failed to render or tried something unsafe."""


class SidecarError(A2ATSError):
    """An A2ATS calibration sidecar is missing, corrupted or for another model."""


class TokenizerError(A2ATSError, ValueError):
    """A token id or text the tokenizer cannot handle (out of the vocabulary, not an integer)."""


class GrammarError(A2ATSError, ValueError):
    """An invalid or too costly JSON schema, grammar or regex for constrained decoding."""


class ToolError(A2ATSError, ValueError):
    """Invalid `tools` / `tool_choice` or tool-call history in a chat request."""


class EmptyPromptError(A2ATSError, ValueError):
    """A request without a single prompt token."""


class ClosedError(A2ATSError, RuntimeError):
    """A Runtime (or engine) used after close()."""


class ContextWarning(UserWarning):
    """A context size past the model's training context (allowed, as llama.cpp allows it)."""
