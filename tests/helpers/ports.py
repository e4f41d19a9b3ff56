"""Loopback ports for tests that need a port number before anything listens on it."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

__all__ = ["free_port", "refused_port"]


def free_port() -> int:
    """A port nothing listens on (bound, then released): for an agent that must keep its port across a
    restart, or a client that must find nobody there."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A port held bound but not listening while the block runs: connecting to it is refused, and no other
    process can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])
