"""Failure detection: each peer's liveness from whether its heartbeat keeps advancing.

    alive ──(no heartbeat advance for suspect_after_s)──► suspect ──(dead_after_s)──► dead
      ▲                                                      │                         │
      └──────────────── heartbeat advances ◄─────────────────┴─────────────────────────┘
    any ──(record says left)──► left          dead / left ──(forget_after_s)──► forgotten (dropped)
    any ──(newer generation: a restart)──► alive at once (or left, if the new record says so)

Liveness comes only from heartbeats carried by gossip (directly or relayed), never from mDNS and never
from one failed exchange: suspicion needs several missed rounds, death several more (debounce). A
transport failure is recorded (`last_error`, shown to operators) but does not change liveness by itself.

The clock is pluggable (`clock()` returns monotonic seconds) so tests drive it by hand. If the clock jumps
forward between two `tick()`s by more than `max_tick_gap_s` (our loop stalled, the VM was paused), the gap
is credited to every peer: the silence was ours.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from helexa.mesh.fleet.records import Liveness, NodeId, NodeRecord
from helexa.mesh.timing import DEFAULT_TIMING, MeshTiming

log = logging.getLogger(__name__)

__all__ = ["FailureDetector", "MembershipEvent", "PeerStatus", "Transition"]

Transition = Liveness | Literal["forgotten"]


@dataclass(frozen=True, kw_only=True, slots=True)
class MembershipEvent:
    """A peer's liveness changed. `previous` is None when the peer is new; `restarted` on a new generation."""

    node_id: NodeId
    name: str
    previous: Liveness | None
    current: Transition
    generation: int
    restarted: bool = False


@dataclass(kw_only=True, slots=True)
class PeerStatus:
    """What the detector knows about one peer (mutable, owned by the detector)."""

    node_id: NodeId
    name: str
    generation: int
    heartbeat: int
    liveness: Liveness
    last_advance_at: float  # clock() when the heartbeat last advanced (or the peer was first seen)
    changed_at: float  # clock() of the last liveness change
    failures: int = 0  # consecutive failed direct exchanges
    last_error: str | None = None


class FailureDetector:
    """Per-peer liveness on a pluggable clock. Not thread-safe: use from the event loop only."""

    def __init__(
        self,
        *,
        self_id: NodeId,
        timing: MeshTiming = DEFAULT_TIMING,
        clock: Callable[[], float] = time.monotonic,
        on_event: Callable[[MembershipEvent], None] | None = None,
    ) -> None:
        self.self_id = self_id
        self.timing = timing
        self._clock = clock
        self._peers: dict[NodeId, PeerStatus] = {}
        self._listeners: list[Callable[[MembershipEvent], None]] = [on_event] if on_event else []
        self._last_tick = clock()

    def add_listener(self, fn: Callable[[MembershipEvent], None]) -> None:
        self._listeners.append(fn)

    def _emit(self, ev: MembershipEvent) -> None:
        # Debug only: operators read joins, deaths and leaves from `mesh.peering.PeerStateLog` (once per
        # change, flapping quieted); an info line here repeated each of them.
        log.debug(
            "peer %s (%s): %s -> %s%s",
            ev.name,
            ev.node_id,
            ev.previous,
            ev.current,
            " (restarted)" if ev.restarted else "",
        )
        for fn in self._listeners:
            try:
                fn(ev)
            except Exception:
                log.exception("membership listener failed")

    def _set(self, p: PeerStatus, liveness: Liveness, now: float) -> None:
        if p.liveness == liveness:
            return
        previous = p.liveness
        p.liveness = liveness
        p.changed_at = now
        self._emit(
            MembershipEvent(
                node_id=p.node_id, name=p.name, previous=previous, current=liveness, generation=p.generation
            )
        )

    def observe(self, record: NodeRecord, *, direct: bool = False) -> None:
        """Take note of the record currently held for a peer (after every merge that changed it).

        `direct`: the record came from the peer itself in an exchange, so it is reachable now. A peer first
        heard of second-hand starts `suspect` until its heartbeat is seen advancing, so a long-dead node
        relayed by someone cannot enter routing.
        """
        if record.node_id == self.self_id:
            return
        now = self._clock()
        p = self._peers.get(record.node_id)
        if p is None or record.generation > p.generation:
            restarted = p is not None
            liveness: Liveness = "left" if record.left else ("alive" if direct or restarted else "suspect")
            previous = p.liveness if p is not None else None
            self._peers[record.node_id] = PeerStatus(
                node_id=record.node_id,
                name=record.name,
                generation=record.generation,
                heartbeat=record.heartbeat,
                liveness=liveness,
                last_advance_at=now,
                changed_at=now,
            )
            self._emit(
                MembershipEvent(
                    node_id=record.node_id,
                    name=record.name,
                    previous=previous,
                    current=liveness,
                    generation=record.generation,
                    restarted=restarted,
                )
            )
            return
        if record.generation < p.generation:
            return  # stale news about an earlier incarnation
        p.name = record.name
        if record.left:
            self._set(p, "left", now)
            return
        if record.heartbeat > p.heartbeat:
            p.heartbeat = record.heartbeat
            p.last_advance_at = now
            if p.liveness != "left":
                self._set(p, "alive", now)

    def report_success(self, node_id: NodeId) -> None:
        p = self._peers.get(node_id)
        if p is not None:
            p.failures = 0
            p.last_error = None

    def report_failure(self, node_id: NodeId, error: str) -> None:
        """A direct exchange failed: recorded for operators; liveness still follows heartbeats only."""
        p = self._peers.get(node_id)
        if p is not None:
            p.failures += 1
            p.last_error = error

    def tick(self) -> list[NodeId]:
        """Advance the state machine to `clock()`; returns the ids forgotten now (drop their records)."""
        now = self._clock()
        gap = now - self._last_tick
        self._last_tick = now
        if gap > self.timing.max_tick_gap_s:
            log.warning("failure detector paused for %.1f s; not counting it against peers", gap)
            for p in self._peers.values():
                p.last_advance_at += gap
                p.changed_at += gap
        t = self.timing
        forgotten: list[NodeId] = []
        for p in list(self._peers.values()):
            silent = now - p.last_advance_at
            if p.liveness == "alive" and silent >= t.suspect_after_s:
                self._set(p, "suspect", now)
            if p.liveness == "suspect" and silent >= t.dead_after_s:
                self._set(p, "dead", now)
            if p.liveness in ("dead", "left") and now - p.changed_at >= t.forget_after_s:
                del self._peers[p.node_id]
                forgotten.append(p.node_id)
                self._emit(
                    MembershipEvent(
                        node_id=p.node_id,
                        name=p.name,
                        previous=p.liveness,
                        current="forgotten",
                        generation=p.generation,
                    )
                )
        return forgotten

    def liveness(self, node_id: NodeId) -> Liveness | None:
        if node_id == self.self_id:
            return "alive"
        p = self._peers.get(node_id)
        return p.liveness if p is not None else None

    def status(self, node_id: NodeId) -> PeerStatus | None:
        return self._peers.get(node_id)

    def peers(self) -> dict[NodeId, PeerStatus]:
        return dict(self._peers)

    def ids(self, *states: Liveness) -> list[NodeId]:
        return [nid for nid, p in self._peers.items() if p.liveness in states]
