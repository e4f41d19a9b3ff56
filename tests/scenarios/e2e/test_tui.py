"""The dashboard (`HelexaApp` + `HttpFleetSource`) against real agents, driven with Pilot: what it shows,
and that its actions really change the fleet (checked through the agents' own `/mesh/state` and the
catalogue file), and that it rides out an agent restart."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC

import pytest
from textual.pilot import Pilot
from textual.widgets import Input

from helexa.engine.base import ModelId
from helexa.tui.app import HelexaApp
from helexa.tui.fleet import ConnectionStatus, FleetEvent, FleetState
from helexa.tui.screens import ConfirmScreen, LoadScreen, PinScreen
from helexa.tui.source import FleetSink, HttpFleetSource, OperatorError
from helexa.tui.widgets import CatalogueTable, DiffTable, EventLog, StatusBar, TopologyTable
from tests.helpers.agents import Fleet
from tests.helpers.polling import eventually

from .conftest import CATALOGUE_TOML

pytestmark = pytest.mark.slow

SIZE = (160, 45)
SMALL = "e2e/small"
COMMENTS = (
    "# e2e catalogue: this comment must survive edits made through the agent.",
    "# A small fake model: loads in 0.6 s (progress reported)",
    "# the id operators type",
)


class RecordingSource(HttpFleetSource):
    """The real HTTP source, fast polling, keeping every state it parsed (to see transient states such
    as a load in progress, which one look at the table could miss)."""

    def __init__(self, url: str, *, mesh_key: str | None = None) -> None:
        super().__init__(
            url, poll_interval_s=0.1, backoff_initial_s=0.1, backoff_max_s=0.4, mesh_key=mesh_key
        )
        self.states: list[FleetState] = []

    async def run(self, sink: FleetSink) -> None:
        source = self

        class Tee:
            def on_fleet_state(self, state: FleetState) -> None:
                source.states.append(state)
                sink.on_fleet_state(state)

            def on_fleet_event(self, event: FleetEvent) -> None:
                sink.on_fleet_event(event)

            def on_connection(self, status: ConnectionStatus) -> None:
                sink.on_connection(status)

        await super().run(Tee())


async def until(
    pilot: Pilot[int], check: Callable[[], bool | Awaitable[bool]], *, what: str, timeout_s: float = 15.0
) -> None:
    """Let the app run until `check()` holds (or fail naming `what` and the app's first events)."""
    try:
        await eventually(check, timeout_s=timeout_s, what=what, pause=pilot.pause)
    except AssertionError as failed:
        events = [(e.type, e.node, e.model, e.message) for e in pilot.app.query_one(EventLog).events]
        raise AssertionError(f"{failed}; events: {events[:12]}") from None


def keys(table: DiffTable) -> list[str]:
    return [str(k.value) for k in table.rows]


def cell(table: DiffTable, key: str, column: str) -> str:
    return str(table.get_cell(key, column)) if key in keys(table) else ""


def select(table: DiffTable, key: str) -> None:
    table.move_cursor(row=keys(table).index(key))


def status_line(app: HelexaApp) -> str:
    return str(app.query_one(StatusBar).render())


def logged(app: HelexaApp, kind: str, node: str, model: str | None = None) -> list[FleetEvent]:
    """Events of `kind` about `node` (a name, as the log shows it) in the event log, newest first."""
    return [
        e
        for e in app.query_one(EventLog).events
        if e.type == kind and e.node == node and (model is None or e.model == model)
    ]


def seen(app: HelexaApp, kind: str, node: str, model: str | None = None) -> bool:
    return bool(logged(app, kind, node, model))


async def test_dashboard_operates_a_real_agent(agents: Fleet) -> None:
    alpha = await agents.start("alpha", catalogue_toml=CATALOGUE_TOML)
    assert alpha.catalogue is not None
    source = RecordingSource(alpha.url)
    app = HelexaApp(source, tz=UTC)
    node_row, model_row = f"n:{alpha.node_id}", f"m:{alpha.node_id}:{SMALL}"
    async with app.run_test(size=SIZE) as pilot:
        topology = app.query_one(TopologyTable)
        catalogue = app.query_one(CatalogueTable)
        await until(pilot, lambda: node_row in keys(topology), what="the agent in the topology")
        assert cell(topology, node_row, "name") == "alpha"
        assert cell(topology, node_row, "where") == f"127.0.0.1:{alpha.port}"
        assert cell(topology, node_row, "state") == "alive"
        assert f"d:{alpha.node_id}:cpu" in keys(topology)
        line = status_line(app)
        assert "● connected" in line and alpha.url in line and "mesh default" in line
        assert "OPEN MESH" in line and "1/1 nodes alive · 0 models loaded" in line

        # Load from the catalogue tab with the `l` dialog, on a chosen node.
        await pilot.press("2")
        await until(pilot, lambda: f"c:{SMALL}" in keys(catalogue), what="the catalogue")
        assert cell(catalogue, f"c:{SMALL}", "feasible") == "alpha"
        assert cell(catalogue, f"c:{SMALL}", "loaded") == "-"
        select(catalogue, f"c:{SMALL}")
        await pilot.press("l")
        await pilot.pause()
        assert isinstance(app.screen, LoadScreen)
        await pilot.press("enter", *"alpha", "enter")  # the model is prefilled from the selection
        await until(
            pilot,
            lambda: agents.model_status_is(alpha, SMALL, "alpha", "loaded"),
            what="the agent to have loaded it",
        )
        await until(
            pilot, lambda: cell(catalogue, f"c:{SMALL}", "loaded") == "alpha", what="catalogue: loaded on"
        )
        await pilot.press("1")
        await until(pilot, lambda: cell(topology, model_row, "state") == "loaded", what="topology: loaded")
        assert "fake cpu" in cell(topology, model_row, "where")
        assert any(
            m.id == SMALL and m.status == "loading" and m.progress is not None
            for s in source.states
            for n in s.nodes
            for m in n.models
        ), "the dashboard never saw the load in progress"
        # The event log follows /mesh/events: the load's start, progress and end, with the node's name.
        await until(pilot, lambda: seen(app, "load_done", "alpha", SMALL), what="load_done in the log")
        assert seen(app, "load_started", "alpha", SMALL)
        progress = [e.message for e in logged(app, "load_progress", "alpha", SMALL)]
        assert progress and all(p is not None and p.endswith("%") for p in progress), progress
        done = logged(app, "load_done", "alpha", SMALL)[0].message
        assert done is not None and done.startswith("in ") and done.endswith(" s"), done
        assert any(
            e.type == "operator" and e.message == f"{SMALL} is loaded on alpha"
            for e in app.query_one(EventLog).events
        )
        await until(pilot, lambda: "1 models loaded" in status_line(app), what="status bar count")

        # Unload asks first: "no" changes nothing, "yes" unloads from the selected node.
        select(topology, model_row)
        await pilot.press("u")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        assert app.screen.question.startswith(f"Unload {SMALL} from alpha?")
        await pilot.press("n")
        await pilot.pause(0.3)
        assert not isinstance(app.screen, ConfirmScreen)
        assert await agents.model_status(alpha, SMALL, "alpha") == "loaded"
        await pilot.press("u")
        await pilot.pause()
        await pilot.press("y")
        await until(
            pilot, lambda: agents.model_status_is(alpha, SMALL, "alpha", None), what="the agent to unload it"
        )
        await until(pilot, lambda: model_row not in keys(topology), what="the model row to go")
        await until(pilot, lambda: seen(app, "unload", "alpha", SMALL), what="unload in the log")
        assert logged(app, "unload", "alpha", SMALL)[0].message == "operator"

        # Pin and unpin write the catalogue through the agent: its models.toml changes, comments kept.
        await pilot.press("2")
        await pilot.pause()
        select(catalogue, f"c:{SMALL}")
        await pilot.press("p")
        await pilot.pause()
        assert isinstance(app.screen, PinScreen)
        await pilot.press(*"alpha", "enter")
        await until(
            pilot,
            lambda: 'pinned_on = ["alpha"]' in alpha.catalogue.read_text(),
            what="the pin in models.toml",
        )
        text = alpha.catalogue.read_text()
        assert all(c in text for c in COMMENTS), text
        await until(pilot, lambda: cell(catalogue, f"c:{SMALL}", "pinned") == "alpha", what="pinned on")
        entry = next(e for e in (await agents.state(alpha))["catalogue"] if e["id"] == SMALL)
        assert entry["pinned_on"] == ["alpha"] and entry["aliases"] == ["small"]
        assert entry["options"]["tokens"] == ["hello", " world", " again"]

        await pilot.press("P")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("y")
        await until(
            pilot,
            lambda: "pinned_on = []" in alpha.catalogue.read_text(),
            what="the unpin in models.toml",
        )
        text = alpha.catalogue.read_text()
        assert all(c in text for c in COMMENTS)
        # Only pinned_on and the version were written: no defaults spelled out.
        assert not any(k in text for k in ("min_devices", "min_device_memory_mb", "resident", "preload")), (
            text
        )
        await until(pilot, lambda: cell(catalogue, f"c:{SMALL}", "pinned") == "-", what="unpinned")

        # The agent goes away: the status bar says so; it comes back (a new generation): reconnected.
        generation = app.state.nodes[0].generation if app.state else 0
        await alpha.running.stop()
        await until(pilot, lambda: app.connection.state == "reconnecting", what="reconnecting")
        assert "reconnecting (attempt" in status_line(app) and "cannot reach the agent" in status_line(app)
        again = await agents.restart(alpha)
        assert again.node_id == alpha.node_id
        await until(
            pilot,
            lambda: (
                app.connection.state == "connected"
                and app.state is not None
                and app.state.nodes[0].generation > generation
            ),
            what="reconnected to the restarted agent",
        )
        assert "● connected" in status_line(app)
        await pilot.press("1")
        await until(pilot, lambda: cell(topology, node_row, "state") == "alive", what="alive again")


async def test_dashboard_over_a_three_agent_mesh(agents: Fleet) -> None:
    alpha = await agents.start("alpha", catalogue_toml=CATALOGUE_TOML)
    beta = await agents.start("beta", peers=[alpha], entries=[])
    gamma = await agents.start("gamma", peers=[alpha], entries=[])
    source = RecordingSource(beta.url)  # watched through beta, whose own catalogue is empty
    app = HelexaApp(source, tz=UTC)
    async with app.run_test(size=SIZE) as pilot:
        topology = app.query_one(TopologyTable)
        rows = [f"n:{a.node_id}" for a in (alpha, beta, gamma)]

        def all_alive() -> bool:
            return all(cell(topology, r, "state") == "alive" for r in rows)

        await until(pilot, all_alive, what="three alive nodes")
        assert [cell(topology, r, "name") for r in rows] == ["alpha", "beta", "gamma"]
        await until(pilot, lambda: "3/3 nodes alive" in status_line(app), what="status bar")

        # Load on gamma: with gamma's row selected the dialog offers gamma as the node; beta asks gamma.
        select(topology, rows[2])
        await pilot.press("l")
        await pilot.pause()
        assert isinstance(app.screen, LoadScreen)
        assert app.screen.query_one("#node", Input).value == "gamma"
        await pilot.press(*"small", "enter")
        await until(
            pilot, lambda: agents.model_status_is(gamma, SMALL, "gamma", "loaded"), what="loaded on gamma"
        )
        model_row = f"m:{gamma.node_id}:{SMALL}"
        await until(pilot, lambda: cell(topology, model_row, "state") == "loaded", what="shown on gamma")
        assert gamma.engine.loads[ModelId(SMALL)] == 1
        assert alpha.engine.loads[ModelId(SMALL)] == 0 and beta.engine.loads[ModelId(SMALL)] == 0
        # Gamma's load reaches beta's event log through gossip.
        await until(pilot, lambda: seen(app, "load_done", "gamma", SMALL), what="gamma's load_done")

        # Gamma dies: the dashboard shows it suspect, then dead.
        await gamma.running.kill()
        await until(pilot, lambda: cell(topology, rows[2], "state") == "dead", what="gamma dead")
        assert seen(app, "dead", "gamma")
        await until(pilot, lambda: "2/3 nodes alive" in status_line(app), what="status bar after the death")


async def test_dashboard_shows_a_download_while_it_runs(agents: Fleet) -> None:
    """A model whose load downloads (the fake engine reports bytes as `engine.download` does): its row
    and the event log show the bytes, the rate and the time left while it runs, from the agent's own
    `/mesh/state` and `/mesh/events`."""
    big = "e2e/download"
    toml = (
        f'[[models]]\nid = "{big}"\nengine = "fake"\nmemory_mb = 100\n'
        "options = { download_bytes = 98400000, load_delay_s = 3.0, memory_mb = 100 }\n"
    )
    alpha = await agents.start("alpha", catalogue_toml=toml)
    app = HelexaApp(RecordingSource(alpha.url), tz=UTC)
    row = f"m:{alpha.node_id}:{big}"
    async with app.run_test(size=SIZE) as pilot:
        topology = app.query_one(TopologyTable)
        await until(pilot, lambda: f"n:{alpha.node_id}" in keys(topology), what="the agent in the topology")
        loading = asyncio.create_task(agents.post(alpha, "/mesh/models/load", {"model": big}))
        shown: list[str] = []

        def downloading() -> bool:
            shown.append(cell(topology, row, "state"))
            return "MB/s" in shown[-1] and "left" in shown[-1]

        await until(pilot, downloading, what="the download in the model's row", timeout_s=10)
        assert " MB " in shown[-1] and "/98.4 MB" in shown[-1], shown[-1]
        assert not loading.done(), "seen only after the load ended"
        await until(pilot, lambda: cell(topology, row, "state") == "loaded", what="loaded")
        status, _ = await loading
        assert status == 200
        messages = [e.message or "" for e in logged(app, "load_progress", "alpha", big)]
        assert any(m.startswith("downloading ") and "MB/s" in m for m in messages), messages


async def test_dashboard_on_a_keyed_mesh(agents: Fleet) -> None:
    key = "e2e-mesh-key-0123456789abcdef"
    alpha = await agents.start("alpha", catalogue_toml=CATALOGUE_TOML, args=["--mesh-key", key])
    keyless = HttpFleetSource(alpha.url)
    with pytest.raises(OperatorError, match="no mesh key: pass --mesh-key or set HELEXA_MESH_KEY"):
        await keyless.load_model(SMALL)
    await keyless.aclose()
    assert await agents.model_status(alpha, SMALL, "alpha") is None

    source = RecordingSource(alpha.url, mesh_key=key)
    app = HelexaApp(source, tz=UTC)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "keyed mesh" in status_line(app), what="keyed mesh in the status bar")
        assert "OPEN MESH" not in status_line(app)
        await pilot.press("l")
        await pilot.pause()
        await pilot.press(*"small", "enter", "enter")
        await until(
            pilot, lambda: agents.model_status_is(alpha, SMALL, "alpha", "loaded"), what="loaded with the key"
        )
        await until(pilot, lambda: "1 models loaded" in status_line(app), what="shown loaded")
