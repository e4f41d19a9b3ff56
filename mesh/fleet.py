"""The fleet view: this node's own `NodeRecord` and the records of its peers.

`Fleet.self_record` is rebuilt (with `version + 1`) whenever something it says changes: the neuron's
models (loads, unloads, request counts), a significant hardware change, the catalogue, draining. Changes
are coalesced: `mark_changed()` schedules one rebuild on the next loop iteration however many changes
arrive in between, so a burst of requests costs one rebuild, not hundreds. `beat()` advances the
heartbeat without a new version (failure detection watches the heartbeat; gossip carries it).

Peers' records arrive through gossip (`mesh.gossip` merges into `peers` with `mesh.merge`); their
liveness comes from a pluggable function (`mesh.membership.FailureDetector.liveness`), defaulting to
"alive" for every known peer. `routable_nodes()` is what routing chooses among: this node unless it is
draining, plus every alive or suspect peer that is not draining or leaving.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from .records import DeviceRecord, Liveness, ModelRecord, NodeId, NodeRecord

log = logging.getLogger(__name__)

Subscriber = Callable[[NodeRecord], None]


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

    def routable_nodes(self) -> list[NodeRecord]:
        """Nodes routing may choose: this node (unless draining) and live peers not draining or left."""
        out: list[NodeRecord] = []
        if not self._self.draining and not self._self.left:
            out.append(self._self)
        for record in sorted(self.peers.values(), key=lambda r: (r.name, r.node_id)):
            if record.node_id == self._self.node_id or record.draining or record.left:
                continue
            if self.liveness(record.node_id) in ("alive", "suspect"):
                out.append(record)
        return out

    def node(self, node_id_or_name: str) -> NodeRecord | None:
        for record in self.nodes():
            if node_id_or_name in (record.node_id, record.name):
                return record
        return None
