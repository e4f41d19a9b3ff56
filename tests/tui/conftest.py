"""Helpers for driving the dashboard against the fake fleet (fixed clock, UTC)."""

from __future__ import annotations

from datetime import UTC

from helexa.tui.app import HelexaApp
from helexa.tui.source import FIXED_CLOCK_S, FakeFleetSource
from helexa.tui.widgets import DiffTable


def make_app(fake: FakeFleetSource) -> HelexaApp:
    return HelexaApp(fake, clock=lambda: FIXED_CLOCK_S, tz=UTC)


def select(table: DiffTable, key: str) -> None:
    """Put the table's cursor on the row with `key`."""
    keys = [str(k.value) for k in table.rows]
    table.move_cursor(row=keys.index(key))
