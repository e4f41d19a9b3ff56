"""The simulated fleet behind a real agent's HTTP API, for the bench and for demos.

`fake_agent_app(fake)` serves what the dashboard reads from an agent: `GET /mesh/state` (the fake's
state as `/mesh/state` JSON; with `tick_per_poll` the simulation advances one step per request, so every
poll brings a changed document) and `GET /mesh/events` (the joins, then keep-alives). The dashboard
pointed at it with `--agent URL` does exactly its production work per update: fetch, JSON parse, diff,
paint. `GET /bench/stats` counts the states served.
"""

from __future__ import annotations

import asyncio
import time

import orjson
from aiohttp import web

from .source import FakeFleetSource

# Comment lines keep an idle SSE stream open through proxies and client read timeouts.
KEEPALIVE_S = 15.0

STATES_SERVED = web.AppKey("states_served", list)


def fake_agent_app(fake: FakeFleetSource, *, tick_per_poll: bool = True) -> web.Application:
    served = [0]
    app = web.Application()
    app[STATES_SERVED] = served

    async def state(request: web.Request) -> web.Response:
        if tick_per_poll:
            fake.tick()
        served[0] += 1
        return web.Response(body=orjson.dumps(fake.wire_state()), content_type="application/json")

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        try:
            for node in fake.snapshot().nodes:
                event = {
                    "type": "join",
                    "ts": time.time(),
                    "node": node.name,
                    "message": f"{node.name} joined",
                }
                await resp.write(b"data: " + orjson.dumps(event) + b"\n\n")
            while True:
                await asyncio.sleep(KEEPALIVE_S)
                await resp.write(b": keep-alive\n\n")
        except ConnectionResetError:  # the dashboard went away
            return resp

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"states_served": served[0]})

    app.router.add_get("/mesh/state", state)
    app.router.add_get("/mesh/events", events)
    app.router.add_get("/bench/stats", stats)
    return app
