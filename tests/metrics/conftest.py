"""Two (or more) real agents on loopback for the metrics and log tests: the fake engine, a fixed-size cpu
device that reports a utilisation, static peers, no mDNS, and the fleet tests' shrunk mesh timings."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from catalogue.entry import ModelEntry
from engine.fake import FakeEngine
from mesh.agent import RunningAgent, start_agent
from mesh.appkeys import KEEPALIVE_INTERVAL_S
from mesh.config import load_config
from mesh.hardware import Hardware, HardwareSnapshot
from mesh.records import DeviceRecord

from ..agent.conftest import FAST
from ..fleet.conftest import OPTIONS

MIB = 1024 * 1024
UTILIZATION = 0.25


class SampledHardware(Hardware):
    """One cpu device of `total_mb` whose free memory is what the fake models leave, at 25 % utilisation."""

    def __init__(self, engine: FakeEngine, total_mb: int) -> None:
        super().__init__()
        self.engine = engine
        self.total_mb = total_mb

    def probe(self) -> HardwareSnapshot:
        used = sum(m.memory.total_mb for m in self.engine.loaded.values())
        cpu = DeviceRecord(
            name="cpu",
            kind="cpu",
            model="test cpu",
            memory_total_mb=self.total_mb,
            memory_free_mb=max(0, self.total_mb - used),
            utilization=UTILIZATION,
        )
        self.last = HardwareSnapshot(devices=(cpu,), gpu_available=False, ram_total_mb=self.total_mb)
        return self.last


class Node:
    def __init__(self, running: RunningAgent, engine: FakeEngine, name: str) -> None:
        self.running = running
        self.engine = engine
        self.name = name

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def agent(self) -> Any:
        return self.running.agent

    @property
    def port(self) -> int:
        return self.running.port

    def sees(self, other: Node) -> bool:
        return bool(self.agent.mesh.gossip.liveness(other.agent.identity.node_id) == "alive")


class Mesh:
    _ids = itertools.count()

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.nodes: list[Node] = []
        self.http = aiohttp.ClientSession()

    async def start(
        self, name: str, *, entries: Sequence[ModelEntry], memory_mb: int, peers: Sequence[Node] = ()
    ) -> Node:
        engine = FakeEngine()
        argv = ["--name", name, "--host", "127.0.0.1", "--port", "0", "--no-mdns", "--drain-timeout", "2"]
        argv += ["--state-dir", str(self.tmp_path / f"state-{name}-{next(self._ids)}")]
        for p in peers:
            argv += ["--peer", f"127.0.0.1:{p.port}"]
        config = load_config(argv, {"HOME": str(self.tmp_path)})

        def configure(app: Any) -> None:
            app[KEEPALIVE_INTERVAL_S] = 0.05

        running = await start_agent(
            config,
            engine_for=lambda e, d: engine,
            hardware=SampledHardware(engine, memory_mb),
            catalogue=entries,
            neuron_timing=FAST,
            mesh_options=OPTIONS,
            configure=configure,
        )
        node = Node(running, engine, name)
        self.nodes.append(node)
        return node

    async def scrape(self, node: Node) -> dict[str, Any]:
        """`/metrics` of `node` parsed with prometheus-client's parser: family name -> family."""
        async with self.http.get(f"{node.url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        return {f.name: f for f in text_string_to_metric_families(text)}

    async def close(self) -> None:
        for n in self.nodes:
            await n.running.stop(drain=False)
        await self.http.close()


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
