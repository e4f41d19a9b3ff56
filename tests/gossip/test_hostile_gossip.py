"""Hostile gossip (issue 12): whatever a stranger sends, an agent never crashes, never holds a number the
mesh cannot carry or a start time from the future, never moves its own record to one, and is never cut
off from its honest peers.

Two honest gossipers on the in-memory network (rounds driven by hand; their wall clock moves with the
rounds) converge, then take Hypothesis-drawn hostile messages (`tests.helpers.strategies`: records and
digests with the int64 and 2^53 edges, generations far ahead or just inside the allowed skew, forged
copies of their own records), then gossip on: they must see each other alive with each other's own
records again.
"""

from __future__ import annotations

import asyncio
import json
import random

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from helexa.mesh.fleet.codec import MAX_COUNTER, encode_ints, node_from_dict, node_to_dict
from helexa.mesh.fleet.merge import members, membership_hash
from helexa.mesh.fleet.records import NodeId, NodeRecord
from helexa.mesh.gossip.exchange import Gossip
from helexa.mesh.gossip.transport import InMemoryNetwork, PeerAddr
from helexa.mesh.timing import GENERATION_MAX_AHEAD_S, MeshTiming
from tests.helpers.clock import FakeClock
from tests.helpers.strategies import SHARED_MACHINE, hostile_messages

NOW_S = 1_764_221_000.0
NOW_MS = int(NOW_S * 1000)
AHEAD_MS = int(GENERATION_MAX_AHEAD_S * 1000)
HONEST = ("honest-a", "honest-b")
IDS = st.sampled_from([*HONEST, "stranger"])
TIMING = MeshTiming(gossip_fanout=2, full_exchange_every_rounds=3)


def _pair() -> tuple[FakeClock, list[Gossip]]:
    clock = FakeClock()
    start = clock.now
    net = InMemoryNetwork()
    gossipers: list[Gossip] = []
    for i, nid in enumerate(HONEST):
        own = NodeRecord(
            node_id=NodeId(nid),
            name=nid,
            generation=NOW_MS - 60_000 * (i + 1),
            version=1,
            heartbeat=0,
            address=f"10.0.0.{i + 1}",
            port=31313,
        )
        addr = PeerAddr(own.address, own.port)
        g = Gossip(
            own=own,
            transport=net.transport_for(addr),
            timing=TIMING,
            clock=clock,
            rng=random.Random(i),
            seeds=[PeerAddr("10.0.0.1", 31313)] if i else [],
            wall_clock=lambda: NOW_S + (clock.now - start),
        )
        net.add(addr, g)
        gossipers.append(g)
    return clock, gossipers


async def _rounds(clock: FakeClock, gossipers: list[Gossip], k: int) -> None:
    for _ in range(k):
        clock.now += 1.0
        await asyncio.gather(*(g.round() for g in gossipers))


def _body(g: Gossip, kind: str, payload: object) -> bytes:
    if kind == "garbage":
        return json.dumps(payload).encode()
    msg: dict[str, object] = {"v": 2, "type": kind, "mesh": "default", "from": "stranger"}
    if kind in ("push", "full"):
        msg["records"] = payload
    elif kind == "syn":
        msg["digest"] = payload
    else:  # csyn, positioned over the responder's own members so that it gets past the hash check
        assert isinstance(payload, tuple)
        versions: list[int] = payload[0]
        residuals: list[int] = payload[1]
        t: int = payload[2]
        ms = members(g.view)
        msg.update(
            mh=membership_hash(ms),
            n=len(ms),
            t=t,
            ver=encode_ints((versions * len(ms))[: len(ms)]),
            hb=encode_ints((residuals * len(ms))[: len(ms)]),
        )
    return json.dumps(msg).encode()  # json, not orjson: the numbers may not fit in 64 bits


def _check_views(clock: FakeClock, gossipers: list[Gossip], start: float) -> None:
    """No record anyone holds has a number the mesh cannot carry or a start time from the future."""
    limit_ms = NOW_MS + int((clock.now - start) * 1000) + AHEAD_MS + 1
    for g in gossipers:
        assert g.own.generation <= limit_ms
        for r in g.view.values():
            assert 0 <= r.generation <= limit_ms, r
            assert 0 <= r.version <= MAX_COUNTER and 0 <= r.heartbeat <= MAX_COUNTER, r
            assert node_from_dict(orjson.loads(orjson.dumps(node_to_dict(r)))) == r  # every peer decodes it


@settings(SHARED_MACHINE, max_examples=150)
@given(
    messages=st.lists(
        st.tuples(st.sampled_from([0, 1]), hostile_messages(IDS, NOW_MS)), min_size=1, max_size=5
    )
)
def test_hostile_gossip_never_crashes_adopts_nothing_impossible_and_never_partitions(
    messages: list[tuple[int, tuple[str, object]]],
) -> None:
    async def run() -> None:
        clock, gs = _pair()
        start = clock.now
        await _rounds(clock, gs, 3)
        a, b = gs
        assert a.liveness(b.self_id) == b.liveness(a.self_id) == "alive"
        for target, (kind, payload) in messages:
            g = gs[target]
            status, reply = g.handle(_body(g, kind, payload))
            assert status in (200, 400)
            assert isinstance(orjson.loads(reply), dict)
            _check_views(clock, gs, start)
        for _ in range(15):
            await _rounds(clock, gs, 1)
            _check_views(clock, gs, start)
            if (
                a.liveness(b.self_id) == b.liveness(a.self_id) == "alive"
                and a.view[b.self_id].key == b.own.key
                and b.view[a.self_id].key == a.own.key
            ):
                return
        raise AssertionError(
            f"partitioned: a sees b {a.liveness(b.self_id)} at {a.view[b.self_id].key} (b's own {b.own.key}),"
            f" b sees a {b.liveness(a.self_id)} at {b.view[a.self_id].key} (a's own {a.own.key})"
        )

    asyncio.run(run())
