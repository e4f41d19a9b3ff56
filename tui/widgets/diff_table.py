"""A `DataTable` fed whole row lists that touches only what changed.

`apply_rows(rows)` compares against the rows it showed last: when the row keys are the same in the same
order (the usual case: utilisation, memory and rates moved) it updates only the changed cells, with fixed
column widths so nothing is re-measured; when rows appear, vanish or move (a join, a load, a filter) it
rebuilds the rows and keeps the cursor on the same key. The table renders only visible lines, so the
cost of an update is the diff plus one repaint of the visible window.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowKey

from ..rows import Cell, Column, Row


class DiffTable(DataTable[Cell]):
    COLUMNS: ClassVar[tuple[Column, ...]] = ()

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=False)
        self._shown: dict[str, tuple[Cell, ...]] = {}
        self._order: list[str] = []
        self.cells_updated = 0  # for tests and the bench: how much work updates cost
        self.rebuilds = 0

    def on_mount(self) -> None:
        for column in self.COLUMNS:
            self.add_column(column.label, width=column.width, key=column.key)

    @property
    def selected_key(self) -> str | None:
        """The row key under the cursor (None on an empty table)."""
        if not self._order or not 0 <= self.cursor_row < len(self._order):
            return None
        return self._order[self.cursor_row]

    def apply_rows(self, rows: Sequence[Row]) -> int:
        """Show `rows`; returns the number of cells written."""
        keys = [r.key for r in rows]
        if keys == self._order:
            written = 0
            column_keys = [c.key for c in self.COLUMNS]
            # Cells are written straight into the table's store and the table is invalidated once:
            # `update_cell` would schedule a refresh per cell (hundreds per tick on a large fleet).
            data = self._data
            for row in rows:
                old = self._shown[row.key]
                if old == row.cells:
                    continue
                row_data = data[RowKey(row.key)]
                for column_key, before, after in zip(column_keys, old, row.cells, strict=True):
                    if before != after:
                        row_data[ColumnKey(column_key)] = after
                        written += 1
                self._shown[row.key] = row.cells
            if written:
                self._update_count += 1
                self.refresh()
            self.cells_updated += written
            return written
        selected = self.selected_key
        self.clear()
        for row in rows:
            self.add_row(*row.cells, key=row.key)
        self._order = keys
        self._shown = {r.key: r.cells for r in rows}
        self.rebuilds += 1
        if selected in self._shown:
            self.move_cursor(row=keys.index(selected), scroll=False)
        written = len(rows) * len(self.COLUMNS)
        self.cells_updated += written
        return written
