"""The simulated fleet behind a real agent's HTTP API, for the bench and for demos.

`fake_agent_app(fake)` serves what the dashboard reads from an agent: `GET /mesh/state` (the fake's
`wire_state()`, built by the agent's own `state_to_json`; with `tick_per_poll` the simulation advances
one step per request, so every poll brings a changed document) and `GET /mesh/events` (the joins as the
agent's events, then keep-alives, framed by the agent's `helexa.mesh.sse`). The dashboard pointed at it
with `--agent URL` does exactly its production work per update: fetch, JSON parse, diff, paint.
`GET /bench/stats` counts the states served.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import orjson
from aiohttp import web

from helexa.mesh import sse
from helexa.mesh.fleet.events import Event
from helexa.mesh.timing import EVENT_KEEPALIVE_S

from .source import FakeFleetSource


@dataclass(kw_only=True, slots=True)
class FakeAgent:
    """What the handlers share: the simulated fleet, whether each poll advances it, the count served."""

    fleet: FakeFleetSource
    tick_per_poll: bool
    states_served: int = 0


FAKE_AGENT = web.AppKey("fake_agent", FakeAgent)


async def _state(request: web.Request) -> web.Response:
    agent = request.app[FAKE_AGENT]
    if agent.tick_per_poll:
        agent.fleet.tick()
    agent.states_served += 1
    return web.Response(body=orjson.dumps(agent.fleet.wire_state()), content_type="application/json")


async def _events(request: web.Request) -> web.StreamResponse:
    fleet = request.app[FAKE_AGENT].fleet
    resp = web.StreamResponse(headers=sse.HEADERS)
    await resp.prepare(request)
    try:
        for node in fleet.snapshot().nodes:
            join = Event(kind="join", node=node.id, node_name=node.name, message=f"{node.name} joined")
            await resp.write(sse.event(orjson.dumps(join.to_json())))
        while True:
            await asyncio.sleep(EVENT_KEEPALIVE_S)
            await resp.write(sse.KEEPALIVE)
    except ConnectionResetError:  # the dashboard went away
        return resp


async def _stats(request: web.Request) -> web.Response:
    return web.json_response({"states_served": request.app[FAKE_AGENT].states_served})


def fake_agent_app(fake: FakeFleetSource, *, tick_per_poll: bool = True) -> web.Application:
    app = web.Application()
    app[FAKE_AGENT] = FakeAgent(fleet=fake, tick_per_poll=tick_per_poll)
    app.router.add_get("/mesh/state", _state)
    app.router.add_get("/mesh/events", _events)
    app.router.add_get("/bench/stats", _stats)
    return app
