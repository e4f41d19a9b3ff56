"""Ask which nodes a model is pinned on (affinity only; eviction protection is `resident`)."""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class PinScreen(ModalScreen[tuple[str, ...] | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, *, model: str, pinned_on: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self._pinned_on = ", ".join(pinned_on)

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(f"Pin {self.model}", classes="title")
            yield Label("Nodes it may run on (names, comma separated)")
            yield Input(self._pinned_on, id="nodes")
            yield Label("enter: save · esc: cancel", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#nodes", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        nodes = tuple(n.strip() for n in event.value.split(",") if n.strip())
        _ = self.dismiss(nodes)

    def action_cancel(self) -> None:
        _ = self.dismiss(None)
