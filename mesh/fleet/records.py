"""The fleet's data model: what each agent publishes about itself.

Each agent owns exactly one `NodeRecord` (about itself) and holds copies of its peers' records. Gossip
carries them, `GET /mesh/state` serves them, routing reads them, the dashboard draws them. They are
frozen: a change makes a new record with `version + 1`.

`GET /mesh/state` JSON (what `state_to_json` produces; the dashboard and CLI read this):

    {
      "mesh": "default",              # mesh name
      "open": true,                   # true when no mesh key is configured
      "self": "<node id of the agent answering>",
      "agent_version": "0.1.0",
      "nodes": [
        {
          "id": "...", "name": "beast", "address": "10.0.0.5", "port": 31313,
          "generation": 1764221000123,     # ms since the epoch at this agent's start
          "version": 42, "heartbeat": 1234,
          "liveness": "alive",             # alive|suspect|dead|left, as the answering agent sees it
          "agent_version": "0.1.0", "engines": ["transformers"], "labels": {}, "draining": false,
          "devices": [
            {"name": "cuda:0", "kind": "cuda", "model": "NVIDIA GeForce RTX 4090", "uuid": "GPU-...",
             "memory_total_mb": 24564, "memory_free_mb": 20000,
             "utilization": 0.12, "temperature_c": 54.0, "compute_capability": "8.9"}
          ],
          "models": [
            {"id": "helexa/demo", "status": "loaded", "engine": "transformers",
             "devices": ["cpu"], "memory_mb": 60, "in_flight": 0, "queued": 0,
             "last_used": 1764221050.5, "progress": null, "error": null,
             "tokens_per_s": 85.0, "resident": false,
             "phase": null, "done_bytes": null, "total_bytes": null, "bytes_per_s": null, "eta_s": null}
          ]
        }
      ],
      "catalogue": [ {<catalogue entry as in models.toml, plus "version">, "feasible_on": [...],
                      "locations": [{"node": ..., "status": ..., "memory_mb": ..., "in_flight": ...}]} ]
    }
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NewType

from helexa.engine.base import ModelId, eta_s

NodeId = NewType("NodeId", str)
Liveness = Literal["alive", "suspect", "dead", "left"]
ModelStatus = Literal["loading", "loaded", "unloading", "failed"]
DeviceKind = Literal["cuda", "cpu"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceRecord:
    """One device as last sampled. A host without GPUs has one `cpu` device (memory = system RAM)."""

    name: str  # "cuda:0" ... or "cpu"
    kind: DeviceKind
    model: str  # marketing name of the GPU, or the CPU brand
    memory_total_mb: int
    memory_free_mb: int
    uuid: str | None = None
    utilization: float | None = None  # 0..1
    temperature_c: float | None = None
    compute_capability: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelRecord:
    """A model present on a node (loading, loaded, unloading or failed)."""

    id: ModelId
    status: ModelStatus
    engine: str
    devices: tuple[str, ...] = ()
    memory_mb: int = 0  # measured once loaded; the catalogue's estimate while loading
    in_flight: int = 0
    queued: int = 0
    last_used: float = 0.0  # unix seconds
    progress: float | None = None  # 0..1 while loading, when known
    error: str | None = None  # set when failed
    tokens_per_s: float | None = None  # recent decode rate
    resident: bool = False
    requests_total: int = 0  # requests served by this load (counter, for the dashboard)
    ttft_s: float | None = None  # recent average time to first token (s), when known
    # While loading: the phase (resolving, downloading, converting, loading, warming) and, while
    # downloading, bytes done of the total and the recent rate (`eta_s` derives from them).
    phase: str | None = None
    done_bytes: int | None = None
    total_bytes: int | None = None
    bytes_per_s: float | None = None

    @property
    def eta_s(self) -> float | None:
        """Seconds until the download ends at the recent rate; None when unknown."""
        return eta_s(self.done_bytes, self.total_bytes, self.bytes_per_s)


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeRecord:
    """Everything one agent says about itself. Newer (generation, version) wins in a merge."""

    node_id: NodeId
    name: str
    generation: int  # ms since the epoch at start: changes (and grows) at every start
    version: int  # grows on every change within a generation
    heartbeat: int  # grows every gossip interval; failure detection watches it
    address: str  # routable address peers use (never loopback unless the whole mesh is local)
    port: int
    mesh: str = "default"
    agent_version: str = "0.0.0"
    engines: tuple[str, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    draining: bool = False  # shutting down: route elsewhere
    left: bool = False  # graceful leave announced
    devices: tuple[DeviceRecord, ...] = ()
    models: tuple[ModelRecord, ...] = ()
    # The catalogue entries this node holds, as plain dicts (`catalogue.store.entry_to_dict`), each with
    # its "version"; the mesh-wide catalogue is the per-id newest of all nodes' entries.
    catalogue: tuple[dict[str, object], ...] = ()

    @property
    def key(self) -> tuple[int, int]:
        """Merge order: a newer generation beats any version of an older one."""
        return (self.generation, self.version)

    def model(self, model_id: str) -> ModelRecord | None:
        for m in self.models:
            if m.id == model_id:
                return m
        return None
