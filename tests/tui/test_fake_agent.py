"""The fake fleet as `/mesh/state` JSON and behind HTTP (what the bench measures): the JSON parses back
to the very state the fake holds, and the dashboard connected over HTTP shows and follows the fleet."""

from __future__ import annotations

import asyncio
from datetime import UTC

import orjson

from helexa.tui.app import HelexaApp
from helexa.tui.fake_agent import fake_agent_app
from helexa.tui.fleet import parse_state
from helexa.tui.source import FIXED_CLOCK_S, FakeFleetSource, HttpFleetSource
from helexa.tui.widgets import EventLog, StatusBar, TopologyTable


async def test_wire_state_parses_back_to_the_snapshot() -> None:
    fake = FakeFleetSource(nodes=12, gpus_per_node=4, load_steps=3)
    checked = 0
    for step in range(6):
        fake.tick()
        if step == 1:
            await fake.load_model("Qwen/Qwen2.5-7B-Instruct", "gpu-03")
        if step == 2:
            fake.kill_node("gpu-05", "suspect")
            await fake.set_pinned("qwen", ["gpu-01", "gpu-02"])
        body = orjson.dumps(fake.wire_state())
        assert parse_state(orjson.loads(body)) == fake.snapshot()
        checked += 1
    assert checked == 6
    # It carries what real agents send and the dashboard ignores, so parsing costs the same.
    node = fake.wire_state()["nodes"][0]
    assert {"version", "heartbeat", "engines", "labels"} <= node.keys()
    assert {"uuid", "compute_capability"} <= node["devices"][0].keys()


async def test_dashboard_over_http_follows_a_changing_fleet(aiohttp_server) -> None:
    fake = FakeFleetSource(nodes=6, gpus_per_node=2)
    server = await aiohttp_server(fake_agent_app(fake))
    source = HttpFleetSource(f"http://127.0.0.1:{server.port}", poll_interval_s=0.02)
    app = HelexaApp(source, clock=lambda: FIXED_CLOCK_S, tz=UTC)
    async with app.run_test(size=(150, 40)) as pilot:
        table = app.query_one(TopologyTable)
        expected = sum(1 + len(n.devices) + len(n.models) for n in fake.snapshot().nodes)
        async with asyncio.timeout(10):
            while len(table.rows) < expected or len(app.query_one(EventLog).events) < 6:
                await pilot.pause(0.02)
        assert "d:node-005:cuda:1" in [str(k.value) for k in table.rows]
        first = str(table.get_cell("d:node-000:cuda:0", "util"))
        async with asyncio.timeout(10):  # utilisation moves on every poll
            while str(
                table.get_cell("d:node-000:cuda:0", "util")
            ) == first or table.cells_updated == table.rebuilds * len(table.rows) * len(table.columns):
                await pilot.pause(0.02)
        assert table.rebuilds == 1  # every later poll was an in-place update
        assert "connected" in str(app.query_one(StatusBar).render())
