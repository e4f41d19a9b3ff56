"""Real agents (`tests.helpers.agents.Fleet`: the fake engine, fixed fake hardware, shrunk mesh timings)
for the dashboard's and the CLI's end-to-end tests. Unlike the multi-agent scenarios in `tests/scenarios/
fleet`, an agent here may read and write a real `models.toml` (`catalogue_toml=`), so tests can check that
catalogue edits made through the operator API reach the file with comments kept.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers.agents import Fleet

__all__ = ["CATALOGUE_TOML"]

# The catalogue the single-agent tests start from. The comments must survive every edit made through
# the operator API (pin, unpin, add, remove).
CATALOGUE_TOML = """\
# e2e catalogue: this comment must survive edits made through the agent.

# A small fake model: loads in 0.6 s (progress reported), answers "hello world again" slowly.
[[models]]
id = "e2e/small"  # the id operators type
engine = "fake"
memory_mb = 100
aliases = ["small"]
options = { tokens = ["hello", " world", " again"], token_delay_s = 0.3, load_delay_s = 0.6, memory_mb = 100 }

# A second model that nobody loads (the catalogue view lists it as feasible, loaded nowhere).
[[models]]
id = "e2e/other"
engine = "fake"
memory_mb = 200
options = { memory_mb = 200 }
"""


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Fleet]:
    a = Fleet(tmp_path)
    try:
        yield a
    finally:
        await a.close()
