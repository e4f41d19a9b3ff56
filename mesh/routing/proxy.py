"""Forwarding a client request to the peer agent that serves it: byte passthrough with aiohttp.

    resp = await forward(request, session=session, target=PeerAddr(...), body=raw_body)

- The request body and the response body pass through as bytes (no re-serialisation); the response is
  streamed chunk by chunk as it arrives, so SSE token streams keep their timing.
- Timeouts bound *connect*, the *start* of the response (`start_timeout_s`: a serving agent answers, or
  starts a keep-alive response, within a second) and *stall* (no bytes for `stall_timeout_s`), never the
  total: a long answer is never cut while it is still flowing.
- `X-Helexa-Forwarded: 1` is set so the target serves locally and never routes again; with a key the
  request is signed for the target's binding (`mesh.gossip.auth`), and a peer that restarted since its
  record was read (a signed challenge from the same node id) gets it once more, bound to its new run.
  The client's own `Authorization` / `x-api-key` (and cookies) never go upstream.
- `deferred=True` (non-streamed requests) asks the peer for a deferred answer (`mesh.routing.peer_client`:
  keep-alive spaces, then the real status and body), which is buffered and answered with its real
  status: such a hop is never silent, so the stall timeout finds a frozen peer in seconds.
- Failures before anything reached the client raise typed errors the caller maps: `PeerUnreachable`
  (could not connect: nothing ran there, try the next candidate), `PeerNoResponse` (connected, but no
  response began within `start_timeout_s`, or the connection failed before one did: frozen or gone; also
  safe to try the next candidate) and `PeerFailed` (the response began, then the peer failed or stalled
  before anything reached the client). `PeerRefused` when the peer answered with one of the
  `refuse_statuses` the caller asked to handle itself (e.g. 503 "no room": next candidate).
- After the response began: a peer that dies or stalls mid-stream gives an SSE client a final
  `data: {"error": ...}` event and a closed stream at once; a non-SSE client gets its connection closed
  (a truncated body, which HTTP clients report as an error).
- A client that disconnects (the handler is cancelled, or a write fails) closes the upstream connection,
  which cancels the work on the serving agent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

from helexa.mesh import sse
from helexa.mesh.fleet.codec import dumps
from helexa.mesh.gossip.auth import ANY_TARGET, NONCE_HEADER, MeshAuth, binding_node
from helexa.mesh.gossip.transport import PeerAddr
from helexa.mesh.routing.peer_client import DEFERRED_HEADER, FORWARDED_HEADER
from helexa.mesh.timing import PEER_RESPONSE_START_TIMEOUT_S, PROXY_CONNECT_TIMEOUT_S, PROXY_STALL_TIMEOUT_S

log = logging.getLogger(__name__)

__all__ = [
    "FORWARDED_HEADER",
    "PeerFailed",
    "PeerNoResponse",
    "PeerRefused",
    "PeerUnreachable",
    "ProxyError",
    "forward",
]

# The most a deferred (buffered) answer may hold: far above any chat completion, bounded all the same.
MAX_DEFERRED_BYTES = 64 * 1024 * 1024
# Headers of a deferred answer passed on to the client (everything else is the hop's own).
_DEFERRED_HEADERS = frozenset({"content-type", "retry-after", "allow"})
# A challenge or refusal body is a small JSON envelope.
_MAX_REFUSAL_BYTES = 64 * 1024


# Hop-by-hop headers (RFC 9110 §7.6.1) and the ones the proxy recomputes.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        "Content-Encoding",
    )
)
# Never forwarded upstream: the client's API key is for the entry agent; peers trust the mesh key.
_DROP_UPSTREAM = frozenset(
    {"authorization", "x-api-key", "cookie", FORWARDED_HEADER.lower(), DEFERRED_HEADER.lower()}
)


class ProxyError(Exception):
    """Forwarding failed before any byte reached the client."""

    def __init__(self, peer: PeerAddr, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason


class PeerUnreachable(ProxyError):
    """Could not connect (refused, unroutable, connect timeout): safe to try the next candidate."""


class PeerNoResponse(ProxyError):
    """Connected, but no response began (frozen, wedged or gone): safe to try the next candidate."""


class PeerFailed(ProxyError):
    """The response began, then the peer failed or stalled before anything reached the client."""


class PeerRefused(ProxyError):
    """The peer answered with a status the caller handles itself (`refuse_statuses`)."""

    def __init__(self, peer: PeerAddr, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        super().__init__(peer, f"HTTP {status}")
        self.status = status
        self.body = body
        self.headers = dict(headers)


def _upstream_headers(request: web.Request) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in request.headers.items():
        lk = k.lower()
        if lk not in _HOP_BY_HOP and lk not in _DROP_UPSTREAM:
            out.add(k, v)
    out[FORWARDED_HEADER] = "1"
    return out


def _is_sse(resp: aiohttp.ClientResponse) -> bool:
    return resp.content_type == "text/event-stream"


def _sse_error(message: str) -> bytes:
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": "peer_failed"}}
    return sse.event(dumps(body))


async def _open(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    body: bytes,
    headers: CIMultiDict[str],
    *,
    target: PeerAddr,
    client_timeout: aiohttp.ClientTimeout,
    start_timeout_s: float,
) -> aiohttp.ClientResponse:
    """Send the request; returns once the response headers are in. Maps every failure to a `ProxyError`."""
    try:
        async with asyncio.timeout(start_timeout_s):
            return await session.request(
                method, url, data=body, headers=headers, timeout=client_timeout, allow_redirects=False
            )
    except aiohttp.ClientConnectorError as e:  # refused, unroutable, DNS
        raise PeerUnreachable(target, f"cannot connect: {e.os_error or e}") from e
    except aiohttp.ConnectionTimeoutError as e:
        raise PeerUnreachable(target, "connect timeout") from e
    except (TimeoutError, aiohttp.ServerTimeoutError) as e:
        raise PeerNoResponse(target, f"no response within {start_timeout_s:g} s") from e
    except aiohttp.ClientError as e:
        raise PeerNoResponse(target, f"failed before responding: {type(e).__name__}: {e}") from e


async def _read(upstream: aiohttp.ClientResponse, target: PeerAddr, limit: int, what: str) -> bytes:
    """The whole body (at most `limit` bytes); `PeerFailed` if the peer fails or stalls meanwhile."""
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in upstream.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise PeerFailed(target, f"{what} larger than {limit} bytes")
            chunks.append(chunk)
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
        reason = "stalled" if isinstance(e, TimeoutError) else type(e).__name__
        raise PeerFailed(target, f"failed during {what}: {reason}") from e
    return b"".join(chunks)


def _deferred_answer(data: bytes, target: PeerAddr) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of a deferred answer: keep-alive spaces, a JSON line, the body."""
    meta_line, _, payload = data.lstrip(b" \t\r\n").partition(b"\n")
    try:
        meta: Any = orjson.loads(meta_line)
    except orjson.JSONDecodeError:
        meta = None
    status = meta.get("status") if isinstance(meta, dict) else None
    raw_headers = meta.get("headers") if isinstance(meta, dict) else None
    if not isinstance(status, int) or not 200 <= status <= 599 or not isinstance(raw_headers, dict):
        raise PeerFailed(target, "malformed deferred answer")
    headers = {
        str(k): str(v)
        for k, v in raw_headers.items()
        if str(k).lower() in _DEFERRED_HEADERS and isinstance(v, str) and "\n" not in v and "\r" not in v
    }
    return status, headers, payload


def _buffered(upstream: aiohttp.ClientResponse, data: bytes) -> web.Response:
    """An upstream answer already read whole, passed on as it was."""
    out = web.Response(status=upstream.status, body=data)
    for k, v in upstream.headers.items():
        if k.lower() not in _HOP_BY_HOP and not k.lower().startswith("x-helexa-"):
            out.headers.add(k, v)
    return out


async def forward(
    request: web.Request,
    *,
    session: aiohttp.ClientSession,
    target: PeerAddr,
    body: bytes | None = None,
    path: str | None = None,
    auth: MeshAuth | None = None,
    node: str | None = None,
    connect_timeout_s: float = PROXY_CONNECT_TIMEOUT_S,
    start_timeout_s: float = PEER_RESPONSE_START_TIMEOUT_S,
    stall_timeout_s: float = PROXY_STALL_TIMEOUT_S,
    deferred: bool = False,
    refuse_statuses: Collection[int] = (),
    extra_headers: Mapping[str, str] | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> web.StreamResponse:
    """Forward `request` (its `body` if already read) to `target` and stream the reply back.

    Returns the prepared response (the caller returns it from its handler). Raises `ProxyError`
    subclasses only while nothing has been sent to the client. `node` is the binding of the agent at
    `target` (`mesh.gossip.auth.binding`) the request is signed for; `extra_headers` are added to the
    upstream request; `on_failure(reason)` is called when the peer fails after the response began (the
    caller can take it out of routing at once).
    """
    if body is None:
        body = await request.read()
    path_qs = path or request.raw_path
    base = _upstream_headers(request)
    if extra_headers:
        base.update(extra_headers)
    if deferred:
        base[DEFERRED_HEADER] = "1"
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=stall_timeout_s)
    url = f"{target.url}{path_qs}"
    sign_for = node or ANY_TARGET
    upstream: aiohttp.ClientResponse | None = None
    try:
        for attempt in range(2):
            headers = CIMultiDict(base)
            if auth is not None:
                headers.update(auth.sign(request.method, path_qs, body, target=sign_for))
            upstream = await _open(
                session,
                request.method,
                url,
                body,
                headers,
                target=target,
                client_timeout=timeout,
                start_timeout_s=start_timeout_s,
            )
            if upstream.status not in refuse_statuses and upstream.status != 401:
                break
            data = await _read(upstream, target, _MAX_REFUSAL_BYTES, "a refusal")
            if auth is not None and node is not None and attempt == 0:
                # The peer restarted since its record was read: the same node, a new run.
                learned = auth.challenge(headers[NONCE_HEADER], upstream.status, data, upstream.headers)
                if (
                    learned is not None
                    and binding_node(learned) == binding_node(node)
                    and learned != sign_for
                ):
                    upstream.close()
                    sign_for = learned
                    continue
            if upstream.status in refuse_statuses:
                raise PeerRefused(target, upstream.status, data, upstream.headers)
            return _buffered(upstream, data)
        assert upstream is not None
        if upstream.headers.get(DEFERRED_HEADER) == "1":
            data = await _read(upstream, target, MAX_DEFERRED_BYTES, "a deferred answer")
            status, answer_headers, payload = _deferred_answer(data, target)
            if status in refuse_statuses:
                raise PeerRefused(target, status, payload, answer_headers)
            return web.Response(status=status, body=payload, headers=answer_headers)
        return await _stream_back(request, upstream, target, on_failure)
    finally:
        # On every exit (done, client gone, cancelled, peer died) the upstream connection is closed or
        # released. Closing an unfinished response drops the connection, which cancels the peer's work.
        if upstream is not None and not upstream.closed:
            upstream.close()


async def _stream_back(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    target: PeerAddr,
    on_failure: Callable[[str], None] | None = None,
) -> web.StreamResponse:
    sse = _is_sse(upstream)
    out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for k, v in upstream.headers.items():
        if k.lower() not in _HOP_BY_HOP:
            out.headers.add(k, v)
    if (
        not sse
        and upstream.content_length is not None
        and "Content-Encoding" not in upstream.headers  # aiohttp decompresses; the length would lie
    ):
        out.content_length = upstream.content_length
    await out.prepare(request)
    chunks = upstream.content.iter_any().__aiter__()
    while True:
        try:
            chunk = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
            reason = "stalled" if isinstance(e, TimeoutError) else type(e).__name__
            if on_failure is not None:
                try:
                    on_failure(reason)
                except Exception:
                    log.exception("on_failure callback failed")
            return await _peer_died(request, out, sse, target, reason)
        try:
            await out.write(chunk)
        except ConnectionError:  # the client went away; `forward` closes the upstream
            log.debug("client went away while forwarding from %s", target)
            return out
    await out.write_eof()
    return out


async def _peer_died(
    request: web.Request, out: web.StreamResponse, sse: bool, target: PeerAddr, reason: str
) -> web.StreamResponse:
    log.warning("peer %s failed mid-response (%s)", target, reason)
    if sse:
        try:
            await out.write(_sse_error(f"the serving agent failed mid-stream ({reason})"))
            await out.write_eof()
        except ConnectionError:
            pass
    elif request.transport is not None:
        # A truncated non-SSE body must not look complete: drop the connection.
        request.transport.close()
    return out
