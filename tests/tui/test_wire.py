"""The dashboard's parsers against what the agent's own code emits (no fakes in between): an event made by
`mesh.fleet.events` and a state document made by `mesh.fleet.codec.state_to_json` read as the agent
means them."""

from __future__ import annotations

from helexa.engine.base import ModelId
from helexa.mesh.fleet.codec import state_to_json
from helexa.mesh.fleet.events import Event, record_events
from helexa.mesh.fleet.records import DeviceRecord, ModelRecord, NodeId, NodeRecord
from helexa.tui.fleet import parse_event, parse_state
from helexa.tui.rows import model_status


def test_agent_event_reads_with_node_name_time_and_details() -> None:
    ev = Event(
        kind="load_progress",
        node="0123abcd",
        node_name="gamma",
        model="e2e/small",
        data={"status": "loading", "progress": 0.5},
        time=1_700_000_000.25,
    )
    parsed = parse_event(ev.to_json(), now_s=0.0)
    assert (parsed.type, parsed.node, parsed.model) == ("load_progress", "gamma", "e2e/small")
    assert parsed.ts == 1_700_000_000.25 and parsed.message == "50%"
    unload = Event(kind="unload", node="0123abcd", node_name="gamma", model="m", data={"reason": "idle"})
    assert parse_event(unload.to_json()).message == "idle"
    failed = Event(kind="load_failed", node="x", node_name="gamma", model="m", message="out of memory")
    assert parse_event(failed.to_json()).message == "out of memory"


def test_agent_state_reads_with_names_devices_models_and_catalogue() -> None:
    node = NodeRecord(
        node_id=NodeId("0123abcd"),
        name="gamma",
        generation=1_700_000_000_000,
        version=3,
        heartbeat=7,
        address="10.0.0.7",
        port=31313,
        mesh="lab",
        agent_version="0.1.0",
        devices=(
            DeviceRecord(
                name="cuda:0", kind="cuda", model="RTX 4090", memory_total_mb=24_000, memory_free_mb=20_000
            ),
        ),
        models=(
            ModelRecord(
                id=ModelId("m"),
                status="loading",
                engine="mlc",
                progress=0.4,
                memory_mb=4000,
                requests_total=3,
            ),
        ),
    )
    doc = state_to_json(
        mesh="lab",
        open_mesh=False,
        self_id=node.node_id,
        agent_version="0.1.0",
        nodes=[(node, "suspect")],
        catalogue=[{"id": "m", "aliases": ["mm"], "pinned_on": ["gamma"], "memory_mb": 4000, "version": 2}],
        feasible_on={"m": ["gamma"]},
    )
    state = parse_state(doc)
    assert (state.mesh, state.open, state.self_id) == ("lab", False, "0123abcd")
    (n,) = state.nodes
    assert (n.name, n.address, n.port, n.liveness, n.generation) == (
        "gamma", "10.0.0.7", 31313, "suspect", 1_700_000_000_000,
    )  # fmt: skip
    assert n.devices[0].memory_used_mb == 4000 and n.devices[0].model == "RTX 4090"
    (m,) = n.models
    assert (m.status, m.progress, m.memory_mb, m.requests_total) == ("loading", 0.4, 4000, 3)
    (e,) = state.catalogue
    assert (e.aliases, e.pinned_on, e.feasible_on) == (("mm",), ("gamma",), ("gamma",))
    assert [(loc.node, loc.status) for loc in e.locations] == [("0123abcd", "loading")]
    assert state.node_name(e.locations[0].node) == "gamma"


def test_a_download_reads_as_bytes_rate_and_time_left_in_events_and_rows() -> None:
    def node(*models: ModelRecord) -> NodeRecord:
        return NodeRecord(
            node_id=NodeId("n1"),
            name="gamma",
            generation=1,
            version=1,
            heartbeat=1,
            address="a",
            port=1,
            models=models,
        )

    def downloading(done: int) -> ModelRecord:
        return ModelRecord(
            id=ModelId("m"),
            status="loading",
            engine="transformers",
            progress=done / 98_400_000,
            phase="downloading",
            done_bytes=done,
            total_bytes=98_400_000,
            bytes_per_s=5_200_000.0,
        )

    (event,) = record_events(node(downloading(0)), node(downloading(41_000_000)))
    assert parse_event(event.to_json()).message == "downloading 42% 41.0/98.4 MB 5.2 MB/s 11s left"
    doc = state_to_json(
        mesh="lab",
        open_mesh=False,
        self_id=NodeId("n1"),
        agent_version="0.1.0",
        nodes=[(node(downloading(41_000_000)), "alive")],
        catalogue=[],
    )
    state = parse_state(doc)
    (model,) = state.nodes[0].models
    assert (model.phase, model.done_bytes, model.total_bytes) == ("downloading", 41_000_000, 98_400_000)
    assert model.eta_s is not None and round(model.eta_s, 2) == 11.04
    assert model_status(model).plain == "▰▰▱▱▱  42% 41.0/98.4 MB 5.2 MB/s 11s left"
