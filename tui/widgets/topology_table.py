"""The fleet: each node, its devices and the models on it."""

from __future__ import annotations

from ..rows import TOPOLOGY_COLUMNS
from .diff_table import DiffTable


class TopologyTable(DiffTable):
    COLUMNS = TOPOLOGY_COLUMNS
