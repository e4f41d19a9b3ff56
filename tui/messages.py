"""Messages the fleet source posts to the app (the source runs in a worker on the app's loop)."""

from __future__ import annotations

from textual.message import Message

from .fleet import ConnectionStatus, FleetEvent, FleetState


class StateUpdated(Message):
    """A new `/mesh/state` snapshot arrived."""

    def __init__(self, state: FleetState) -> None:
        super().__init__()
        self.state = state


class FleetEventReceived(Message):
    """One event from `/mesh/events`."""

    def __init__(self, event: FleetEvent) -> None:
        super().__init__()
        self.event = event


class ConnectionChanged(Message):
    """Connected, or reconnecting after the agent went away."""

    def __init__(self, status: ConnectionStatus) -> None:
        super().__init__()
        self.status = status
