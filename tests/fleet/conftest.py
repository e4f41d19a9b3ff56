"""Several agents in one test process on loopback: static peers (or mDNS on 127.0.0.1), the fake engine,
fixed fake hardware, and shrunk mesh timings (`MeshTiming.scaled`)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helexa.catalogue.entry import ModelEntry
from helexa.engine.base import ModelId
from helexa.engine.fake import FakeEngine
from helexa.mesh.agent import RunningAgent, start_agent
from helexa.mesh.config import load_config
from helexa.mesh.fleet.records import DeviceRecord
from helexa.mesh.hardware import Hardware, HardwareSnapshot
from helexa.mesh.peering import MeshOptions
from helexa.mesh.server.appkeys import KEEPALIVE_INTERVAL_S
from helexa.mesh.timing import DEFAULT_TIMING

from ..agent.conftest import FAST, entry

# Gossip every 0.2 s; suspect after 0.6 s, dead after 1.6 s of silence.
TIMING = DEFAULT_TIMING.scaled(0.2)
OPTIONS = MeshOptions(timing=TIMING, preload_settle_s=0.6, events_keepalive_s=0.5)

__all__ = ["OPTIONS", "TIMING", "Fleet", "StaticHardware", "entry", "eventually"]


class StaticHardware(Hardware):
    """One cpu device of a fixed size whose free memory is what the agent's fake models leave."""

    def __init__(self, engine: FakeEngine, total_mb: int, utilization: float | None = None) -> None:
        super().__init__()
        self.engine = engine
        self.total_mb = total_mb
        self.utilization = utilization

    def probe(self) -> HardwareSnapshot:
        used = sum(m.memory.total_mb for m in self.engine.loaded.values())
        cpu = DeviceRecord(
            name="cpu",
            kind="cpu",
            model="test cpu",
            memory_total_mb=self.total_mb,
            memory_free_mb=max(0, self.total_mb - used),
            utilization=self.utilization,
        )
        self.last = HardwareSnapshot(devices=(cpu,), gpu_available=False, ram_total_mb=self.total_mb)
        return self.last


async def eventually(
    check: Callable[[], bool] | Callable[[], Awaitable[bool]], *, timeout_s: float = 8.0, what: str = ""
) -> None:
    """Wait until `check()` is true (polling), or fail naming `what`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        await asyncio.sleep(0.05)


class Member:
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

    def loads(self, model: str) -> int:
        return self.engine.loads[ModelId(model)]

    def sees(self, *others: Member) -> bool:
        """Every one of `others` is alive in this agent's view."""
        gossip = self.agent.mesh.gossip
        return all(gossip.liveness(o.agent.identity.node_id) == "alive" for o in others)


class Fleet:
    """Start agents on 127.0.0.1 (port 0); each has its own FakeEngine, state dir and hardware."""

    _ids = itertools.count()

    def __init__(self, tmp_path: Path, *, utilization: float | None = None) -> None:
        self.tmp_path = tmp_path
        self.utilization = utilization  # what every agent's cpu device reports
        self.members: list[Member] = []
        self.http = aiohttp.ClientSession()

    async def start(
        self,
        name: str,
        *,
        entries: Sequence[ModelEntry] | None = (),
        memory_mb: int = 1000,
        peers: Sequence[Member] = (),
        args: Sequence[str] = (),
        options: MeshOptions = OPTIONS,
        mdns: bool = False,
    ) -> Member:
        engine = FakeEngine()
        argv = ["--name", name, "--host", "127.0.0.1", "--port", "0"]
        argv += ["--state-dir", str(self.tmp_path / f"state-{name}-{next(self._ids)}")]
        argv += ["--drain-timeout", "2"]
        if not mdns:
            argv.append("--no-mdns")
        for p in peers:
            argv += ["--peer", f"127.0.0.1:{p.port}"]
        argv += list(args)
        config = load_config(argv, {"HOME": str(self.tmp_path)})

        def configure(app: Any) -> None:
            app[KEEPALIVE_INTERVAL_S] = 0.05

        running = await start_agent(
            config,
            engine_for=lambda e, d: engine,
            hardware=StaticHardware(engine, memory_mb, self.utilization),
            catalogue=entries,
            neuron_timing=FAST,
            mesh_options=options,
            configure=configure,
        )
        member = Member(running, engine, name)
        self.members.append(member)
        return member

    async def state(self, m: Member) -> dict[str, Any]:
        async with self.http.get(f"{m.url}/mesh/state") as resp:
            assert resp.status == 200
            data: dict[str, Any] = await resp.json()
            return data

    async def post(self, m: Member, path: str, payload: Any, **kw: Any) -> tuple[int, Any]:
        async with self.http.post(f"{m.url}{path}", json=payload, **kw) as resp:
            return resp.status, await resp.json()

    async def close(self) -> None:
        for m in self.members:
            await m.running.stop(drain=False)
        await self.http.close()


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        await f.close()
