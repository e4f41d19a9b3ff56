"""Per-model and per-node traffic with sparklines over the last minutes."""

from __future__ import annotations

from ..rows import TRAFFIC_COLUMNS
from .diff_table import DiffTable


class TrafficTable(DiffTable):
    COLUMNS = TRAFFIC_COLUMNS
