"""Hypothesis strategies for mesh records (one documented place, like attrs' tests/strategies.py).

`node_records(node_ids=...)` draws valid `NodeRecord`s; `json_garbage()` draws arbitrary JSON-able
values for robustness tests of the decoders.
"""

from __future__ import annotations

from hypothesis import strategies as st

from helexa.engine.base import ModelId
from helexa.mesh.fleet.records import DeviceRecord, ModelRecord, NodeId, NodeRecord

_text = st.text(max_size=20)
_count = st.integers(min_value=0, max_value=2**40)
_finite = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def devices() -> st.SearchStrategy[DeviceRecord]:
    return st.builds(
        DeviceRecord,
        name=st.sampled_from(["cpu", "cuda:0", "cuda:1"]),
        kind=st.sampled_from(["cpu", "cuda"]),
        model=_text,
        memory_total_mb=_count,
        memory_free_mb=_count,
        uuid=st.none() | _text,
        utilization=st.none() | _finite,
        temperature_c=st.none() | st.floats(min_value=0, max_value=120, allow_nan=False),
        compute_capability=st.none() | st.sampled_from(["8.9", "12.0"]),
    )


def models() -> st.SearchStrategy[ModelRecord]:
    return st.builds(
        ModelRecord,
        id=st.sampled_from(["helexa/demo", "Qwen/Qwen2.5-7B"]).map(ModelId),
        status=st.sampled_from(["loading", "loaded", "unloading", "failed"]),
        engine=st.sampled_from(["fake", "transformers"]),
        devices=st.lists(st.sampled_from(["cpu", "cuda:0"]), max_size=2).map(tuple),
        memory_mb=_count,
        in_flight=st.integers(0, 100),
        queued=st.integers(0, 100),
        last_used=st.floats(min_value=0, max_value=2e9, allow_nan=False),
        progress=st.none() | _finite,
        error=st.none() | _text,
        tokens_per_s=st.none() | st.floats(min_value=0, max_value=1e4, allow_nan=False),
        resident=st.booleans(),
    )


def catalogue_entries() -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries(
        {
            "id": st.sampled_from(["helexa/demo", "Qwen/Qwen2.5-7B", "m3"]),
            "version": st.integers(1, 5),
            "memory_mb": st.integers(0, 1000),
        },
        optional={"removed": st.booleans()},
    )


_NODE_IDS = st.sampled_from(["n1", "n2", "n3"])


def node_records(node_ids: st.SearchStrategy[str] = _NODE_IDS) -> st.SearchStrategy[NodeRecord]:
    return st.builds(
        NodeRecord,
        node_id=node_ids.map(NodeId),
        name=_text,
        generation=st.integers(0, 3),
        version=st.integers(0, 3),
        heartbeat=st.integers(0, 3),
        address=st.sampled_from(["10.0.0.1", "10.0.0.2"]),
        port=st.integers(1, 65535),
        mesh=st.sampled_from(["default", "lab"]),
        agent_version=st.just("0.1.0"),
        engines=st.lists(st.sampled_from(["fake", "transformers"]), max_size=2).map(tuple),
        labels=st.dictionaries(_text, _text, max_size=2),
        draining=st.booleans(),
        left=st.booleans(),
        devices=st.lists(devices(), max_size=2).map(tuple),
        models=st.lists(models(), max_size=2).map(tuple),
        catalogue=st.lists(catalogue_entries(), max_size=2).map(tuple),
    )


def views() -> st.SearchStrategy[dict[NodeId, NodeRecord]]:
    """Views as gossip would hold them: records keyed by their own id (small id space → collisions)."""
    return st.lists(node_records(), max_size=4).map(lambda rs: {r.node_id: r for r in rs})


def json_garbage() -> st.SearchStrategy[object]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(min_value=-(2**70), max_value=2**70)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=30)
    )
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
        ),
        max_leaves=20,
    )
