"""The failure detector on a fake clock."""

from __future__ import annotations

import dataclasses
import logging

import pytest

from helexa.mesh.fleet.membership import FailureDetector, MembershipEvent
from helexa.mesh.fleet.records import NodeId, NodeRecord
from helexa.mesh.timing import MeshTiming
from tests.helpers.clock import FakeClock

T = MeshTiming(suspect_after_s=3.0, dead_after_s=8.0, forget_after_s=60.0, max_tick_gap_s=2.5)


def _rec(hb: int = 0, gen: int = 1, left: bool = False, nid: str = "p") -> NodeRecord:
    return NodeRecord(
        node_id=NodeId(nid),
        name=nid,
        generation=gen,
        version=1,
        heartbeat=hb,
        address="10.0.0.2",
        port=1,
        left=left,
    )


def _setup():
    clock = FakeClock()
    events: list[MembershipEvent] = []
    det = FailureDetector(self_id=NodeId("me"), timing=T, clock=clock, on_event=events.append)
    return clock, det, events


def _advance(clock, det, seconds, step=1.0, beat=None):
    """Tick every `step` seconds like the gossip loop; `beat(t)` may feed records."""
    t = 0.0
    while t < seconds:
        clock.now += step
        t += step
        if beat is not None:
            beat()
        det.tick()


def test_alive_suspect_dead_forgotten():
    clock, det, events = _setup()
    det.observe(_rec(hb=1), direct=True)
    assert det.liveness(NodeId("p")) == "alive"
    _advance(clock, det, 2)
    assert det.liveness(NodeId("p")) == "alive"  # two missed rounds: still alive
    _advance(clock, det, 1)
    assert det.liveness(NodeId("p")) == "suspect"
    _advance(clock, det, 4)
    assert det.liveness(NodeId("p")) == "suspect"
    _advance(clock, det, 1)
    assert det.liveness(NodeId("p")) == "dead"  # 8 s of silence: out of routing well within 10 s
    _advance(clock, det, 59)
    assert det.liveness(NodeId("p")) == "dead"
    forgotten = []
    clock.now += 1
    forgotten = det.tick()
    assert forgotten == ["p"] and det.liveness(NodeId("p")) is None
    assert [(e.previous, e.current) for e in events] == [
        (None, "alive"),
        ("alive", "suspect"),
        ("suspect", "dead"),
        ("dead", "forgotten"),
    ]


def test_steady_heartbeats_keep_alive_and_one_missed_round_is_harmless():
    clock, det, events = _setup()
    hb = [1]
    det.observe(_rec(hb=1), direct=True)

    def beat():
        # the heartbeat advances every round except every third (a lost exchange)
        if int(clock.now) % 3:
            hb[0] += 1
            det.observe(_rec(hb=hb[0]))

    _advance(clock, det, 60, beat=beat)
    assert det.liveness(NodeId("p")) == "alive"
    assert [e.current for e in events] == ["alive"]


def test_dead_peer_comes_back_when_heartbeat_advances():
    clock, det, events = _setup()
    det.observe(_rec(hb=1), direct=True)
    _advance(clock, det, 9)
    assert det.liveness(NodeId("p")) == "dead"
    det.observe(_rec(hb=2))
    assert det.liveness(NodeId("p")) == "alive"
    assert events[-1].previous == "dead" and events[-1].current == "alive"


def test_same_heartbeat_does_not_refresh():
    clock, det, _ = _setup()
    det.observe(_rec(hb=5), direct=True)
    for _ in range(4):
        clock.now += 1
        det.observe(_rec(hb=5), direct=True)  # reachable, but heartbeat frozen (e.g. stuck agent)
        det.tick()
    assert det.liveness(NodeId("p")) == "suspect"


def test_relayed_first_sight_is_suspect_until_heartbeat_advances():
    clock, det, _ = _setup()
    det.observe(_rec(hb=3))
    assert det.liveness(NodeId("p")) == "suspect"
    clock.now += 1
    det.observe(_rec(hb=4))
    assert det.liveness(NodeId("p")) == "alive"


def test_left_and_new_generation_replaces_at_once():
    _, det, events = _setup()
    det.observe(_rec(hb=1), direct=True)
    det.observe(dataclasses.replace(_rec(hb=2), left=True, version=2))
    assert det.liveness(NodeId("p")) == "left"
    det.observe(_rec(hb=3))  # a later heartbeat of the same run does not undo a leave
    assert det.liveness(NodeId("p")) == "left"
    det.observe(_rec(hb=0, gen=2))  # restarted
    assert det.liveness(NodeId("p")) == "alive"
    assert events[-1].restarted and events[-1].generation == 2
    det.observe(_rec(hb=99, gen=1))  # stale news from the old run is ignored
    status = det.status(NodeId("p"))
    assert status is not None and status.generation == 2


def test_restart_of_dead_peer_is_alive_at_once():
    clock, det, _ = _setup()
    det.observe(_rec(hb=1), direct=True)
    _advance(clock, det, 10)
    assert det.liveness(NodeId("p")) == "dead"
    det.observe(_rec(hb=0, gen=5))
    assert det.liveness(NodeId("p")) == "alive"


def test_own_loop_pause_is_not_blamed_on_peers():
    clock, det, _ = _setup()
    det.observe(_rec(hb=1), direct=True)
    clock.now += 1
    det.tick()
    clock.now += 20  # the loop was blocked 20 s
    det.tick()
    assert det.liveness(NodeId("p")) == "alive"
    _advance(clock, det, 3)
    assert det.liveness(NodeId("p")) == "suspect"


def test_failures_are_recorded_but_do_not_change_liveness():
    _, det, _ = _setup()
    det.observe(_rec(hb=1), direct=True)
    det.report_failure(NodeId("p"), "connection refused")
    det.report_failure(NodeId("p"), "connection refused")
    st = det.status(NodeId("p"))
    assert st is not None and st.failures == 2 and st.last_error == "connection refused"
    assert det.liveness(NodeId("p")) == "alive"
    det.report_success(NodeId("p"))
    assert st.failures == 0 and st.last_error is None


def test_self_is_always_alive_and_never_tracked():
    _, det, events = _setup()
    det.observe(_rec(nid="me"))
    assert det.liveness(NodeId("me")) == "alive" and det.peers() == {} and events == []


def test_transitions_are_logged_at_debug_only(caplog: pytest.LogCaptureFixture) -> None:
    """Joins, deaths and leaves are the runtime's to report (`mesh.peering.PeerStateLog`, once, with
    quieting); the detector's own line about them is debug, so operators never read each twice."""
    caplog.set_level(logging.DEBUG, logger="helexa.mesh.fleet.membership")
    clock, det, events = _setup()
    det.observe(_rec(hb=1), direct=True)  # joined
    _advance(clock, det, 8)  # suspect, then dead
    det.observe(_rec(hb=2), direct=True)  # alive again
    det.observe(dataclasses.replace(_rec(hb=3), left=True, version=2))  # left
    det.observe(_rec(hb=0, gen=2))  # restarted
    assert [e.current for e in events] == ["alive", "suspect", "dead", "alive", "left", "alive"]
    lines = [r for r in caplog.records if r.name == "helexa.mesh.fleet.membership"]
    assert len(lines) == len(events)  # still there for debugging
    assert all(r.levelno == logging.DEBUG for r in lines), [(r.levelname, r.getMessage()) for r in lines]
