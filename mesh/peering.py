"""The mesh side of one agent: gossip, membership, discovery, the event bus and the mesh-wide catalogue.

`MeshRuntime` wires the tested building blocks into a running agent:

- **gossip** (`mesh.gossip.Gossip` over `HttpTransport` at `POST /mesh/peer/gossip`): the fleet's own
  record is pushed into it on every rebuild (`fleet.subscribe(gossip.set_own)`; gossip beats the
  heartbeat), peers' records are mirrored into `fleet.peers`, liveness is the failure detector's;
- **events**: membership transitions, peers' model changes (`record_events`) and this node's own loads,
  unloads and evictions (`neuron.on_event`) go to one `EventBus` behind `GET /mesh/events`;
- **discovery** (`mesh.discovery`) runs in the background after the port is bound; its hints become gossip
  seeds, like the static `--peer`s;
- **catalogue**: this node's entries (its file, plus what it adopts) travel in its record; the mesh-wide
  catalogue (per id the newest version among live nodes, tombstones included) is what the cortex routes
  over. Newer entries seen in gossip are adopted into this node's record *and written to its own
  models.toml* (when the agent reads its catalogue from a file), so a model added anywhere survives any
  one node going away, and a removal (a tombstone: `removed = true` with a higher version) spreads;
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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from helexa.catalogue.entry import ModelEntry
from helexa.mesh.discovery import SERVICE_TYPE, Discovery, GpuSummary
from helexa.mesh.fleet.events import Event, EventBus, EventKind, membership_event, record_events
from helexa.mesh.fleet.membership import MembershipEvent
from helexa.mesh.fleet.records import NodeId, NodeRecord
from helexa.mesh.fleet.view import Fleet
from helexa.mesh.gossip.auth import MeshAuth
from helexa.mesh.gossip.exchange import Gossip, HttpTransport, PeerAddr
from helexa.mesh.metrics import Metrics, PeerState
from helexa.mesh.routing.cortex import CatalogueView, MeshCortex
from helexa.mesh.routing.neuron import Neuron, NeuronEvent
from helexa.mesh.timing import DEFAULT_TIMING, EVENT_KEEPALIVE_S, MeshTiming

log = logging.getLogger(__name__)

__all__ = ["LocalCatalogue", "MeshOptions", "MeshRuntime", "PeerStateLog", "newest_entries"]

# Preload waits this many gossip intervals after start so the fleet view has settled (peers known,
# their models visible) before deciding which single node loads a `preload` entry.
PRELOAD_SETTLE_ROUNDS = 3
# Count-only changes of this node's record (requests in flight, totals, rates) are published at most every
# this many gossip intervals (`Fleet.counts_interval_s`; 2 s in production): fresh enough for least-busy
# routing and the dashboard, without re-gossiping a busy agent's whole record on every round.
COUNTS_PUBLISH_ROUNDS = 2
# A peer's repeated change of the same kind (suspect again, alive again...) within this window is logged
# at debug: a flapping peer gets one warning per kind of change, not one per round.
PEER_LOG_QUIET_S = 300.0

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
        self._clock = clock
        self._warned: dict[tuple[str, str], float] = {}

    def level(self, ev: MembershipEvent) -> int:
        """The level `ev` is logged at (and remember a warning)."""
        kind = self._kind(ev)
        if kind is None:
            joined = ev.previous is None and ev.current in ("alive", "suspect")
            return logging.INFO if joined else logging.DEBUG
        now = self._clock()
        key = (str(ev.node_id), kind)
        last = self._warned.get(key)
        if last is not None and now - last < self.quiet_s:
            return logging.DEBUG
        if len(self._warned) > 4096:
            self._warned.clear()
        self._warned[key] = now
        return logging.WARNING

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


def _canonical(entry: Mapping[str, object]) -> bytes:
    return orjson.dumps(entry, option=orjson.OPT_SORT_KEYS)


def _version(entry: Mapping[str, object]) -> int:
    v = entry.get("version", 0)
    return v if isinstance(v, int) and not isinstance(v, bool) else 0


def newest_entries(records: Sequence[NodeRecord]) -> dict[str, dict[str, object]]:
    """Per entry id the newest version among `records`' catalogues, tombstones included.

    Ties on version are broken by the canonical bytes (the same winner on every agent). Pure.
    """
    best: dict[str, tuple[int, bytes, Mapping[str, object]]] = {}
    for r in records:
        for e in r.catalogue:
            eid = e.get("id")
            if not isinstance(eid, str):
                continue
            cand = (_version(e), _canonical(e))
            cur = best.get(eid)
            if cur is None or cand > cur[:2]:
                best[eid] = (*cand, e)
    return {k: dict(v[2]) for k, v in best.items()}


class LocalCatalogue:
    """This node's catalogue entries in their gossip form (tombstones included), and its file.

    `path` is None when the agent was given its entries (tests): edits then live in memory only.
    Writes to the file run in worker threads, one at a time.
    """

    def __init__(self, entries: Sequence[ModelEntry], *, path: Path | None) -> None:
        from helexa.catalogue.store import entry_to_dict

        self.path = path
        self.dicts: dict[str, dict[str, object]] = {e.id: entry_to_dict(e) for e in entries}
        # Parsed entries of this node's own file (their sources resolved against the file's folder).
        self.parsed: dict[str, ModelEntry] = {e.id: e for e in entries}
        self._write_lock = asyncio.Lock()

    def records(self) -> tuple[dict[str, object], ...]:
        return tuple(self.dicts[k] for k in sorted(self.dicts))

    async def write(self, entry_id: str, new: Mapping[str, object]) -> None:
        """Make the file hold `new` for `entry_id` (add, replace, or remove for a tombstone). Logged, never
        raised: the in-memory catalogue is what gossip carries either way."""
        if self.path is None:
            return
        path = self.path
        async with self._write_lock:
            try:
                await asyncio.to_thread(_write_entry, path, entry_id, dict(new))
            except Exception as e:
                log.warning("catalogue %s: could not write %s: %s", path, entry_id, e)


def _write_entry(path: Path, entry_id: str, new: dict[str, object]) -> None:
    """Blocking: bring `path`'s entry `entry_id` to `new` (a tombstone removes it)."""
    from helexa.catalogue import store

    if new.get("removed") is True:
        store.remove_entry(path, entry_id)
        return
    fields = {k: v for k, v in new.items() if k != "removed"}
    try:
        current = store.load_catalogue(path)
        present = any(e.id == entry_id for e in current.entries)
    except FileNotFoundError:
        present = False
    if present:
        store.update_entry(path, entry_id, fields, bump_version=False, replace=True)
    else:
        store.add_entry(path, fields)


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
        static_peers: Sequence[str] = (),
        mdns: bool = True,
        options: MeshOptions | None = None,
    ) -> None:
        self.options = options or MeshOptions()
        self.timing = self.options.timing
        self.fleet = fleet
        self.neuron = neuron
        self.cortex = cortex
        self.view = view
        self.local = local
        self.metrics = metrics
        self.mdns = mdns
        self.auth = MeshAuth(mesh_key) if mesh_key else None
        self.bus = EventBus()
        self.http: aiohttp.ClientSession | None = None
        self.discovery: Discovery | None = None
        seeds: list[PeerAddr] = []
        for text in static_peers:
            try:
                seeds.append(PeerAddr.parse(text))
            except ValueError:
                log.warning("ignoring the bad static peer %r", text)
        self._transport = _LazyTransport(self.auth)
        self.gossip = Gossip(own=own, transport=self._transport, timing=self.timing, seeds=seeds)
        self._parsed: dict[bytes, ModelEntry | None] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._running = False
        self.peer_log = PeerStateLog()
        self._wire()
        self.refresh_catalogue()
        metrics.add_refresher(self.refresh_metrics)

    @property
    def open(self) -> bool:
        return self.auth is None

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

    def mesh_entries(self) -> dict[str, dict[str, object]]:
        """The mesh-wide catalogue with tombstones (per id the newest version)."""
        return newest_entries(self.live_records())

    def _parse(self, raw: Mapping[str, object]) -> ModelEntry | None:
        key = _canonical(raw)
        if key not in self._parsed:
            from helexa.catalogue.store import entry_from_dict

            eid = str(raw.get("id"))
            local = self.local.parsed.get(eid)
            if local is not None and local.version == _version(raw) and raw == self.local.dicts.get(eid):
                self._parsed[key] = local  # this node's own file entry (sources resolved against it)
            else:
                try:
                    self._parsed[key] = entry_from_dict(raw)
                except Exception as e:
                    log.warning("ignoring the catalogue entry %s from the mesh: %s", eid, e)
                    self._parsed[key] = None
            if len(self._parsed) > 4096:
                self._parsed.clear()
        return self._parsed[key]

    def refresh_catalogue(self) -> None:
        """Recompute the mesh-wide view and adopt newer entries into this node's catalogue."""
        newest = self.mesh_entries()
        adopted = False
        for eid, winner in newest.items():
            mine = self.local.dicts.get(eid)
            if mine is not None and _version(mine) >= _version(winner):
                continue
            self.local.dicts[eid] = winner
            self.local.parsed.pop(eid, None)
            adopted = True
            log.info("catalogue: adopting %s version %d from the mesh", eid, _version(winner))
            self._spawn(self.local.write(eid, winner), f"write catalogue {eid}")
        entries = [
            e
            for raw in newest.values()
            if raw.get("removed") is not True and (e := self._parse(raw)) is not None
        ]
        self.view.replace(sorted(entries, key=lambda e: e.id))
        if adopted:
            self.fleet.mark_changed()

    async def put_entry(self, raw: Mapping[str, object]) -> ModelEntry:
        """Add or update an entry (operator API): validated strictly, written to this node's file off the
        loop, with a version above every copy in the mesh, then gossiped. Raises on a bad entry."""
        from helexa.catalogue.store import entry_from_dict, entry_to_dict

        fields = {
            k: v
            for k, v in raw.items()
            if k not in ("version", "removed", "feasible_on", "locations", "status", "loaded")
        }
        eid = fields.get("id")
        if not isinstance(eid, str) or not eid:
            from helexa.mesh.errors import InvalidRequest

            raise InvalidRequest("the entry needs an 'id'", param="id")
        current = self.mesh_entries().get(eid)
        versions = [_version(e) for e in (current, self.local.dicts.get(eid)) if e]
        if current is not None and current.get("removed") is not True:
            # An update: the fields given replace those of the current entry (pinning posts a new pinned_on).
            fields = {**{k: v for k, v in current.items() if k != "version"}, **fields}
        fields = {k: v for k, v in fields.items() if v is not None}
        fields["version"] = max(versions, default=0) + 1
        entry = entry_from_dict(fields, origin="request")  # raises InvalidEntryError on problems
        if self.local.path is not None:
            path = self.local.path
            async with self.local._write_lock:
                entry = await asyncio.to_thread(_store_entry, path, eid, fields)
        self.local.parsed[entry.id] = entry
        self.local.dicts[entry.id] = entry_to_dict(entry)
        self.refresh_catalogue()
        self.fleet.mark_changed()
        return entry

    async def remove_entry(self, entry_id: str) -> bool:
        """Remove an entry mesh-wide with a tombstone of a higher version. False if unknown."""
        current = self.mesh_entries().get(entry_id)
        if current is None or current.get("removed") is True:
            return False
        versions = [_version(e) for e in (current, self.local.dicts.get(entry_id)) if e]
        tombstone: dict[str, object] = {"id": entry_id, "version": max(versions) + 1, "removed": True}
        self.local.dicts[entry_id] = tombstone
        self.local.parsed.pop(entry_id, None)
        await self.local.write(entry_id, tombstone)
        self.refresh_catalogue()
        self.fleet.mark_changed()
        return True

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
        self._transport.http = HttpTransport(self.http, auth=self.auth)
        self._running = True
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
        for entry in self.view.entries:
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

    def node_id_of(self, name_or_id: str) -> NodeId | None:
        record = self.fleet.node(name_or_id)
        return record.node_id if record is not None else None


def _store_entry(path: Path, entry_id: str, fields: dict[str, object]) -> ModelEntry:
    """Blocking: add or update `entry_id` in the file (strict: refused on any problem)."""
    from helexa.catalogue import store

    try:
        present = any(e.id == entry_id for e in store.load_catalogue(path).entries)
    except FileNotFoundError:
        present = False
    if present:
        return store.update_entry(path, entry_id, fields, bump_version=True, replace=True)
    return store.add_entry(path, fields)
