"""codec: records round-trip; hostile input raises CodecError and nothing else."""

from __future__ import annotations

import contextlib
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helexa.mesh.fleet.codec import (
    CodecError,
    decode_ints,
    decode_json,
    dumps,
    encode_ints,
    node_from_dict,
    node_to_dict,
    state_to_json,
)
from helexa.mesh.fleet.records import NodeId
from tests.helpers.strategies import json_garbage, wire_node_records


@given(wire_node_records())
def test_round_trip(rec):
    assert node_from_dict(orjson.loads(dumps(node_to_dict(rec)))) == rec


@given(json_garbage())
def test_garbage_raises_only_codec_error(value):
    with contextlib.suppress(CodecError):
        node_from_dict(value)


@given(wire_node_records(), st.data())
def test_one_corrupted_field_raises_only_codec_error(rec, data):
    d = node_to_dict(rec)
    key = data.draw(st.sampled_from(sorted(d)))
    d[key] = data.draw(json_garbage())
    with contextlib.suppress(CodecError):
        node_from_dict(d)


@given(wire_node_records(), st.data())
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
        ("generation", 2**63 - 1),  # int64, but not a start time: beyond MAX_COUNTER (2^53 - 1)
        ("version", 2**53),
        ("heartbeat", 2**53),
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
@given(st.lists(wire_node_records(), max_size=3, unique_by=lambda r: r.node_id))
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


# --- compact integer vectors ------------------------------------------------------------------------

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(st.lists(_INT64, max_size=50))
def test_int_vector_round_trip(values):
    s = encode_ints(values)
    assert decode_ints(s, len(values), "v") == values
    assert s.isascii() and orjson.loads(orjson.dumps(s)) == s  # nothing JSON has to escape


def test_int_vector_is_compact():
    assert len(encode_ints(range(-16, 16))) == 32  # one character each
    assert len(encode_ints([511, -512])) == 4
    assert len(encode_ints([2**63 - 1, -(2**63)])) == 26


@given(json_garbage(), st.integers(0, 20))
def test_int_vector_garbage_raises_only_codec_error(value, count):
    with contextlib.suppress(CodecError):
        decode_ints(value, count, "v")


@given(st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_!", max_size=60))
def test_int_vector_random_strings_raise_only_codec_error(s):
    with contextlib.suppress(CodecError):
        decode_ints(s, 5, "v", lo=0, hi=1000)


@pytest.mark.parametrize(
    ("text", "count", "lo", "match"),
    [
        (encode_ints([1, 2]), 3, -(2**63), "2 values, expected 3"),
        (encode_ints([1, 2, 3]), 2, -(2**63), "longer than|3 values"),
        (encode_ints([1])[:-1] + "-", 1, -(2**63), "ends inside"),  # a continuation char last
        ("A*", 2, -(2**63), "bad character"),
        ("-" * 14 + "A", 1, -(2**63), "longer than"),
        (encode_ints([-1]), 1, 0, "outside"),
    ],
)
def test_int_vector_bad_inputs(text, count, lo, match):
    with pytest.raises(CodecError, match=match):
        decode_ints(text, count, "v", lo=lo)


def test_int_vector_beyond_int64_refused():
    top = encode_ints([2**63 - 1])
    assert top[-1] == "P"  # 12 groups of 5 bits, then the top 4 bits of 2^64 - 2 (zigzag)
    with pytest.raises(CodecError, match="outside"):
        decode_ints(top[:-1] + "f", 1, "v")  # the top group made larger than an int64 allows
