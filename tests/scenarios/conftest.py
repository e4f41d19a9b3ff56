"""Several agents in one test process on loopback (`tests.helpers.agents.Fleet`): static peers (or mDNS
on 127.0.0.1), the fake engine, fixed fake hardware, and shrunk mesh timings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.agents import Fleet


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        await f.close()
