"""One line at the bottom: the connection, the agent, the mesh, and whether the mesh is open."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from ..fleet import ConnectionStatus, FleetState


def status_text(url: str, connection: ConnectionStatus, state: FleetState | None) -> Text:
    text = Text()
    if connection.state == "connected":
        text.append(" ● connected ", style="bold green")
    elif connection.state == "connecting":
        text.append(" ◌ connecting ", style="bold yellow")
    else:
        retry = f", retry in {connection.retry_in_s:.0f}s" if connection.retry_in_s is not None else ""
        text.append(f" ◌ reconnecting (attempt {connection.attempt}{retry}) ", style="bold yellow")
    text.append(f" {url} ")
    if connection.state == "reconnecting" and connection.reason:
        text.append(f" {connection.reason} ", style="red")
    if state is not None:
        text.append("│ mesh ", style="dim")
        text.append(state.mesh, style="bold")
        text.append(" │ ", style="dim")
        if state.open:
            text.append(" OPEN MESH: no key, anyone on the LAN can join ", style="bold black on yellow")
        else:
            text.append("keyed mesh", style="green")
        alive = sum(1 for n in state.nodes if n.liveness == "alive")
        loaded = sum(1 for n in state.nodes for m in n.models if m.status == "loaded")
        text.append(f" │ {alive}/{len(state.nodes)} nodes alive · {loaded} models loaded", style="dim")
    return text


class StatusBar(Static):
    """Redraws only when its text changes."""

    def __init__(self, url: str, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._url = url
        self.connection = ConnectionStatus(state="connecting")
        self.state: FleetState | None = None
        self._text: Text | None = None

    def on_mount(self) -> None:
        self._redraw()

    def set_connection(self, connection: ConnectionStatus) -> None:
        self.connection = connection
        self._redraw()

    def set_state(self, state: FleetState) -> None:
        self.state = state
        self._redraw()

    def _redraw(self) -> None:
        text = status_text(self._url, self.connection, self.state)
        if text != self._text:
            self._text = text
            self.update(text)
