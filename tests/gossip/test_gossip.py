"""Gossip: convergence over the in-memory transport (rounds driven by hand on a fake clock) and over
real HTTP on loopback (tiny aiohttp apps), mesh isolation, leave, partition and heal, hostile input."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from helexa.engine.base import ModelId
from helexa.mesh.fleet.codec import encode_ints, node_to_dict
from helexa.mesh.fleet.merge import content_hash, members, membership_hash
from helexa.mesh.fleet.records import ModelRecord, NodeId, NodeRecord
from helexa.mesh.gossip.auth import MeshAuth, binding, peer_auth_middleware
from helexa.mesh.gossip.exchange import Gossip
from helexa.mesh.gossip.transport import GOSSIP_PATH, HttpTransport, InMemoryNetwork, PeerAddr, gossip_handler
from helexa.mesh.timing import MeshTiming
from tests.helpers.clock import FakeClock

TIMING = MeshTiming(gossip_fanout=3, full_exchange_every_rounds=7, forget_after_s=30.0, tombstone_s=60.0)


def _own(
    i: int, *, mesh: str = "default", port: int = 31313, address: str | None = None, gen: int = 1
) -> NodeRecord:
    return NodeRecord(
        node_id=NodeId(f"node-{i:03d}"),
        name=f"host{i}",
        generation=gen,
        version=1,
        heartbeat=0,
        address=address or f"10.0.0.{i}",
        port=port,
        mesh=mesh,
    )


def _fleet(n: int, *, seed: int = 1, mesh_of=lambda i: "default"):
    clock = FakeClock()
    net = InMemoryNetwork()
    rng = random.Random(seed)
    gossipers = []
    for i in range(n):
        own = _own(i, mesh=mesh_of(i))
        addr = PeerAddr(own.address, own.port)
        g = Gossip(
            own=own,
            transport=net.transport_for(addr),
            timing=TIMING,
            clock=clock,
            rng=random.Random(rng.random()),
            seeds=[PeerAddr("10.0.0.0", 31313)] if i else [],  # everyone knows node 0 only
        )
        net.add(addr, g)
        gossipers.append(g)
    return clock, net, gossipers


async def _rounds(clock, gossipers, k: int = 1) -> None:
    for _ in range(k):
        clock.now += 1.0
        await asyncio.gather(*(g.round() for g in gossipers))


async def _rounds_until(clock, gossipers, pred, limit: int) -> int | None:
    """Rounds until `pred()` holds (None if not within `limit`)."""
    for k in range(1, limit + 1):
        await _rounds(clock, gossipers)
        if pred():
            return k
    return None


def _converged(gossipers) -> bool:
    want = dict(gossipers[0].view)
    return all(dict(g.view) == want for g in gossipers[1:]) and len(want) == len(gossipers)


async def test_fleet_converges_from_one_seed_and_spreads_a_change():
    clock, _, gs = _fleet(20)
    for _ in range(1, 30):
        await _rounds(clock, gs)
        if all(len(g.view) == 20 for g in gs):
            break
    assert all(len(g.view) == 20 for g in gs), [len(g.view) for g in gs]
    await _rounds(clock, gs, 3)
    assert all(g.liveness(NodeId("node-005")) == "alive" for g in gs if g.self_id != "node-005")

    changed = gs[7].update_own(models=(ModelRecord(id=ModelId("m"), status="loading", engine="fake"),))
    rounds = await _rounds_until(clock, gs, lambda: all(g.view[changed.node_id].version >= 2 for g in gs), 15)
    assert all(g.view[changed.node_id].model("m") is not None for g in gs)
    assert rounds is not None and rounds <= 8  # epidemic spread: a handful of rounds for 20 nodes, not 20
    assert all(g.stats.exchanges_failed == 0 for g in gs)


async def test_dead_node_detected_then_forgotten_and_not_resurrected():
    clock, net, gs = _fleet(6)
    await _rounds(clock, gs, 8)
    victim = gs[3]
    net.cut.add(PeerAddr(victim.own.address, victim.own.port))
    others = [g for g in gs if g is not victim]
    seen_dead_at = None
    for t in range(1, 15):
        await _rounds(clock, others)
        if all(g.liveness(victim.self_id) == "dead" for g in others):
            seen_dead_at = t
            break
    assert seen_dead_at is not None and seen_dead_at <= 10
    assert all(victim.self_id not in {r.node_id for r in g.live_records()} for g in others)
    # forgotten after forget_after_s, then a stale copy pushed by the victim's old view is refused
    await _rounds(clock, others, int(TIMING.forget_after_s))
    assert all(victim.self_id not in g.view for g in others)
    stale = {"type": "push", "mesh": "default", "from": "x", "records": [node_to_dict(victim.own)]}
    assert gs[0].handle(orjson.dumps(stale))[0] == 200
    assert victim.self_id not in gs[0].view


async def test_partition_heals():
    clock, net, gs = _fleet(5)
    await _rounds(clock, gs, 8)
    cut = gs[2]
    addr = PeerAddr(cut.own.address, cut.own.port)
    net.cut.add(addr)
    await _rounds(clock, gs, 10)
    assert all(g.liveness(cut.self_id) == "dead" for g in gs if g is not cut)
    assert all(cut.liveness(g.self_id) == "dead" for g in gs if g is not cut)
    net.cut.discard(addr)
    healed_in = await _rounds_until(
        clock, gs, lambda: all(g.liveness(h.self_id) == "alive" for g in gs for h in gs if g is not h), 10
    )
    assert healed_in is not None and healed_in <= 8


async def test_restart_with_new_generation_replaces_old_record():
    clock, net, gs = _fleet(4)
    await _rounds(clock, gs, 6)
    old = gs[1]
    new = Gossip(
        own=_own(1, gen=2),
        transport=net.transport_for(PeerAddr("10.0.0.1", 31313)),
        timing=TIMING,
        clock=clock,
        seeds=[PeerAddr("10.0.0.0", 31313)],
    )
    net.add(PeerAddr("10.0.0.1", 31313), new)
    gs[1] = new
    for _ in range(6):
        await _rounds(clock, gs)
    assert all(g.view[old.self_id].generation == 2 for g in gs)
    assert all(g.liveness(old.self_id) == "alive" for g in gs if g is not new)


async def test_own_record_refuted_when_peers_hold_a_newer_generation():
    clock, net, gs = _fleet(3)
    await _rounds(clock, gs, 5)
    # node 2 restarts with a clock that went backwards: generation lower than before
    gs[2] = Gossip(
        own=_own(2, gen=0),
        transport=net.transport_for(PeerAddr("10.0.0.2", 31313)),
        timing=TIMING,
        clock=clock,
        seeds=[PeerAddr("10.0.0.0", 31313)],
    )
    net.add(PeerAddr("10.0.0.2", 31313), gs[2])
    await _rounds(clock, gs, 6)
    assert gs[2].own.generation > 1
    assert all(g.view[gs[2].self_id].generation == gs[2].own.generation for g in gs)


async def test_other_mesh_is_ignored():
    clock, _, gs = _fleet(4, mesh_of=lambda i: "default" if i % 2 == 0 else "lab")
    await _rounds(clock, gs, 8)
    for g in gs:
        assert {r.mesh for r in g.view.values()} == {g.mesh}
    assert gs[1].stats.exchanges_failed > 0  # it tried node 0 (a seed) and was refused
    assert gs[0].stats.messages_refused > 0


async def test_graceful_leave_marks_left_at_once():
    clock, _, gs = _fleet(4)
    await _rounds(clock, gs, 8)
    await gs[3].leave()
    for g in gs[:3]:
        assert g.liveness(gs[3].self_id) == "left"
        assert gs[3].self_id not in {r.node_id for r in g.live_records()}


async def test_hostile_messages_never_crash_the_responder():
    _, _, gs = _fleet(1)
    g = gs[0]
    bad = [
        b"",
        b"not json",
        b"[]",
        b'{"type": "syn", "mesh": "default", "digest": "x"}',
        b'{"type": "syn", "mesh": "default", "digest": [[1, 2, 3, 4]]}',
        b'{"type": "syn", "mesh": "default", "digest": [["a", -1, 0, 0]]}',
        b'{"type": "bogus", "mesh": "default"}',
        b'{"type": "push", "mesh": "default", "records": [{"id": 5}], "heartbeats": [["a", true, 1, 1], 7]}',
        b'{"type": "full", "mesh": "default", "records": "many"}',
    ]
    for body in bad:
        status, reply = g.handle(body)
        assert status in (200, 400)
        assert isinstance(orjson.loads(reply), dict)
    assert list(g.view) == [g.self_id]
    assert g.stats.records_dropped == 1


async def test_failing_transport_never_ends_the_loop():
    calls = 0

    async def broken(peer: PeerAddr, body: bytes) -> bytes:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise OSError("boom")
        await asyncio.sleep(10)  # hangs: the per-peer timeout must cut it
        return b""

    g = Gossip(
        own=_own(0),
        transport=broken,
        timing=MeshTiming(gossip_interval_s=0.02, gossip_peer_timeout_s=0.05),
        seeds=[PeerAddr("10.9.9.9", 1)],
    )
    g._seeds[PeerAddr("10.9.9.9", 1)].backoff_s = 0
    task = asyncio.create_task(g.run())
    await asyncio.sleep(0.5)
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert g.stats.exchanges_failed >= 2 and g.stats.rounds >= 5


# --- over real HTTP on loopback ------------------------------------------------------------------


async def _http_agent(i: int, session: aiohttp.ClientSession, *, key: str | None, seeds=()):
    auth = MeshAuth(key) if key else None  # bound to the gossiper's id and generation below
    app = web.Application(middlewares=[peer_auth_middleware(auth)])
    holder: list[Gossip] = []  # the port is known only after start, and routes freeze at start

    async def handle(request: web.Request) -> web.StreamResponse:
        return await gossip_handler(holder[0])(request)

    app.router.add_post(GOSSIP_PATH, handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    own = _own(i, address="127.0.0.1", port=server.port)  # type: ignore[arg-type]
    g = Gossip(
        own=own,
        transport=HttpTransport(session, auth=auth),
        timing=MeshTiming(gossip_interval_s=0.1, gossip_peer_timeout_s=1.0),
        seeds=seeds,
    )
    holder.append(g)
    if auth is not None:
        auth.bind(lambda: binding(g.self_id, g.own.generation))
    return server, g


async def _run_http_fleet(keys: list[str | None], rounds: int):
    async with aiohttp.ClientSession() as session:
        servers: list[TestServer] = []
        gs: list[Gossip] = []
        for i, key in enumerate(keys):
            seeds = [PeerAddr("127.0.0.1", servers[0].port or 0)] if servers else []
            s, g = await _http_agent(i, session, key=key, seeds=seeds)
            servers.append(s)
            gs.append(g)
        try:
            for _ in range(rounds):
                await asyncio.gather(*(g.round() for g in gs))
        finally:
            for s in servers:
                await s.close()
        return gs


async def test_http_fleet_converges_with_mesh_key():
    gs = await _run_http_fleet(["k1"] * 4, rounds=8)
    assert all(len(g.view) == 4 for g in gs)
    assert all(g.liveness(h.self_id) == "alive" for g in gs for h in gs if g is not h)
    assert all(g.stats.bytes_sent > 0 and g.stats.bytes_received > 0 for g in gs)


async def test_http_first_contact_learns_the_binding_and_a_restart_is_relearnt():
    """Seeds are contacted with no binding (a signed challenge answers with it); a peer's new generation
    (a restart, here a refutation) is learnt the same way, so a keyed fleet never stops converging."""
    async with aiohttp.ClientSession() as session:
        s0, g0 = await _http_agent(0, session, key="k")
        s1, g1 = await _http_agent(1, session, key="k", seeds=[PeerAddr("127.0.0.1", s0.port or 0)])
        try:
            for _ in range(4):
                await asyncio.gather(g0.round(), g1.round())
            assert g0.liveness(g1.self_id) == g1.liveness(g0.self_id) == "alive"
            transport = g1._transport
            assert isinstance(transport, HttpTransport)
            addr = PeerAddr("127.0.0.1", s0.port or 0)
            assert transport.target(addr) == binding(g0.self_id, g0.own.generation)
            g0._refute("a test")  # a new generation of node 0: g1's binding of it is stale
            for _ in range(4):
                await asyncio.gather(g0.round(), g1.round())
            assert transport.target(addr) == binding(g0.self_id, g0.own.generation)
            assert g1.view[g0.self_id].generation == g0.own.generation
            assert g0.stats.exchanges_failed == g1.stats.exchanges_failed == 0
        finally:
            await s0.close()
            await s1.close()


async def test_http_open_mesh_converges():
    gs = await _run_http_fleet([None] * 3, rounds=6)
    assert all(len(g.view) == 3 for g in gs)


async def test_http_peer_without_the_key_is_refused():
    gs = await _run_http_fleet(["right", "right", "wrong", None], rounds=8)
    assert set(gs[0].view) == {gs[0].self_id, gs[1].self_id}
    assert set(gs[2].view) == {gs[2].self_id}
    assert set(gs[3].view) == {gs[3].self_id}
    assert gs[2].stats.exchanges_failed > 0 and gs[3].stats.exchanges_failed > 0


async def test_set_own_adopts_an_external_record_and_keeps_heartbeat_monotone():
    clock, _, gs = _fleet(2)
    await _rounds(clock, gs, 4)
    g = gs[0]
    hb = g.own.heartbeat
    g.set_own(dataclasses.replace(g.own, version=g.own.version + 1, heartbeat=0, name="renamed"))
    assert g.own.name == "renamed" and g.own.heartbeat == hb
    await _rounds(clock, gs, 2)
    assert gs[1].view[g.self_id].name == "renamed"
    with pytest.raises(ValueError):
        g.set_own(dataclasses.replace(g.own, version=0))


# --- compact digests ----------------------------------------------------------------------------


def _bytes(gs) -> int:
    return sum(g.stats.bytes_sent + g.stats.bytes_received for g in gs)


def _assert_members_cache_fresh(gs) -> None:
    for g in gs:
        ms = members(g.view)
        assert g._membership() == (ms, membership_hash(ms))


async def _steady_bytes(timing: MeshTiming, n: int = 12, rounds: int = 14) -> tuple[int, list[Gossip]]:
    clock, _, gs = _fleet(n)
    for g in gs:
        g.timing = timing
    await _rounds(clock, gs, 12)
    assert _converged_keys(gs)
    before = _bytes(gs)
    await _rounds(clock, gs, rounds)
    return _bytes(gs) - before, gs


def _converged_keys(gs) -> bool:
    """Every view holds every node's own (generation, version); heartbeats may lag a round."""
    return all(g.view[h.self_id].key == h.own.key for g in gs for h in gs)


async def test_compact_steady_state_is_a_fraction_of_explicit_and_keeps_everyone_alive():
    explicit, _ = await _steady_bytes(dataclasses.replace(TIMING, compact_digests=False))
    compact, gs = await _steady_bytes(TIMING)
    assert compact * 3 < explicit, (compact, explicit)
    fallbacks = sum(g.stats.digest_fallbacks for g in gs)
    await _rounds(FakeClockOf(gs), gs, 5)
    assert sum(g.stats.digest_fallbacks for g in gs) == fallbacks  # same node sets: no explicit digests
    assert all(g.liveness(h.self_id) == "alive" for g in gs for h in gs if g is not h)
    _assert_members_cache_fresh(gs)


def FakeClockOf(gs):
    return gs[0]._clock


async def test_mixed_fleet_of_compact_and_explicit_agents_converges():
    clock, _, gs = _fleet(8)
    for g in gs[::2]:
        g.timing = dataclasses.replace(TIMING, compact_digests=False)
    await _rounds(clock, gs, 10)
    assert all(len(g.view) == 8 for g in gs)
    changed = gs[3].update_own(labels={"x": "1"})
    rounds = await _rounds_until(clock, gs, lambda: _converged_keys(gs), 10)
    assert rounds is not None
    assert all(g.view[changed.node_id].labels == {"x": "1"} for g in gs)
    assert all(g.liveness(h.self_id) == "alive" for g in gs for h in gs if g is not h)


async def test_repair_check_settles_two_contents_under_one_version():
    clock, _, gs = _fleet(6)
    await _rounds(clock, gs, 8)
    target = gs[4].self_id
    # a forged copy with the same (generation, version) that no digest can tell apart
    for g in gs[:3]:
        r = g._view[target]
        g._view[target] = dataclasses.replace(r, name="forged")
    await _rounds(clock, gs, 2 * TIMING.full_exchange_every_rounds + 4)
    hashes = {content_hash(g.view[target]) for g in gs}
    assert len(hashes) == 1, hashes


async def test_membership_cache_follows_joins_restarts_and_forgets():
    clock, net, gs = _fleet(5)
    await _rounds(clock, gs, 6)
    _assert_members_cache_fresh(gs)
    gs[2] = Gossip(
        own=_own(2, gen=5),
        transport=net.transport_for(PeerAddr("10.0.0.2", 31313)),
        timing=TIMING,
        clock=clock,
        seeds=[PeerAddr("10.0.0.0", 31313)],
    )
    net.add(PeerAddr("10.0.0.2", 31313), gs[2])
    await _rounds(clock, gs, 6)
    assert all(g.view[gs[2].self_id].generation == 5 for g in gs)
    _assert_members_cache_fresh(gs)
    net.cut.add(PeerAddr("10.0.0.4", 31313))
    others = gs[:4]
    await _rounds(clock, others, int(TIMING.dead_after_s + TIMING.forget_after_s) + 3)
    assert all(gs[4].self_id not in g.view for g in others)
    _assert_members_cache_fresh(others)
    assert all(g.liveness(h.self_id) == "alive" for g in others for h in others if g is not h)


def _csyn(g: Gossip, **over) -> bytes:
    ms, mh = g._membership()
    msg = {
        "v": 2,
        "type": "csyn",
        "mesh": "default",
        "from": "node-999",
        "mh": mh,
        "n": len(ms),
        "t": 0,
        "hb": encode_ints([5] * len(ms)),
        "ver": encode_ints([1] * len(ms)),
    }
    msg.update(over)
    return orjson.dumps(msg)


async def test_hostile_compact_messages_are_refused_whole():
    clock, _, gs = _fleet(3)
    await _rounds(clock, gs, 6)
    g = gs[0]
    before = dict(g.view)
    n = len(g.view)
    bad: list[dict[str, Any]] = [
        {"hb": "not base64!"},
        {"hb": encode_ints([5] * (n + 1))},
        {"hb": encode_ints([-1] * n)},  # heartbeats below zero
        {"ver": encode_ints([-1] * n)},
        {"ver": 7},
        {"t": "x"},
        {"t": True},
        {"t": 2**64 - 1},
        {"ch": "short"},
        {"ch": 12},
        {"hb": "-" * 100_000},
    ]
    for over in bad:
        status, reply = g.handle(_csyn(g, **over))
        assert status == 400, over
        assert orjson.loads(reply)["type"] == "reject"
    assert dict(g.view) == before
    # another node set (or a lie about its size) is not an error: the initiator falls back
    for over in ({"mh": "A" * 12}, {"n": n + 1}, {"mh": 5}):
        status, reply = g.handle(_csyn(g, **over))
        assert status == 200 and orjson.loads(reply)["need"] == "digest"


async def test_compact_ack_carries_the_responders_newer_heartbeats():
    clock, _, gs = _fleet(3)
    await _rounds(clock, gs, 6)
    a, b = gs[0], gs[1]
    for _ in range(5):
        b.beat()
    await a.exchange(PeerAddr(b.own.address, b.own.port))
    assert a.view[b.self_id].heartbeat == b.own.heartbeat
    assert b.view[a.self_id].heartbeat == a.own.heartbeat
