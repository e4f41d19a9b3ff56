"""`helexa tui`: the live fleet in a terminal.

Tabs: Topology (nodes → devices → models), Catalogue (where each model is and could go), Traffic
(sparklines per model and per node). Below them the event log (newest first) and a status bar (agent,
mesh, open/keyed, connection). Keys: l load · u unload · p pin · P unpin · / filter · d devices ·
1/2/3 tabs · ctrl+p command palette · q quit. Unload and unpin ask first.

Data flows one way: a `FleetSource` (HTTP, or the fake) posts messages; each state is diffed into the
visible table so only changed cells are written.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import tzinfo

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.widgets import Footer, Input, Label, TabbedContent, TabPane

from helexa.mesh.client import agent_url

from .commands import FleetCommands
from .fleet import ConnectionStatus, FleetEvent, FleetState
from .messages import ConnectionChanged, FleetEventReceived, StateUpdated
from .rows import catalogue_rows, topology_rows, traffic_rows
from .screens import ConfirmScreen, LoadRequest, LoadScreen, PinScreen
from .source import FakeFleetSource, FleetSource, HttpFleetSource, OperatorError
from .traffic import TrafficHistory
from .widgets import CatalogueTable, DiffTable, EventLog, StatusBar, TopologyTable, TrafficTable

logger = logging.getLogger(__name__)

TRAFFIC_NOTE_ESTIMATED = (
    "Tok/s and busy (in-flight + queued) are exact. The agent publishes no request counter, so Req/s is a "
    "lower bound (≥) from last-used changes between polls; TTFT shows once agents publish ttft_s."
)
TRAFFIC_NOTE_EXACT = "Req/s from the agents' request counters; TTFT as published by the agents."


class _Sink:
    """Adapts a source's callbacks to app messages (the source runs on the app's loop)."""

    def __init__(self, app: HelexaApp) -> None:
        self._app = app

    def on_fleet_state(self, state: FleetState) -> None:
        self._app.post_message(StateUpdated(state))

    def on_fleet_event(self, event: FleetEvent) -> None:
        self._app.post_message(FleetEventReceived(event))

    def on_connection(self, status: ConnectionStatus) -> None:
        self._app.post_message(ConnectionChanged(status))


class HelexaApp(App[int]):
    CSS_PATH = "app.tcss"
    TITLE = "helexa"
    AUTO_FOCUS = "#topology-table"
    COMMANDS = App.COMMANDS | {FleetCommands}
    BINDINGS = [
        Binding("l", "load", "Load"),
        Binding("u", "unload", "Unload"),
        Binding("p", "pin", "Pin"),
        Binding("P", "unpin", "Unpin"),
        Binding("slash", "filter", "Filter"),
        Binding("escape", "clear_filter", "Clear filter", show=False),
        Binding("d", "toggle_devices", "Devices"),
        Binding("1", "show_tab('topology')", "Topology", show=False),
        Binding("2", "show_tab('catalogue')", "Catalogue", show=False),
        Binding("3", "show_tab('traffic')", "Traffic", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self, source: FleetSource, *, clock: Callable[[], float] = time.time, tz: tzinfo | None = None
    ) -> None:
        super().__init__()
        self.source = source
        self.clock = clock
        self.tz = tz
        self.state: FleetState | None = None
        self.connection = ConnectionStatus(state="connecting")
        self.traffic = TrafficHistory()
        self.needle = ""
        self.show_devices = True
        self._views_stale = False

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter nodes and models (esc clears)", id="filter")
        with TabbedContent(id="tabs", initial="topology"):
            with TabPane("Topology", id="topology"):
                yield TopologyTable(id="topology-table")
            with TabPane("Catalogue", id="catalogue"):
                yield CatalogueTable(id="catalogue-table")
            with TabPane("Traffic", id="traffic"):
                yield Label(TRAFFIC_NOTE_ESTIMATED, id="traffic-note")
                yield TrafficTable(id="traffic-table")
        log = EventLog(tz=self.tz, id="events")
        log.border_title = "Events (newest first)"
        yield log
        yield StatusBar(self.source.url, id="status")
        yield Footer()

    def on_mount(self) -> None:
        self.run_worker(self.source.run(_Sink(self)), name="fleet-source", group="source")

    # --- incoming data ---

    def on_state_updated(self, message: StateUpdated) -> None:
        # Every state feeds the traffic history; the views are diffed once per burst (states queued
        # behind a slow paint are coalesced into the newest).
        self.state = message.state
        self.traffic.observe(message.state, self.clock())
        if not self._views_stale:
            self._views_stale = True
            self.call_later(self._show_state)

    def _show_state(self) -> None:
        self._views_stale = False
        if self.state is not None:
            self.query_one(StatusBar).set_state(self.state)
            self.refresh_views()

    def on_fleet_event_received(self, message: FleetEventReceived) -> None:
        self.query_one(EventLog).add(message.event)

    def on_connection_changed(self, message: ConnectionChanged) -> None:
        self.connection = message.status
        self.query_one(StatusBar).set_connection(message.status)

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        self.refresh_views()

    @property
    def active_tab(self) -> str:
        return self.query_one(TabbedContent).active or "topology"

    def active_table(self) -> DiffTable:
        tables: dict[str, type[DiffTable]] = {
            "topology": TopologyTable,
            "catalogue": CatalogueTable,
            "traffic": TrafficTable,
        }
        return self.query_one(tables[self.active_tab])

    def refresh_views(self) -> None:
        """Diff the visible tab only; hidden tabs catch up when shown."""
        state = self.state
        if state is None:
            return
        tab = self.active_tab
        if tab == "topology":
            rows = topology_rows(
                state, now_s=self.clock(), needle=self.needle, show_devices=self.show_devices
            )
            self.query_one(TopologyTable).apply_rows(rows)
        elif tab == "catalogue":
            self.query_one(CatalogueTable).apply_rows(catalogue_rows(state, needle=self.needle))
        else:
            note = TRAFFIC_NOTE_EXACT if self.traffic.exact_requests else TRAFFIC_NOTE_ESTIMATED
            label = self.query_one("#traffic-note", Label)
            if str(label.render()) != note:
                label.update(note)
            self.query_one(TrafficTable).apply_rows(traffic_rows(state, self.traffic, needle=self.needle))

    # --- selection ---

    def selection(self) -> tuple[str | None, str | None]:
        """(model id, node name) under the cursor of the visible table."""
        key = self.active_table().selected_key
        state = self.state
        if key is None or state is None:
            return None, None
        kind, _, rest = key.partition(":")
        if kind == "m":
            node_id, _, model = rest.partition(":")
            return model, state.node_name(node_id)
        if kind in ("n", "tn"):
            return None, state.node_name(rest)
        if kind == "d":
            return None, state.node_name(rest.partition(":")[0])
        if kind in ("c", "tm"):
            return rest, None
        return None, None

    # --- actions ---

    def action_show_tab(self, tab: str) -> None:
        self.query_one(TabbedContent).active = tab
        self.active_table().focus()

    def action_toggle_devices(self) -> None:
        self.show_devices = not self.show_devices
        self.refresh_views()

    def action_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.add_class("visible")
        box.focus()

    def action_clear_filter(self) -> None:
        box = self.query_one("#filter", Input)
        box.value = ""
        box.remove_class("visible")
        self.set_filter("")
        self.active_table().focus()

    def set_filter(self, needle: str) -> None:
        self.needle = needle.strip()
        box = self.query_one("#filter", Input)
        if box.value != needle:
            box.value = needle
        if needle:
            box.add_class("visible")
        self.refresh_views()

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.needle = event.value.strip()
            self.refresh_views()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            self.active_table().focus()

    def action_load(self) -> None:
        model, node = self.selection()
        state = self.state
        models = [n for e in state.catalogue for n in (e.id, *e.aliases)] if state else []
        nodes = [n.name for n in state.nodes if n.liveness == "alive"] if state else []

        def answered(request: LoadRequest | None) -> None:
            if request is not None:
                self.request_load(request.model, request.node)

        _ = self.push_screen(LoadScreen(models=models, nodes=nodes, model=model, node=node), answered)

    def action_unload(self) -> None:
        model, node = self.selection()
        if model is None:
            self.notify("Select a model (a model row, or a catalogue entry) to unload.", severity="warning")
            return
        self.request_unload(model, node)

    def action_pin(self) -> None:
        model, node = self.selection()
        if model is None:
            self.notify("Select a model to pin.", severity="warning")
            return
        entry = self.state.entry(model) if self.state else None
        current = entry.pinned_on if entry else ()
        default = current or ((node,) if node else ())

        def answered(nodes: tuple[str, ...] | None) -> None:
            if nodes is not None:
                self.request_pin(model, nodes)

        _ = self.push_screen(PinScreen(model=model, pinned_on=default), answered)

    def action_unpin(self) -> None:
        model, _node = self.selection()
        if model is None:
            self.notify("Select a model to unpin.", severity="warning")
            return
        self.request_unpin(model)

    # --- operator requests (used by actions and the command palette) ---

    def request_load(self, model: str, node: str | None) -> None:
        self._operate(self.source.load_model(model, node))

    def request_unload(self, model: str, node: str | None) -> None:
        where = f"from {node}" if node else "everywhere it is loaded"
        question = f"Unload {model} {where}? Requests in flight on it will fail."

        def answered(yes: bool | None) -> None:
            if yes:
                self._operate(self.source.unload_model(model, node))

        _ = self.push_screen(ConfirmScreen(question), answered)

    def request_pin(self, model: str, nodes: Sequence[str]) -> None:
        self._operate(self.source.set_pinned(model, tuple(nodes)))

    def request_unpin(self, model: str) -> None:
        entry = self.state.entry(model) if self.state else None
        if entry is not None and not entry.pinned_on:
            self.notify(f"{model} is not pinned.", severity="warning")
            return
        where = ", ".join(entry.pinned_on) if entry else "?"

        def answered(yes: bool | None) -> None:
            if yes:
                self._operate(self.source.set_pinned(model, ()))

        _ = self.push_screen(ConfirmScreen(f"Unpin {model} (pinned on {where})?"), answered)

    def _operate(self, call: Awaitable[str]) -> None:
        async def run() -> None:
            try:
                message = await call
            except OperatorError as exc:
                self.notify(str(exc), severity="error", timeout=8)
                self.query_one(EventLog).add(FleetEvent(type="error", ts=self.clock(), message=str(exc)))
                return
            self.notify(message)
            self.query_one(EventLog).add(FleetEvent(type="operator", ts=self.clock(), message=message))

        self.run_worker(run(), group="operator")


_FAKE_SPEC = re.compile(r"^(\d+)x(\d+)$")


def main(argv: Sequence[str] | None = None) -> int:
    """`helexa tui [--agent URL] [--fake-fleet NODESxGPUS]`."""
    parser = argparse.ArgumentParser(prog="helexa tui", description="The live fleet dashboard.")
    parser.add_argument("--agent", metavar="URL", help="agent to watch (default $HELEXA_AGENT or :31313)")
    parser.add_argument(
        "--mesh-key",
        metavar="KEY",
        help="the mesh key, for load/unload/pin on a keyed mesh (default $HELEXA_MESH_KEY)",
    )
    parser.add_argument(
        "--fake-fleet",
        metavar="NODESxGPUS",
        help="watch a simulated fleet instead (demos and the bench), e.g. 50x8",
    )
    try:
        args = parser.parse_args(list(argv or ()))
    except SystemExit as exc:
        return int(exc.code or 0)
    source: FleetSource
    if args.fake_fleet:
        match = _FAKE_SPEC.match(args.fake_fleet)
        if match is None:
            parser.print_usage()
            return 2
        source = FakeFleetSource(
            nodes=int(match[1]), gpus_per_node=int(match[2]), interval_s=0.5, clock=time.time, open_mesh=True
        )
    else:
        source = HttpFleetSource(
            agent_url(args.agent), mesh_key=args.mesh_key or os.environ.get("HELEXA_MESH_KEY")
        )
    HelexaApp(source).run()
    return 0
