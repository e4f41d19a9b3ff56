"""Routing (the cortex) over a fleet view with hand-made peer records, and the fleet's own record."""

from __future__ import annotations

import asyncio

import pytest

from engine.base import ModelId
from mesh import errors
from mesh.cortex import CatalogueView, MeshCortex
from mesh.fleet import Fleet
from mesh.records import DeviceRecord, ModelRecord, ModelStatus, NodeId, NodeRecord
from mesh.routing import RemoteDecision

from .conftest import Rig, entry


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
