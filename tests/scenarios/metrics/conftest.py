"""Two (or more) real agents on loopback for the metrics and log tests: the fake engine, a fixed-size cpu
device that reports a utilisation, static peers, no mDNS, and shrunk mesh timings (`tests.helpers.agents`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.helpers.agents import Fleet, Member

MIB = 1024 * 1024
UTILIZATION = 0.25


# The metrics tests' agents are `tests.helpers.agents`' agents, with a cpu device that reports a utilisation.
Node = Member


class Mesh(Fleet):
    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path, utilization=UTILIZATION)

    @property
    def nodes(self) -> list[Member]:
        return self.members

    async def scrape(self, node: Node) -> dict[str, Any]:
        """`/metrics` of `node` parsed with prometheus-client's parser: family name -> family."""
        async with self.http.get(f"{node.url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family: Any, suffix: str = "", **labels: str) -> list[Sample]:
    """The family's samples named `<family><suffix>` whose labels include `labels`."""
    name = family.name + suffix
    return [
        s for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    ]


def value(family: Any, suffix: str = "", **labels: str) -> float:
    """The one sample of the family named `<family><suffix>` with exactly these labels."""
    found = [s for s in samples(family, suffix, **labels) if s.labels == labels]
    assert len(found) == 1, f"{family.name}{suffix}{labels}: {found or family.samples}"
    return float(found[0].value)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    m = Mesh(tmp_path)
    try:
        yield m
    finally:
        await m.close()
