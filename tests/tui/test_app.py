"""Every dashboard action driven with Pilot against the fake fleet; the fake records operator calls."""

from __future__ import annotations

from helexa.tui.fleet import ConnectionStatus
from helexa.tui.messages import ConnectionChanged
from helexa.tui.screens import ConfirmScreen, LoadScreen, PinScreen
from helexa.tui.source import FakeFleetSource, OperatorCall
from helexa.tui.widgets import CatalogueTable, EventLog, StatusBar, TopologyTable

from .conftest import make_app, select

SIZE = (150, 40)
QWEN7 = "Qwen/Qwen2.5-7B-Instruct"
QWEN05 = "Qwen/Qwen2.5-0.5B-Instruct"


def row_keys(table) -> list[str]:
    return [str(k.value) for k in table.rows]


async def test_shows_topology_and_catalogue() -> None:
    fake = FakeFleetSource(nodes=4, gpus_per_node=2)
    app = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        keys = row_keys(app.query_one(TopologyTable))
        assert "n:node-000" in keys and "d:node-000:cuda:1" in keys
        assert f"m:node-000:{QWEN05}" in keys and "m:node-003:helexa/demo" in keys
        await pilot.press("2")
        await pilot.pause()
        assert row_keys(app.query_one(CatalogueTable))[0] == "c:Qwen/Qwen2.5-0.5B-Instruct"
        assert len(app.query_one(EventLog).events) == 4  # four joins


async def test_load_with_node_from_dialog_then_progress_shows() -> None:
    fake = FakeFleetSource(nodes=4, gpus_per_node=2, load_steps=2)
    app = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("2")
        await pilot.pause()
        select(app.query_one(CatalogueTable), f"c:{QWEN7}")
        await pilot.press("l")
        await pilot.pause()
        assert isinstance(app.screen, LoadScreen)
        await pilot.press("enter")  # model prefilled from the selection; focus moves to the node
        await pilot.press(*"beast", "enter")
        await pilot.pause()
        assert fake.calls == [OperatorCall(op="load", model=QWEN7, node="beast")]
        await pilot.press("1")
        await pilot.pause()
        table = app.query_one(TopologyTable)
        status = table.get_cell(f"m:node-000:{QWEN7}", "state")
        assert "0%" in str(status)
        fake.tick()
        await pilot.pause()
        assert "50%" in str(table.get_cell(f"m:node-000:{QWEN7}", "state"))
        fake.tick()
        await pilot.pause()
        assert str(table.get_cell(f"m:node-000:{QWEN7}", "state")) == "loaded"
        types = [e.type for e in app.query_one(EventLog).events]
        assert types[0] == "load_done" and set(types[1:3]) == {"operator", "load_started"}


async def test_load_without_node_lets_mesh_place() -> None:
    fake = FakeFleetSource(nodes=4, gpus_per_node=2)
    app = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("2")
        await pilot.pause()
        select(app.query_one(CatalogueTable), "c:helexa/demo")
        await pilot.press("l", "enter", "enter")
        await pilot.pause()
        assert fake.calls == [OperatorCall(op="load", model="helexa/demo", node=None)]


async def test_load_cancel_sends_nothing() -> None:
    fake = FakeFleetSource(nodes=2, gpus_per_node=1)
    app = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("l")
        await pilot.pause()
        await pilot.press("escape")
        await pilot.pause()
        assert fake.calls == [] and not isinstance(app.screen, LoadScreen)


async def test_unload_asks_first() -> None:
    fake = FakeFleetSource(nodes=4, gpus_per_node=2)
    app = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        table = app.query_one(TopologyTable)
        select(table, f"m:node-001:{QWEN7}")
        await pilot.press("u")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        await pilot.pause()
        assert fake.calls == []
        await pilot.press("u")
        await pilot.pause()
        await pilot.press("y")
        await pilot.pause()
        assert fake.calls == [OperatorCall(op="unload", model=QWEN7, node="benjy")]
        assert f"m:node-001:{QWEN7}" not in row_keys(table)


async def test_unload_needs_a_model() -> None:
    fake = FakeFleetSource(nodes=2, gpus_per_node=1)
    app = make_app(fake)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        select(app.query_one(TopologyTable), "n:node-000")
        await pilot.press("u")
        await pilot.pause()
        assert fake.calls == [] and not isinstance(app.screen, ConfirmScreen)
        assert any("Select a model" in n.message for n in app._notifications)


async def test_pin_then_unpin_with_confirmation() -> None:
    fake = FakeFleetSource(nodes=4, gpus_per_node=2)
    app = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        select(app.query_one(TopologyTable), f"m:node-001:{QWEN7}")
        await pilot.press("p")
        await pilot.pause()
        assert isinstance(app.screen, PinScreen)
        await pilot.press("end", *", beast", "enter")
        await pilot.pause()
        assert fake.calls == [OperatorCall(op="pin", model=QWEN7, pinned_on=("benjy", "beast"))]
        await pilot.press("2")
        await pilot.pause()
        catalogue = app.query_one(CatalogueTable)
        assert str(catalogue.get_cell(f"c:{QWEN7}", "pinned")) == "benjy, beast"
        select(catalogue, f"c:{QWEN7}")
        await pilot.press("P")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await pilot.pause()
        assert fake.calls[-1] == OperatorCall(op="pin", model=QWEN7, pinned_on=())
        assert str(catalogue.get_cell(f"c:{QWEN7}", "pinned")) == "-"


async def test_filter_and_device_toggle() -> None:
    fake = FakeFleetSource(nodes=4, gpus_per_node=2)
    app = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        table = app.query_one(TopologyTable)
        await pilot.press("slash", *"benjy")
        await pilot.pause()
        assert row_keys(table) == [
            "n:node-001",
            "d:node-001:cuda:0",
            "d:node-001:cuda:1",
            f"m:node-001:{QWEN7}",
        ]
        await pilot.press("escape")
        await pilot.pause()
        assert len(row_keys(table)) == 14
        await pilot.press("d")
        await pilot.pause()
        assert not any(k.startswith("d:") for k in row_keys(table))
        # Filtering on a model keeps only the nodes that have it.
        app.set_filter("demo")
        await pilot.pause()
        assert row_keys(table) == ["n:node-003", "m:node-003:helexa/demo"]


async def test_command_palette_loads_on_a_node() -> None:
    fake = FakeFleetSource(nodes=4, gpus_per_node=2)
    app = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Load helexa/demo on laptop")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause()
        assert fake.calls == [OperatorCall(op="load", model="helexa/demo", node="laptop")]


async def test_operator_error_is_shown() -> None:
    fake = FakeFleetSource(nodes=2, gpus_per_node=1)
    fake.fail_next = "load helexa/demo: no room (model_unavailable, HTTP 503)"
    app = make_app(fake)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await pilot.pause()
        app.request_load("helexa/demo", None)
        await pilot.pause()
        event = app.query_one(EventLog).events[0]
        assert event.type == "error" and "no room" in (event.message or "")
        assert any(n.severity == "error" for n in app._notifications)


async def test_dead_node_and_reconnecting_status() -> None:
    fake = FakeFleetSource(nodes=3, gpus_per_node=1)
    app = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        fake.kill_node("benjy")
        await pilot.pause()
        assert str(app.query_one(TopologyTable).get_cell("n:node-001", "state")) == "dead"
        assert app.query_one(EventLog).events[0].type == "dead"
        app.post_message(
            ConnectionChanged(
                ConnectionStatus(state="reconnecting", attempt=2, retry_in_s=1.0, reason="refused")
            )
        )
        await pilot.pause()
        assert "reconnecting (attempt 2" in str(app.query_one(StatusBar).render())


async def test_only_changed_cells_are_written() -> None:
    fake = FakeFleetSource(nodes=50, gpus_per_node=8)
    app = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        table = app.query_one(TopologyTable)
        rebuilds, cells = table.rebuilds, table.cells_updated
        fake.publish()
        await pilot.pause()
        assert table.rebuilds == rebuilds and table.cells_updated == cells  # same state: nothing written
        fake.tick()
        await pilot.pause()
        written = table.cells_updated - cells
        assert table.rebuilds == rebuilds
        assert 0 < written < len(table.rows) * len(table.columns) / 2


async def test_a_burst_of_states_is_diffed_once_and_every_state_is_counted() -> None:
    fake = FakeFleetSource(nodes=4, gpus_per_node=2)
    app = make_app(fake)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        shown = []
        refresh_views = app.refresh_views

        def counting_refresh_views() -> None:
            shown.append(app.state)
            refresh_views()

        app.refresh_views = counting_refresh_views  # type: ignore[method-assign]
        series = next(iter(app.traffic.models.values()))
        samples = series.current.n
        for _ in range(3):  # three states queued before the app gets to run
            fake.tick()
        await pilot.pause()
        assert shown == [fake.snapshot()]  # one diff, of the newest state
        assert series.current.n == samples + 3  # the traffic history saw all three
        table = app.query_one(TopologyTable)
        utilization = fake.snapshot().nodes[0].devices[0].utilization
        assert utilization is not None
        assert str(table.get_cell("d:node-000:cuda:0", "util")) == f"{utilization * 100:.0f}%"
