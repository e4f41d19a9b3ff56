"""`HttpFleetSource` against a real aiohttp agent stand-in: polling, events, reconnect, operator calls."""

from __future__ import annotations

import asyncio

import pytest

from helexa.tui.fleet import ConnectionStatus, FleetEvent, FleetState
from helexa.tui.source import HttpFleetSource, OperatorError, backoff_s
from tests.helpers.fake_agent import CALLS, make_agent
from tests.helpers.polling import eventually
from tests.helpers.ports import free_port


class Sink:
    def __init__(self) -> None:
        self.states: list[FleetState] = []
        self.events: list[FleetEvent] = []
        self.connection: list[ConnectionStatus] = []

    def on_fleet_state(self, state: FleetState) -> None:
        self.states.append(state)

    def on_fleet_event(self, event: FleetEvent) -> None:
        self.events.append(event)

    def on_connection(self, status: ConnectionStatus) -> None:
        self.connection.append(status)


async def test_polls_state_and_follows_events(aiohttp_server) -> None:
    server = await aiohttp_server(make_agent())
    source = HttpFleetSource(f"http://127.0.0.1:{server.port}", poll_interval_s=0.02, backoff_initial_s=0.01)
    sink = Sink()
    task = asyncio.create_task(source.run(sink))
    try:
        await eventually(lambda: sink.states and len(sink.events) >= 2, timeout_s=5.0, interval_s=0.01)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    state = sink.states[0]
    assert [n.name for n in state.nodes] == ["beast", "laptop"]
    assert state.nodes[1].liveness == "dead" and state.nodes[1].models[0].progress == 0.4
    assert state.catalogue[0].feasible_on == ("beast", "laptop")
    assert len(sink.states) == 1  # identical polls are not re-published
    assert (sink.events[0].type, sink.events[1].type) == ("join", "evict")
    assert sink.connection[-1].state == "connected"


async def test_reconnecting_with_backoff_when_agent_is_away() -> None:
    port = free_port()
    source = HttpFleetSource(f"http://127.0.0.1:{port}", backoff_initial_s=0.01, backoff_max_s=0.02)
    sink = Sink()
    task = asyncio.create_task(source.run(sink))
    try:
        await eventually(
            lambda: sum(c.state == "reconnecting" for c in sink.connection) >= 3,
            timeout_s=5.0,
            interval_s=0.01,
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    last = sink.connection[-1]
    assert last.state == "reconnecting" and last.attempt >= 3 and "connection refused" in (last.reason or "")


async def test_operator_calls_and_errors(aiohttp_server) -> None:
    server = await aiohttp_server(make_agent())
    source = HttpFleetSource(f"http://127.0.0.1:{server.port}")
    try:
        assert "load helexa/demo" in await source.load_model("helexa/demo", "beast")
        await source.unload_model("helexa/demo", None)
        assert await source.set_pinned("helexa/demo", ["beast"]) == "saved helexa/demo"  # the agent's words
        with pytest.raises(OperatorError, match="model_not_found"):
            await source.load_model("nope", None)
    finally:
        await source.aclose()
    ops = [c[0] for c in server.app[CALLS]]
    assert ops == ["load", "unload", "put", "load"]
    assert server.app[CALLS][2][1]["pinned_on"] == ["beast"]


def test_backoff_doubles_and_caps() -> None:
    assert [backoff_s(a, initial_s=0.5, max_s=4.0) for a in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
