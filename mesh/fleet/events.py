"""The in-process event bus behind `GET /mesh/events` (served by `mesh.server.operator_routes`).

Producers (membership, gossip record changes, the neuron's loads) call `bus.publish(event)`; it never
blocks and never fails. Each subscriber has a bounded queue: one that falls behind loses its *oldest*
events (counted in `dropped`), so a stuck dashboard cannot slow the agent. New subscribers first receive
the last `history` events. `record_events(old, new)` derives model events (load started / progress /
done / failed, unloads) from two versions of a node's record, so every agent can report what happens
anywhere in the fleet.

SSE framing: one `data: {json}` line per event, `: keep-alive` comments when idle (never an `event:`
frame without data).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal

from helexa.mesh.fleet.membership import MembershipEvent
from helexa.mesh.fleet.records import NodeRecord
from helexa.mesh.timing import EVENT_HISTORY_SIZE, EVENT_QUEUE_SIZE

log = logging.getLogger(__name__)

__all__ = [
    "Event",
    "EventBus",
    "EventKind",
    "Subscription",
    "membership_event",
    "record_events",
]

EventKind = Literal[
    "join",
    "leave",
    "restart",
    "alive",
    "suspect",
    "dead",
    "forgotten",
    "load_started",
    "load_progress",
    "load_done",
    "load_failed",
    "unload",
    "evict",
    "error",
]


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    kind: EventKind
    node: str = ""  # node id
    node_name: str = ""
    model: str | None = None
    message: str | None = None
    data: dict[str, object] = field(default_factory=dict)
    time: float = field(default_factory=time.time)  # unix seconds

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "type": self.kind,
            "time": self.time,
            "node": self.node,
            "node_name": self.node_name,
        }
        if self.model is not None:
            out["model"] = self.model
        if self.message is not None:
            out["message"] = self.message
        out.update(self.data)
        return out


class Subscription:
    """One subscriber's bounded queue; iterate it (`async for event in sub`) until the bus closes."""

    def __init__(self, bus: EventBus, max_size: int) -> None:
        self._bus = bus
        self._queue: collections.deque[Event] = collections.deque(maxlen=max_size)
        self._ready = asyncio.Event()
        self.dropped = 0
        self.closed = False

    def _put(self, event: Event) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1  # the deque drops the oldest on append
        self._queue.append(event)
        self._ready.set()

    def _close(self) -> None:
        self.closed = True
        self._ready.set()

    async def get(self, timeout_s: float | None = None) -> Event | None:
        """Next event; None on timeout or when the bus is closed and drained."""
        while not self._queue:
            if self.closed:
                return None
            self._ready.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ready.wait()
            except TimeoutError:
                return None
        return self._queue.popleft()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[Event]:
        while True:
            ev = await self.get()
            if ev is None:
                return
            yield ev

    def unsubscribe(self) -> None:
        self._bus._subs.discard(self)
        self._close()


class EventBus:
    def __init__(self, *, queue_size: int = EVENT_QUEUE_SIZE, history: int = EVENT_HISTORY_SIZE) -> None:
        self.queue_size = queue_size
        self._subs: set[Subscription] = set()
        self._history: collections.deque[Event] = collections.deque(maxlen=history)
        self.published = 0
        self.closed = False

    def publish(self, event: Event) -> None:
        """Never blocks, never raises."""
        self.published += 1
        self._history.append(event)
        for sub in self._subs:
            sub._put(event)

    def subscribe(self, *, replay: bool = True) -> Subscription:
        """A new subscription, first holding the last `history` events when `replay`. Once the bus is closed
        it is already closed and empty (no replay), so an SSE client that connects during shutdown ends at
        once instead of holding the server's stop until its shutdown timeout."""
        sub = Subscription(self, self.queue_size)
        if self.closed:
            sub._close()
            return sub
        if replay:
            for ev in self._history:
                sub._put(ev)
        self._subs.add(sub)
        return sub

    @contextlib.contextmanager
    def subscription(self, *, replay: bool = True) -> collections.abc.Iterator[Subscription]:
        sub = self.subscribe(replay=replay)
        try:
            yield sub
        finally:
            sub.unsubscribe()

    def close(self) -> None:
        """End every subscription (app shutdown): SSE handlers return; later subscriptions start closed."""
        self.closed = True
        for sub in list(self._subs):
            sub._close()
        self._subs.clear()

    @property
    def subscribers(self) -> int:
        return len(self._subs)

    def recent(self) -> list[Event]:
        return list(self._history)


def membership_event(ev: MembershipEvent) -> Event:
    """Map a failure-detector transition to a bus event."""
    kind: EventKind
    if ev.restarted:
        kind = "restart"
    elif ev.previous is None:
        kind = "join"
    elif ev.current == "left":
        kind = "leave"
    else:
        kind = ev.current
    return Event(
        kind=kind,
        node=ev.node_id,
        node_name=ev.name,
        data={"liveness": ev.current, "previous": ev.previous, "generation": ev.generation},
    )


def record_events(old: NodeRecord | None, new: NodeRecord | None) -> list[Event]:
    """Model events implied by a node's record changing from `old` to `new` (either may be None)."""
    if new is None or (old is not None and old.generation != new.generation):
        return []  # forgotten or restarted: membership events cover it
    before = {m.id: m for m in old.models} if old is not None else {}
    out: list[Event] = []
    for m in new.models:
        prev = before.pop(m.id, None)
        if (
            prev is not None
            and prev.status == m.status
            and prev.progress == m.progress
            and prev.phase == m.phase
            and prev.done_bytes == m.done_bytes
        ):
            continue
        kind: EventKind | None = None
        if m.status == "loading":
            kind = "load_started" if prev is None or prev.status != "loading" else "load_progress"
        elif m.status == "loaded" and (prev is None or prev.status != "loaded"):
            kind = "load_done"
        elif m.status == "failed" and (prev is None or prev.status != "failed"):
            kind = "load_failed"
        elif m.status == "unloading" and (prev is None or prev.status != "unloading"):
            kind = "unload"
        if kind is not None:
            data: dict[str, object] = {"status": m.status}
            if m.progress is not None:
                data["progress"] = m.progress
            if m.phase is not None:
                data["phase"] = m.phase
            if m.done_bytes is not None:
                # A download: bytes done / total, the rate and the time left.
                data |= {
                    "done_bytes": m.done_bytes,
                    "total_bytes": m.total_bytes,
                    "bytes_per_s": m.bytes_per_s,
                    "eta_s": m.eta_s,
                }
            out.append(
                Event(kind=kind, node=new.node_id, node_name=new.name, model=m.id, message=m.error, data=data)
            )
    for gone in before.values():  # removed from the record: unloaded (evictions are published by the neuron)
        if gone.status != "unloading":
            out.append(Event(kind="unload", node=new.node_id, node_name=new.name, model=gone.id))
    return out
