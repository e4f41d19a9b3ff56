"""What this host can run, found without importing the heavy libraries.

Its own module so that the registry (which chooses engines) and the engines (which refuse to load what
the host cannot run) both import it without importing each other.
"""

from __future__ import annotations

import importlib.util


def mlc_available() -> bool:
    """Whether `mlc_llm` could be imported, without importing it (it pulls in TVM and CUDA)."""
    try:
        return importlib.util.find_spec("mlc_llm") is not None
    except (ImportError, ValueError):
        return False
