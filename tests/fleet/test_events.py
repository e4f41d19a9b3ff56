"""Event bus: fan-out, drop-oldest for slow subscribers, replay; SSE handler; record-derived events."""

from __future__ import annotations

import asyncio
import itertools

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from helexa.engine.base import ModelId
from helexa.mesh.fleet.events import Event, EventBus, membership_event, record_events
from helexa.mesh.fleet.membership import MembershipEvent
from helexa.mesh.fleet.records import ModelRecord, NodeId, NodeRecord
from helexa.mesh.server.operator_routes import events_handler


def _ev(i: int) -> Event:
    return Event(kind="join", node=f"n{i}")


async def test_fan_out_and_drop_oldest():
    bus = EventBus(queue_size=3, history=2)
    fast, slow = bus.subscribe(replay=False), bus.subscribe(replay=False)
    for i in range(5):
        bus.publish(_ev(i))
        got = await fast.get(timeout_s=1)
        assert got is not None and got.node == f"n{i}"
    assert [(await slow.get(timeout_s=1)).node for _ in range(3)] == ["n2", "n3", "n4"]  # type: ignore[union-attr]
    assert slow.dropped == 2 and fast.dropped == 0
    assert await slow.get(timeout_s=0.01) is None
    late = bus.subscribe()
    assert [(await late.get(timeout_s=1)).node for _ in range(2)] == ["n3", "n4"]  # type: ignore[union-attr]


async def test_publish_never_blocks_with_a_stuck_subscriber():
    bus = EventBus(queue_size=10)
    bus.subscribe()
    for i in range(100_000):
        bus.publish(_ev(i))  # synchronous: it cannot block by construction; and memory stays bounded
    assert bus.published == 100_000


async def test_close_ends_iteration():
    bus = EventBus()
    sub = bus.subscribe()
    bus.publish(_ev(1))

    async def consume():
        return [e.node async for e in sub]

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.01)
    bus.close()
    assert await asyncio.wait_for(task, 2) == ["n1"]


async def test_subscribing_after_close_gets_a_closed_subscription():
    bus = EventBus()
    bus.publish(_ev(1))
    bus.close()
    sub = bus.subscribe()
    assert sub.closed and bus.subscribers == 0
    assert await asyncio.wait_for(sub.get(), 2) is None  # no replay, no wait: the bus is gone
    assert [e async for e in sub] == []


async def test_sse_client_arriving_after_close_ends_at_once():
    """A `/mesh/events` client that connects after the bus closed (agent stopping) gets a stream that ends
    at once, rather than one that idles with keep-alives and holds the server's shutdown."""
    bus = EventBus()
    bus.publish(_ev(1))
    app = web.Application()
    app.router.add_get("/mesh/events", events_handler(bus, keepalive_s=0.05))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        bus.close()
        async with aiohttp.ClientSession() as s, s.get(server.make_url("/mesh/events")) as r:
            body = await asyncio.wait_for(r.read(), 2)
        assert body == b": connected\n\n"
        assert bus.subscribers == 0
    finally:
        await server.close()


async def test_sse_handler_streams_events_and_keepalives():
    bus = EventBus()
    app = web.Application()
    app.router.add_get("/mesh/events", events_handler(bus, keepalive_s=0.05))
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as s, s.get(server.make_url("/mesh/events")) as r:
            assert r.headers["Content-Type"] == "text/event-stream"
            assert await r.content.readline() == b": connected\n"
            await r.content.readline()
            assert await r.content.readline() == b": keep-alive\n"  # idle: comments, never empty event frames
            bus.publish(Event(kind="load_done", node="n1", node_name="beast", model="m"))
            line = b""
            while not line.startswith(b"data: "):
                line = await r.content.readline()
            doc = orjson.loads(line[6:])
            assert doc["type"] == "load_done" and doc["model"] == "m" and doc["node_name"] == "beast"
            assert bus.subscribers == 1
        for _ in range(100):  # client gone: the handler unsubscribes
            if bus.subscribers == 0:
                break
            await asyncio.sleep(0.02)
        assert bus.subscribers == 0
    finally:
        bus.close()
        await server.close()


def _node(*models: ModelRecord, gen: int = 1) -> NodeRecord:
    return NodeRecord(
        node_id=NodeId("n"),
        name="beast",
        generation=gen,
        version=1,
        heartbeat=0,
        address="a",
        port=1,
        models=models,
    )


def _m(status, progress=None) -> ModelRecord:
    return ModelRecord(id=ModelId("m"), status=status, engine="fake", progress=progress)


def test_record_events_follow_a_load_lifecycle():
    steps = [
        _node(),
        _node(_m("loading", 0.1)),
        _node(_m("loading", 0.5)),
        _node(_m("loaded")),
        _node(_m("loaded")),
        _node(_m("unloading")),
        _node(),
        _node(_m("failed")),
    ]
    kinds = [e.kind for a, b in itertools.pairwise(steps) for e in record_events(a, b)]
    assert kinds == ["load_started", "load_progress", "load_done", "unload", "load_failed"]
    assert [e.kind for e in record_events(_node(_m("loaded")), _node())] == ["unload"]
    assert record_events(_node(_m("loaded")), None) == []
    assert record_events(_node(), _node(_m("loaded"), gen=2)) == []


def test_membership_events_map_to_kinds():
    def ev(prev, cur, restarted=False):
        return MembershipEvent(
            node_id=NodeId("n"), name="x", previous=prev, current=cur, generation=1, restarted=restarted
        )

    assert membership_event(ev(None, "alive")).kind == "join"
    assert membership_event(ev("alive", "suspect")).kind == "suspect"
    assert membership_event(ev("suspect", "dead")).kind == "dead"
    assert membership_event(ev("alive", "left")).kind == "leave"
    assert membership_event(ev("dead", "alive", restarted=True)).kind == "restart"
    assert membership_event(ev("dead", "forgotten")).kind == "forgotten"


def test_download_progress_events_carry_bytes_rate_and_time_left():
    def downloading(done: int) -> ModelRecord:
        return ModelRecord(
            id=ModelId("m"),
            status="loading",
            engine="transformers",
            progress=done / 1000,
            phase="downloading",
            done_bytes=done,
            total_bytes=1000,
            bytes_per_s=100.0,
        )

    (started,) = record_events(_node(), _node(downloading(0)))
    (event,) = record_events(_node(downloading(0)), _node(downloading(400)))
    assert started.kind == "load_started"
    assert event.kind == "load_progress"
    assert event.data == {
        "status": "loading",
        "progress": 0.4,
        "phase": "downloading",
        "done_bytes": 400,
        "total_bytes": 1000,
        "bytes_per_s": 100.0,
        "eta_s": 6.0,
    }
    # The phase changing is progress too, even with no fraction to show.
    converting = ModelRecord(id=ModelId("m"), status="loading", engine="transformers", phase="converting")
    assert [e.kind for e in record_events(_node(downloading(1000)), _node(converting))] == ["load_progress"]
