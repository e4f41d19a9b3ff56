"""A clock that only moves when a test moves it (for the failure detector and gossip rounds)."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
