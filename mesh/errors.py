"""Errors the agent answers clients with, each carrying its HTTP status and OpenAI error fields.

    HelexaError                    500 server_error      base; never raised directly
    ├── InvalidRequest             400 invalid_request_error   names the bad field in `param`
    ├── Unauthorized               401 invalid_request_error   code invalid_api_key
    ├── NotFound                   404 invalid_request_error   no such route
    │   └── ModelNotFound          404 invalid_request_error   code model_not_found, param model
    ├── MethodNotAllowed           405 invalid_request_error
    ├── PayloadTooLarge            413 invalid_request_error
    ├── Overloaded                 429 (or 503) rate_limit_error   + Retry-After
    ├── ModelUnavailable           503 server_error      + Retry-After where waiting helps; `reason`
    │   └── ModelLoadFailed        503 server_error      the load on the chosen node failed
    ├── UpstreamError              502 server_error      a peer failed while serving a forwarded request
    └── InternalError              500 server_error      anything unexpected; the message is generic
        └── ModelFault             500 server_error      the model broke mid-request (EngineFault)

Every message is client-safe: it never carries stack traces, file paths or internal hostnames. Callers
raise these; `mesh.server.middleware.error_middleware` turns them into responses (one place), and after
a stream has started the handler sends `mesh.sse.error_event(exc)` instead. Foreign exceptions are
translated at the boundary: `from_engine_error` maps `engine.errors` (RequestError → 400 with its param
and code, EngineFault → 500 "model failed", load errors → 503).
"""

from __future__ import annotations

import logging
import math

from helexa.engine import errors as engine_errors
from helexa.mesh.timing import DEFAULT_RETRY_AFTER_S

logger = logging.getLogger(__name__)


class HelexaError(Exception):
    """Base of every client-facing error. Subclasses set the class attributes."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    default_message: str = "internal error"

    def __init__(
        self,
        message: str | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.message = message if message is not None else self.default_message
        super().__init__(self.message)
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        """Extra response headers (`Retry-After` in whole seconds, rounded up, when set)."""
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r}, code={self.code!r})"


class InvalidRequest(HelexaError):
    status = 400
    type = "invalid_request_error"
    default_message = "invalid request"


class Unauthorized(HelexaError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"
    default_message = "missing or invalid API key (send 'Authorization: Bearer <key>')"


class NotFound(HelexaError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"
    default_message = "no such route"


class ModelNotFound(NotFound):
    code = "model_not_found"
    default_message = "model not found"

    def __init__(self, model: str, *, message: str | None = None) -> None:
        super().__init__(message or f"The model '{model}' does not exist in the catalogue", param="model")
        self.model = model


class MethodNotAllowed(HelexaError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"
    default_message = "method not allowed"

    def __init__(self, message: str | None = None, *, allowed: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.allowed = allowed

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(self.allowed)} if self.allowed else {}


class PayloadTooLarge(HelexaError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"
    default_message = "request body too large"


class Overloaded(HelexaError):
    """Too many requests queued; the SDKs retry 429 and honour Retry-After."""

    status = 429
    type = "rate_limit_error"
    code = "overloaded"
    default_message = "the agent is overloaded, retry later"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after_s: float | None = DEFAULT_RETRY_AFTER_S,
        status: int = 429,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.status = status


class ModelUnavailable(HelexaError):
    """The model exists but cannot be served now. `reason` is a short machine word
    (`infeasible`, `draining`, `load_failed`, `no_forwarder`, ...)."""

    status = 503
    type = "server_error"
    code = "model_unavailable"
    default_message = "model unavailable"

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: str = "unavailable",
        retry_after_s: float | None = DEFAULT_RETRY_AFTER_S,
        code: str | None = None,
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s, param="model", code=code)
        self.reason = reason


class ModelLoadFailed(ModelUnavailable):
    code = "model_load_failed"
    default_message = "the model failed to load"

    def __init__(
        self,
        message: str | None = None,
        *,
        reason: str = "load_failed",
        retry_after_s: float | None = DEFAULT_RETRY_AFTER_S,
    ) -> None:
        super().__init__(message, reason=reason, retry_after_s=retry_after_s)


class UpstreamError(HelexaError):
    status = 502
    type = "server_error"
    code = "upstream_error"
    default_message = "the node serving this model failed"


class InternalError(HelexaError):
    status = 500
    type = "server_error"
    code = "internal_error"
    default_message = "internal error"


class ModelFault(InternalError):
    code = "model_failed"
    default_message = "the model failed while generating; it will be reloaded on the next request"


def error_envelope(exc: HelexaError) -> dict[str, dict[str, str | None]]:
    """The OpenAI error body: `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}


def from_engine_error(exc: engine_errors.EngineError) -> HelexaError:
    """Translate an engine error into the client-facing hierarchy.

    Request errors keep their (client-caused, client-safe) message; load errors and faults get a
    generic message, since theirs may carry paths or device details (they are logged in full).
    """
    if isinstance(exc, engine_errors.RequestError):
        return InvalidRequest(str(exc) or "invalid request", param=exc.param, code=exc.code)
    if isinstance(exc, engine_errors.InsufficientMemory):
        logger.warning("load failed, not enough memory: %s", exc)
        return ModelUnavailable(
            "the model does not fit in the memory available now", reason="insufficient_memory"
        )
    if isinstance(exc, engine_errors.TransientLoadError):
        logger.warning("load failed transiently: %s", exc)
        return ModelLoadFailed("the model failed to load (transient; retry later)")
    if isinstance(exc, engine_errors.ModelSourceError):
        logger.error("load failed, bad model source: %s", exc)
        return ModelLoadFailed(
            "the model failed to load: its weights or config are missing or invalid (see the agent log)",
            reason="bad_source",
            retry_after_s=None,
        )
    if isinstance(exc, engine_errors.LoadError):
        logger.error("load failed: %s", exc)
        return ModelLoadFailed()
    if isinstance(exc, engine_errors.EngineFault):
        logger.error("model fault: %s", exc)
        return ModelFault()
    logger.error("unexpected engine error: %r", exc)
    return InternalError()
