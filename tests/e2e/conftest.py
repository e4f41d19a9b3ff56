"""Real agents (the fake engine, fixed fake hardware, shrunk mesh timings) for the dashboard's and the
CLI's end-to-end tests. Unlike `tests/fleet`, an agent here may read and write a real `models.toml`, so
tests can check that catalogue edits made through the operator API reach the file with comments kept.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from helexa.catalogue.entry import ModelEntry
from helexa.engine.fake import FakeEngine
from helexa.mesh.agent import RunningAgent, start_agent
from helexa.mesh.config import load_config
from helexa.mesh.server.appkeys import KEEPALIVE_INTERVAL_S

from ..agent.conftest import FAST
from ..fleet.conftest import OPTIONS, StaticHardware, eventually

__all__ = ["CATALOGUE_TOML", "Agents", "E2EAgent", "eventually", "free_port"]

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


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class E2EAgent:
    """One running agent and what a test needs to restart it as the same node (state dir, port, file)."""

    def __init__(
        self, running: RunningAgent, engine: FakeEngine, name: str, state_dir: Path, catalogue: Path | None
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
    def port(self) -> int:
        return self.running.port

    @property
    def node_id(self) -> str:
        return str(self.running.agent.identity.node_id)

    def sees(self, *others: E2EAgent) -> bool:
        gossip = self.running.agent.mesh.gossip
        return all(gossip.liveness(o.running.agent.identity.node_id) == "alive" for o in others)


class Agents:
    """Start agents on 127.0.0.1; each has its own FakeEngine, state dir and 1000 MB cpu device."""

    _ids = itertools.count()

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: list[E2EAgent] = []
        self.http = aiohttp.ClientSession()

    async def start(
        self,
        name: str,
        *,
        catalogue_toml: str | None = None,
        entries: Sequence[ModelEntry] | None = None,
        peers: Sequence[E2EAgent] = (),
        port: int = 0,
        state_dir: Path | None = None,
        catalogue: Path | None = None,
        args: Sequence[str] = (),
    ) -> E2EAgent:
        """`catalogue_toml` is written to a fresh models.toml the agent reads and edits; `catalogue` reuses
        an existing file (a restart); `entries` keeps the catalogue in memory (no file); `args` are more
        `helexa agent` flags (e.g. `--mesh-key`)."""
        state_dir = state_dir or self.tmp_path / f"state-{name}-{next(self._ids)}"
        if catalogue_toml is not None:
            catalogue = self.tmp_path / f"{name}-models.toml"
            catalogue.write_text(catalogue_toml, encoding="utf-8")
        argv = ["--name", name, "--host", "127.0.0.1", "--port", str(port), "--state-dir", str(state_dir)]
        argv += ["--drain-timeout", "2", "--no-mdns"]
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
            hardware=StaticHardware(engine, 1000),
            catalogue=entries if catalogue is None else None,
            neuron_timing=FAST,
            mesh_options=OPTIONS,
            configure=configure,
        )
        agent = E2EAgent(running, engine, name, state_dir, catalogue)
        self.running.append(agent)
        return agent

    async def restart(self, agent: E2EAgent) -> E2EAgent:
        """Start `agent` again as the same node (same state dir, port and catalogue file)."""
        return await self.start(
            agent.name, port=agent.port, state_dir=agent.state_dir, catalogue=agent.catalogue
        )

    async def state(self, agent: E2EAgent) -> dict[str, Any]:
        async with self.http.get(f"{agent.url}/mesh/state") as resp:
            assert resp.status == 200
            data: dict[str, Any] = await resp.json()
            return data

    async def model_status(self, agent: E2EAgent, model: str, node: str) -> str | None:
        """The status of `model` on the node named `node` in `agent`'s `/mesh/state` (None: not there)."""
        for n in (await self.state(agent))["nodes"]:
            if n["name"] == node:
                for m in n["models"]:
                    if m["id"] == model:
                        return str(m["status"])
        return None

    async def model_status_is(self, agent: E2EAgent, model: str, node: str, status: str | None) -> bool:
        return await self.model_status(agent, model, node) == status

    async def model_ids(self, agent: E2EAgent) -> set[str]:
        """`GET /v1/models` ids (aliases excluded)."""
        async with self.http.get(f"{agent.url}/v1/models") as resp:
            assert resp.status == 200
            return {m["id"] for m in (await resp.json())["data"]}

    async def close(self) -> None:
        for a in self.running:
            await a.running.stop(drain=False)
        await self.http.close()


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Agents]:
    a = Agents(tmp_path)
    try:
        yield a
    finally:
        await a.close()
