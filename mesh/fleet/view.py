"""The fleet view: this node's own `NodeRecord` and the records of its peers.

`Fleet.self_record` is rebuilt (with `version + 1`) whenever something it says changes: the neuron's
models (loads, unloads, request counts), a significant hardware change, the catalogue, draining. Changes
are coalesced: `mark_changed()` schedules one rebuild on the next loop iteration however many changes
arrive in between, so a burst of requests costs one rebuild, not hundreds. `beat()` advances the
heartbeat without a new version (failure detection watches the heartbeat; gossip carries it).

Count-only changes are rate-limited. Every new version makes gossip carry the whole record again, and a
busy agent's request counters (`in_flight`, `queued`, `requests_total`, `tokens_per_s`, `ttft_s`,
`last_used`) move with every request: publishing each would re-gossip the record every round. So a
rebuild whose only differences are those counters, or device readings that moved less than
`SIGNIFICANT_CHANGE_MB` (utilisation, temperature, allocator noise), is published at most every
`counts_interval_s` (the first at once after a quiet spell, the rest batched). Anything else (a model
loading, loaded, failed, unloading or gone, load progress, memory moving significantly, catalogue,
draining) is published at once and carries the pending counts with it. `live_record` is always current
(it is what routing reads for this node); `self_record` is the last published version.

Peers' records arrive through gossip (`mesh.gossip` merges into `peers` with `mesh.fleet.merge`); their
liveness comes from a pluggable function (`mesh.fleet.membership.FailureDetector.liveness`), defaulting to
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
import math
import time
from collections.abc import Callable
from typing import Any

from helexa.mesh.fleet.records import DeviceRecord, Liveness, ModelRecord, NodeId, NodeRecord
from helexa.mesh.hardware import SIGNIFICANT_CHANGE_MB
from helexa.mesh.timing import COUNTS_INTERVAL_S

log = logging.getLogger(__name__)

Subscriber = Callable[[NodeRecord], None]

# Heartbeat advances that end an avoid mark: one could be a relayed beat older than the failure.
AVOID_HEARTBEAT_ADVANCE = 2

# ModelRecord fields that move with every request (rate-limited); any other field is a status change.
_COUNT_FIELDS = ("in_flight", "queued", "requests_total", "tokens_per_s", "ttft_s", "last_used")
# DeviceRecord fields that drift all the time; free memory counts only when it moves significantly.
_DEVICE_DRIFT_FIELDS = ("memory_free_mb", "utilization", "temperature_c")


def counts_only(old: NodeRecord, new: NodeRecord) -> bool:
    """True when `new` differs from `old` only in request counters and insignificant device drift."""
    if dataclasses.replace(new, models=old.models, devices=old.devices) != old:
        return False
    if len(old.models) != len(new.models) or len(old.devices) != len(new.devices):
        return False
    for a, b in zip(old.models, new.models, strict=True):
        if dataclasses.replace(b, **{f: getattr(a, f) for f in _COUNT_FIELDS}) != a:
            return False
    for d, e in zip(old.devices, new.devices, strict=True):
        if dataclasses.replace(e, **{f: getattr(d, f) for f in _DEVICE_DRIFT_FIELDS}) != d:
            return False
        if abs(d.memory_free_mb - e.memory_free_mb) >= SIGNIFICANT_CHANGE_MB:
            return False
    return True


class Fleet:
    """This node's record plus its peers'. Create and use it on the event loop."""

    def __init__(
        self,
        *,
        initial: NodeRecord,
        models: Callable[[], tuple[ModelRecord, ...]] = tuple,
        devices: Callable[[], tuple[DeviceRecord, ...]] = tuple,
        catalogue: Callable[[], tuple[dict[str, object], ...]] = tuple,
        counts_interval_s: float = COUNTS_INTERVAL_S,
    ) -> None:
        self._models = models
        self._devices = devices
        self._catalogue = catalogue
        self._self = initial
        self._live = initial
        self.counts_interval_s = counts_interval_s
        self._published_at = -math.inf  # time.monotonic() of the last published version
        self._counts_timer: asyncio.TimerHandle | None = None
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
        """The last published version of this node's record (what gossip carries)."""
        return self._self

    @property
    def live_record(self) -> NodeRecord:
        """This node's record as of the last rebuild, unpublished counters included (routing reads it)."""
        return self._live

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
        self._rebuild(urgent=False)

    def _counts_due(self) -> None:
        self._counts_timer = None
        self._rebuild(urgent=True)

    def rebuild(self, **changes: Any) -> NodeRecord:
        """Rebuild this node's record now from its sources, with `version + 1` if anything differs
        (published at once, whatever changed).

        Keyword `changes` override record fields (address, port, labels...) from now on.
        """
        self._overrides.update(changes)
        return self._rebuild(urgent=True)

    def _rebuild(self, *, urgent: bool) -> NodeRecord:
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
        self._live = candidate
        if candidate == current:
            self._cancel_counts_timer()
            return current
        if not urgent and counts_only(current, candidate):
            wait_s = self._published_at + self.counts_interval_s - time.monotonic()
            if wait_s > 0:
                self._defer(wait_s)
                return current
        self._cancel_counts_timer()
        self._self = dataclasses.replace(candidate, version=current.version + 1)
        self._live = self._self
        self._published_at = time.monotonic()
        for callback in list(self._subscribers):
            try:
                callback(self._self)
            except Exception:
                log.exception("fleet subscriber failed")
        return self._self

    def _defer(self, wait_s: float) -> None:
        """Publish the pending count changes in `wait_s` (one timer however many changes arrive)."""
        if self._counts_timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to wait on: publish now
            self._rebuild(urgent=True)
            return
        self._counts_timer = loop.call_later(wait_s, self._counts_due)

    def _cancel_counts_timer(self) -> None:
        if self._counts_timer is not None:
            self._counts_timer.cancel()
            self._counts_timer = None

    def close(self) -> None:
        """Drop a pending deferred publish (the agent is stopping)."""
        self._cancel_counts_timer()

    def adopt_key(self, generation: int, version: int) -> None:
        """Continue from a (generation, version) set elsewhere (gossip refuted a stale record of us)."""
        if (generation, version) > self._self.key:
            self._self = dataclasses.replace(self._self, generation=generation, version=version)
            self._live = dataclasses.replace(self._live, generation=generation, version=version)
            self._overrides["generation"] = generation

    def beat(self) -> NodeRecord:
        """Advance the heartbeat (no version change: only the heartbeat moved)."""
        self._self = dataclasses.replace(self._self, heartbeat=self._self.heartbeat + 1)
        self._live = dataclasses.replace(self._live, heartbeat=self._self.heartbeat)
        return self._self

    def set_draining(self, draining: bool = True) -> None:
        self._draining = draining
        self.rebuild()

    # --- peers -------------------------------------------------------------------------------------

    def nodes(self) -> list[NodeRecord]:
        """This node first, then every known peer (any liveness), by name."""
        return [self._live, *sorted(self.peers.values(), key=lambda r: (r.name, r.node_id))]

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
            out.append(self._live)  # this node's own counters as they are now, published or not
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
