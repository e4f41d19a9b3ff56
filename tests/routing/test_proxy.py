"""proxy.forward against tiny aiohttp fake peers: passthrough, streaming, stall, peer death, disconnect,
deferred answers, signatures bound to the target (and the challenge of a restarted peer)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from helexa.mesh.gossip.auth import MeshAuth, binding, peer_auth_middleware
from helexa.mesh.gossip.transport import PeerAddr
from helexa.mesh.routing.proxy import (
    PeerFailed,
    PeerNoResponse,
    PeerRefused,
    PeerUnreachable,
    ProxyError,
    forward,
)
from tests.helpers.ports import refused_port


class FakePeer:
    """A serving agent stand-in: each route misbehaves in one way."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.seen_headers: dict[str, str] = {}
        self.app = web.Application()
        r = self.app.router
        r.add_post("/v1/echo", self.echo)
        r.add_post("/v1/stream", self.stream)
        r.add_post("/v1/die", self.die)
        r.add_post("/v1/stall", self.stall)
        r.add_post("/v1/slow", self.slow)
        r.add_post("/v1/busy", self.busy)
        r.add_post("/v1/silent", self.silent)
        r.add_post("/v1/deferred", self.deferred)
        r.add_post("/v1/deferred-error", self.deferred_error)
        r.add_post("/v1/deferred-stall", self.deferred_stall)

    async def echo(self, request: web.Request) -> web.Response:
        self.seen_headers = dict(request.headers)
        return web.Response(
            body=await request.read(), content_type="application/json", headers={"X-Peer": "yes"}
        )

    async def _sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        return resp

    async def stream(self, request: web.Request) -> web.StreamResponse:
        resp = await self._sse(request)
        for i in range(5):
            await resp.write(b'data: {"i": %d}\n\n' % i)
            await asyncio.sleep(0.01)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    async def die(self, request: web.Request) -> web.StreamResponse:
        resp = await self._sse(request)
        await resp.write(b'data: {"i": 0}\n\n')
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # like a SIGKILLed agent: the socket just goes away
        return resp

    async def stall(self, request: web.Request) -> web.StreamResponse:
        resp = await self._sse(request)
        await resp.write(b'data: {"i": 0}\n\n')
        await asyncio.sleep(60)
        return resp

    async def slow(self, request: web.Request) -> web.StreamResponse:
        resp = await self._sse(request)
        try:
            for i in range(1000):
                await resp.write(b'data: {"i": %d}\n\n' % i)
                await asyncio.sleep(0.05)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return resp

    async def busy(self, request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "no room"}}, status=503, headers={"Retry-After": "2"})

    async def silent(self, request: web.Request) -> web.Response:
        await asyncio.sleep(60)
        return web.Response()

    async def _deferred(self, request: web.Request, spaces: int) -> web.StreamResponse:
        self.seen_headers = dict(request.headers)
        resp = web.StreamResponse(headers={"X-Helexa-Deferred": "1", "Content-Type": "application/json"})
        await resp.prepare(request)
        for _ in range(spaces):
            await resp.write(b" ")
            await asyncio.sleep(0.02)
        return resp

    async def deferred(self, request: web.Request) -> web.StreamResponse:
        resp = await self._deferred(request, 40)  # 0.8 s of keep-alives: longer than the stall timeout
        await resp.write(b'{"status": 200, "headers": {"Content-Type": "application/json"}}\n{"answer": 42}')
        await resp.write_eof()
        return resp

    async def deferred_error(self, request: web.Request) -> web.StreamResponse:
        resp = await self._deferred(request, 3)
        meta = orjson.dumps(
            {"status": 503, "headers": {"Content-Type": "application/json", "Retry-After": "7", "X-No": "1"}}
        )
        await resp.write(meta + b'\n{"error": {"code": "no_room"}}')
        await resp.write_eof()
        return resp

    async def deferred_stall(self, request: web.Request) -> web.StreamResponse:
        await self._deferred(request, 3)
        await asyncio.sleep(60)  # keep-alives stop: frozen mid-answer
        return web.Response()


@pytest.fixture
async def peer():
    p = FakePeer()
    server = TestServer(p.app, host="127.0.0.1")
    await server.start_server()
    p.addr = PeerAddr("127.0.0.1", server.port or 0)  # type: ignore[attr-defined]
    yield p
    await server.close()


async def _entry(target: PeerAddr, **kw):
    """An entry agent stand-in: forwards everything to `target`, maps ProxyError to 502."""
    session = aiohttp.ClientSession()

    async def handle(request: web.Request) -> web.StreamResponse:
        try:
            return await forward(request, session=session, target=target, **kw)
        except ProxyError as e:
            return web.json_response(
                {
                    "error": {
                        "type": type(e).__name__,
                        "message": e.reason,
                        "status": getattr(e, "status", None),
                    }
                },
                status=502,
            )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server, session


async def test_passthrough_of_body_status_and_headers(peer):
    server, session = await _entry(peer.addr)
    try:
        async with aiohttp.ClientSession() as client:
            body = b'{"model": "m", "x": [1, 2, 3]}'
            async with client.post(
                server.make_url("/v1/echo?q=1"), data=body, headers={"Authorization": "Bearer client-key"}
            ) as resp:
                assert resp.status == 200
                assert await resp.read() == body  # byte for byte
                assert resp.headers["X-Peer"] == "yes"
        assert peer.seen_headers["X-Helexa-Forwarded"] == "1"
        assert "Authorization" not in peer.seen_headers  # the client's key is for the entry agent only
    finally:
        await server.close()
        await session.close()


async def test_sse_streams_through_chunk_by_chunk(peer):
    server, session = await _entry(peer.addr)
    try:
        async with aiohttp.ClientSession() as client, client.post(server.make_url("/v1/stream")) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            lines = [line async for line in resp.content if line.strip()]
        assert lines[-1] == b"data: [DONE]\n" and len(lines) == 6
    finally:
        await server.close()
        await session.close()


async def test_peer_death_mid_stream_gives_error_event_and_closed_stream(peer):
    server, session = await _entry(peer.addr)
    try:
        async with aiohttp.ClientSession() as client:
            t0 = time.monotonic()
            async with client.post(server.make_url("/v1/die")) as resp:
                events = [line async for line in resp.content if line.startswith(b"data: ")]
            assert time.monotonic() - t0 < 5  # at once, not after a stall timeout
        assert events[0] == b'data: {"i": 0}\n'
        err = orjson.loads(events[-1][len(b"data: ") :])
        assert "error" in err and err["error"]["code"] == "peer_failed"
    finally:
        await server.close()
        await session.close()


async def test_stall_timeout_ends_the_stream_with_an_error_event(peer):
    server, session = await _entry(peer.addr, stall_timeout_s=0.3)
    try:
        async with aiohttp.ClientSession() as client, client.post(server.make_url("/v1/stall")) as resp:
            events = [line async for line in resp.content if line.startswith(b"data: ")]
        assert len(events) == 2 and b"stalled" in events[1]
    finally:
        await server.close()
        await session.close()


async def test_no_total_timeout_on_a_flowing_stream(peer):
    # stall timeout shorter than the whole stream: must not cut it while chunks keep coming
    server, session = await _entry(peer.addr, stall_timeout_s=0.2)
    try:
        async with aiohttp.ClientSession() as client, client.post(server.make_url("/v1/slow")) as resp:
            n = 0
            async for line in resp.content:
                if line.startswith(b"data: "):
                    assert b"error" not in line
                    n += 1
                    if n == 12:  # 0.6 s of streaming, three times the stall timeout
                        break
        assert n == 12
    finally:
        await server.close()
        await session.close()


async def test_client_disconnect_cancels_the_peer(peer):
    server, session = await _entry(peer.addr)
    try:
        async with aiohttp.ClientSession() as client:
            resp = await client.post(server.make_url("/v1/slow"))
            await resp.content.readline()
            resp.close()  # the client goes away mid-stream
        async with asyncio.timeout(5):
            await peer.cancelled.wait()
    finally:
        await server.close()
        await session.close()


async def test_unreachable_peer_is_a_typed_error():
    with refused_port() as port:
        server, session = await _entry(PeerAddr("127.0.0.1", port))
        try:
            async with (
                aiohttp.ClientSession() as client,
                client.post(server.make_url("/v1/echo"), data=b"{}") as r,
            ):
                assert r.status == 502
                assert (await r.json())["error"]["type"] == PeerUnreachable.__name__
        finally:
            await server.close()
            await session.close()


async def test_peer_silent_before_its_response_starts_is_no_response(peer):
    """A frozen peer (SIGSTOP: the kernel accepts the connection, nobody answers) is given up on after the
    response-start timeout, however long the stall timeout: safe to retry elsewhere (nothing started)."""
    server, session = await _entry(peer.addr, start_timeout_s=0.2, stall_timeout_s=900)
    try:
        started = time.monotonic()
        async with aiohttp.ClientSession() as client, client.post(server.make_url("/v1/silent")) as r:
            assert r.status == 502
            assert (await r.json())["error"]["type"] == PeerNoResponse.__name__
        assert time.monotonic() - started < 2
    finally:
        await server.close()
        await session.close()


async def test_a_deferred_answer_is_unwrapped_with_its_real_status(peer):
    server, session = await _entry(peer.addr, deferred=True, stall_timeout_s=0.5)
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(server.make_url("/v1/deferred"), data=b"{}") as r:
                assert r.status == 200 and await r.json() == {"answer": 42}
            assert peer.seen_headers["X-Helexa-Deferred"] == "1"
            async with client.post(server.make_url("/v1/deferred-error"), data=b"{}") as r:
                assert r.status == 503 and r.headers["Retry-After"] == "7" and "X-No" not in r.headers
                assert (await r.json())["error"]["code"] == "no_room"
            # Keep-alives that stop mid-answer: a stalled peer, found after the stall timeout.
            started = time.monotonic()
            async with client.post(server.make_url("/v1/deferred-stall"), data=b"{}") as r:
                assert r.status == 502 and (await r.json())["error"]["type"] == PeerFailed.__name__
            assert time.monotonic() - started < 3
    finally:
        await server.close()
        await session.close()
    server, session = await _entry(peer.addr, deferred=True, refuse_statuses={503})
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.post(server.make_url("/v1/deferred-error"), data=b"{}") as r,
        ):
            err = (await r.json())["error"]
            assert err["type"] == PeerRefused.__name__ and err["status"] == 503
    finally:
        await server.close()
        await session.close()


async def test_refuse_statuses_raise_peer_refused(peer):
    server, session = await _entry(peer.addr, refuse_statuses={503})
    try:
        async with aiohttp.ClientSession() as client, client.post(server.make_url("/v1/busy")) as r:
            err = (await r.json())["error"]
            assert err["type"] == PeerRefused.__name__ and err["status"] == 503
    finally:
        await server.close()
        await session.close()
    server, session = await _entry(peer.addr)  # not asked to refuse: the 503 passes through
    try:
        async with aiohttp.ClientSession() as client, client.post(server.make_url("/v1/busy")) as r:
            assert r.status == 503 and r.headers["Retry-After"] == "2"
    finally:
        await server.close()
        await session.close()


async def test_forwarded_request_is_signed_with_the_mesh_key_for_its_target():
    generation = [1]
    auth = MeshAuth("secret", local=lambda: binding("peer-id", generation[0]))
    p = FakePeer()
    app = web.Application(middlewares=[peer_auth_middleware(auth, prefix="/v1/")])
    app.router.add_post("/v1/echo", p.echo)
    peer_server = TestServer(app, host="127.0.0.1")
    await peer_server.start_server()
    target = PeerAddr("127.0.0.1", peer_server.port or 0)
    sender = MeshAuth("secret")
    cases: tuple[tuple[dict[str, Any], int], ...] = (
        ({"auth": sender, "node": binding("peer-id", 1)}, 200),
        ({"auth": sender, "node": binding("peer-id", 0)}, 200),  # restarted since: challenged, sent again
        ({"auth": sender, "node": binding("another-id", 1)}, 401),  # another agent: no second try
        ({"auth": sender}, 401),  # not bound
        ({}, 401),
        ({"auth": MeshAuth("other"), "node": binding("peer-id", 1)}, 401),
    )
    for kw, expected in cases:
        server, session = await _entry(target, **kw)
        try:
            async with (
                aiohttp.ClientSession() as client,
                client.post(server.make_url("/v1/echo"), data=b"{}") as r,
            ):
                assert r.status == expected
        finally:
            await server.close()
            await session.close()
    await peer_server.close()
