"""Feasibility, eviction and placement: examples plus Hypothesis properties over random fleets."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from helexa.catalogue.entry import ModelEntry
from helexa.catalogue.placement import (
    _rendezvous,
    devices_fitting_now,
    eviction_plan,
    feasible_devices,
    feasible_on,
    infeasible_reason,
    place,
)
from helexa.engine.base import ModelId
from helexa.mesh.fleet.records import DeviceRecord, ModelRecord, NodeId, NodeRecord
from tests.helpers.strategies import (
    NODE_IDS,
    SHARED_MACHINE,
    crowded_nodes_and_entries,
    fleets,
    node_records,
    placement_entries,
)


def gpu(name: str, total: int, free: int) -> DeviceRecord:
    return DeviceRecord(name=name, kind="cuda", model="RTX", memory_total_mb=total, memory_free_mb=free)


def cpu(total: int, free: int) -> DeviceRecord:
    return DeviceRecord(name="cpu", kind="cpu", model="x86", memory_total_mb=total, memory_free_mb=free)


def node(  # noqa: PLR0917
    node_id: str, name: str, devices, models=(), engines=("transformers",), draining=False
) -> NodeRecord:
    return NodeRecord(
        node_id=NodeId(node_id),
        name=name,
        generation=1,
        version=1,
        heartbeat=0,
        address="10.0.0.1",
        port=31313,
        engines=engines,
        devices=tuple(devices),
        models=tuple(models),
        draining=draining,
    )


def loaded(model_id: str, devices, memory_mb: int, *, last_used=0.0, in_flight=0, queued=0, resident=False):
    return ModelRecord(
        id=ModelId(model_id),
        status="loaded",
        engine="transformers",
        devices=tuple(devices),
        memory_mb=memory_mb,
        last_used=last_used,
        in_flight=in_flight,
        queued=queued,
        resident=resident,
    )


def entry(**kwargs) -> ModelEntry:
    kwargs.setdefault("id", "m/new")
    kwargs.setdefault("source", "org/m")
    return ModelEntry(**kwargs)


# --- examples ------------------------------------------------------------------------------------------

BEAST = node(
    "n1", "beast", [gpu("cuda:0", 32000, 30000), gpu("cuda:1", 32000, 31000)], engines=("mlc", "transformers")
)
BENJY = node("n2", "benjy", [gpu("cuda:0", 24000, 20000)])
LAPTOP = node("n3", "laptop", [cpu(16000, 9000)])


def test_devices_prefer_gpus_most_free_first_and_cpu_on_cpu_hosts() -> None:
    assert feasible_devices(entry(memory_mb=8000), BEAST) == ("cuda:1",)
    assert feasible_devices(entry(memory_mb=8000, min_devices=2), BEAST) == ("cuda:1", "cuda:0")
    assert feasible_devices(entry(memory_mb=50000), BEAST) == ("cuda:1", "cuda:0")  # spread over two
    assert feasible_devices(entry(memory_mb=8000), LAPTOP) == ("cpu",)
    assert feasible_devices(entry(memory_mb=8000, engine="mlc"), LAPTOP) is None
    assert feasible_devices(entry(memory_mb=50000, engine="mlc"), BEAST) is None  # mlc: exactly min_devices


def test_infeasible_reasons_are_readable() -> None:
    assert infeasible_reason(entry(memory_mb=100), BENJY) is None
    assert (
        infeasible_reason(entry(engine="mlc"), BENJY)
        == "node benjy does not run the mlc engine (it runs: transformers)"
    )
    assert infeasible_reason(entry(engine="mlc"), node("n9", "x", [cpu(8000, 8000)], engines=("mlc",))) == (
        "the mlc engine needs a CUDA GPU and node x has none"
    )
    assert infeasible_reason(entry(min_devices=2, min_device_memory_mb=16000), BENJY) == (
        "needs 2 device(s) with at least 16000 MB each; node benjy has cuda:0 24000 MB"
    )
    assert infeasible_reason(entry(memory_mb=30000), LAPTOP) == (
        "needs 30000 MB over 1 or more device(s); node laptop has cpu 16000 MB"
    )


def test_measured_memory_overrides_the_catalogue() -> None:
    assert feasible_devices(entry(memory_mb=100), LAPTOP, memory_mb=20000) is None
    assert devices_fitting_now(entry(memory_mb=100), LAPTOP, memory_mb=9500) is None


def test_eviction_takes_least_recently_used_idle_models_and_no_more() -> None:
    busy = node(
        "n4",
        "busy",
        [gpu("cuda:0", 24000, 2000)],
        models=[
            loaded("old", ["cuda:0"], 6000, last_used=10),
            loaded("older", ["cuda:0"], 6000, last_used=5),
            loaded("serving", ["cuda:0"], 6000, last_used=1, in_flight=1),
            loaded("pinned-in-memory", ["cuda:0"], 4000, last_used=0, resident=True),
        ],
    )
    assert eviction_plan(entry(memory_mb=7000), busy, now=100) == ("older",)
    assert eviction_plan(entry(memory_mb=12000), busy, now=100) == ("older", "old")
    assert eviction_plan(entry(memory_mb=15000), busy, now=100) is None  # would need the busy or resident one
    assert eviction_plan(entry(memory_mb=1000), busy, now=100) == ()


def test_place_follows_mission_order() -> None:
    tight = node("n4", "tight", [gpu("cuda:0", 24000, 1000)], models=[loaded("idle", ["cuda:0"], 20000)])
    stuck = node(
        "n5", "stuck", [gpu("cuda:0", 24000, 1000)], models=[loaded("hot", ["cuda:0"], 20000, in_flight=2)]
    )
    fleet = [stuck, tight, LAPTOP, BENJY, BEAST]
    routable = {"n1", "n2", "n3", "n4", "n5"}
    # fits now (in rendezvous order), then after eviction, then the rest.
    order = place(entry(memory_mb=8000), fleet, routable=routable)
    assert set(order[:3]) == {"n1", "n2", "n3"}
    assert order[3:] == ("n4", "n5")
    assert order[:3] == tuple(sorted(("n1", "n2", "n3"), key=lambda n: _rendezvous("m/new", n)))
    assert place(entry(memory_mb=8000, pinned_on=("tight", "n3")), fleet, routable=routable) == ("n3", "n4")
    assert place(entry(memory_mb=8000), fleet, routable={"n4", "n5"}) == ("n4", "n5")
    assert place(entry(memory_mb=8000, engine="mlc"), fleet, routable=routable) == ("n1",)
    draining = dataclasses.replace(BEAST, draining=True)
    assert "n1" not in place(entry(memory_mb=8000), [draining, BENJY], routable=routable)
    assert feasible_on(entry(memory_mb=20000), fleet) == ("beast", "benjy", "stuck", "tight")


# --- properties ----------------------------------------------------------------------------------------

routable_sets = st.sets(st.sampled_from(NODE_IDS))


@SHARED_MACHINE
@given(placement_entries(), fleets(), routable_sets, st.randoms(use_true_random=False))
def test_place_picks_only_routable_feasible_pinned_nodes_deterministically(
    entry, fleet, routable, rnd
) -> None:
    chosen = place(entry, fleet, routable=routable)
    by_id = {n.node_id: n for n in fleet}
    assert len(set(chosen)) == len(chosen)
    for node_id in chosen:
        chosen_node = by_id[NodeId(node_id)]
        assert node_id in routable and not chosen_node.draining
        assert feasible_devices(entry, chosen_node) is not None
        assert infeasible_reason(entry, chosen_node) is None
        assert not entry.pinned_on or {chosen_node.name, chosen_node.node_id} & set(entry.pinned_on)
    # Every eligible node is a candidate.
    eligible = {
        n.node_id
        for n in fleet
        if n.node_id in routable
        and not n.draining
        and feasible_devices(entry, n) is not None
        and (not entry.pinned_on or {n.name, n.node_id} & set(entry.pinned_on))
    }
    assert set(chosen) == eligible
    # Deterministic and independent of the order of the fleet.
    shuffled = list(fleet)
    rnd.shuffle(shuffled)
    assert place(entry, shuffled, routable=set(routable)) == chosen
    # Tiers: fits now, then after eviction, then the rest.
    tiers = []
    for node_id in chosen:
        n = by_id[NodeId(node_id)]
        tiers.append(
            0 if devices_fitting_now(entry, n) else 1 if eviction_plan(entry, n, now=0) is not None else 2
        )
    assert tiers == sorted(tiers)
    assert set(feasible_on(entry, fleet, routable=routable)) == {by_id[NodeId(i)].name for i in chosen}


def _apply(node_record: NodeRecord, plan) -> NodeRecord:
    """The node after unloading `plan`: each model's memory returns evenly to its devices."""
    freed: dict[str, int] = {}
    for m in node_record.models:
        if m.id in plan:
            for d in m.devices:
                freed[d] = freed.get(d, 0) + m.memory_mb // len(m.devices)
    devices = tuple(
        dataclasses.replace(d, memory_free_mb=d.memory_free_mb + freed.get(d.name, 0))
        for d in node_record.devices
    )
    models = tuple(m for m in node_record.models if m.id not in plan)
    return dataclasses.replace(node_record, devices=devices, models=models)


@settings(SHARED_MACHINE, max_examples=300)
@given(
    st.one_of(
        st.tuples(placement_entries(), node_records()),
        crowded_nodes_and_entries().map(lambda pair: (pair[1], pair[0])),
        crowded_nodes_and_entries().map(lambda pair: (pair[1], pair[0])),
    ),
    st.floats(min_value=0, max_value=4000),
)
def test_eviction_plan_is_safe_and_makes_room(case, now) -> None:
    entry, node_record = case
    plan = eviction_plan(entry, node_record, now=now)
    present = any(m.id == entry.id and m.status in ("loading", "loaded") for m in node_record.models)
    if plan is None:
        # Even evicting every idle non-resident model would not make room.
        everything = [
            m.id
            for m in node_record.models
            if m.status == "loaded"
            and not m.in_flight
            and not m.queued
            and not m.resident
            and m.id != entry.id
        ]
        after = _apply(node_record, everything)
        assert (
            node_record.draining
            or feasible_devices(entry, node_record) is None
            or (devices_fitting_now(entry, after) is None)
        )
        return
    assert len(set(plan)) == len(plan)
    models = {m.id: m for m in node_record.models}
    for model_id in plan:
        model = models[model_id]
        assert model.status == "loaded" and model.in_flight == 0 and model.queued == 0 and not model.resident
        assert model_id != entry.id
    if not present:
        assert devices_fitting_now(entry, _apply(node_record, plan)) is not None


def test_place_ignores_free_memory_moves_among_nodes_where_the_model_fits() -> None:
    """Agents see each other's free memory a gossip round late; the order must not depend on it, or
    simultaneous first requests at different agents start loads on different nodes."""
    a = node("a", "a", [cpu(16000, 9000)])
    b = node("b", "b", [cpu(16000, 9100)])
    c = node("c", "c", [cpu(16000, 8900)])
    view_1 = place(entry(memory_mb=1000), [a, b, c], routable={"a", "b", "c"})
    a2 = node("a", "a", [cpu(16000, 9200)])
    c2 = node("c", "c", [cpu(16000, 9300)])
    view_2 = place(entry(memory_mb=1000), [a2, b, c2], routable={"a", "b", "c"})
    assert view_1 == view_2


def test_fake_engine_entries_run_on_any_node() -> None:
    real = node("r", "real", [cpu(16000, 9000)], engines=("transformers",))
    assert place(entry(engine="fake", memory_mb=100), [real], routable={"r"}) == ("r",)
