"""Command palette entries built from the live fleet: load/unload/pin/unpin/filter by name.

The provider knows the app only as `FleetActions` (the state it reads and the actions it calls), so this
module imports nothing from `app`; `HelexaApp` satisfies the protocol and lists `FleetCommands` in its
`COMMANDS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol, runtime_checkable

from textual.command import DiscoveryHit, Hit, Hits, Provider

from .fleet import FleetState

Command = tuple[str, Callable[[], object], str]


@runtime_checkable
class FleetActions(Protocol):
    """What the palette needs from the app it runs in."""

    @property
    def state(self) -> FleetState | None: ...

    def action_toggle_devices(self) -> None: ...

    def action_clear_filter(self) -> None: ...

    def set_filter(self, needle: str) -> None: ...

    def request_load(self, model: str, node: str | None) -> None: ...

    def request_unload(self, model: str, node: str | None) -> None: ...

    def request_pin(self, model: str, nodes: Sequence[str]) -> None: ...

    def request_unpin(self, model: str) -> None: ...


class FleetCommands(Provider):
    def _actions(self) -> FleetActions:
        app = self.app
        if not isinstance(app, FleetActions):
            raise TypeError(f"FleetCommands needs an app with the fleet actions, not {type(app).__name__}")
        return app

    def _commands(self, *, discover: bool = False) -> list[Command]:
        app = self._actions()
        state = app.state
        out: list[Command] = [
            ("Toggle device rows", app.action_toggle_devices, "show or hide each node's devices"),
            ("Clear filter", app.action_clear_filter, "show every node and model"),
        ]
        if state is None:
            return out
        alive = [n.name for n in state.nodes if n.liveness == "alive"]
        for entry in state.catalogue:
            m = entry.id
            out.append((f"Load {m}", partial(app.request_load, m, None), "the mesh picks a feasible node"))
            out.append((f"Unload {m} everywhere", partial(app.request_unload, m, None), "asks first"))
            if entry.pinned_on:
                out.append((f"Unpin {m}", partial(app.request_unpin, m), "asks first"))
            if discover:
                continue
            for node in entry.feasible_on or alive:
                out.append((f"Load {m} on {node}", partial(app.request_load, m, node), ""))
                if node not in entry.pinned_on:
                    pins = (*entry.pinned_on, node)
                    out.append((f"Pin {m} on {node}", partial(app.request_pin, m, pins), "affinity only"))
            for loc in entry.locations:
                node = state.node_name(loc.node)
                out.append((f"Unload {m} from {node}", partial(app.request_unload, m, node), "asks first"))
            out.append((f"Filter on {m}", partial(app.set_filter, m), ""))
        if not discover:
            out.extend((f"Filter on node {n.name}", partial(app.set_filter, n.name), "") for n in state.nodes)
        return out

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands(discover=True):
            yield DiscoveryHit(name, callback, help=help_text or None)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, text=name, help=help_text or None)
