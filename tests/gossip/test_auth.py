"""Mesh key: accept, reject (bad MAC, other key, tampered body/path), replay, stale; log once; signatures
bound to the target agent and run (the challenge that answers a first contact); the key derived from
client API keys."""

from __future__ import annotations

import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from helexa.mesh.gossip.auth import (
    ANY_TARGET,
    AuthError,
    MeshAuth,
    NonceCache,
    TargetMismatch,
    binding,
    client_middleware,
    new_key,
    peer_auth_middleware,
)


class Wall:
    def __init__(self) -> None:
        self.now = 1_764_221_000.0

    def __call__(self) -> float:
        return self.now


def test_accepts_a_good_signature():
    a = MeshAuth("k")
    h = a.sign("POST", "/mesh/peer/gossip", b"{}")
    assert a.verify("POST", "/mesh/peer/gossip", b"{}", h) == h["X-Helexa-Nonce"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/mesh/peer/gossip", b"{}"),
        ("POST", "/mesh/peer/load", b"{}"),
        ("POST", "/mesh/peer/gossip", b"{ }"),
    ],
)
def test_rejects_tampering(method, path, body):
    a = MeshAuth("k")
    h = a.sign("POST", "/mesh/peer/gossip", b"{}")
    with pytest.raises(AuthError, match="bad signature"):
        a.verify(method, path, body, h)


def test_rejects_other_key_and_missing_headers():
    h = MeshAuth("k1").sign("POST", "/p", b"")
    with pytest.raises(AuthError, match="bad signature"):
        MeshAuth("k2").verify("POST", "/p", b"", h)
    with pytest.raises(AuthError, match="missing"):
        MeshAuth("k1").verify("POST", "/p", b"", {})


def test_rejects_replay():
    a = MeshAuth("k")
    h = a.sign("POST", "/p", b"x")
    a.verify("POST", "/p", b"x", h)
    with pytest.raises(AuthError, match="replayed"):
        a.verify("POST", "/p", b"x", h)


def test_rejects_stale_and_future_timestamps():
    wall = Wall()
    a = MeshAuth("k", wall_clock=wall)
    h = a.sign("POST", "/p", b"")
    wall.now += 31
    with pytest.raises(AuthError, match="timestamp"):
        a.verify("POST", "/p", b"", h)
    wall.now -= 62
    with pytest.raises(AuthError, match="timestamp"):
        a.verify("POST", "/p", b"", h)
    wall.now += 31 - 29  # within the window again
    a.verify("POST", "/p", b"", h)


def test_nonce_cache_is_bounded():
    c = NonceCache(max_size=100, ttl_s=60)
    for i in range(1000):
        assert c.check_and_add(f"n{i}", now=0.0)
    assert len(c) <= 100
    assert not c.check_and_add("n999", now=0.0)
    assert c.check_and_add("n0", now=0.0)  # evicted long ago (bounded memory beats perfect recall)
    assert c.check_and_add("late", now=1000.0)
    assert len(c) == 1  # expired entries go first


def test_response_signature_is_bound_to_the_request_nonce_and_names_the_responder():
    a = MeshAuth("k", local=lambda: binding("node-a", 7))
    h = a.sign_response("nonce1", 200, b"body")
    assert a.verify_response("nonce1", 200, b"body", h) == "node-a@7"
    for args in (("nonce2", 200, b"body"), ("nonce1", 500, b"body"), ("nonce1", 200, b"other")):
        with pytest.raises(AuthError):
            a.verify_response(*args, h)
    with pytest.raises(AuthError):  # another responder's name under the same signature
        a.verify_response("nonce1", 200, b"body", {**h, "X-Helexa-Node": "node-b@7"})


def test_a_request_is_accepted_only_by_the_agent_and_run_it_was_signed_for():
    generation = [1]
    a = MeshAuth("k", local=lambda: binding("node-a", generation[0]))
    b = MeshAuth("k", local=lambda: binding("node-b", 1))
    h = a.sign("POST", "/mesh/peer/load", b"{}", target=binding("node-a", 1))
    with pytest.raises(TargetMismatch):
        b.verify("POST", "/mesh/peer/load", b"{}", h)  # another agent of the mesh
    generation[0] = 2  # node-a restarted: its nonces are forgotten, its generation is new
    with pytest.raises(TargetMismatch):
        a.verify("POST", "/mesh/peer/load", b"{}", h)
    generation[0] = 1
    a.verify("POST", "/mesh/peer/load", b"{}", h)
    with pytest.raises(AuthError, match="replayed"):
        a.verify("POST", "/mesh/peer/load", b"{}", h)
    # Unbound (first contact) and tampered targets.
    with pytest.raises(TargetMismatch):
        a.verify("POST", "/p", b"", a.sign("POST", "/p", b"", target=ANY_TARGET))
    forged = {**a.sign("POST", "/p", b"", target="node-b@1"), "X-Helexa-Target": "node-a@1"}
    with pytest.raises(AuthError, match="bad signature"):
        a.verify("POST", "/p", b"", forged)


def test_a_challenge_is_believed_only_when_signed_for_our_request():
    a = MeshAuth("k", local=lambda: binding("node-a", 3))
    body = b'{"error": {"code": "mesh_target"}}'
    h = a.sign_response("n1", 401, body)
    assert MeshAuth("k").challenge("n1", 401, body, h) == "node-a@3"
    assert MeshAuth("k").challenge("n2", 401, body, h) is None  # for someone else's request
    assert MeshAuth("other").challenge("n1", 401, body, h) is None  # from outside the mesh
    assert MeshAuth("k").challenge("n1", 401, b'{"error": {"code": "mesh_auth"}}', h) is None


def test_client_keys_derive_one_peer_key_per_key_set():
    one = MeshAuth.for_client_keys(["k1", "k2"])
    same = MeshAuth.for_client_keys(["k2", "k1", "k1"])
    other = MeshAuth.for_client_keys(["k1"])
    h = one.sign("POST", "/p", b"x")
    same.verify("POST", "/p", b"x", h)
    with pytest.raises(AuthError, match="bad signature"):
        other.verify("POST", "/p", b"x", h)
    with pytest.raises(AuthError, match="bad signature"):  # the client key itself is not the peer key
        MeshAuth("k1").verify("POST", "/p", b"x", one.sign("POST", "/p", b"x"))
    with pytest.raises(ValueError):
        MeshAuth.for_client_keys([])


def test_new_key_is_random_and_long():
    keys = {new_key() for _ in range(10)}
    assert len(keys) == 10 and all(len(k) >= 40 for k in keys)


async def test_middleware_and_client_signer_over_http(caplog):
    auth = MeshAuth("secret")
    app = web.Application(middlewares=[peer_auth_middleware(auth)])

    async def ok(request: web.Request) -> web.Response:
        return web.Response(body=b"pong:" + await request.read())

    app.router.add_post("/mesh/peer/ping", ok)
    app.router.add_get("/open", ok)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with (
            aiohttp.ClientSession(middlewares=(client_middleware(auth),)) as signed,
            signed.post(server.make_url("/mesh/peer/ping?x=1"), data=b"hi") as r,
        ):
            assert r.status == 200 and await r.read() == b"pong:hi"
            auth.verify_response(r.request_info.headers["X-Helexa-Nonce"], 200, b"pong:hi", r.headers)
        caplog.set_level(logging.DEBUG, logger="helexa.mesh.gossip.auth")
        async with aiohttp.ClientSession() as plain:
            for _ in range(3):
                async with plain.post(server.make_url("/mesh/peer/ping"), data=b"hi") as r:
                    assert r.status == 401
                    assert (await r.json())["error"]["code"] == "mesh_auth"
            async with plain.get(server.make_url("/open")) as r:
                assert r.status == 200  # only /mesh/peer/* is guarded
        # Signed, but for another agent: a challenge that names this one, signed for the request.
        bound = MeshAuth("secret", local=lambda: "node-x@1")
        app2 = web.Application(middlewares=[peer_auth_middleware(bound, exempt=("/mesh/peer/open",))])
        app2.router.add_post("/mesh/peer/ping", ok)
        app2.router.add_post("/mesh/peer/open", ok)
        server2 = TestServer(app2, host="127.0.0.1")
        await server2.start_server()
        try:
            async with (
                aiohttp.ClientSession(middlewares=(client_middleware(auth, target="node-y@1"),)) as signed,
                signed.post(server2.make_url("/mesh/peer/ping"), data=b"hi") as r,
            ):
                assert r.status == 401
                body = await r.read()
                nonce = r.request_info.headers["X-Helexa-Nonce"]
                assert auth.challenge(nonce, 401, body, r.headers) == "node-x@1"
            async with (
                aiohttp.ClientSession(middlewares=(client_middleware(auth, target="node-x@1"),)) as signed,
                signed.post(server2.make_url("/mesh/peer/ping"), data=b"hi") as r,
            ):
                assert r.status == 200 and await r.read() == b"pong:hi"
            async with aiohttp.ClientSession() as plain, plain.post(server2.make_url("/mesh/peer/open")) as r:
                assert r.status == 200  # an exempt path (gossip on an open mesh with client keys)
        finally:
            await server2.close()
        levels = [
            rec.levelno
            for rec in caplog.records
            if rec.name == "helexa.mesh.gossip.auth" and "refusing" in rec.getMessage()
        ]
        assert levels == [logging.WARNING, logging.DEBUG, logging.DEBUG]  # logged once, then quietly
    finally:
        await server.close()
