"""Wire details clients notice: `"usage": null` on the chunks before the usage chunk, `system_fingerprint`,
an `x-request-id` on every answer, and CORS (loopback origins by default, a setting for others)."""

from __future__ import annotations

import aiohttp
import orjson
import pytest
from aiohttp import web

from helexa.mesh.server.headers import CorsPolicy, add_response_headers, cors_middleware

from .conftest import Edge

MODEL = "test/tiny-chat"


async def test_usage_null_until_the_usage_chunk_and_a_fingerprint(
    edge: Edge, session: aiohttp.ClientSession
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "x"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with session.post(f"{edge.base_url}/chat/completions", json=body) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"].startswith("req_")
        events = [line[6:] async for line in resp.content if line.startswith(b"data: ")]
    chunks = [orjson.loads(e) for e in events if e.strip() != b"[DONE]"]
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] > 0
    assert all(c["system_fingerprint"] == "fp_helexa" for c in chunks)
    async with session.post(
        f"{edge.base_url}/chat/completions", json={**body, "stream_options": None}
    ) as resp:
        chunks = [orjson.loads(line[6:]) async for line in resp.content if line.startswith(b"data: {")]
    assert all("usage" not in c for c in chunks)


async def test_a_client_request_id_is_kept(edge: Edge, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{edge.base_url}/models", headers={"X-Request-Id": "my-trace-42"}) as resp:
        assert resp.headers["X-Request-Id"] == "my-trace-42"
    async with session.get(f"{edge.base_url}/models", headers={"X-Request-Id": "bad id\\n"}) as resp:
        assert resp.headers["X-Request-Id"].startswith("req_")


@pytest.mark.parametrize(
    ("origins", "origin", "allowed"),
    [
        ((), "http://localhost:3000", True),
        ((), "http://127.0.0.1:8080", True),
        ((), "http://[::1]:5173", True),
        ((), "https://evil.example", False),
        (("https://chat.example",), "https://chat.example", True),
        (("*",), "https://anything.example", True),
    ],
)
async def test_cors(aiohttp_server, origins: tuple[str, ...], origin: str, allowed: bool) -> None:
    policy = CorsPolicy(origins)
    app = web.Application(middlewares=[cors_middleware(policy)])
    add_response_headers(app, policy)

    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app.router.add_post("/v1/chat/completions", hello)
    server = await aiohttp_server(app)
    async with aiohttp.ClientSession() as s:
        preflight = {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        async with s.options(server.make_url("/v1/chat/completions"), headers=preflight) as resp:
            assert resp.status == (204 if allowed else 403)
            if allowed:
                assert resp.headers["Access-Control-Allow-Origin"] == origin
                assert "POST" in resp.headers["Access-Control-Allow-Methods"]
                assert resp.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
        async with s.post(server.make_url("/v1/chat/completions"), headers={"Origin": origin}) as resp:
            assert resp.status == 200
            assert (resp.headers.get("Access-Control-Allow-Origin") == origin) is allowed
