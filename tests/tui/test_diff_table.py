"""`DiffTable` paints what it was given: after any sequence of cell changes, scrolls and cursor moves,
the lines it paints equal those of a plain `DataTable` built from scratch with the same rows.

`DiffTable` discards `DataTable`'s private render caches by key instead of invalidating them all, builds
off-screen rows only when they come into view, and repaints only changed lines; a stale line anywhere
(a missed cache entry, a missed repaint, a pending row painted unbuilt) shows up here as a mismatch.
"""

from __future__ import annotations

import random
from typing import Any

from rich.text import Text
from textual.app import App, ComposeResult
from textual.containers import Horizontal
from textual.geometry import Region
from textual.widgets import DataTable

from helexa.tui.rows import Cells, Column, Row
from helexa.tui.widgets import DiffTable

ROWS = 60
SIZE = (100, 14)  # about ten data rows on screen: most of the table is off screen


def cells(name: str, value: int, hot: bool) -> Cells:
    bar = Text("█" * (value % 9), style="red" if hot else "green")
    bar.append(f" {value}")
    # A string with brackets: shown as is, never parsed as markup.
    return (Text(name, style="bold"), f"[{value % 7}] v{value}", bar)


class Table(DiffTable):
    COLUMNS = (
        Column(key="name", label="Name", width=8),
        Column(key="value", label="Value", width=10),
        Column(key="bar", label="Bar", width=14),
    )


class Pair(App[None]):
    CSS = "Horizontal { height: 1fr; } DataTable { width: 48; height: 1fr; }"

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Table(id="diff")
            yield DataTable(id="reference", cursor_type="row", zebra_stripes=False)

    def on_mount(self) -> None:
        reference = self.query_one("#reference", DataTable)
        for column in Table.COLUMNS:
            reference.add_column(column.label, width=column.width, key=column.key)


def make_rows(values: list[tuple[int, bool]]) -> list[Row]:
    return [Row(f"r{i}", cells, (f"row {i}", v, hot)) for i, (v, hot) in enumerate(values)]


def painted(table: DataTable[Any]) -> list[str]:
    width, height = table.size
    return [strip.text for strip in table.render_lines(Region(0, 0, width, height))]


async def test_painted_lines_match_a_table_built_from_scratch() -> None:
    rng = random.Random(7)
    values = [(rng.randrange(100), False) for _ in range(ROWS)]
    app = Pair()
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(Table)
        reference = app.query_one("#reference", DataTable)
        table.apply_rows(make_rows(values))
        await pilot.pause()
        checked = 0
        for step in range(40):
            for i in rng.sample(range(ROWS), rng.randrange(1, 20)):
                value, hot = values[i]
                values[i] = (value + rng.randrange(1, 5), hot) if rng.random() < 0.8 else (value, not hot)
            table.apply_rows(make_rows(values))
            if step % 5 == 4:  # scroll (off-screen rows come into view) and move the cursor
                row = rng.randrange(ROWS)
                table.move_cursor(row=row)
                reference.move_cursor(row=row)
            await pilot.pause()
            reference.clear()
            for i, row_cells in enumerate(r.cells for r in make_rows(values)):
                reference.add_row(*(Text(c) if isinstance(c, str) else c for c in row_cells), key=f"r{i}")
            reference.move_cursor(row=table.cursor_row, scroll=False)
            reference.scroll_to(y=table.scroll_offset.y, animate=False, immediate=True)
            await pilot.pause()
            assert reference.scroll_offset == table.scroll_offset
            assert painted(table) == painted(reference), f"step {step}"
            checked += 1
        assert checked == 40
        assert table.rebuilds == 1  # every step was an in-place update
        assert table.rows_repainted > 0


async def test_off_screen_rows_are_built_when_needed() -> None:
    values = [(i, False) for i in range(ROWS)]
    app = Pair()
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(Table)
        table.apply_rows(make_rows(values))
        await pilot.pause()
        values = [(v + 1, hot) for v, hot in values]
        written = table.apply_rows(make_rows(values))
        # Only the rows on screen (and a margin) were built; the rest wait.
        assert 0 < written < ROWS
        assert table.pending_rows > ROWS // 2
        # Reading a pending row builds it.
        assert str(table.get_cell("r50", "value")) == "[2] v51"
        assert str(table.get_row("r51")[1]) == "[3] v52"
        # Scrolling to the bottom builds (and paints) the rows that come into view.
        pending = table.pending_rows
        table.move_cursor(row=ROWS - 1)
        await pilot.pause()
        assert table.pending_rows < pending
        assert "row 59" in painted(table)[-1] and "v60" in painted(table)[-1]
        # Unchanged inputs cost nothing.
        cells_before = table.cells_updated
        assert table.apply_rows(make_rows(values)) == 0
        assert table.cells_updated == cells_before


async def test_a_row_changing_back_before_being_built_shows_its_latest_inputs() -> None:
    values = [(i, False) for i in range(ROWS)]
    app = Pair()
    async with app.run_test(size=SIZE) as pilot:
        table = app.query_one(Table)
        table.apply_rows(make_rows(values))
        await pilot.pause()
        changed = list(values)
        changed[40] = (999, True)
        table.apply_rows(make_rows(changed))
        assert table.pending_rows == 1
        table.apply_rows(make_rows(values))  # back to what the table holds
        assert str(table.get_cell("r40", "value")) == "[5] v40"
