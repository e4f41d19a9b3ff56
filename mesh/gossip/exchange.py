"""Push-pull anti-entropy gossip of `NodeRecord`s, over a pluggable transport.

Every `interval` an agent bumps its own heartbeat, ticks the failure detector, and exchanges with up to
`fanout` random live (or suspect) peers, plus static/mDNS seed addresses not yet known as live records
(with backoff), plus now and then one dead peer so that a healed partition converges again.

Protocol 2, compact digests (the normal case). Positions are the view's nodes sorted by id
(`mesh.fleet.merge.members`); both sides agree on them when their membership hashes agree:

    A → B  csyn  {mh, n, t, hb: "…", ver: "…"}        mh: hash of A's (id, generation) set; hb, ver: A's
                                                       heartbeats and versions, one short string each
    B → A  ack   {hb: "…", ver: "…", records: [...],   B's heartbeats and versions as differences from
                  want: [i, ...]}                      A's (mostly 0: one character per node); records
                                                       where B has a newer version; want: where A has
    A → B  push  {records: [...]}                      only if B wanted something (i.e. after a change)

    B → A  ack   {need: "digest"}                      B's node set differs (join, restart, forget): A
                                                       runs the explicit exchange below at once

Heartbeats go as residuals from `t - generation // 1000` (t chosen by A as the median of
`heartbeat + generation // 1000`): generations are start times in ms and heartbeats count seconds since
start, so live nodes' residuals are small and cost one or two characters (`mesh.fleet.codec.encode_ints`). The
decoding is exact whatever the values; only the size depends on that guess. At 50 agents a steady-state
exchange is ~400 B of bodies where the explicit digest was ~3.5 KB (numbers: `scripts/bench_gossip_sim.py`).

Explicit digests (protocol 1; first contact with a seed, node sets that differ, `compact_digests=False`):

    A → B  syn   {digest: [[id, gen, ver, hb], ...]}    A's whole digest; B takes newer heartbeats from it
    B → A  ack   {records: [...], hb: [[i, hb], ...],   what A lacks / is behind on (i indexes A's digest)
                  want_full: [i, ...]}                  records where A has a newer (generation, version)
    A → B  push  {records: [...]}                       only if B wanted something

Every `full_exchange_every_rounds` one exchange carries a repair check: with compact digests a 48-bit
content hash per record (`ch`), and B swaps the records whose content differs under an equal version
(B sends its own and wants A's); with explicit digests a `full` exchange (all records both ways). Each
exchange runs under `asyncio.timeout(gossip_peer_timeout_s)`; a failure is counted and reported to the
detector and never ends the loop. Messages carry the mesh name; another mesh's messages are answered with
`reject` and its records are never merged. Records that do not decode (`CodecError`) are dropped one by
one; a message that does not decode (bad JSON, a malformed vector, sizes over the limits) is refused
whole. Graceful leave pushes the own record with `left = true` to every live peer. A responder answers
protocol-1 messages too (`syn`, `push`, `full`), so an agent with `compact_digests=False` still gossips
with this one; an agent older than protocol 2 refuses `csyn` (the exchange fails and is retried).

Numbers are bounded twice. The codec refuses generations, versions and heartbeats beyond `MAX_COUNTER`
(2^53 - 1). Here, a record (or digest entry) that no real agent can have is dropped: a generation further
than `GENERATION_MAX_AHEAD_S` ahead of this host's clock (generations are start times in ms), or a
heartbeat of more than one a millisecond since that start. A record of this node itself that it did not
write (an earlier run whose clock ran ahead, or a forger: a newer version, other content under its own
version, a heartbeat ahead of its own) is refuted with a new generation just above it, never by adopting
anything it says, and never past the skew bound. (A forged generation of 2^63 - 1 once made a node answer
with 2^63, which no peer could decode: it was cut off, and stayed so across restarts.) A host whose clock
is more than the bound behind its peers' drops their records until its clock is set, and says so.

The transport (`mesh.gossip.transport`) is `async (peer, body) -> reply body` and raises on failure:
`HttpTransport` posts to `POST /mesh/peer/gossip` (served by `gossip_handler(gossip)`), `InMemoryNetwork`
connects gossipers in one process (tests, `scripts/bench_gossip_sim.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from helexa.mesh.fleet.codec import (
    MAX_COUNTER,
    CodecError,
    decode_ints,
    decode_json,
    dumps,
    encode_ints,
    node_from_dict,
    node_to_dict,
)
from helexa.mesh.fleet.membership import FailureDetector, MembershipEvent
from helexa.mesh.fleet.merge import (
    DigestEntry,
    apply_heartbeats,
    content_hash,
    diff,
    members,
    membership_hash,
    merge_record,
    mesh_catalogue,
    order_key,
)
from helexa.mesh.fleet.records import Liveness, NodeId, NodeRecord
from helexa.mesh.gossip.transport import GossipError, PeerAddr, Transport
from helexa.mesh.logs import QuietLog
from helexa.mesh.timing import (
    DEFAULT_TIMING,
    GENERATION_MAX_AHEAD_S,
    MAX_GOSSIP_MESSAGE_BYTES,
    SEED_BACKOFF_MAX_S,
    MeshTiming,
)

log = logging.getLogger(__name__)

__all__ = ["PROTOCOL_VERSION", "Gossip", "GossipStats"]

PROTOCOL_VERSION = 2
MAX_DIGEST_ENTRIES = 100_000
_CONTENT_HASH_CHARS = 8  # mesh.fleet.merge.content_hash
_MAX_INT = 2**63 - 1
HeartbeatUpdate = tuple[NodeId, int, int, int]  # (node id, generation, version, heartbeat)


RecordListener = Callable[[NodeRecord | None, NodeRecord | None], None]  # (old, new); new None: forgotten


@dataclass(kw_only=True, slots=True)
class GossipStats:
    """Counters for metrics (monotonic; read them, never reset them)."""

    rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    exchanges_ok: int = 0
    exchanges_failed: int = 0
    messages_handled: int = 0
    messages_refused: int = 0
    records_dropped: int = 0  # peer records that failed to decode, were implausible, or of another mesh
    refutations: int = 0  # times this node answered a record of itself it did not write
    digest_fallbacks: int = 0  # compact exchanges that needed the explicit digest (node sets differed)


@dataclass(kw_only=True, slots=True)
class _Seed:
    next_try_at: float = 0.0
    backoff_s: float = 0.0


class Gossip:
    """One agent's gossip state and loop. Use from one event loop; `handle` is synchronous and cheap."""

    def __init__(
        self,
        *,
        own: NodeRecord,
        transport: Transport,
        timing: MeshTiming = DEFAULT_TIMING,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        seeds: Iterable[PeerAddr] = (),
        wall_clock: Callable[[], float] = time.time,
        generation_max_ahead_s: float = GENERATION_MAX_AHEAD_S,
    ) -> None:
        self.mesh = own.mesh
        self.self_id = own.node_id
        self.timing = timing
        self.stats = GossipStats()
        self._transport = transport
        self._clock = clock
        self._wall = wall_clock
        self._ahead_ms = int(generation_max_ahead_s * 1000)
        self._rng = rng or random.Random()
        self._view: dict[NodeId, NodeRecord] = {own.node_id: own}
        self.detector = FailureDetector(self_id=own.node_id, timing=timing, clock=clock)
        self._seeds: dict[PeerAddr, _Seed] = {s: _Seed() for s in seeds}
        self._tombstones: dict[NodeId, tuple[DigestEntry, float]] = {}
        self._record_listeners: list[RecordListener] = []
        self._failures = QuietLog()  # per peer address: a failing peer is warned about once
        self._implausible_log = QuietLog()  # per sender: implausible records are warned about once
        self._leaving = False
        # Which catalogue entries `catalogue()` lists (None: all); the agent sets its catalogue's rules.
        self.accept_entry: Callable[[Mapping[str, object]], bool] | None = None
        # members(view) and its hash, recomputed only when a node is added, dropped or changes generation
        # (every such change goes through `_membership_changed`); heartbeat and version moves keep it.
        self._members: tuple[list[tuple[NodeId, int]], str] | None = None

    # --- state --------------------------------------------------------------------------------------

    @property
    def own(self) -> NodeRecord:
        return self._view[self.self_id]

    @property
    def view(self) -> Mapping[NodeId, NodeRecord]:
        """Every known record (own included), read-only."""
        return MappingProxyType(self._view)

    def liveness(self, node_id: NodeId) -> Liveness | None:
        return self.detector.liveness(node_id)

    def nodes(self) -> list[tuple[NodeRecord, Liveness]]:
        """Every known record with its liveness (for `/mesh/state`)."""
        return [(r, self.detector.liveness(nid) or "suspect") for nid, r in self._view.items()]

    def live_records(self) -> list[NodeRecord]:
        """Records routing may use: self plus peers that are alive and not draining or left."""
        return [
            r
            for nid, r in self._view.items()
            if self.detector.liveness(nid) == "alive" and not r.left and not r.draining
        ]

    def catalogue(self) -> list[dict[str, object]]:
        """The mesh-wide catalogue over every known record that is not dead or left, of the entries
        `accept_entry` takes (the agent's catalogue rules, `mesh.fleet.catalogue.MeshCatalogue.accepts`)."""
        return mesh_catalogue(
            (r for nid, r in self._view.items() if self.detector.liveness(nid) in ("alive", "suspect")),
            accept=self.accept_entry,
        )

    def add_record_listener(self, fn: RecordListener) -> None:
        self._record_listeners.append(fn)

    def add_membership_listener(self, fn: Callable[[MembershipEvent], None]) -> None:
        self.detector.add_listener(fn)

    def _notify(self, old: NodeRecord | None, new: NodeRecord | None) -> None:
        for fn in self._record_listeners:
            try:
                fn(old, new)
            except Exception:
                log.exception("gossip record listener failed")

    def update_own(self, **changes: Any) -> NodeRecord:
        """Replace fields of the own record (`models=...`, `devices=...`, `catalogue=...`); version + 1."""
        old = self.own
        new = dataclasses.replace(old, version=old.version + 1, **changes)
        self._view[self.self_id] = new
        if new.generation != old.generation:
            self._membership_changed()
        self._notify(old, new)
        return new

    def set_own(self, record: NodeRecord) -> None:
        """Adopt an own record built elsewhere (e.g. `Fleet.rebuild` → subscriber), keeping the larger
        heartbeat so the two heartbeat sources never make it go backwards."""
        old = self.own
        if record.node_id != self.self_id or record.key < old.key:
            raise ValueError("set_own needs this node's record with a (generation, version) not older")
        new = dataclasses.replace(record, heartbeat=max(record.heartbeat, old.heartbeat))
        if self._leaving:  # announced: a later rebuild elsewhere must not take the leave back
            new = dataclasses.replace(new, left=True, draining=True)
        self._view[self.self_id] = new
        if new.generation != old.generation:
            self._membership_changed()
        if new.key != old.key:
            self._notify(old, new)

    def beat(self) -> None:
        """Advance the own heartbeat (no new version: heartbeats travel as small digest updates)."""
        own = self.own
        self._view[self.self_id] = dataclasses.replace(own, heartbeat=own.heartbeat + 1)

    def add_seed(self, addr: PeerAddr) -> None:
        """A static peer or an mDNS hint: contacted until a live record covers the address."""
        if addr not in self._seeds:
            self._seeds[addr] = _Seed()

    def add_hint(self, *, address: str, port: int, node_id: str, mesh: str) -> None:
        """Discovery callback: a service was seen. Only a hint; liveness comes from gossip."""
        if mesh != self.mesh or node_id == self.self_id:
            return
        self.add_seed(PeerAddr(address, port))

    # --- loop ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Gossip every interval until cancelled or `leave()`; never ends on an exchange's failure."""
        loop = asyncio.get_running_loop()  # pacing uses the loop's clock; the detector uses `clock`
        next_at = loop.time()
        while not self._leaving:
            try:
                await self.round()
            except Exception:
                log.exception("gossip round failed")
            next_at += self.timing.gossip_interval_s
            now = loop.time()
            next_at = max(next_at, now)  # fell behind (slow round, paused loop): don't burst to catch up
            await asyncio.sleep(next_at - now)

    async def round(self) -> None:
        """One round: beat, tick the detector, exchange with the chosen peers concurrently."""
        self.stats.rounds += 1
        self.beat()
        for gone in self.detector.tick():
            self._forget(gone)
        self._expire_tombstones()
        targets = self._choose_targets()
        full_round = self.stats.rounds % max(1, self.timing.full_exchange_every_rounds) == 0
        async with asyncio.TaskGroup() as tg:
            for i, (addr, nid) in enumerate(targets):
                tg.create_task(self._exchange_safely(addr, nid, full=full_round and i == 0))

    def _membership_changed(self) -> None:
        self._members = None

    def _membership(self) -> tuple[list[tuple[NodeId, int]], str]:
        """The positions of a compact digest (`members(view)`) and their hash, cached."""
        if self._members is None:
            ms = members(self._view)
            self._members = (ms, membership_hash(ms))
        return self._members

    def _forget(self, nid: NodeId) -> None:
        old = self._view.pop(nid, None)
        if old is not None:
            self._membership_changed()
            self._tombstones[nid] = (order_key(old), self._clock() + self.timing.tombstone_s)
            self._notify(old, None)

    def _expire_tombstones(self) -> None:
        now = self._clock()
        for nid in [n for n, (_, until) in self._tombstones.items() if until <= now]:
            del self._tombstones[nid]

    def _choose_targets(self) -> list[tuple[PeerAddr, NodeId | None]]:
        live: list[NodeRecord] = []
        dead: list[NodeRecord] = []
        covered: set[PeerAddr] = set()
        for nid, r in self._view.items():
            if nid == self.self_id or r.left:
                continue
            state = self.detector.liveness(nid)
            if state in ("alive", "suspect"):
                live.append(r)
                covered.add(PeerAddr(r.address, r.port))
            elif state == "dead":
                dead.append(r)
        picks = self._rng.sample(live, min(self.timing.gossip_fanout, len(live)))
        out: list[tuple[PeerAddr, NodeId | None]] = [(PeerAddr(r.address, r.port), r.node_id) for r in picks]
        every = max(1, self.timing.reconnect_dead_every_rounds)
        if dead and self.stats.rounds % every == 0:
            r = self._rng.choice(dead)
            out.append((PeerAddr(r.address, r.port), r.node_id))
        now = self._clock()
        chosen = {a for a, _ in out}
        for addr, seed in self._seeds.items():
            if addr not in covered and addr not in chosen and seed.next_try_at <= now:
                out.append((addr, None))
        return out

    async def _exchange_safely(self, addr: PeerAddr, nid: NodeId | None, *, full: bool) -> None:
        seed = self._seeds.get(addr)
        try:
            async with asyncio.timeout(self.timing.gossip_peer_timeout_s):
                # A seed (nid None) has no record here yet: the node sets differ, so explicit at once.
                await self.exchange(addr, full=full, explicit=nid is None)
        except Exception as e:  # every failure of one exchange stays in that exchange
            self.stats.exchanges_failed += 1
            reason = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if nid is not None:
                self.detector.report_failure(nid, reason)
            if seed is not None:
                seed.backoff_s = min(
                    SEED_BACKOFF_MAX_S, max(self.timing.gossip_interval_s, seed.backoff_s * 2)
                )
                seed.next_try_at = self._clock() + seed.backoff_s
            self._log_once(str(addr), "gossip with %s failed: %s", addr, reason)
        else:
            self.stats.exchanges_ok += 1
            if nid is not None:
                self.detector.report_success(nid)
            if seed is not None:
                seed.backoff_s = 0.0
                seed.next_try_at = 0.0
            self._failures.reset(str(addr))

    def _log_once(self, key: str, msg: str, *args: object) -> None:
        level = self._failures.level(key)
        log.log(level, msg + (" (repeats are logged at debug)" if level > logging.DEBUG else ""), *args)

    # --- initiator ----------------------------------------------------------------------------------

    def _envelope(self, kind: str, **body: object) -> dict[str, object]:
        return {"v": PROTOCOL_VERSION, "type": kind, "mesh": self.mesh, "from": self.self_id, **body}

    async def _send(self, addr: PeerAddr, msg: dict[str, object]) -> Mapping[str, Any]:
        body = dumps(msg)
        self.stats.bytes_sent += len(body)
        reply = await self._transport(addr, body)
        self.stats.bytes_received += len(reply)
        data = decode_json(reply, max_bytes=MAX_GOSSIP_MESSAGE_BYTES)
        if not isinstance(data, dict):
            raise GossipError("reply is not an object")
        if data.get("type") == "reject":
            raise GossipError(f"peer refused: {str(data.get('reason'))[:200]}")
        if data.get("mesh") != self.mesh:
            raise GossipError(f"peer is in mesh {str(data.get('mesh'))[:100]!r}, not {self.mesh!r}")
        return data

    async def exchange(self, addr: PeerAddr, *, full: bool = False, explicit: bool = False) -> None:
        """One push-pull exchange with `addr` (no timeout here: `round` adds it). Raises on failure.

        `full`: with the repair check (compact) or as a full exchange (explicit digests).
        `explicit`: skip the compact attempt (a peer whose node set surely differs, e.g. a new seed)."""
        if not self.timing.compact_digests:
            if full:
                reply = await self._send(addr, self._envelope("full", records=self._all_records()))
                self._absorb(reply, reply.get("records"), None)
            else:
                await self._exchange_explicit(addr)
            return
        if explicit or not await self._exchange_compact(addr, repair=full):
            await self._exchange_explicit(addr)

    async def _exchange_compact(self, addr: PeerAddr, *, repair: bool) -> bool:
        """The compact exchange; False if the peer's node set differs (run the explicit one)."""
        ms, mh = self._membership()
        recs = [self._view[nid] for nid, _ in ms]
        bases = [gen // 1000 for _, gen in ms]
        ref = sorted(r.heartbeat + b for r, b in zip(recs, bases, strict=True))[len(ms) // 2]
        my_hb = [r.heartbeat for r in recs]
        my_ver = [r.version for r in recs]
        msg = self._envelope(
            "csyn",
            mh=mh,
            n=len(ms),
            t=ref,
            hb=encode_ints(h - (ref - b) for h, b in zip(my_hb, bases, strict=True)),
            ver=encode_ints(my_ver),
        )
        if repair:
            msg["ch"] = "".join(content_hash(r) for r in recs)
        reply = await self._send(addr, msg)
        if reply.get("type") != "ack":
            raise GossipError(f"unexpected reply {str(reply.get('type'))[:40]!r}")
        if reply.get("need") == "digest":
            self.stats.digest_fallbacks += 1
            return False
        n = len(ms)
        # Decode everything before merging anything: a malformed reply changes nothing.
        d_hb = decode_ints(reply.get("hb"), n, "ack.hb")
        d_ver = decode_ints(reply["ver"], n, "ack.ver") if "ver" in reply else [0] * n
        self._absorb(reply, reply.get("records"), None)
        sender = reply.get("from") if isinstance(reply.get("from"), str) else None
        updates = [(nid, gen, my_ver[i] + d_ver[i], my_hb[i] + d_hb[i]) for i, (nid, gen) in enumerate(ms)]
        self._apply_heartbeat_updates(updates, sender)
        records = []
        for i in _int_list(reply.get("want"), n):
            r = self._view.get(ms[i][0])
            if r is not None and r.generation == ms[i][1]:
                records.append(node_to_dict(r))
        if records:
            await self._send(addr, self._envelope("push", records=records))
        return True

    async def _exchange_explicit(self, addr: PeerAddr) -> None:
        """The protocol-1 exchange: the whole digest by id (`syn`), then `ack`, then `push` if wanted."""
        syn = [[nid, *order_key(r)] for nid, r in self._view.items()]
        reply = await self._send(addr, self._envelope("syn", digest=syn))
        if reply.get("type") != "ack":
            raise GossipError(f"unexpected reply {str(reply.get('type'))[:40]!r}")
        self._absorb(reply, reply.get("records"), None)
        self._absorb_indexed_heartbeats(reply, syn)
        records = []
        for i in _int_list(reply.get("want_full"), len(syn)):
            r = self._view.get(NodeId(str(syn[i][0])))
            if r is not None:
                records.append(node_to_dict(r))
        if records:
            await self._send(addr, self._envelope("push", records=records))

    def _all_records(self) -> list[dict[str, object]]:
        return [node_to_dict(r) for r in self._view.values()]

    def _absorb_indexed_heartbeats(self, reply: Mapping[str, Any], syn: list[list[Any]]) -> None:
        sender = reply.get("from")
        hb = reply.get("hb")
        if not isinstance(hb, list):
            return
        updates: list[HeartbeatUpdate] = []
        for item in hb[: len(syn)]:
            if (
                isinstance(item, list)
                and len(item) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in item)
                and 0 <= item[0] < len(syn)
                and 0 <= item[1] <= MAX_COUNTER
            ):
                nid, gen, ver, _ = syn[item[0]]
                updates.append((nid, gen, ver, item[1]))
        self._apply_heartbeat_updates(updates, sender)

    # --- responder ----------------------------------------------------------------------------------

    def handle(self, body: bytes) -> tuple[int, bytes]:
        """Answer one gossip message: (HTTP status, reply body). Never raises on bad input."""
        try:
            msg = decode_json(body, max_bytes=MAX_GOSSIP_MESSAGE_BYTES)
            if not isinstance(msg, dict):
                raise CodecError("message is not an object")
            reply = self._handle(msg)
        except CodecError as e:
            self.stats.messages_refused += 1
            log.debug("refusing gossip message: %s", e)
            return 400, dumps({"type": "reject", "reason": f"bad message: {e}"[:300]})
        self.stats.bytes_received += len(body)
        out = dumps(reply)
        self.stats.bytes_sent += len(out)
        self.stats.messages_handled += 1
        return 200, out

    def _handle(self, msg: Mapping[str, Any]) -> dict[str, object]:
        if msg.get("mesh") != self.mesh:
            self.stats.messages_refused += 1
            self._log_once(
                f"mesh:{str(msg.get('from'))[:128]}",
                "ignoring gossip from %r of mesh %r (this agent is in mesh %r)",
                str(msg.get("from"))[:128],
                str(msg.get("mesh"))[:100],
                self.mesh,
            )
            return {"type": "reject", "reason": "mesh", "mesh": self.mesh}
        kind = msg.get("type")
        sender = msg.get("from") if isinstance(msg.get("from"), str) else None
        if kind == "csyn":
            return self._compact_ack(msg, sender)
        if kind == "syn":
            digest = _parse_digest(msg.get("digest"))
            return self._ack(digest, sender)
        if kind == "push":
            self._absorb(msg, msg.get("records"), sender)
            self._absorb_heartbeats(msg.get("heartbeats"), sender)
            return self._envelope("ok")
        if kind == "full":
            self._absorb(msg, msg.get("records"), sender)
            return self._envelope("full", records=self._all_records())
        raise CodecError(f"unknown message type {str(kind)[:40]!r}")

    def _ack(self, their: list[tuple[NodeId, DigestEntry]], sender: str | None) -> dict[str, object]:
        # Entries no real agent can have (a generation from the future) are treated as absent: the sender
        # gets this node's records for them and is never asked for theirs.
        their = [(nid, e) for nid, e in their if self._implausible(*e, node_id=nid) is None]
        their_map = dict(their)
        # Where only their heartbeat is ahead, their digest entry already is the update: apply it here
        # instead of asking for it (saves a third message per exchange in the steady state).
        self._apply_heartbeat_updates([(nid, g, v, h) for nid, (g, v, h) in their], sender)
        delta = diff(self._view, their_map)
        index = {nid: i for i, (nid, _) in enumerate(their)}
        want_full = [
            index[nid]
            for nid in delta.wanted
            if nid not in self._view or their_map[nid][:2] > order_key(self._view[nid])[:2]
        ]
        return self._envelope(
            "ack",
            records=[node_to_dict(r) for r in delta.records],
            hb=[[index[nid], hb] for nid, _, _, hb in delta.heartbeats],
            want_full=want_full,
        )

    def _compact_ack(self, msg: Mapping[str, Any], sender: str | None) -> dict[str, object]:
        ms, mh = self._membership()
        n = len(ms)
        if msg.get("mh") != mh or msg.get("n") != n:
            return self._envelope("ack", need="digest")
        ref = msg.get("t")
        if not isinstance(ref, int) or isinstance(ref, bool) or not -_MAX_INT <= ref <= _MAX_INT:
            raise CodecError("csyn.t: expected an int64")
        their_ver = decode_ints(msg.get("ver"), n, "csyn.ver", lo=0, hi=MAX_COUNTER)
        their_hb = [
            ref - gen // 1000 + d
            for (_, gen), d in zip(ms, decode_ints(msg.get("hb"), n, "csyn.hb"), strict=True)
        ]
        if not all(0 <= hb <= MAX_COUNTER for hb in their_hb):
            raise CodecError("csyn.hb: a heartbeat outside [0, 2^53)")
        hashes = msg.get("ch")
        if hashes is not None and not (isinstance(hashes, str) and len(hashes) == n * _CONTENT_HASH_CHARS):
            raise CodecError(f"csyn.ch: expected a string of {n} content hashes")
        self._apply_heartbeat_updates(
            [(nid, gen, their_ver[i], their_hb[i]) for i, (nid, gen) in enumerate(ms)], sender
        )
        records: list[dict[str, object]] = []
        want: list[int] = []
        d_ver: list[int] = []
        d_hb: list[int] = []
        for i, (nid, _) in enumerate(ms):
            r = self._view[nid]
            if their_ver[i] > r.version:
                want.append(i)
            elif their_ver[i] < r.version:
                records.append(node_to_dict(r))
            elif hashes is not None:
                at = i * _CONTENT_HASH_CHARS
                if hashes[at : at + _CONTENT_HASH_CHARS] != content_hash(r):
                    records.append(node_to_dict(r))  # same version, other content: both sides merge
                    want.append(i)  # both records, so both pick the same winner (`merge.newer`)
            d_ver.append(r.version - their_ver[i])
            d_hb.append(r.heartbeat - their_hb[i])
        reply = self._envelope("ack", hb=encode_ints(d_hb))
        if any(d_ver):
            reply["ver"] = encode_ints(d_ver)
        if records:
            reply["records"] = records
        if want:
            reply["want"] = want
        return reply

    def _apply_heartbeat_updates(self, updates: Iterable[HeartbeatUpdate], sender: str | None) -> None:
        """Advance heartbeats where (generation, version) match; implausible entries are ignored. An entry
        for this node itself that is ahead of its own heartbeat (only a forger can write one) is refuted:
        peers holding it would never see this node's heartbeat advance, and declare it dead."""
        plausible: list[HeartbeatUpdate] = []
        for nid, gen, ver, hb in updates:
            if nid == self.self_id:
                own = self.own
                if (gen, ver) == own.key and hb > own.heartbeat and not self._leaving:
                    self._refute(f"a heartbeat of {hb} under its own generation and version")
                continue
            if self._implausible(gen, ver, hb) is None:
                plausible.append((nid, gen, ver, hb))
        for nid in apply_heartbeats(self._view, plausible):
            self.detector.observe(self._view[nid], direct=nid == sender)

    def _absorb_heartbeats(self, v: object, sender: str | None) -> None:
        if not isinstance(v, list):
            return
        updates: list[HeartbeatUpdate] = []
        for item in v[:MAX_DIGEST_ENTRIES]:
            parsed = _digest_item(item)
            if parsed is not None:
                nid, (gen, ver, hb) = parsed
                updates.append((nid, gen, ver, hb))
        self._apply_heartbeat_updates(updates, sender)

    def _absorb(self, msg: Mapping[str, Any], records: object, sender: str | None) -> None:
        """Merge the records of a message (bad ones dropped one by one)."""
        if sender is None and isinstance(msg.get("from"), str):
            sender = msg["from"]
        if not isinstance(records, list):
            return
        for i, raw in enumerate(records):
            try:
                rec = node_from_dict(raw, f"records[{i}]")
            except CodecError as e:
                self.stats.records_dropped += 1
                log.debug("dropping a record from %s: %s", sender, e)
                continue
            self._merge_one(rec, direct=rec.node_id == sender, sender=sender)

    def _merge_one(self, rec: NodeRecord, *, direct: bool, sender: str | None = None) -> None:
        if rec.mesh != self.mesh:
            self.stats.records_dropped += 1
            return
        why = self._implausible(rec.generation, rec.version, rec.heartbeat, node_id=rec.node_id)
        if why is not None:
            self.stats.records_dropped += 1
            level = self._implausible_log.level(str(sender))
            log.log(
                level,
                "dropping a record of node %s from %s: %s%s",
                rec.node_id[:64],
                str(sender)[:64],
                why,
                " (a forged record, or that host's clock is wrong; repeats are logged at debug)"
                if level > logging.DEBUG
                else "",
            )
            return
        nid = rec.node_id
        if nid == self.self_id:
            self._refute_record(rec)
            return
        tomb = self._tombstones.get(nid)
        if tomb is not None:
            if order_key(rec)[:2] <= tomb[0][:2]:
                return  # a forgotten node's stale record: don't resurrect it
            del self._tombstones[nid]
        old = self._view.get(nid)
        if merge_record(self._view, rec):
            new = self._view[nid]
            if old is None or old.generation != new.generation:
                self._membership_changed()
            self.detector.observe(new, direct=direct)
            if old is None or order_key(old)[:2] != order_key(new)[:2]:
                self._notify(old, new)

    # --- plausibility and refutation ------------------------------------------------------------------

    def _max_generation(self) -> int:
        """The largest generation a real record can have now: this host's clock plus the allowed skew."""
        return int(self._wall() * 1000) + self._ahead_ms

    def _implausible(
        self, generation: int, version: int, heartbeat: int, *, node_id: NodeId | None = None
    ) -> str | None:
        """Why (generation, version, heartbeat) cannot be a real agent's, or None when they can be.

        Generations are start times in ms, so none lies further than the allowed skew in this host's
        future; a heartbeat counts gossip rounds since that start, so it is at most one per millisecond
        since then (a bound no real interval comes near, but one a forger cannot push past). The heartbeat
        of a record of this node itself is not judged: nothing of such a record is adopted, and one that
        a peer (whose clock may be ahead) holds above the own heartbeat must be refuted, not ignored."""
        if node_id == self.self_id:
            heartbeat = 0
        limit = self._max_generation()
        if not 0 <= generation <= limit:
            ahead_s = (generation - limit + self._ahead_ms) / 1000
            return f"its generation {generation} is {ahead_s:.0f} s ahead of this host's clock"
        if not 0 <= version <= MAX_COUNTER:
            return f"its version {version} is out of range"
        if not 0 <= heartbeat <= limit - generation:
            return f"its heartbeat {heartbeat} is more than one per millisecond since its start"
        return None

    def _refute(self, what: str, *, above: int | None = None) -> None:
        """Peers hold a record of this node that this node did not write (`what` it says): an earlier run
        whose clock was ahead of ours, or a forger (a newer version, other content under the own version, a
        heartbeat ahead of the own). Answer with a new generation above it (`above`: the record's, if
        newer than the own), so that every peer takes the own record over it again, as a restart; nothing
        the record says is adopted. The new generation stays within the allowed skew of this host's
        clock: `above` passed `_implausible`, so it is at most one past the bound, and a refutation that
        would go further (a flood of forgeries, each pushing the generation on) is not made."""
        own = self.own
        now_ms = int(self._wall() * 1000)
        generation = max(own.generation if above is None else above, own.generation) + 1
        generation = max(generation, now_ms)
        if generation > now_ms + self._ahead_ms + 1:
            log.debug("not refuting %s: the generation would run ahead of this host's clock", what)
            return
        level = self._implausible_log.level("refute")
        log.log(
            level,
            "peers hold a record of this node it did not write (%s); refuting it with generation %d%s",
            what,
            generation,
            " (repeats are logged at debug)" if level > logging.DEBUG else "",
        )
        new = dataclasses.replace(own, generation=generation, version=0)
        self._view[self.self_id] = new
        self.stats.refutations += 1
        self._membership_changed()
        self._notify(own, new)

    def _refute_record(self, rec: NodeRecord) -> None:
        """A (plausible) record of this node arrived: refute it if it would win over the own record, or
        tell the own record apart from it under the same (generation, version)."""
        own = self.own
        if self._leaving:
            return  # gone: nothing left to defend (and a stale copy of the leave is not a forgery)
        if rec.key > own.key:
            self._refute(f"generation {rec.generation}, version {rec.version}", above=rec.generation)
        elif rec.key == own.key:
            if rec.heartbeat > own.heartbeat:
                self._refute(f"a heartbeat of {rec.heartbeat} under its own generation and version")
            elif dataclasses.replace(rec, heartbeat=own.heartbeat) != own:
                self._refute(f"other content under its own version {own.version}")

    # --- leave --------------------------------------------------------------------------------------

    async def leave(self) -> None:
        """Graceful leave: mark the own record left and push it to every live peer once (bounded)."""
        self._leaving = True
        self.update_own(left=True, draining=True)
        msg = self._envelope("push", records=[node_to_dict(self.own)])
        targets = [
            PeerAddr(r.address, r.port)
            for nid, r in self._view.items()
            if nid != self.self_id and self.detector.liveness(nid) in ("alive", "suspect")
        ]

        async def one(addr: PeerAddr) -> None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(self.timing.leave_timeout_s):
                    await self._send(addr, msg)

        async with asyncio.TaskGroup() as tg:
            for addr in targets:
                tg.create_task(one(addr))


# --- parsing helpers --------------------------------------------------------------------------------


def _digest_item(item: object) -> tuple[NodeId, DigestEntry] | None:
    if not (
        isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and 0 < len(item[0]) <= 128
    ):
        return None
    nums = item[1:]
    if not all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= MAX_COUNTER for x in nums):
        return None
    return NodeId(item[0]), (nums[0], nums[1], nums[2])


def _parse_digest(v: object) -> list[tuple[NodeId, DigestEntry]]:
    if not isinstance(v, list):
        raise CodecError("digest: expected a list")
    if len(v) > MAX_DIGEST_ENTRIES:
        raise CodecError("digest: too many entries")
    out: list[tuple[NodeId, DigestEntry]] = []
    seen: set[NodeId] = set()
    for i, item in enumerate(v):
        parsed = _digest_item(item)
        if parsed is None:
            raise CodecError(f"digest[{i}]: expected [id, generation, version, heartbeat]")
        if parsed[0] not in seen:
            seen.add(parsed[0])
            out.append(parsed)
    return out


def _int_list(v: object, bound: int) -> list[int]:
    if not isinstance(v, list):
        return []
    return [x for x in v[:bound] if isinstance(x, int) and not isinstance(x, bool) and 0 <= x < bound]


# --- transports -------------------------------------------------------------------------------------
