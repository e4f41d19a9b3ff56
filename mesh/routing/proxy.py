"""Forwarding a client request to the peer agent that serves it: byte passthrough with aiohttp.

    resp = await forward(request, session=session, target=PeerAddr(...), body=raw_body)

- The request body and the response body pass through as bytes (no re-serialisation); the response is
  streamed chunk by chunk as it arrives, so SSE token streams keep their timing.
- Timeouts bound *connect* and *stall* (no bytes for `stall_timeout_s`), never the total: a long answer
  is never cut while it is still flowing.
- `X-Helexa-Forwarded: 1` is set so the target serves locally and never routes again; with a mesh key the
  request is signed (`mesh.gossip.auth`).
- Failures before anything reached the client raise typed errors the caller maps: `PeerUnreachable`
  (could not connect: nothing ran there, try the next candidate) and `PeerFailed` (connected, but the
  peer failed, stalled or vanished before its response began). `PeerRefused` when the peer answered with
  one of the `refuse_statuses` the caller asked to handle itself (e.g. 503 "no room": next candidate).
- After the response began: a peer that dies or stalls mid-stream gives an SSE client a final
  `data: {"error": ...}` event and a closed stream at once; a non-SSE client gets its connection closed
  (a truncated body, which HTTP clients report as an error).
- A client that disconnects (the handler is cancelled, or a write fails) closes the upstream connection,
  which cancels the work on the serving agent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from helexa.mesh import sse
from helexa.mesh.fleet.codec import dumps
from helexa.mesh.gossip.auth import MeshAuth
from helexa.mesh.gossip.transport import PeerAddr
from helexa.mesh.routing.peer_client import FORWARDED_HEADER
from helexa.mesh.timing import PROXY_CONNECT_TIMEOUT_S, PROXY_STALL_TIMEOUT_S

log = logging.getLogger(__name__)

__all__ = ["FORWARDED_HEADER", "PeerFailed", "PeerRefused", "PeerUnreachable", "ProxyError", "forward"]


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
_DROP_UPSTREAM = frozenset({"authorization", "cookie", FORWARDED_HEADER.lower()})


class ProxyError(Exception):
    """Forwarding failed before any byte reached the client."""

    def __init__(self, peer: PeerAddr, reason: str) -> None:
        super().__init__(f"{peer}: {reason}")
        self.peer = peer
        self.reason = reason


class PeerUnreachable(ProxyError):
    """Could not connect (refused, unroutable, connect timeout): safe to try the next candidate."""


class PeerFailed(ProxyError):
    """Connected, but the peer failed or stalled before its response began."""


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


async def forward(
    request: web.Request,
    *,
    session: aiohttp.ClientSession,
    target: PeerAddr,
    body: bytes | None = None,
    path: str | None = None,
    auth: MeshAuth | None = None,
    connect_timeout_s: float = PROXY_CONNECT_TIMEOUT_S,
    stall_timeout_s: float = PROXY_STALL_TIMEOUT_S,
    refuse_statuses: Collection[int] = (),
    extra_headers: Mapping[str, str] | None = None,
    on_failure: Callable[[str], None] | None = None,
) -> web.StreamResponse:
    """Forward `request` (its `body` if already read) to `target` and stream the reply back.

    Returns the prepared response (the caller returns it from its handler). Raises `ProxyError`
    subclasses only while nothing has been sent to the client. `extra_headers` are added to the upstream
    request; `on_failure(reason)` is called when the peer fails after the response began (the caller
    can take it out of routing at once).
    """
    if body is None:
        body = await request.read()
    path_qs = path or request.raw_path
    headers = _upstream_headers(request)
    if extra_headers:
        headers.update(extra_headers)
    if auth is not None:
        headers.update(auth.sign(request.method, path_qs, body))
    timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=stall_timeout_s)
    url = f"{target.url}{path_qs}"
    try:
        upstream = await session.request(
            request.method, url, data=body, headers=headers, timeout=timeout, allow_redirects=False
        )
    except aiohttp.ClientConnectorError as e:  # refused, unroutable, DNS
        raise PeerUnreachable(target, f"cannot connect: {e.os_error or e}") from e
    except aiohttp.ConnectionTimeoutError as e:
        raise PeerUnreachable(target, "connect timeout") from e
    except (TimeoutError, aiohttp.ServerTimeoutError) as e:
        raise PeerFailed(target, f"no response within {stall_timeout_s:g} s") from e
    except aiohttp.ClientError as e:
        raise PeerFailed(target, f"failed before responding: {type(e).__name__}: {e}") from e

    try:
        if upstream.status in refuse_statuses:
            try:
                data = await upstream.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                raise PeerFailed(target, f"failed while refusing: {type(e).__name__}") from e
            raise PeerRefused(target, upstream.status, data, upstream.headers)
        return await _stream_back(request, upstream, target, on_failure)
    finally:
        # On every exit (done, client gone, cancelled, peer died) the upstream connection is closed or
        # released. Closing an unfinished response drops the connection, which cancels the peer's work.
        if not upstream.closed:
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
