"""Peering: the mesh side of one agent (gossip, membership, discovery, events, catalogue replication).

`MeshRuntime` wires the tested building blocks into a running agent:

- **gossip** (`mesh.gossip.exchange.Gossip` over `mesh.gossip.transport.HttpTransport` at
  `POST /mesh/peer/gossip`): the fleet's own
  record is pushed into it on every rebuild (`fleet.subscribe(gossip.set_own)`; gossip beats the
  heartbeat), peers' records are mirrored into `fleet.peers`, liveness is the failure detector's;
- **events**: membership transitions, peers' model changes (`record_events`) and this node's own loads,
  unloads and evictions (`neuron.on_event`) go to one `EventBus` behind `GET /mesh/events`;
- **discovery** (`mesh.discovery`) runs in the background after the port is bound; its hints become gossip
  seeds, like the static `--peer`s;
- **catalogue**: this node's entries travel in its record; `mesh.fleet.catalogue.MeshCatalogue` adopts
  newer entries from the mesh (and writes them to this node's models.toml) and keeps the view the cortex
  routes over; it is refreshed whenever a record or a peer's liveness changes;
- **preload**: `preload = true` entries load on one node, the first in placement order once the view
  has settled, not on every node;
- **graceful leave** on drain: peers mark this node `left`, not dead;
- **metrics and logs**: `helexa_peers` follows membership (and is recomputed at every scrape with the
  gossip counters, from cached state); peer state changes are logged at warning (`PeerStateLog`: a
  flapping peer once per kind of change, then at debug).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from helexa.mesh.discovery import SERVICE_TYPE, Discovery, GpuSummary
from helexa.mesh.fleet.catalogue import CatalogueView, LocalCatalogue, MeshCatalogue
from helexa.mesh.fleet.events import Event, EventBus, EventKind, membership_event, record_events
from helexa.mesh.fleet.membership import MembershipEvent
from helexa.mesh.fleet.records import NodeRecord
from helexa.mesh.fleet.view import Fleet
from helexa.mesh.gossip.auth import MeshAuth, binding
from helexa.mesh.gossip.exchange import Gossip
from helexa.mesh.gossip.transport import GOSSIP_PATH, HttpTransport, PeerAddr
from helexa.mesh.logs import QuietLog
from helexa.mesh.metrics import Metrics, PeerState
from helexa.mesh.routing.cortex import MeshCortex
from helexa.mesh.routing.neuron import Neuron, NeuronEvent
from helexa.mesh.timing import (
    COUNTS_PUBLISH_ROUNDS,
    DEFAULT_TIMING,
    EVENT_KEEPALIVE_S,
    PEER_LOG_QUIET_S,
    PRELOAD_SETTLE_ROUNDS,
    MeshTiming,
)

log = logging.getLogger(__name__)

__all__ = ["MeshOptions", "MeshRuntime", "PeerStateLog"]


_NEURON_EVENT_KINDS: dict[str, EventKind] = {
    "loading": "load_started",
    "loaded": "load_done",
    "load_failed": "load_failed",
    "unloaded": "unload",
    "evicted": "evict",
    "fault": "error",
}


@dataclass(frozen=True, kw_only=True, slots=True)
class MeshOptions:
    """Mesh settings that are not configuration keys: protocol timings and test hooks."""

    timing: MeshTiming = DEFAULT_TIMING
    # mDNS: None = every interface; tests pass ["127.0.0.1"] and a unique service type.
    mdns_interfaces: tuple[str, ...] | None = None
    mdns_service_type: str = SERVICE_TYPE
    # Seconds to wait before the preload decision (default: PRELOAD_SETTLE_ROUNDS gossip intervals).
    preload_settle_s: float | None = None
    # SSE keep-alive comment interval of `/mesh/events`.
    events_keepalive_s: float = EVENT_KEEPALIVE_S
    # Seconds between publications of count-only changes of this node's record (default:
    # COUNTS_PUBLISH_ROUNDS gossip intervals, so a scaled test timing shrinks it too).
    counts_interval_s: float | None = None

    @property
    def record_counts_interval_s(self) -> float:
        if self.counts_interval_s is not None:
            return self.counts_interval_s
        return COUNTS_PUBLISH_ROUNDS * self.timing.gossip_interval_s


class PeerStateLog:
    """Logs peers' liveness changes for operators: joins at info; suspect, dead, left and rejoins
    (alive again, or restarted) at warning, except that the same kind of change of the same peer within
    `quiet_s` of the last warning about it goes to debug (a flapping peer is logged once, then quietly).
    """

    def __init__(self, *, quiet_s: float = PEER_LOG_QUIET_S, clock: Callable[[], float] = time.monotonic):
        self.quiet_s = quiet_s
        self._warnings = QuietLog(quiet_s=quiet_s, clock=clock)

    def level(self, ev: MembershipEvent) -> int:
        """The level `ev` is logged at (and remember a warning)."""
        kind = self._kind(ev)
        if kind is None:
            joined = ev.previous is None and ev.current in ("alive", "suspect")
            return logging.INFO if joined else logging.DEBUG
        return self._warnings.level((str(ev.node_id), kind))

    @staticmethod
    def _kind(ev: MembershipEvent) -> str | None:
        if ev.restarted:
            return "restarted"
        if ev.previous is None:
            return None  # first heard of (a join; or a relayed record of a node long gone)
        if ev.current in ("suspect", "dead", "left"):
            return ev.current
        if ev.current == "alive" and ev.previous in ("suspect", "dead", "left"):
            return "rejoined"
        return None  # a new peer, or forgotten

    def log(self, ev: MembershipEvent) -> None:
        level = self.level(ev)
        if not log.isEnabledFor(level):
            return
        kind = self._kind(ev)
        what = {
            "suspect": "is suspect (no heartbeat lately)",
            "dead": "is dead (no heartbeat): out of routing",
            "left": "left the mesh",
            "rejoined": f"is alive again (was {ev.previous})",
            "restarted": f"restarted (generation {ev.generation}), now {ev.current}",
        }.get(kind or "", f"{ev.previous or 'new'} -> {ev.current}")
        if ev.previous is None and not ev.restarted:
            what = f"joined ({ev.current})" if ev.current in ("alive", "suspect") else f"seen ({ev.current})"
        quiet = f" (repeats within {self.quiet_s:.0f} s at debug)" if level == logging.WARNING else ""
        log.log(level, "peer %s (%s) %s%s", ev.name, str(ev.node_id)[:8], what, quiet)


class _LazyTransport:
    """`HttpTransport` over the session the app creates when it starts (gossip is built before)."""

    def __init__(self, auth: MeshAuth | None) -> None:
        self.auth = auth
        self.http: HttpTransport | None = None

    async def __call__(self, peer: PeerAddr, body: bytes) -> bytes:
        if self.http is None:
            raise ConnectionError("the agent is not running")
        return await self.http(peer, body)


class MeshRuntime:
    """Gossip, membership, discovery, events and the mesh-wide catalogue of one agent."""

    def __init__(
        self,
        *,
        own: NodeRecord,
        fleet: Fleet,
        neuron: Neuron,
        cortex: MeshCortex,
        view: CatalogueView,
        local: LocalCatalogue,
        metrics: Metrics,
        mesh_key: str | None,
        api_keys: Sequence[str] = (),
        model_roots: Sequence[Path] | None = None,
        static_peers: Sequence[str] = (),
        mdns: bool = True,
        options: MeshOptions | None = None,
    ) -> None:
        self.options = options or MeshOptions()
        self.timing = self.options.timing
        self.fleet = fleet
        self.neuron = neuron
        self.cortex = cortex
        self.metrics = metrics
        self.mdns = mdns
        # A mesh key guards gossip and every other peer request. Without one (an open mesh) gossip is open;
        # client API keys, if any, then guard the other peer requests with a key derived from them, so
        # that only agents holding the same keys exchange requests (`mesh.gossip.auth`).
        self.gossip_auth = MeshAuth(mesh_key) if mesh_key else None
        self.auth = self.gossip_auth or (MeshAuth.for_client_keys(api_keys) if api_keys else None)
        self.bus = EventBus()
        self.http: aiohttp.ClientSession | None = None
        self.discovery: Discovery | None = None
        seeds: list[PeerAddr] = []
        for text in static_peers:
            try:
                seeds.append(PeerAddr.parse(text))
            except ValueError:
                log.warning("ignoring the bad static peer %r", text)
        self._transport = _LazyTransport(self.gossip_auth)
        self.gossip = Gossip(own=own, transport=self._transport, timing=self.timing, seeds=seeds)
        if self.auth is not None:
            gossip = self.gossip  # requests are bound to this node's id and current generation
            self.auth.bind(lambda: binding(gossip.self_id, gossip.own.generation))
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running = False
        self.peer_log = PeerStateLog()
        self._wire()
        self.catalogue = MeshCatalogue(
            local=local,
            view=view,
            live_records=self.live_records,
            changed=fleet.mark_changed,
            roots=model_roots,
            open_mesh=self.open,
        )
        self.gossip.accept_entry = self.catalogue.accepts
        self.refresh_catalogue()
        metrics.add_refresher(self.refresh_metrics)

    @property
    def open(self) -> bool:
        """No mesh key: anyone on the LAN can gossip with this agent."""
        return self.gossip_auth is None

    @property
    def unguarded_paths(self) -> tuple[str, ...]:
        """Peer paths `self.auth` does not guard: gossip, on an open mesh."""
        return (GOSSIP_PATH,) if self.open else ()

    @property
    def events_keepalive_s(self) -> float:
        return self.options.events_keepalive_s

    # --- wiring ------------------------------------------------------------------------------------

    def _wire(self) -> None:
        fleet, gossip = self.fleet, self.gossip
        fleet.subscribe(self._push_own)
        fleet.liveness = gossip.liveness
        fleet.heartbeat_of = lambda nid: r.heartbeat if (r := gossip.view.get(nid)) is not None else None
        gossip.add_record_listener(self._on_record)
        gossip.add_membership_listener(self._on_membership)
        self.neuron.on_event.append(self._on_neuron_event)

    def _push_own(self, record: NodeRecord) -> None:
        try:
            self.gossip.set_own(record)
        except ValueError:
            # Gossip moved our (generation, version) on (it refuted a stale record of us): continue there.
            own = self.gossip.own
            self.fleet.adopt_key(own.generation, own.version)
            self.fleet.rebuild()

    def _on_record(self, old: NodeRecord | None, new: NodeRecord | None) -> None:
        me = self.fleet.node_id
        rec = new or old
        if rec is None:
            return
        if rec.node_id == me:
            # Own loads/unloads come from the neuron (with durations and reasons); progress from here.
            for ev in record_events(old, new):
                if ev.kind == "load_progress":
                    self.bus.publish(ev)
            if old is not None and new is not None and old.catalogue != new.catalogue:
                # An edit through the operator API: the view (routing, /v1/models) takes it now, not at
                # the next peer change (put_entry's own refresh ran before this record was rebuilt).
                self.refresh_catalogue()
            return
        if new is None:
            self.fleet.peers.pop(rec.node_id, None)
        else:
            self.fleet.peers[new.node_id] = new
        for ev in record_events(old, new):
            self.bus.publish(ev)
        if old is None or new is None or old.catalogue != new.catalogue:
            self.refresh_catalogue()

    def _on_membership(self, ev: MembershipEvent) -> None:
        self.peer_log.log(ev)
        self.bus.publish(membership_event(ev))
        self._count_peers()
        # Entries held only by nodes that died or left drop out of (or come back into) the view.
        self.refresh_catalogue()

    def _on_neuron_event(self, ev: NeuronEvent) -> None:
        me = self.fleet.self_record
        data: dict[str, object] = {}
        if ev.devices:
            data["devices"] = list(ev.devices)
        if ev.memory_mb:
            data["memory_mb"] = ev.memory_mb
        if ev.duration_s is not None:
            data["duration_s"] = round(ev.duration_s, 3)
        if ev.reason is not None:
            data["reason"] = ev.reason
        self.bus.publish(
            Event(
                kind=_NEURON_EVENT_KINDS.get(ev.kind, "error"),
                node=me.node_id,
                node_name=me.name,
                model=ev.model,
                message=ev.error,
                data=data,
                time=ev.at,
            )
        )

    # --- catalogue ---------------------------------------------------------------------------------

    def live_records(self) -> list[NodeRecord]:
        """Records of nodes that are alive or suspect (own included)."""
        return [r for nid, r in self.gossip.view.items() if self.gossip.liveness(nid) in ("alive", "suspect")]

    def refresh_catalogue(self) -> None:
        self.catalogue.refresh()

    # --- lifecycle ---------------------------------------------------------------------------------

    def _spawn(self, coro: Any, name: str) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro, name=name)
        except RuntimeError:  # no loop (built outside one): nothing to run it on
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @contextlib.asynccontextmanager
    async def running(self, *, advertise_address: str) -> AsyncIterator[None]:
        """Run gossip (and discovery, preload, metrics) for the lifetime of the app."""
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0)
        self.http = aiohttp.ClientSession(connector=connector)
        self._transport.http = HttpTransport(self.http, auth=self.gossip_auth)
        self._running = True
        if self.open and self.auth is not None:
            log.warning(
                "open mesh with client API keys: gossip is open (anyone on the LAN can see this fleet and"
                " announce nodes), but requests are forwarded only to and from agents configured with the"
                " same API keys, and the keys never leave this agent; on an untrusted network give every"
                " agent a --mesh-key"
            )
        self.fleet.rebuild()
        self._spawn(self.gossip.run(), "gossip")
        self._spawn(self._preload(), "preload")
        if self.mdns:
            self._spawn(self._start_discovery(advertise_address), "mdns")
        try:
            yield
        finally:
            self._running = False
            self.fleet.close()
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            if self.discovery is not None:
                await self.discovery.close()
            await self.catalogue.aclose()
            self.bus.close()
            self._transport.http = None
            await self.http.close()

    async def leave(self) -> None:
        """Graceful leave (a drain hook): peers mark this node `left` at once instead of dead later."""
        if not self._running:
            return
        try:
            await self.gossip.leave()
        except Exception:
            log.exception("graceful leave failed")

    async def _start_discovery(self, address: str) -> None:
        me = self.fleet.self_record
        gpus = [d for d in me.devices if d.kind == "cuda"]
        discovery = Discovery(
            node_id=me.node_id,
            generation=me.generation,
            mesh=me.mesh,
            port=me.port,
            addresses=[address],
            on_peer=lambda h: self.gossip.add_hint(
                address=h.address, port=h.port, node_id=h.node_id, mesh=h.mesh
            ),
            gpus=GpuSummary(
                count=len(gpus),
                total_vram_mb=sum(d.memory_total_mb for d in gpus),
                first_name=gpus[0].model if gpus else "",
            ),
            instance_name=f"{me.name[:40]}-{me.node_id[:8]}",
            interfaces=list(self.options.mdns_interfaces) if self.options.mdns_interfaces else None,
            service_type=self.options.mdns_service_type,
        )
        self.discovery = discovery
        await discovery.start()

    def _count_peers(self) -> None:
        """`helexa_peers` from the failure detector's view (left and forgotten peers are not counted)."""
        counts: dict[PeerState, int] = {"alive": 0, "suspect": 0, "dead": 0}
        for nid in self.gossip.view:
            if nid == self.fleet.node_id:
                continue
            state = self.gossip.liveness(nid)
            if state in ("alive", "suspect", "dead"):
                counts[state] += 1
        self.metrics.set_peers(counts)

    def refresh_metrics(self) -> None:
        """Before each scrape: gossip totals and peer counts, from cached state only."""
        stats = self.gossip.stats
        self.metrics.gossip_totals(rounds=stats.rounds, bytes_total=stats.bytes_sent + stats.bytes_received)
        self._count_peers()

    async def _preload(self) -> None:
        """Load each `preload` entry on ONE node: the first in placement order, once the view settled."""
        settle_s = self.options.preload_settle_s
        if settle_s is None:
            settle_s = PRELOAD_SETTLE_ROUNDS * self.timing.gossip_interval_s
        await asyncio.sleep(settle_s)
        for entry in self.catalogue.view.entries:
            if not entry.preload:
                continue
            nodes = self.fleet.routable_nodes()
            if any((m := n.model(entry.id)) is not None and m.status in ("loaded", "loading") for n in nodes):
                continue
            candidates = self.cortex.place(entry, nodes)
            if not candidates or candidates[0].node_id != self.fleet.node_id:
                continue
            log.info("preloading %s (this node is first in placement order)", entry.id)
            try:
                await self.neuron.ensure_loaded(entry)
            except Exception as e:
                log.warning("preloading %s failed: %s", entry.id, e)
