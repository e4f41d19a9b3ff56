"""The HTTP edge's middleware: every error in the OpenAI envelope, and the one bearer-key check.

Every error, ours, the engine's, aiohttp's own 404/405/413 and anything unexpected, is turned into the
OpenAI envelope `{"error": {"message", "type", "param", "code"}}` (Anthropic's `{"type": "error", "error":
{"type", "message"}}` on `/v1/messages...`, by route) with its status (and `Retry-After` /
`Allow` headers) in exactly one place, `error_middleware`; the agent never answers a bare traceback.
Foreign exceptions are translated by class, looked up along the MRO (as starlette does). Requests
aiohttp cannot even parse never reach a middleware: `mesh.server.connections` answers those, in the same
envelope. `body_deadline_middleware` (outermost) reads every body within a deadline (408 past it).

`bearer_check` is the one comparison of an `Authorization: Bearer <key>` header against configured keys
(constant time, every key compared): client API keys on `/v1` (`authorize_client`), the client's key
carried by a peer on an open mesh, the mesh key on the changing operator endpoints.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Literal

import orjson
from aiohttp import web
from aiohttp.typedefs import Middleware

from helexa.engine.errors import EngineError
from helexa.mesh.errors import (
    HelexaError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    Unauthorized,
    error_envelope,
    from_engine_error,
)
from helexa.mesh.server import anthropic_wire
from helexa.mesh.server.appkeys import API_KEYS, CLIENT_AUTHORIZED

logger = logging.getLogger(__name__)

__all__ = [
    "JSON_CONTENT_TYPE",
    "Handler",
    "authorize_client",
    "bearer_check",
    "body_deadline_middleware",
    "error_middleware",
    "error_response",
    "json_body_response",
    "to_helexa_error",
]

JSON_CONTENT_TYPE: Final = "application/json"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _from_http_exception(exc: web.HTTPException) -> HelexaError:
    if exc.status == 404:
        return NotFound("no such route")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(
            f"method {exc.method} not allowed here", allowed=tuple(sorted(exc.allowed_methods))
        )
    if exc.status == 413:
        return PayloadTooLarge(exc.text or None)
    err = HelexaError(exc.reason)
    err.status = exc.status
    err.type = "invalid_request_error" if exc.status < 500 else "server_error"
    err.code = None
    return err


def _from_payload(exc: BaseException) -> HelexaError:
    # The body broke off or was malformed (bad chunking, a short Content-Length): the client's doing.
    # aiohttp's message quotes the offending bytes, so it is not repeated.
    logger.debug("malformed request body: %s", type(exc.__cause__ or exc).__name__)
    return InvalidRequest(
        "malformed request body (bad chunked encoding, or shorter than its length)", code="malformed_request"
    )


def _from_unexpected(exc: BaseException) -> HelexaError:
    logger.error("unexpected error: %r", exc, exc_info=exc)
    return InternalError()


def _from_engine(exc: BaseException) -> HelexaError:
    assert isinstance(exc, EngineError)
    return from_engine_error(exc)


def _from_http(exc: BaseException) -> HelexaError:
    assert isinstance(exc, web.HTTPException)
    return _from_http_exception(exc)


# Looked up along the exception's MRO (as starlette does): the most specific translator wins.
_TRANSLATORS: Final[dict[type[BaseException], Callable[[BaseException], HelexaError]]] = {
    EngineError: _from_engine,
    web.HTTPException: _from_http,
    web.RequestPayloadError: _from_payload,
    Exception: _from_unexpected,
}


def to_helexa_error(exc: Exception) -> HelexaError:
    """The client-facing error for any exception (unexpected ones are logged with their traceback)."""
    if isinstance(exc, HelexaError):
        return exc
    for cls in type(exc).__mro__:
        translate = _TRANSLATORS.get(cls)
        if translate is not None:
            return translate(exc)
    return _from_unexpected(exc)  # pragma: no cover - Exception is always in the MRO


def error_response(err: HelexaError, path: str = "") -> web.Response:
    """The error answer; on the Anthropic routes (`path`) in Anthropic's envelope."""
    anthropic = anthropic_wire.is_anthropic_path(path)
    return web.Response(
        status=err.status,
        body=anthropic_wire.error_body(err, path) if anthropic else orjson.dumps(error_envelope(err)),
        content_type=JSON_CONTENT_TYPE,
        headers=err.headers(),
    )


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every error into the OpenAI envelope with its status (and Retry-After / Allow headers)."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:  # redirects and the like are responses, not errors
            raise
        return error_response(to_helexa_error(exc), request.path)
    except Exception as exc:
        return error_response(to_helexa_error(exc), request.path)


def body_deadline_middleware(timeout_s: float) -> Middleware:
    """Read every request body in full within `timeout_s` of its headers, before any handler (it goes
    first, outside even the peer authentication): a client trickling its body gets 408 and the connection
    closed. Handlers then get the body from aiohttp's cache (`request.read()`); `client_max_size` still
    bounds it (413)."""

    @web.middleware
    async def body_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.can_read_body:
            try:
                async with asyncio.timeout(timeout_s):
                    await request.read()
            except TimeoutError:
                logger.info(
                    "request body from %s did not arrive within %.0f s: 408", request.remote, timeout_s
                )
                err = HelexaError(
                    f"the request body did not arrive within {timeout_s:g} s", code="request_timeout"
                )
                err.status, err.type = 408, "invalid_request_error"
                return _closing(error_response(err, request.path))
            except (web.HTTPException, web.RequestPayloadError) as exc:
                return _closing(error_response(to_helexa_error(exc), request.path))
        return await handler(request)

    return body_deadline


def _closing(response: web.Response) -> web.Response:
    response.force_close()
    return response


def json_body_response(body: bytes, status: int = 200) -> web.Response:
    """An already-encoded JSON body."""
    return web.Response(body=body, status=status, content_type=JSON_CONTENT_TYPE)


BearerResult = Literal["ok", "missing", "invalid"]


def bearer_check(header: str, keys: Sequence[str]) -> BearerResult:
    """`header` (an `Authorization` value) against `keys`: "missing" when it is not a bearer token,
    "invalid" when no key matches. Compares against every key, so timing says nothing about which one
    is close."""
    scheme, _, token = header.partition(" ")
    given = token.strip().encode()
    if scheme.lower() != "bearer" or not given:
        return "missing"
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key.encode())
    return "ok" if matched else "invalid"


def authorize_client(request: web.Request) -> None:
    """Check `Authorization: Bearer <key>` (or Anthropic's `x-api-key: <key>`) against the configured
    client keys (none configured: open)."""
    keys = request.app.get(API_KEYS)
    if not keys or request.get(CLIENT_AUTHORIZED, False):
        return
    header = request.headers.get("Authorization", "")
    if not header and (api_key := request.headers.get("x-api-key")):
        header = f"Bearer {api_key}"
    result = bearer_check(header, keys)
    if result == "missing":
        raise Unauthorized()
    if result == "invalid":
        raise Unauthorized("invalid API key")
