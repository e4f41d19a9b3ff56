"""The mesh-wide catalogue: where each model is loaded and where it could go."""

from __future__ import annotations

from ..rows import CATALOGUE_COLUMNS
from .diff_table import DiffTable


class CatalogueTable(DiffTable):
    COLUMNS = CATALOGUE_COLUMNS
