"""A `DataTable` fed whole row lists that touches only what changed.

`apply_rows(rows)` compares against the rows it showed last. When the row keys are the same in the same
order (the usual case: utilisation, memory and rates moved) only rows whose inputs changed are looked
at: on-screen ones are built and their changed cells written at once; off-screen ones are kept pending
and built when they scroll into view (or are read with `get_row`/`get_cell`). When rows appear, vanish
or move (a join, a load, a filter) it rebuilds the rows and keeps the cursor on the same key.

Why not `update_cell` or `refresh()`: `DataTable` keys every render cache (cells, rows, lines, row
offsets) on one table-wide `_update_count`, and `update_cell` bumps it, so a single changed cell makes
the next paint re-render every visible cell through Rich (about 70 % of the dashboard's CPU on a
50-node fleet, measured with `scripts/bench tui --profile`). Here the counter stays put and the stale
cache entries are discarded by key, so a paint re-renders the changed cells only, and only the changed
lines on screen are repainted. This reaches into `DataTable`'s private caches (textual 8.x);
`tests/tui/test_diff_table.py` checks that what is painted matches a table built from scratch, so a
textual change that breaks the scheme fails there.

Strings are stored as plain `Text`: never parsed as Rich markup (agent-supplied names, versions and
errors may contain brackets), and markup parsing on every repaint was a measurable cost. Rows are one
line high (the row index is the line).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.style import Style
from rich.text import Text
from textual.geometry import Region
from textual.strip import Strip
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey, RowKey

from ..rows import Cell, Cells, Column, Row

# Rows just outside the window that are built eagerly anyway (cheap insurance for one-line scrolls).
SCREEN_MARGIN_ROWS = 2


def shown_as(cell: Cell) -> Text:
    """What the table stores for a cell: strings as plain text, exactly as `DataTable` lays them out."""
    return Text(cell, no_wrap=True, end="") if isinstance(cell, str) else cell


class DiffTable(DataTable[Cell]):
    COLUMNS: ClassVar[tuple[Column, ...]] = ()

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes, cursor_type="row", zebra_stripes=False)
        self._shown: dict[str, Cells] = {}  # the cells in the table's store
        self._inputs: dict[str, tuple[object, ...]] = {}  # the newest inputs, shown or pending
        self._pending: dict[str, Row] = {}  # changed off-screen rows, built when needed
        self._order: list[str] = []
        self._paint_style: Style | None = None  # the widget's style while a paint is in progress
        self._column_keys = tuple(ColumnKey(c.key) for c in self.COLUMNS)
        self.cells_updated = 0  # for tests: how much work updates cost
        self.rebuilds = 0
        self.rows_repainted = 0  # changed rows that were on screen (and so repainted)

    def on_mount(self) -> None:
        for column in self.COLUMNS:
            self.add_column(column.label, width=column.width, key=column.key)

    @property
    def selected_key(self) -> str | None:
        """The row key under the cursor (None on an empty table)."""
        if not self._order or not 0 <= self.cursor_row < len(self._order):
            return None
        return self._order[self.cursor_row]

    @property
    def pending_rows(self) -> int:
        """Changed rows not built yet (off screen)."""
        return len(self._pending)

    def apply_rows(self, rows: Sequence[Row]) -> int:
        """Show `rows`; returns the number of cells written."""
        keys = [r.key for r in rows]
        if keys == self._order:
            return self._update_rows(rows)
        selected = self.selected_key
        self.clear()
        self._pending.clear()
        self._shown = {}
        for row in rows:
            cells = row.cells
            self._shown[row.key] = cells
            self.add_row(*map(shown_as, cells), key=row.key, height=1)
        self._order = keys
        self._inputs = {r.key: r.inputs for r in rows}
        self.rebuilds += 1
        if selected in self._shown:
            self.move_cursor(row=keys.index(selected), scroll=False)
        written = len(rows) * len(self.COLUMNS)
        self.cells_updated += written
        return written

    def _update_rows(self, rows: Sequence[Row]) -> int:
        """Same rows in the same order: build the changed rows on screen, leave the others pending."""
        inputs = self._inputs
        pending = self._pending
        first, last = self._screen_rows()
        changed: dict[RowKey, set[ColumnKey]] = {}
        written = 0
        for index, row in enumerate(rows):
            key = row.key
            if row.inputs == inputs[key]:
                continue
            inputs[key] = row.inputs
            if first <= index < last:
                pending.pop(key, None)
                written += self._write(key, row.cells, changed)
            else:
                pending[key] = row
        if changed:
            self._invalidate(changed)
        self.cells_updated += written
        return written

    def _screen_rows(self) -> tuple[int, int]:
        """Row indices [first, last) on screen now, with a small margin."""
        header = self.header_height if self.show_header else 0
        top = self.scroll_offset.y
        return top - SCREEN_MARGIN_ROWS, top + max(0, self.size.height - header) + SCREEN_MARGIN_ROWS

    def _write(self, key: str, cells: Cells, changed: dict[RowKey, set[ColumnKey]]) -> int:
        """Write the cells of row `key` that differ from what the table holds; returns how many."""
        old = self._shown[key]
        if old == cells:
            return 0
        row_key = RowKey(key)
        row_data = self._data[row_key]
        columns: set[ColumnKey] = set()
        for column_key, before, after in zip(self._column_keys, old, cells, strict=True):
            if before != after:
                row_data[column_key] = shown_as(after)
                columns.add(column_key)
        self._shown[key] = cells
        changed[row_key] = columns
        return len(columns)

    def _build_pending(self, keys: Sequence[str]) -> None:
        changed: dict[RowKey, set[ColumnKey]] = {}
        written = 0
        for key in keys:
            row = self._pending.pop(key, None)
            if row is not None:
                written += self._write(key, row.cells, changed)
        if changed:
            self._invalidate(changed)
        self.cells_updated += written

    def render_lines(self, crop: Region) -> list[Strip]:
        """Build pending rows that came on screen (a scroll, a resize) before painting them."""
        if self._pending:
            first, last = self._screen_rows()
            order = self._order
            self._build_pending([order[i] for i in range(max(0, first), min(len(order), last))])
        # `rich_style` walks every ancestor's CSS; `DataTable.render_line` asks for it once per line.
        self._paint_style = self.rich_style
        try:
            return super().render_lines(crop)
        finally:
            self._paint_style = None

    def render_line(self, y: int) -> Strip:
        """`DataTable.render_line` (no fixed rows here) with the widget style computed once per paint."""
        style = self._paint_style
        if style is None or self.fixed_rows:
            return super().render_line(y)
        scroll_x, scroll_y = self.scroll_offset
        if y >= (self.header_height if self.show_header else 0):
            y += scroll_y
        return self._render_line(y, scroll_x, scroll_x + self.size.width, style)

    def get_row(self, row_key: RowKey | str) -> list[Cell]:
        """The row's cells, up to date (a pending row is built first)."""
        key = row_key.value if isinstance(row_key, RowKey) else row_key
        if key is not None and key in self._pending:
            self._build_pending([key])
        return super().get_row(row_key)

    def get_cell(self, row_key: RowKey | str, column_key: ColumnKey | str) -> Cell:
        """The cell, up to date (a pending row is built first)."""
        key = row_key.value if isinstance(row_key, RowKey) else row_key
        if key is not None and key in self._pending:
            self._build_pending([key])
        return super().get_cell(row_key, column_key)

    def _invalidate(self, changed: dict[RowKey, set[ColumnKey]]) -> None:
        """Drop the render caches of the changed cells and their lines; repaint the visible ones."""
        # Cell cache keys: (row key, column key, style, cursor, hover, ..., update count, pseudo-classes).
        cell_cache = self._cell_render_cache
        cell_keys = cell_cache.keys()  # a view: collect first, then discard
        for key in [k for k in cell_keys if k[0] in changed and k[1] in changed[k[0]]]:
            cell_cache.discard(key)
        row_cache = self._row_render_cache  # keys: (row key, line in row, ...)
        row_keys = row_cache.keys()
        for row_cache_key in [k for k in row_keys if k[0] in changed]:
            row_cache.discard(row_cache_key)
        # Lines (the table's own y, header included) of the changed rows: rows are one line high.
        header = self.header_height if self.show_header else 0
        lines: list[int] = []
        for row_key in changed:
            index = self._row_locations.get(row_key)
            if index is not None:  # keys: (update count, row index)
                self._row_renderable_cache.discard((self._update_count, index))
                lines.append(index + header)
        line_set = set(lines)
        line_cache = self._line_cache  # keys: (y, x1, x2, width, cursor, ...)
        line_keys = line_cache.keys()
        for line_cache_key in [k for k in line_keys if k[0] in line_set]:
            line_cache.discard(line_cache_key)
        # Repaint only the changed lines that are on screen (the header stays fixed on top).
        scroll_y = self.scroll_offset.y
        width, height = self.size
        regions = [Region(0, y - scroll_y, width, 1) for y in lines if header <= y - scroll_y < height]
        if regions:
            self.rows_repainted += len(regions)
            self.refresh(*regions)
