"""Errors raised by engines. The HTTP edge maps them to OpenAI error envelopes.

EngineError
├── LoadError                 the model could not be loaded
│   ├── ModelSourceError      structural: missing/bad weights or config (never retried)
│   ├── TransientLoadError    network or download failure (retried with backoff)
│   └── InsufficientMemory    it does not fit on the chosen devices
├── RequestError              the request itself is bad (a 4xx; the model stays healthy)
│   └── ContextLengthExceeded prompt (+ max_tokens) longer than the model's context
└── EngineFault               the model broke (device fault, worker died): only this model is
                              marked failed and unloaded; it can be loaded again
"""

from __future__ import annotations


class EngineError(Exception):
    """Base of every engine error."""


class LoadError(EngineError):
    pass


class ModelSourceError(LoadError):
    pass


class TransientLoadError(LoadError):
    pass


class InsufficientMemory(LoadError):
    pass


class RequestError(EngineError):
    """A client-caused problem. `param` names the offending request field when known."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class ContextLengthExceeded(RequestError):
    def __init__(self, message: str, *, param: str | None = "messages") -> None:
        super().__init__(message, param=param, code="context_length_exceeded")


class EngineFault(EngineError):
    pass
