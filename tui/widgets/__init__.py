"""The dashboard's widgets, one per module."""

from .catalogue_table import CatalogueTable
from .diff_table import DiffTable
from .event_log import EventLog
from .status_bar import StatusBar
from .topology_table import TopologyTable
from .traffic_table import TrafficTable

__all__ = ["CatalogueTable", "DiffTable", "EventLog", "StatusBar", "TopologyTable", "TrafficTable"]
