"""codec: records round-trip; hostile input raises CodecError and nothing else."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.codec import CodecError, decode_json, dumps, node_from_dict, node_to_dict, state_to_json
from mesh.records import NodeId

from .strategies import json_garbage, node_records


@given(node_records())
def test_round_trip(rec):
    assert node_from_dict(orjson.loads(dumps(node_to_dict(rec)))) == rec


@given(json_garbage())
def test_garbage_raises_only_codec_error(value):
    with contextlib.suppress(CodecError):
        node_from_dict(value)


@given(node_records(), st.data())
def test_one_corrupted_field_raises_only_codec_error(rec, data):
    d = node_to_dict(rec)
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(json_garbage())
    with contextlib.suppress(CodecError):
        node_from_dict(d)


@given(node_records(), st.data())
def test_corrupted_nested_field_raises_only_codec_error(rec, data):
    d: dict[str, Any] = node_to_dict(rec)
    d["devices"] = [{"name": "cpu", "kind": "cpu", "memory_total_mb": 1, "memory_free_mb": 1}]
    d["models"] = [{"id": "m", "status": "loaded"}]
    node_from_dict(d)  # the minimal nested forms are valid
    section = data.draw(st.sampled_from(["devices", "models"]))
    entry = d[section][0]
    entry[data.draw(st.sampled_from(sorted(entry)))] = data.draw(json_garbage())
    with contextlib.suppress(CodecError):
        node_from_dict(d)


@given(st.binary(max_size=200))
def test_bad_bytes_raise_codec_error(raw):
    with contextlib.suppress(CodecError):
        decode_json(raw)


def _valid() -> dict[str, object]:
    return {
        "id": "n1",
        "name": "a",
        "generation": 1,
        "version": 1,
        "heartbeat": 0,
        "address": "10.0.0.1",
        "port": 1,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("generation", True),  # bool is not a count
        ("generation", -1),
        ("generation", 2**64),
        ("version", 1.5),
        ("port", 70000),
        ("id", ""),
        ("id", "x" * 1000),
        ("name", None),
        ("devices", [{"name": "cpu", "kind": "tpu", "memory_total_mb": 1, "memory_free_mb": 1}]),
        ("models", [{"id": "m", "status": "exploded"}]),
        ("models", [{"id": "m", "status": "loaded"}] * 10_000),
        ("labels", {"a": 1}),
        ("catalogue", [{"id": "m"}]),  # an entry needs a version
        ("catalogue", [{"id": "m", "version": 1, "blob": "x" * 100_000}]),
    ],
)
def test_specific_bad_values_are_refused(field, value):
    d = _valid()
    d[field] = value
    with pytest.raises(CodecError):
        node_from_dict(d)


def test_missing_required_field_is_refused():
    d = _valid()
    del d["address"]
    with pytest.raises(CodecError, match="address"):
        node_from_dict(d)


def test_oversize_and_deep_json_refused():
    with pytest.raises(CodecError):
        decode_json(b"[" * 5000 + b"]" * 5000)
    with pytest.raises(CodecError, match="exceeds"):
        decode_json(b"[1, 2, 3]", max_bytes=4)


@settings(max_examples=25)
@given(st.lists(node_records(), max_size=3, unique_by=lambda r: r.node_id))
def test_state_document_shape(records):
    nodes: list[tuple[Any, Any]] = [(r, "alive") for r in records]
    cat = [{"id": "helexa/demo", "version": 2, "memory_mb": 60}]
    doc: dict[str, Any] = state_to_json(
        mesh="default",
        open_mesh=True,
        self_id=NodeId("n1"),
        agent_version="0.1.0",
        nodes=nodes,
        catalogue=cat,
        feasible_on={"helexa/demo": ["beast"]},
    )
    orjson.dumps(doc)  # JSON-able
    assert doc["mesh"] == "default" and doc["open"] is True and doc["self"] == "n1"
    assert len(doc["nodes"]) == len(records)
    for n in doc["nodes"]:
        assert n["liveness"] == "alive" and "catalogue" not in n
        assert {"id", "name", "address", "generation", "devices", "models"} <= set(n)
    (entry,) = doc["catalogue"]
    assert entry["feasible_on"] == ["beast"]
    holders = {r.node_id for r in records if r.model("helexa/demo") is not None}
    assert {loc["node"] for loc in entry["locations"]} == holders
