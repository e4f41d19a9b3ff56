"""Modal screens: confirmation, load, pin."""

from .confirm import ConfirmScreen
from .load import LoadRequest, LoadScreen
from .pin import PinScreen

__all__ = ["ConfirmScreen", "LoadRequest", "LoadScreen", "PinScreen"]
