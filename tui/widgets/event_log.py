"""The mesh's event log, newest first.

A line-API scroll view over a bounded deque of pre-rendered lines: a new event is one render of one
line and a repaint of the visible window, however long the log is.
"""

from __future__ import annotations

from collections import deque
from datetime import datetime, tzinfo

from rich.text import Text
from textual.geometry import Size
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ..fleet import FleetEvent

MAX_EVENTS = 1000

EVENT_STYLE = {
    "join": "green",
    "alive": "green",
    "leave": "yellow",
    "suspect": "yellow",
    "dead": "bold red",
    "load_started": "cyan",
    "load_progress": "cyan",
    "load_done": "green",
    "load_failed": "bold red",
    "unload": "yellow",
    "evict": "magenta",
    "error": "bold red",
    "operator": "blue",
}


def format_event(event: FleetEvent, tz: tzinfo | None) -> Text:
    when = datetime.fromtimestamp(event.ts, tz=tz).strftime("%H:%M:%S")
    text = Text(f"{when} ", style="dim")
    text.append(f"{event.type:<13}", style=EVENT_STYLE.get(event.type, ""))
    if event.node:
        text.append(f" {event.node}", style="bold")
    if event.model:
        text.append(f" {event.model}")
    if event.message:
        text.append(f"  {event.message}", style="red" if event.type in ("error", "load_failed") else "")
    return text


class EventLog(ScrollView, can_focus=True):
    """Events, newest at the top. `tz=None` shows local time (tests pass UTC)."""

    def __init__(
        self, *, tz: tzinfo | None = None, id: str | None = None, max_events: int = MAX_EVENTS
    ) -> None:
        super().__init__(id=id)
        self._tz = tz
        self._lines: deque[Strip] = deque(maxlen=max_events)
        self._widest = 0
        self.events: deque[FleetEvent] = deque(maxlen=max_events)

    def add(self, event: FleetEvent) -> None:
        self.events.appendleft(event)
        segments = list(format_event(event, self._tz).render(self.app.console))
        strip = Strip([s for s in segments if s.text != "\n"])
        self._lines.appendleft(strip)
        self._widest = max(self._widest, strip.cell_length)
        self.virtual_size = Size(self._widest, len(self._lines))
        self.refresh()

    def render_line(self, y: int) -> Strip:
        scroll_x, scroll_y = self.scroll_offset
        width = self.scrollable_content_region.width
        index = scroll_y + y
        if index >= len(self._lines):
            return Strip.blank(width, self.rich_style)
        return (
            self._lines[index]
            .crop_extend(scroll_x, scroll_x + width, self.rich_style)
            .apply_style(self.rich_style)
        )


__all__ = ["EventLog", "format_event"]
