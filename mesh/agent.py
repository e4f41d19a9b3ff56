"""One running agent: the parts it is made of (`Agent`), its health and its drain.

`mesh.assembly` builds an `Agent` and its aiohttp application; `mesh.process` runs it as a process. The
handlers of the operator and peer APIs read it from the app (`request.app[AGENT]`, `mesh.server.appkeys`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

from helexa.mesh.config import AgentConfig
from helexa.mesh.fleet.catalogue import CatalogueView
from helexa.mesh.fleet.view import Fleet
from helexa.mesh.hardware import Hardware
from helexa.mesh.identity import Identity
from helexa.mesh.metrics import Metrics
from helexa.mesh.peering import MeshRuntime
from helexa.mesh.routing.cortex import MeshCortex
from helexa.mesh.routing.neuron import Neuron

log = logging.getLogger(__name__)

__all__ = ["AGENT_VERSION", "Agent"]

AGENT_VERSION = "0.1.0"


@dataclass(kw_only=True)
class Agent:
    """Everything one running agent is made of (held in the app under `AGENT`)."""

    config: AgentConfig
    identity: Identity
    hardware: Hardware
    metrics: Metrics
    neuron: Neuron
    fleet: Fleet
    cortex: MeshCortex
    catalogue: CatalogueView
    mesh: MeshRuntime
    started_at: float = field(default_factory=time.monotonic)
    draining: bool = False
    # Hooks run (in order) when the agent starts draining; the mesh adds its graceful leave here.
    drain_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def health(self) -> Mapping[str, object]:
        """`/healthz` body from cached state only."""
        records = self.neuron.records()
        return {
            "status": "draining" if self.draining else "ok",
            "node": self.config.name,
            "node_id": self.identity.node_id,
            "generation": self.identity.generation,
            "models_loaded": sum(1 for r in records if r.status == "loaded"),
            "models_loading": sum(1 for r in records if r.status == "loading"),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
        }

    async def drain(self) -> None:
        """Stop admitting work and let what runs finish (bounded). Called once, on SIGTERM/SIGINT."""
        if self.draining:
            return
        self.draining = True
        self.fleet.set_draining(True)
        log.info("draining (at most %.0f s)", self.config.drain_timeout_s)
        for hook in list(self.drain_hooks):
            try:
                await hook()
            except Exception:
                log.exception("drain hook failed")
        # Let requests in flight finish, bounded by drain_timeout_s.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.drain_timeout_s):
                await self.neuron.wait_idle()
