"""The HTTP server's own protections, under the application: how long a connection may idle or take to
send a request, how many may be open, what happens to a client that stops reading, and how a request
aiohttp cannot even parse is answered.

    limits = ServerLimits.for_process(config)            # the bounds, from `mesh.timing` and the config
    guard = ConnectionGuard(runner.server, limits)         # after `runner.setup()`
    await GuardedSite(runner, sock, guard).start()

- **Idle and slow headers**: aiohttp's keep-alive timer (`idle_timeout_s`) runs from the moment a
  connection opens and after every response; a connection with no complete request by then is closed.
- **Slow body**: `body_deadline_middleware` (the app's outermost middleware) reads every request body
  within `body_timeout_s` before any handler sees it, or answers 408.
- **Stalled reader**: when the transport's send buffer stays full (`pause_writing` without
  `resume_writing`) for `write_stall_timeout_s`, the connection is aborted: the handler is cancelled
  (`handler_cancellation=True`), which ends the request and releases its model reservation. Accepted
  sockets get a bounded send buffer (`send_buffer_bytes`), so the buffers fill, and the timer starts,
  soon after a client stops reading rather than megabytes later.
- **Connection limit**: past `max_connections` open connections a new one is answered
  `503 + Retry-After` in the OpenAI envelope and closed, so a flood cannot take every file descriptor.
- **Malformed requests** (oversize or NUL-carrying headers, bad chunking, an unknown method): answered
  in the OpenAI envelope (aiohttp answers plain text) and logged as one line naming the client and what
  was wrong, never the offending bytes (aiohttp logged a traceback quoting them, an oversize
  `Authorization` header included), once per client, then at debug.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import resource
import socket
from dataclasses import dataclass
from typing import Any, Final

import orjson
from aiohttp import http_exceptions, web
from aiohttp.web_protocol import _ErrInfo
from aiohttp.web_request import BaseRequest

from helexa.mesh import timing
from helexa.mesh.config import AgentConfig
from helexa.mesh.errors import HelexaError, InternalError, Overloaded, error_envelope
from helexa.mesh.logs import QuietLog
from helexa.mesh.server.middleware import error_response

logger = logging.getLogger(__name__)

__all__ = ["ConnectionGuard", "GuardedRequestHandler", "GuardedSite", "ServerLimits", "protocol_error"]

# aiohttp's own limits on a request line and on one header line (its defaults, named here).
MAX_REQUEST_LINE_BYTES: Final = 8190
MAX_HEADER_BYTES: Final = 8190


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerLimits:
    """The bounds one agent's HTTP server runs with (`mesh.timing` has why each default is what it is)."""

    idle_timeout_s: float = timing.HTTP_IDLE_TIMEOUT_S
    body_timeout_s: float = timing.REQUEST_BODY_TIMEOUT_S
    write_stall_timeout_s: float = timing.WRITE_STALL_TIMEOUT_S
    send_buffer_bytes: int | None = timing.HTTP_SEND_BUFFER_BYTES
    linger_s: float = timing.HTTP_LINGER_S
    max_connections: int = timing.MAX_CONNECTIONS
    refused_wait_s: float = timing.REFUSED_CONNECTION_WAIT_S

    @classmethod
    def for_process(cls, config: AgentConfig, *, fd_limit: int | None = None) -> ServerLimits:
        """The configured bounds; connections capped at half the file-descriptor limit (`fd_limit`,
        default the process's soft limit), the other half left to peers, models and the rest."""
        limit = fd_limit if fd_limit is not None else _fd_soft_limit()
        max_connections = config.max_connections
        if limit is not None and limit // 2 < max_connections:
            max_connections = max(1, limit // 2)
            logger.info(
                "accepting at most %d connections, not %d: half the file-descriptor limit (%d; raise"
                " LimitNOFILE or ulimit -n for more)",
                max_connections,
                config.max_connections,
                limit,
            )
        return cls(idle_timeout_s=config.http_idle_timeout_s, max_connections=max_connections)


def _fd_soft_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


# --- malformed requests ---------------------------------------------------------------------------------

# The first words of aiohttp's parser messages ("Invalid header value char", "Bad status line") are safe
# to repeat; what follows them (the offending bytes) never is.
_SAFE_REASON = re.compile(r"[A-Za-z][A-Za-z0-9 ,-]{2,79}")


def _reason_of(exc: BaseException | None) -> str | None:
    message = getattr(exc, "message", None)
    if not isinstance(message, str):
        return None
    first = message.strip().split("\n", 1)[0].split(":", 1)[0].strip()
    if not _SAFE_REASON.fullmatch(first):
        return None
    return first[:1].lower() + first[1:]


def protocol_error(status: int, exc: BaseException | None) -> HelexaError:
    """The client-facing error for a request aiohttp could not parse (never quoting its bytes)."""
    if isinstance(exc, http_exceptions.LineTooLong):
        message = (
            f"a header or the request line is too long (at most {MAX_HEADER_BYTES} bytes each); the request"
            " was not read"
        )
        code = "header_too_large"
    elif isinstance(exc, http_exceptions.BadHttpMethod):
        message, code = "unknown or malformed HTTP method", "bad_method"
    else:
        reason = _reason_of(exc)
        message = f"malformed HTTP request: {reason}" if reason else "malformed HTTP request"
        code = "malformed_request"
    err = HelexaError(message, code=code)
    err.status = status
    err.type = "invalid_request_error"
    return err


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's connection handler with the write stall timer, the connection count and the OpenAI
    envelope on parse errors (see the module doc)."""

    def __init__(
        self, manager: web.Server, *, loop: asyncio.AbstractEventLoop, guard: ConnectionGuard, **kw: Any
    ):
        super().__init__(manager, loop=loop, **kw)
        self._guard = guard
        self._stall: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        size = self._guard.limits.send_buffer_bytes
        sock = transport.get_extra_info("socket")
        if size is not None and sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_stall_timer()
        self._guard.open -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._end_broken_body()

    def _end_broken_body(self) -> None:
        """aiohttp's parser queues a parse error found inside a request's body (bad chunking) as the
        connection's next message and leaves that body waiting for bytes that never come: end the body with
        the error now (the handler answers 400) rather than at the body deadline (408). This reads aiohttp
        internals defensively: should they change, the body deadline still ends such a request."""
        queued = getattr(self, "_messages", None)
        request = getattr(self, "_current_request", None)
        if not queued or request is None or not isinstance(queued[-1][0], _ErrInfo):
            return
        body = request.content
        if not body.is_eof() and body.exception() is None:
            body.set_exception(web.RequestPayloadError("malformed request body"))
            body.feed_eof()  # nothing more will be read: aiohttp must not linger over it afterwards

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._stall is None:
            self._stall = self._loop.call_later(
                self._guard.limits.write_stall_timeout_s, self._reader_stalled
            )

    def resume_writing(self) -> None:
        self._stop_stall_timer()
        super().resume_writing()

    def _stop_stall_timer(self) -> None:
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None

    def _reader_stalled(self) -> None:
        self._stall = None
        transport = self.transport
        if transport is None:
            return
        remote = _remote(transport)
        self._guard.log(
            ("stalled", remote),
            "client %s read nothing for %.0f s: its connection is closed (a request it had running is"
            " ended, its model released)",
            remote,
            self._guard.limits.write_stall_timeout_s,
        )
        self._guard.stalled += 1
        transport.abort()  # connection_lost → the handler is cancelled → its reservation is released

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to a request it could not parse, or to an exception no middleware caught: the
        OpenAI envelope, and one log line that never quotes the request's bytes."""
        if request.writer.output_size > 0:
            raise ConnectionError("response is sent already, cannot send another response with the error")
        if status >= 500:
            if status == 500:
                logger.error("unexpected error serving %s %s", request.method, request.path, exc_info=exc)
            err: HelexaError = InternalError()
            err.status = status
        else:
            err = protocol_error(status, exc)
            remote = request.remote or "?"
            self._guard.log(
                ("malformed", remote),
                "refused a malformed request from %s: %s (%s)",
                remote,
                err.message,
                type(exc).__name__ if exc is not None else status,
            )
        response = error_response(err)
        response.force_close()
        return response


def _remote(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"


class _Refusal(asyncio.Protocol):
    """A connection over the limit: answered 503 + Retry-After (when its request arrives, or after a
    moment without one) and closed; nothing of it is parsed."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._guard.limits.refused_wait_s, self._answer)

    def data_received(self, data: bytes) -> None:
        self._answer()

    def eof_received(self) -> bool:
        self._answer()
        return False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def _answer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport, self._transport = self._transport, None
        if transport is not None and not transport.is_closing():
            transport.write(self._guard.refusal)
            transport.close()


class ConnectionGuard:
    """The protocol factory of a `GuardedSite`: a `GuardedRequestHandler` per connection while fewer than
    `limits.max_connections` are open, a refusal past that. Counts what it did, for tests and logs."""

    def __init__(self, server: web.Server, limits: ServerLimits, **handler_kwargs: Any) -> None:
        self.server = server
        self.limits = limits
        self.open = 0
        self.refused = 0
        self.stalled = 0
        self._quiet = QuietLog(quiet_s=timing.PEER_LOG_QUIET_S)
        self._handler_kwargs: dict[str, Any] = {
            "keepalive_timeout": limits.idle_timeout_s,
            "lingering_time": limits.linger_s,
            "max_line_size": MAX_REQUEST_LINE_BYTES,
            "max_field_size": MAX_HEADER_BYTES,
            "access_log": None,
            **handler_kwargs,
        }
        self.refusal = _refusal_bytes(limits.max_connections)

    def log(self, key: tuple[str, str], message: str, *args: object) -> None:
        """Warn once per (kind, client) in a while, then at debug: a flood must not flood the log."""
        logger.log(self._quiet.level(key), message, *args)

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limits.max_connections:
            self.refused += 1
            self.log(
                ("refused", "*"),
                "refusing connections: %d are open, the most this agent accepts (max_connections)",
                self.open,
            )
            return _Refusal(self)
        loop = asyncio.get_running_loop()
        handler = GuardedRequestHandler(self.server, loop=loop, guard=self, **self._handler_kwargs)
        # Counted now, not at connection_made: a burst of accepts creates many protocols before the first
        # of them is connected. Every transport made ends in connection_lost, which uncounts it.
        self.open += 1
        return handler


def _refusal_bytes(max_connections: int) -> bytes:
    err = Overloaded(
        f"this agent has {max_connections} connections open, the most it accepts; retry shortly",
        status=503,
        retry_after_s=1.0,
    )
    err.code = "too_many_connections"
    body = orjson.dumps(error_envelope(err))
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json\r\n"
        f"Retry-After: {err.headers()['Retry-After']}\r\n"
        "Connection: close\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class GuardedSite(web.BaseSite):
    """`web.SockSite` over an already bound socket, with a `ConnectionGuard` as its protocol factory."""

    def __init__(self, runner: web.BaseRunner, sock: socket.socket, guard: ConnectionGuard) -> None:
        super().__init__(runner, backlog=1024)
        self._sock = sock
        self._guard = guard
        host, port = sock.getsockname()[:2]
        self._name = f"http://{host}:{port}"

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._guard, sock=self._sock, backlog=self._backlog)
