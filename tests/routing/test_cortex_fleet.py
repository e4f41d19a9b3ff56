"""Routing (the cortex) over a fleet view with hand-made peer records, and the fleet's own record."""

from __future__ import annotations

import asyncio
import time

import pytest

from helexa.engine.base import ModelId
from helexa.mesh import errors
from helexa.mesh.fleet.catalogue import CatalogueView
from helexa.mesh.fleet.records import DeviceRecord, ModelRecord, ModelStatus, NodeId, NodeRecord
from helexa.mesh.fleet.view import Fleet
from helexa.mesh.routing.cortex import MeshCortex
from helexa.mesh.routing.decisions import RemoteDecision
from tests.helpers.agents import entry
from tests.helpers.polling import eventually

from .conftest import Rig


def _node(
    node_id: str, name: str, *, free_mb: int = 1000, models: tuple[ModelRecord, ...] = ()
) -> NodeRecord:
    cpu = DeviceRecord(name="cpu", kind="cpu", model="cpu", memory_total_mb=1000, memory_free_mb=free_mb)
    return NodeRecord(
        node_id=NodeId(node_id),
        name=name,
        generation=1,
        version=1,
        heartbeat=0,
        address="10.0.0.1",
        port=31313,
        devices=(cpu,),
        models=models,
    )


def _loaded(model_id: str, *, in_flight: int = 0, status: ModelStatus = "loaded") -> ModelRecord:
    return ModelRecord(
        id=ModelId(model_id),
        status=status,
        engine="fake",
        devices=("cpu",),
        memory_mb=100,
        in_flight=in_flight,
    )


@pytest.fixture
def setup(rig: Rig) -> tuple[Fleet, MeshCortex, Rig]:
    fleet = Fleet(initial=_node("m-self", "self", free_mb=50), models=rig.neuron.records)
    rig.neuron.on_change.append(fleet.mark_changed)
    view = CatalogueView([entry("a", aliases=("alias-a",)), entry("b"), entry("huge", memory_mb=10**6)])
    return fleet, MeshCortex(fleet=fleet, neuron=rig.neuron, catalogue=view), rig


def test_unknown_model_is_404_naming_it(setup) -> None:
    _, cortex, _ = setup
    with pytest.raises(errors.ModelNotFound, match="'nope'"):
        cortex.route("nope")


def test_infeasible_everywhere_is_503_with_reason(setup) -> None:
    _, cortex, _ = setup
    with pytest.raises(errors.ModelUnavailable) as info:
        cortex.route("huge")
    assert info.value.status == 503 and info.value.reason == "infeasible" and "huge" in info.value.message


def test_loaded_on_a_peer_routes_there_least_busy_first(setup) -> None:
    fleet, cortex, _ = setup
    fleet.peers[NodeId("p1")] = _node("p1", "peer1", models=(_loaded("a", in_flight=3),))
    fleet.peers[NodeId("p2")] = _node("p2", "peer2", models=(_loaded("a", in_flight=1),))
    decision = cortex.route("alias-a")
    assert isinstance(decision, RemoteDecision) and decision.node.name == "peer2" and not decision.cold
    # A forwarded request is always served here.
    assert not isinstance(cortex.route("a", forwarded=True), RemoteDecision)
    # Dead peers are out of routing.
    fleet.liveness = lambda node_id: "dead" if node_id == "p2" else "alive"
    decision = cortex.route("a")
    assert isinstance(decision, RemoteDecision) and decision.node.name == "peer1"


async def test_local_copy_wins_ties_and_loading_is_joined(setup) -> None:
    fleet, cortex, rig = setup
    fleet.peers[NodeId("p1")] = _node("p1", "peer1", models=(_loaded("b", status="loading"),))
    decision = cortex.route("b")
    assert isinstance(decision, RemoteDecision) and decision.node.name == "peer1" and decision.cold
    await rig.neuron.ensure_loaded(entry("a"))
    await asyncio.sleep(0)  # the coalesced rebuild
    fleet.peers[NodeId("p2")] = _node("p2", "peer2", models=(_loaded("a"),))
    assert not isinstance(cortex.route("a"), RemoteDecision)  # same load: this node first


def test_placement_prefers_the_node_with_room(setup) -> None:
    fleet, cortex, _ = setup  # this node has 50 MB free; the model needs 100
    fleet.peers[NodeId("p1")] = _node("p1", "peer1", free_mb=900)
    decision = cortex.route("a")
    assert isinstance(decision, RemoteDecision) and decision.node.name == "peer1" and decision.cold
    assert [n.name for n in decision.candidates] == ["self"]


def test_list_models_covers_catalogue_and_everything_loaded(setup) -> None:
    fleet, cortex, _ = setup
    fleet.peers[NodeId("p1")] = _node("p1", "peer1", models=(_loaded("a"), _loaded("not-in-catalogue")))
    rows = {row.id: row for row in cortex.list_models()}
    assert set(rows) == {"a", "b", "not-in-catalogue"}  # "huge" is feasible nowhere
    assert rows["a"].status == "loaded" and rows["a"].loaded
    assert [loc.node_name for loc in rows["a"].locations] == ["peer1"]
    assert rows["b"].status == "unloaded" and rows["b"].feasible_on == ("peer1", "self")
    assert cortex.get_model("alias-a") is not None and cortex.get_model("alias-a").id == "a"
    assert cortex.get_model("huge") is None


async def test_fleet_record_versions_and_coalescing(setup) -> None:
    fleet, _, rig = setup
    seen: list[int] = []
    fleet.subscribe(lambda r: seen.append(r.version))
    v0 = fleet.self_record.version
    async with rig.neuron.acquire(entry("a")):
        pass
    await asyncio.sleep(0)
    assert fleet.self_record.version > v0
    assert seen == list(range(v0 + 1, fleet.self_record.version + 1))
    assert fleet.self_record.model("a") is not None
    # A burst of changes within one loop iteration is one rebuild; no change, no new version.
    before = fleet.self_record.version
    for _ in range(100):
        fleet.mark_changed()
    await asyncio.sleep(0)
    assert fleet.self_record.version == before
    hb = fleet.self_record.heartbeat
    version = fleet.self_record.version
    fleet.beat()
    assert (fleet.self_record.heartbeat, fleet.self_record.version) == (hb + 1, version)
    fleet.set_draining()
    assert fleet.self_record.draining and fleet.self_record.version == version + 1
    assert fleet.routable_nodes() == []


def _cpu(free_mb: int) -> tuple[DeviceRecord, ...]:
    return (DeviceRecord(name="cpu", kind="cpu", model="cpu", memory_total_mb=1000, memory_free_mb=free_mb),)


async def _requests(rig: Rig, model: str, n: int) -> None:
    for _ in range(n):
        async with rig.neuron.acquire(entry(model)):
            pass
        await asyncio.sleep(0)  # the coalesced rebuild after each request


async def test_count_only_changes_wait_status_changes_do_not(rig: Rig) -> None:
    """Request counters and small device drift are held back (interval 30 s: never within this test);
    a load, an unload or a significant memory move publishes at once, pending counters included."""
    devices = [_cpu(900)]
    fleet = Fleet(
        initial=_node("m-self", "self"),
        models=rig.neuron.records,
        devices=lambda: devices[0],
        counts_interval_s=30.0,
    )
    rig.neuron.on_change.append(fleet.mark_changed)
    published: list[NodeRecord] = []
    fleet.subscribe(published.append)

    await rig.neuron.ensure_loaded(entry("a"))
    await asyncio.sleep(0)
    loaded = fleet.self_record
    assert (m := loaded.model("a")) is not None and m.status == "loaded"  # a status change: at once

    await _requests(rig, "a", 5)
    devices[0] = _cpu(850)  # 50 MB of drift: noise
    fleet.mark_changed()
    await asyncio.sleep(0)
    assert fleet.self_record is loaded  # nothing new published
    assert (m := fleet.self_record.model("a")) is not None and m.requests_total == 0
    # Routing reads this node's live counters all the same.
    live = fleet.routable_nodes()[0]
    assert live is fleet.live_record and live.version == loaded.version
    assert (m := live.model("a")) is not None and m.requests_total == 5 and live.devices == _cpu(850)

    # A status change publishes at once, with the pending counters.
    await rig.neuron.ensure_loaded(entry("b"))
    await asyncio.sleep(0)
    now = fleet.self_record
    assert now.version > loaded.version and now is published[-1]
    assert (m := now.model("a")) is not None and m.requests_total == 5
    assert (m := now.model("b")) is not None and m.status == "loaded"

    # A significant move of free memory publishes at once too.
    before = fleet.self_record.version
    devices[0] = _cpu(500)
    fleet.mark_changed()
    await asyncio.sleep(0)
    assert fleet.self_record.version == before + 1 and fleet.self_record.devices == _cpu(500)

    # So does an unload.
    await rig.neuron.unload("b")
    await asyncio.sleep(0)
    assert fleet.self_record.model("b") is None and fleet.self_record.version > before + 1
    # Every publication is one version up from the last: nothing skipped or reordered.
    versions = [r.version for r in published]
    assert versions == list(range(versions[0], versions[0] + len(versions)))
    fleet.close()


async def test_held_back_counters_are_published_within_the_interval(rig: Rig) -> None:
    fleet = Fleet(initial=_node("m-self", "self"), models=rig.neuron.records, counts_interval_s=0.05)
    rig.neuron.on_change.append(fleet.mark_changed)
    last_published = [time.monotonic()]
    fleet.subscribe(lambda _record: last_published.__setitem__(0, time.monotonic()))
    await rig.neuron.ensure_loaded(entry("a"))
    # A quiet spell longer than the interval, counted from the last publication (a deferred publish of the
    # load's own count changes may land late on a busy machine).
    await eventually(
        lambda: time.monotonic() - last_published[0] > 0.1, timeout_s=5.0, interval_s=0.01, what="quiet"
    )
    version = fleet.self_record.version
    # The first count change after a quiet spell goes out at once...
    await _requests(rig, "a", 1)
    assert fleet.self_record.version == version + 1
    # ...the next ones within the interval wait for it, with no further trigger needed.
    await _requests(rig, "a", 5)

    def published(n: int) -> bool:
        m = fleet.self_record.model("a")
        return m is not None and m.requests_total == n

    await eventually(
        lambda: published(6), timeout_s=5.0, interval_s=0.01, what="the held-back counters to be published"
    )
    fleet.close()


def test_a_model_only_a_draining_node_could_serve_is_503_with_retry_after(setup) -> None:
    fleet, cortex, _ = setup
    cortex.catalogue.replace([entry("pinned", pinned_on=("self",)), entry("huge", memory_mb=10**6)])
    fleet.peers[NodeId("p1")] = _node("p1", "peer1")
    fleet.set_draining()
    with pytest.raises(errors.ModelUnavailable) as info:
        cortex.route("pinned")
    err = info.value
    assert err.reason == "draining" and err.retry_after_s is not None and "shutting down" in err.message
    # Feasible nowhere at all is still the permanent 503, without Retry-After.
    with pytest.raises(errors.ModelUnavailable) as info:
        cortex.route("huge")
    assert info.value.reason == "infeasible" and info.value.retry_after_s is None


def test_cannot_run_anywhere_503s_name_no_node(setup) -> None:
    """Issue 12 item 11: `mesh.errors` promises client messages never carry internal hostnames; the
    "cannot run anywhere" 503s named every node (and the pinned and draining ones)."""
    fleet, cortex, _ = setup
    fleet.peers[NodeId("p1")] = _node("p1", "gpu-box.lan", free_mb=10)
    fleet.peers[NodeId("p2")] = _node("p2", "laptop-of-ann")
    cortex.catalogue.replace(
        [
            entry("huge", memory_mb=10**6),
            entry("two-gpus", min_devices=2, min_device_memory_mb=500),
            entry("pinned", pinned_on=("vault-7",)),
            entry("here", pinned_on=("self",)),
        ]
    )
    names = ("gpu-box", "laptop-of-ann", "vault-7", "self", "p1", "p2", "m-self")
    messages = []
    for model in ("huge", "two-gpus", "pinned"):
        with pytest.raises(errors.ModelUnavailable) as info:
            cortex.route(model)
        assert info.value.reason == "infeasible" and model in info.value.message
        messages.append(info.value.message)
    fleet.set_draining()
    with pytest.raises(errors.ModelUnavailable) as info:
        cortex.route("here")
    assert info.value.reason == "draining"
    messages.append(info.value.message)
    for message in messages:
        assert not [n for n in names if n in message], message
    # Still useful: why, without saying where.
    assert "MB" in messages[0] and "2 device(s)" in messages[1] and "pinned" in messages[2]
