"""Routing decisions: the contract between the HTTP edge and the cortex (who serves a request).

The HTTP edge (`mesh.server`) talks only to a `Cortex`:

    decision = cortex.route(model_name)          # fast, reads cached state only; raises
                                                 # mesh.errors.ModelNotFound (404) or
                                                 # mesh.errors.ModelUnavailable (503 + Retry-After)
    if isinstance(decision, LocalDecision):
        async with decision.acquire() as model:  # cold-loads if needed (single-flight per model),
            ...model.generate(request)...        # holds an in-flight reservation until exit, so the
                                                 # model is never evicted under a running request
    else:  # RemoteDecision (the mesh): forward the raw request bytes to decision.node

`acquire()` may take as long as a load takes; the edge sends SSE `: keep-alive` comments meanwhile.
Reservations are released on every exit path, cancellation included.

`cortex.list_models()` feeds `GET /v1/models` (every catalogue model feasible somewhere plus
everything loaded anywhere).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Protocol

from helexa.catalogue.entry import ModelEntry
from helexa.engine.base import LoadedModel, ModelId
from helexa.mesh.fleet.records import ModelStatus, NodeId, NodeRecord


@dataclass(frozen=True, kw_only=True, slots=True)
class Location:
    node: NodeId
    node_name: str
    status: ModelStatus
    memory_mb: int
    in_flight: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelListing:
    """One row of `GET /v1/models`."""

    id: ModelId
    created: int  # unix seconds (catalogue entry's first sight, or load time)
    owned_by: str
    status: str  # unloaded|loading|loaded|failed (best over all locations)
    feasible_on: tuple[str, ...]  # node names
    locations: tuple[Location, ...] = ()
    aliases: tuple[str, ...] = ()
    entry: ModelEntry | None = None

    @property
    def loaded(self) -> bool:
        return any(loc.status == "loaded" for loc in self.locations)


class LocalDecision(Protocol):
    """Serve on this agent."""

    @property
    def entry(self) -> ModelEntry: ...

    @property
    def cold(self) -> bool:
        """True when the model is not loaded here yet (the TTFT metric's `cold` label)."""
        ...

    def acquire(self) -> AbstractAsyncContextManager[LoadedModel]: ...


@dataclass(frozen=True, kw_only=True, slots=True)
class RemoteDecision:
    """Forward to a peer (the mesh)."""

    entry: ModelEntry
    node: NodeRecord
    # True when the peer must load first (the entry agent asked it to; it streams keep-alives).
    cold: bool = False
    candidates: tuple[NodeRecord, ...] = field(default=())


Decision = LocalDecision | RemoteDecision


class Cortex(Protocol):
    def route(self, model_name: str, *, forwarded: bool = False) -> Decision:
        """`forwarded=True` for requests a peer forwarded: always local, never routed again."""
        ...

    def list_models(self) -> Sequence[ModelListing]: ...

    def get_model(self, model_name: str) -> ModelListing | None: ...
