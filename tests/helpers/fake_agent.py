"""A tiny aiohttp stand-in for the agent's operator API, recording what it was asked."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

CALLS = web.AppKey("calls", list)

STATE: dict[str, Any] = {
    "mesh": "default",
    "open": True,
    "self": "node-a",
    "agent_version": "0.1.0",
    "nodes": [
        {
            "id": "node-a",
            "name": "beast",
            "address": "10.0.0.5",
            "port": 31313,
            "generation": 1,
            "version": 3,
            "heartbeat": 9,
            "liveness": "alive",
            "agent_version": "0.1.0",
            "devices": [
                {
                    "name": "cuda:0",
                    "kind": "cuda",
                    "model": "NVIDIA GeForce RTX 4090",
                    "memory_total_mb": 24564,
                    "memory_free_mb": 8000,
                    "utilization": 0.5,
                    "temperature_c": 60.0,
                }
            ],
            "models": [
                {
                    "id": "helexa/demo",
                    "status": "loaded",
                    "engine": "transformers",
                    "devices": ["cuda:0"],
                    "memory_mb": 600,
                    "in_flight": 1,
                    "queued": 0,
                    "tokens_per_s": 85.0,
                }
            ],
        },
        {
            "id": "node-b",
            "name": "laptop",
            "address": "10.0.0.6",
            "port": 31313,
            "generation": 1,
            "version": 1,
            "heartbeat": 2,
            "liveness": "dead",
            "agent_version": "0.1.0",
            "devices": [
                {
                    "name": "cpu",
                    "kind": "cpu",
                    "model": "Ryzen",
                    "memory_total_mb": 32000,
                    "memory_free_mb": 16000,
                }
            ],
            "models": [{"id": "tiny", "status": "loading", "engine": "transformers", "progress": 0.4}],
        },
    ],
    "catalogue": [
        {
            "id": "helexa/demo",
            "source": "demo",
            "memory_mb": 600,
            "aliases": ["demo"],
            "pinned_on": [],
            "version": 2,
            "feasible_on": ["beast", "laptop"],
            "locations": [{"node": "node-a", "status": "loaded", "memory_mb": 600, "in_flight": 1}],
        },
    ],
}


def error(status: int, message: str, code: str) -> web.Response:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return web.json_response(body, status=status)


def make_agent() -> web.Application:
    app = web.Application()
    calls: list[tuple[str, Any]] = []
    app[CALLS] = calls
    catalogue = [dict(e) for e in STATE["catalogue"]]

    async def state(request: web.Request) -> web.Response:
        return web.json_response(STATE)

    async def list_catalogue(request: web.Request) -> web.Response:
        return web.json_response({"data": catalogue})

    async def put_entry(request: web.Request) -> web.Response:
        entry = await request.json()
        calls.append(("put", entry))
        if "id" not in entry:
            return error(400, "entry has no id", "invalid_entry")
        return web.json_response({"message": f"saved {entry['id']}"})

    async def delete_entry(request: web.Request) -> web.Response:
        model = request.match_info["id"]
        calls.append(("delete", model))
        if model not in {e["id"] for e in catalogue}:
            return error(404, f"model {model!r} is not in the catalogue", "model_not_found")
        return web.json_response({"message": f"removed {model}"})

    async def load(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append(("load", body))
        if body["model"] != "helexa/demo":
            return error(404, f"model {body['model']!r} is not in the catalogue", "model_not_found")
        return web.json_response({"status": "loading", "node": body["node"] or "beast"})

    async def unload(request: web.Request) -> web.Response:
        body = await request.json()
        calls.append(("unload", body))
        return web.json_response({"status": "unloaded", "node": body["node"] or "beast"})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        calls.append(("chat", body))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b": keep-alive\n\n")
        turn = sum(1 for m in body["messages"] if m["role"] == "user")
        for piece in ("Hello", f" turn {turn}"):
            chunk = {"choices": [{"index": 0, "delta": {"content": piece}}]}
            await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        if body["model"] == "broken":
            await resp.write(b'data: {"error": {"message": "device fault", "type": "server_error"}}\n\n')
        else:
            await resp.write(b"data: [DONE]\n\n")
        return resp

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b': hello\n\ndata: {"type": "join", "ts": 1.0, "node": "beast"}\n\n')
        await resp.write(b'event: evict\ndata: {"ts": 2.0, "node": "beast", "model": "x"}\n\n')
        return resp

    app.router.add_get("/mesh/state", state)
    app.router.add_get("/mesh/catalogue", list_catalogue)
    app.router.add_post("/mesh/catalogue", put_entry)
    app.router.add_delete("/mesh/catalogue/{id:.+}", delete_entry)
    app.router.add_post("/mesh/models/load", load)
    app.router.add_post("/mesh/models/unload", unload)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/mesh/events", events)
    return app
