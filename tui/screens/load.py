"""Ask which model to load, and optionally where."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Input, Label


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadRequest:
    model: str
    node: str | None = None


class LoadScreen(ModalScreen[LoadRequest | None]):
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(
        self,
        *,
        models: Sequence[str],
        nodes: Sequence[str],
        model: str | None = None,
        node: str | None = None,
    ) -> None:
        super().__init__()
        self._model_ids = list(models)
        self._node_names = list(nodes)
        self._model = model or ""
        self._node = node or ""

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("Load a model", classes="title")
            yield Label("Model (id or alias)")
            yield Input(
                self._model, id="model", suggester=SuggestFromList(self._model_ids, case_sensitive=False)
            )
            yield Label("Node (empty: let the mesh place it)")
            yield Input(
                self._node, id="node", suggester=SuggestFromList(self._node_names, case_sensitive=False)
            )
            yield Label("enter: load · esc: cancel", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#model", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        if event.input.id == "model" and not self._node_value():
            self.query_one("#node", Input).focus()
            return
        model = self.query_one("#model", Input).value.strip()
        if not model:
            self.query_one("#model", Input).focus()
            return
        _ = self.dismiss(LoadRequest(model=model, node=self._node_value() or None))

    def _node_value(self) -> str:
        return self.query_one("#node", Input).value.strip()

    def action_cancel(self) -> None:
        _ = self.dismiss(None)
