"""The fleet view: this node's own `NodeRecord` and the records of its peers.

`Fleet.self_record` is rebuilt (with `version + 1`) whenever something it says changes: the neuron's
models (loads, unloads, request counts), a significant hardware change, the catalogue, draining. Changes
are coalesced: `mark_changed()` schedules one rebuild on the next loop iteration however many changes
arrive in between, so a burst of requests costs one rebuild, not hundreds. `beat()` advances the
heartbeat without a new version (failure detection watches the heartbeat; gossip carries it).

Peers' records arrive through gossip (`mesh.gossip` merges into `peers` with `mesh.merge`); their
liveness comes from a pluggable function (`mesh.membership.FailureDetector.liveness`), defaulting to
"alive" for every known peer. `routable_nodes()` is what routing chooses among: this node unless it is
draining, plus every alive or suspect peer that is not draining or leaving, and not *avoided*.

`avoid(node_id)` takes a peer out of routing at once when this agent just failed to reach it (a forward
that could not connect, or a peer that died mid-stream), without waiting for the failure detector's
debounce (which needs several silent gossip rounds). The mark ends when the peer's heartbeat is seen
advancing again (it is alive after all: `AVOID_HEARTBEAT_ADVANCE` beats, so a stale relayed heartbeat does
not end it) or after `for_s`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any

from .records import DeviceRecord, Liveness, ModelRecord, NodeId, NodeRecord

log = logging.getLogger(__name__)

Subscriber = Callable[[NodeRecord], None]

# Heartbeat advances that end an avoid mark: one could be a relayed beat older than the failure.
AVOID_HEARTBEAT_ADVANCE = 2


class Fleet:
    """This node's record plus its peers'. Create and use it on the event loop."""

    def __init__(
        self,
        *,
        initial: NodeRecord,
        models: Callable[[], tuple[ModelRecord, ...]] = tuple,
        devices: Callable[[], tuple[DeviceRecord, ...]] = tuple,
        catalogue: Callable[[], tuple[dict[str, object], ...]] = tuple,
    ) -> None:
        self._models = models
        self._devices = devices
        self._catalogue = catalogue
        self._self = initial
        self.peers: dict[NodeId, NodeRecord] = {}
        self.liveness: Callable[[NodeId], Liveness | None] = lambda node_id: (
            "alive" if node_id in self.peers else None
        )
        # The freshest heartbeat known for a peer (gossip's view; the mirrored records lag behind it).
        self.heartbeat_of: Callable[[NodeId], int | None] = lambda node_id: (
            r.heartbeat if (r := self.peers.get(node_id)) is not None else None
        )
        self._avoided: dict[NodeId, tuple[int, float]] = {}  # node id -> (heartbeat then, until monotonic)
        self._subscribers: list[Subscriber] = []
        self._rebuild_scheduled = False
        self._draining = initial.draining
        self._left = initial.left
        self._overrides: dict[str, Any] = {}

    # --- this node ---------------------------------------------------------------------------------

    @property
    def self_record(self) -> NodeRecord:
        return self._self

    @property
    def node_id(self) -> NodeId:
        return self._self.node_id

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call `callback(record)` after every new version of this node's record; returns unsubscribe."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    def mark_changed(self) -> None:
        """Something in this node's state changed: rebuild the record soon (coalesced)."""
        if self._rebuild_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.rebuild()
            return
        self._rebuild_scheduled = True
        loop.call_soon(self._scheduled_rebuild)

    def _scheduled_rebuild(self) -> None:
        self._rebuild_scheduled = False
        self.rebuild()

    def rebuild(self, **changes: Any) -> NodeRecord:
        """Rebuild this node's record now from its sources, with `version + 1` if anything differs.

        Keyword `changes` override record fields (address, port, labels...) from now on.
        """
        self._overrides.update(changes)
        current = self._self
        candidate = dataclasses.replace(
            current,
            models=self._models(),
            devices=self._devices() or current.devices,
            catalogue=self._catalogue(),
            draining=self._draining,
            left=self._left,
            **self._overrides,
        )
        if candidate == current:
            return current
        self._self = dataclasses.replace(candidate, version=current.version + 1)
        for callback in list(self._subscribers):
            try:
                callback(self._self)
            except Exception:
                log.exception("fleet subscriber failed")
        return self._self

    def adopt_key(self, generation: int, version: int) -> None:
        """Continue from a (generation, version) set elsewhere (gossip refuted a stale record of us)."""
        if (generation, version) > self._self.key:
            self._self = dataclasses.replace(self._self, generation=generation, version=version)
            self._overrides["generation"] = generation

    def beat(self) -> NodeRecord:
        """Advance the heartbeat (no version change: only the heartbeat moved)."""
        self._self = dataclasses.replace(self._self, heartbeat=self._self.heartbeat + 1)
        return self._self

    def set_draining(self, draining: bool = True) -> None:
        self._draining = draining
        self.rebuild()

    def set_left(self) -> None:
        self._left = True
        self._draining = True
        self.rebuild()

    # --- peers -------------------------------------------------------------------------------------

    def nodes(self) -> list[NodeRecord]:
        """This node first, then every known peer (any liveness), by name."""
        return [self._self, *sorted(self.peers.values(), key=lambda r: (r.name, r.node_id))]

    def avoid(self, node_id: NodeId, *, for_s: float) -> None:
        """Take a peer out of routing now (this agent just failed to reach it); see the module doc."""
        if node_id == self._self.node_id:
            return
        heartbeat = self.heartbeat_of(node_id) or 0
        self._avoided[node_id] = (heartbeat, time.monotonic() + for_s)
        log.info("avoiding peer %s in routing (it failed a forwarded request)", node_id)

    def avoided(self, node_id: NodeId) -> bool:
        mark = self._avoided.get(node_id)
        if mark is None:
            return False
        heartbeat, until = mark
        current = self.heartbeat_of(node_id)
        if time.monotonic() >= until or (
            current is not None and current >= heartbeat + AVOID_HEARTBEAT_ADVANCE
        ):
            del self._avoided[node_id]
            return False
        return True

    def routable_nodes(self) -> list[NodeRecord]:
        """Nodes routing may choose: this node (unless draining) and live peers not draining or left."""
        out: list[NodeRecord] = []
        if not self._self.draining and not self._self.left:
            out.append(self._self)
        # Never route to a peer's loopback address unless this node is on loopback too (a whole mesh on
        # one host, as in tests): a peer advertising 127.0.0.1 would make us send traffic to ourselves.
        local_mesh = _is_loopback(self._self.address)
        for record in sorted(self.peers.values(), key=lambda r: (r.name, r.node_id)):
            if record.node_id == self._self.node_id or record.draining or record.left:
                continue
            if self._avoided and self.avoided(record.node_id):
                continue
            if not local_mesh and _is_loopback(record.address):
                continue
            if self.liveness(record.node_id) in ("alive", "suspect"):
                out.append(record)
        return out

    def node(self, node_id_or_name: str) -> NodeRecord | None:
        for record in self.nodes():
            if node_id_or_name in (record.node_id, record.name):
                return record
        return None


def _is_loopback(address: str) -> bool:
    return address.startswith("127.") or address in ("::1", "localhost")
