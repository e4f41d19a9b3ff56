"""Real agents in the test process, on 127.0.0.1 (port 0 unless asked): the fake engine, a fixed-size cpu
device, static peers (or mDNS on loopback), and shrunk timings (`MeshTiming.scaled`, short neuron
back-offs). The multi-agent scenarios, the metrics and log tests and the CLI and dashboard end-to-end tests
all start their agents here.

    fleet = Fleet(tmp_path)
    a = await fleet.start("a", entries=[entry("org/m")])
    b = await fleet.start("b", peers=[a])                      # a static peer, no mDNS
    await eventually(lambda: a.sees(b) and b.sees(a), what="membership")
    c = await fleet.start("c", catalogue_toml=TOML)             # reads and edits a real models.toml
    c = await fleet.restart(c)                                  # the same node again (state, port, file)
    await fleet.close()

Real `helexa agent` processes are started by `tests.helpers.agentproc` instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp

from helexa.catalogue.entry import ModelEntry
from helexa.engine.base import ModelId
from helexa.engine.fake import FakeEngine
from helexa.mesh.config import load_config
from helexa.mesh.fleet.records import DeviceRecord
from helexa.mesh.hardware import Hardware, HardwareSnapshot
from helexa.mesh.peering import MeshOptions
from helexa.mesh.process import RunningAgent, start_agent
from helexa.mesh.routing.neuron import NeuronTiming
from helexa.mesh.server.appkeys import KEEPALIVE_INTERVAL_S
from helexa.mesh.server.connections import ServerLimits
from helexa.mesh.timing import DEFAULT_TIMING
from tests.helpers.polling import eventually

__all__ = ["FAST", "OPTIONS", "TIMING", "Fleet", "Member", "StaticHardware", "entry"]

# Short neuron timings so back-offs and keep-alives pass in milliseconds.
FAST = NeuronTiming(
    load_retry_backoff_s=0.05,
    load_retry_backoff_max_s=0.2,
    structural_retry_backoff_s=30.0,
    reaper_interval_s=0.01,
    unload_timeout_s=2.0,
)

# Gossip every 0.2 s; suspect after 0.6 s, dead after 1.6 s of silence.
TIMING = DEFAULT_TIMING.scaled(0.2)
OPTIONS = MeshOptions(timing=TIMING, preload_settle_s=0.6, events_keepalive_s=0.5)


def entry(
    model_id: str, *, memory_mb: int = 100, options: dict[str, object] | None = None, **kw: Any
) -> ModelEntry:
    """A fake-engine catalogue entry whose fake model really takes `memory_mb`."""
    return ModelEntry(
        id=ModelId(model_id),
        source=f"/models/{model_id}",
        engine="fake",
        memory_mb=memory_mb,
        options={"memory_mb": memory_mb, **(options or {})},
        **kw,
    )


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


class Member:
    """One running agent and what a test needs to restart it as the same node (state dir, port, file)."""

    def __init__(
        self,
        running: RunningAgent,
        engine: FakeEngine,
        name: str,
        state_dir: Path,
        catalogue: Path | None = None,
    ) -> None:
        self.running = running
        self.engine = engine
        self.name = name
        self.state_dir = state_dir
        self.catalogue = catalogue

    @property
    def url(self) -> str:
        return self.running.url

    @property
    def agent(self) -> Any:
        return self.running.agent

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def node_id(self) -> str:
        return str(self.running.agent.identity.node_id)

    def loads(self, model: str) -> int:
        return self.engine.loads[ModelId(model)]

    def sees(self, *others: Member) -> bool:
        """Every one of `others` is alive in this agent's view."""
        gossip = self.agent.mesh.gossip
        return all(gossip.liveness(o.agent.identity.node_id) == "alive" for o in others)


class Fleet:
    """Start agents on 127.0.0.1; each has its own FakeEngine, state dir and cpu device."""

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
        catalogue_toml: str | None = None,
        catalogue: Path | None = None,
        memory_mb: int = 1000,
        peers: Sequence[Member] = (),
        port: int = 0,
        state_dir: Path | None = None,
        args: Sequence[str] = (),
        options: MeshOptions = OPTIONS,
        mdns: bool = False,
        limits: ServerLimits | None = None,
    ) -> Member:
        """`entries` is the catalogue, kept in memory (no file; None: the agent's default catalogue);
        `catalogue_toml` is written to a fresh models.toml the agent reads and edits; `catalogue` reuses an
        existing file (a restart). `args` are more `helexa agent` flags (e.g. `--mesh-key`); `limits` the
        HTTP server's bounds (default: production's)."""
        state_dir = state_dir or self.tmp_path / f"state-{name}-{next(self._ids)}"
        if catalogue_toml is not None:
            catalogue = self.tmp_path / f"{name}-models.toml"
            catalogue.write_text(catalogue_toml, encoding="utf-8")
        argv = ["--name", name, "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(state_dir)]
        argv += ["--drain-timeout", "2"]
        if not mdns:
            argv.append("--no-mdns")
        if catalogue is not None:
            argv += ["--catalogue", str(catalogue)]
        for p in peers:
            argv += ["--peer", f"127.0.0.1:{p.port}"]
        argv += list(args)
        config = load_config(argv, {"HOME": str(self.tmp_path)})
        engine = FakeEngine()

        def configure(app: Any) -> None:
            app[KEEPALIVE_INTERVAL_S] = 0.05

        running = await start_agent(
            config,
            engine_for=lambda e, d: engine,
            hardware=StaticHardware(engine, memory_mb, self.utilization),
            catalogue=entries if catalogue is None else None,
            neuron_timing=FAST,
            mesh_options=options,
            configure=configure,
            limits=limits,
        )
        member = Member(running, engine, name, state_dir, catalogue)
        self.members.append(member)
        return member

    async def serving_pair(self, entries: Sequence[ModelEntry], model: str) -> tuple[Member, Member]:
        """Agents `a` (the entry) and `b`, peered, with `model` loaded on `b` and `a` knowing it: what a
        forwarding test starts from."""
        b = await self.start("b", entries=entries)
        a = await self.start("a", entries=entries, peers=[b])
        await eventually(lambda: a.sees(b) and b.sees(a), what="a and b to see each other")
        status, body = await self.post(a, "/mesh/models/load", {"model": model, "node": "b"})
        assert status == 200, body
        await eventually(
            lambda: (
                (r := a.agent.fleet.peers.get(b.agent.identity.node_id)) is not None
                and (m := r.model(model)) is not None
                and m.status == "loaded"
            ),
            what="a to learn that b serves the model",
        )
        return a, b

    async def restart(self, member: Member) -> Member:
        """Start `member` again as the same node (same state dir, port and catalogue file)."""
        return await self.start(
            member.name, port=member.port, state_dir=member.state_dir, catalogue=member.catalogue
        )

    async def state(self, m: Member) -> dict[str, Any]:
        async with self.http.get(f"{m.url}/mesh/state") as resp:
            assert resp.status == 200
            data: dict[str, Any] = await resp.json()
            return data

    async def post(self, m: Member, path: str, payload: Any, **kw: Any) -> tuple[int, Any]:
        async with self.http.post(f"{m.url}{path}", json=payload, **kw) as resp:
            return resp.status, await resp.json()

    async def model_status(self, m: Member, model: str, node: str) -> str | None:
        """The status of `model` on the node named `node` in `m`'s `/mesh/state` (None: not there)."""
        for n in (await self.state(m))["nodes"]:
            if n["name"] == node:
                for record in n["models"]:
                    if record["id"] == model:
                        return str(record["status"])
        return None

    async def model_status_is(self, m: Member, model: str, node: str, status: str | None) -> bool:
        return await self.model_status(m, model, node) == status

    async def model_ids(self, m: Member) -> set[str]:
        """`GET /v1/models` ids (aliases excluded)."""
        async with self.http.get(f"{m.url}/v1/models") as resp:
            assert resp.status == 200
            return {model["id"] for model in (await resp.json())["data"]}

    async def close(self) -> None:
        for m in self.members:
            await m.running.stop(drain=False)
        await self.http.close()
