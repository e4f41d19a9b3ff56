"""NodeRecord (and its DeviceRecord / ModelRecord parts) to and from JSON-able dicts.

Encoding is plain (`orjson`). Decoding treats its input as hostile: peers may be buggy, from another
version, or forged. Anything that is not exactly the expected shape (wrong types, missing fields,
out-of-range numbers, oversized strings or lists, bad JSON) raises `CodecError` and nothing else, so the
gossip handler can drop the record (or the message) and carry on.

The node dict is the one `GET /mesh/state` shows (see `mesh.fleet.records`), keyed `"id"` for the node
id, plus `"mesh"`, `"left"` and `"catalogue"` on the wire. `state_to_json` builds the whole `/mesh/state`
document (the agent's and the dashboard's fake agent's alike).

Compact gossip digests (`mesh.gossip`) carry vectors of integers as one short string (`encode_ints` /
`decode_ints`): each value zigzag-encoded (sign folded in) and written 5 bits per character, least
significant group first, in the URL-safe base64 alphabet; the first 32 characters end a value, the last 32
continue it. A value in -16..15 is one character, -512..511 two, with no separators and nothing JSON has
to escape. This is what makes a heartbeat vector for 100 nodes ~100-200 bytes instead of ~6 KB of
`[id, generation, version, heartbeat]` lists.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar, cast, get_args

import orjson

from helexa.engine.base import LoadPhase, ModelId
from helexa.mesh.fleet.records import (
    DeviceKind,
    DeviceRecord,
    Liveness,
    ModelRecord,
    ModelStatus,
    NodeId,
    NodeRecord,
)

__all__ = [
    "CodecError",
    "decode_ints",
    "decode_json",
    "device_from_dict",
    "device_to_dict",
    "dumps",
    "encode_ints",
    "model_from_dict",
    "model_to_dict",
    "node_from_dict",
    "node_to_dict",
    "state_to_json",
]

# Limits on what a peer may send. Generous for real fleets, small enough that garbage cannot balloon.
MAX_ID_CHARS = 128  # node ids
MAX_NAME_CHARS = 256  # names, addresses, model ids, engine names
MAX_TEXT_CHARS = 4096  # error messages
MAX_DEVICES = 64
MAX_MODELS = 256
MAX_ENGINES = 16
MAX_LABELS = 64
MAX_CATALOGUE_ENTRIES = 4096
MAX_CATALOGUE_ENTRY_BYTES = 64 * 1024
MAX_INT = 2**63 - 1  # memory sizes and other counts: int64 like everything else on the wire
# Generations (ms since the epoch), versions and heartbeats: at most 2^53 - 1, so that every value and its
# successor are exact in any JSON reader (JavaScript's safe integers) and far inside int64. A real
# generation is ~2^41 (the year 2025 in ms); nothing legitimate comes near the bound. A record beyond it
# does not decode, so no peer can make another hold (or answer with) a number the mesh cannot carry.
MAX_COUNTER = 2**53 - 1

_DEVICE_KINDS: frozenset[str] = frozenset(get_args(DeviceKind))
_MODEL_STATUSES: frozenset[str] = frozenset(get_args(ModelStatus))
_LOAD_PHASES: frozenset[str] = frozenset(get_args(LoadPhase))

T = TypeVar("T")


class CodecError(ValueError):
    """A peer sent something that is not a valid record or message."""


# --- encoding ---------------------------------------------------------------------------------------


def dumps(obj: object) -> bytes:
    """orjson encoding of JSON-able data (dicts from this module, lists, numbers, strings)."""
    return orjson.dumps(obj)


def device_to_dict(d: DeviceRecord) -> dict[str, object]:
    return {
        "name": d.name,
        "kind": d.kind,
        "model": d.model,
        "uuid": d.uuid,
        "memory_total_mb": d.memory_total_mb,
        "memory_free_mb": d.memory_free_mb,
        "utilization": d.utilization,
        "temperature_c": d.temperature_c,
        "compute_capability": d.compute_capability,
    }


def model_to_dict(m: ModelRecord) -> dict[str, object]:
    return {
        "id": m.id,
        "status": m.status,
        "engine": m.engine,
        "devices": list(m.devices),
        "memory_mb": m.memory_mb,
        "in_flight": m.in_flight,
        "queued": m.queued,
        "last_used": m.last_used,
        "progress": m.progress,
        "error": m.error,
        "tokens_per_s": m.tokens_per_s,
        "resident": m.resident,
        "requests_total": m.requests_total,
        "ttft_s": m.ttft_s,
        "phase": m.phase,
        "done_bytes": m.done_bytes,
        "total_bytes": m.total_bytes,
        "bytes_per_s": m.bytes_per_s,
        "eta_s": m.eta_s,  # derived (never read back)
    }


def node_to_dict(n: NodeRecord, *, with_catalogue: bool = True) -> dict[str, object]:
    """The wire form of a record (also the node entry of `/mesh/state`, minus `liveness`)."""
    out: dict[str, object] = {
        "id": n.node_id,
        "name": n.name,
        "address": n.address,
        "port": n.port,
        "generation": n.generation,
        "version": n.version,
        "heartbeat": n.heartbeat,
        "mesh": n.mesh,
        "agent_version": n.agent_version,
        "engines": list(n.engines),
        "labels": dict(n.labels),
        "draining": n.draining,
        "left": n.left,
        "devices": [device_to_dict(d) for d in n.devices],
        "models": [model_to_dict(m) for m in n.models],
    }
    if with_catalogue:
        out["catalogue"] = [dict(e) for e in n.catalogue]
    return out


# --- decoding ---------------------------------------------------------------------------------------


def decode_json(data: bytes | bytearray | memoryview | str, *, max_bytes: int | None = None) -> Any:
    """Parse JSON, mapping every failure (and oversize input) to `CodecError`."""
    if max_bytes is not None and len(data) > max_bytes:
        raise CodecError(f"message of {len(data)} bytes exceeds {max_bytes}")
    try:
        return orjson.loads(data)
    except (orjson.JSONDecodeError, TypeError, ValueError, RecursionError) as e:
        raise CodecError(f"invalid JSON: {e}") from None


def _obj(v: object, what: str) -> Mapping[str, Any]:
    if not isinstance(v, dict):
        raise CodecError(f"{what}: expected an object, got {type(v).__name__}")
    return cast(Mapping[str, Any], v)


def _get(d: Mapping[str, Any], key: str, what: str, *, required: bool) -> Any:
    if key not in d:
        if required:
            raise CodecError(f"{what}: missing field {key!r}")
        return None
    return d[key]


def _str(
    d: Mapping[str, Any],
    key: str,
    what: str,
    *,
    max_chars: int = MAX_NAME_CHARS,
    required: bool = True,
    default: str | None = None,
    nonempty: bool = False,
) -> str:
    v = _get(d, key, what, required=required)
    if v is None:
        if default is None:
            raise CodecError(f"{what}.{key}: must be a string")
        return default
    if not isinstance(v, str):
        raise CodecError(f"{what}.{key}: expected a string, got {type(v).__name__}")
    if len(v) > max_chars:
        raise CodecError(f"{what}.{key}: longer than {max_chars} characters")
    if nonempty and not v:
        raise CodecError(f"{what}.{key}: must not be empty")
    return v


def _opt_str(d: Mapping[str, Any], key: str, what: str, *, max_chars: int = MAX_NAME_CHARS) -> str | None:
    v = d.get(key)
    if v is None:
        return None
    return _str(d, key, what, max_chars=max_chars)


def _opt_int(d: Mapping[str, Any], key: str, what: str) -> int | None:
    return None if d.get(key) is None else _int(d, key, what)


def _int(
    d: Mapping[str, Any],
    key: str,
    what: str,
    *,
    lo: int = 0,
    hi: int = MAX_INT,
    required: bool = True,
    default: int = 0,
) -> int:
    v = _get(d, key, what, required=required)
    if v is None and not required:
        return default
    # bool is an int subclass; `true` is not a count.
    if not isinstance(v, int) or isinstance(v, bool):
        raise CodecError(f"{what}.{key}: expected an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise CodecError(f"{what}.{key}: {v} outside [{lo}, {hi}]")
    return v


def _float(
    d: Mapping[str, Any], key: str, what: str, *, lo: float, hi: float, required: bool = False
) -> float | None:
    v = _get(d, key, what, required=required)
    if v is None:
        return None
    if not isinstance(v, int | float) or isinstance(v, bool):
        raise CodecError(f"{what}.{key}: expected a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f) or not lo <= f <= hi:
        raise CodecError(f"{what}.{key}: {v!r} outside [{lo}, {hi}]")
    return f


def _bool(d: Mapping[str, Any], key: str, what: str, *, default: bool = False) -> bool:
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise CodecError(f"{what}.{key}: expected a boolean, got {type(v).__name__}")
    return v


def _list(d: Mapping[str, Any], key: str, what: str, *, max_items: int) -> list[Any]:
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise CodecError(f"{what}.{key}: expected a list, got {type(v).__name__}")
    if len(v) > max_items:
        raise CodecError(f"{what}.{key}: more than {max_items} items")
    return v


def _str_tuple(d: Mapping[str, Any], key: str, what: str, *, max_items: int) -> tuple[str, ...]:
    items = _list(d, key, what, max_items=max_items)
    for i, s in enumerate(items):
        if not isinstance(s, str) or len(s) > MAX_NAME_CHARS:
            raise CodecError(f"{what}.{key}[{i}]: expected a string of at most {MAX_NAME_CHARS} characters")
    return tuple(items)


def _each(items: Sequence[Any], what: str, fn: Callable[[object, str], T]) -> tuple[T, ...]:
    return tuple(fn(item, f"{what}[{i}]") for i, item in enumerate(items))


def device_from_dict(v: object, what: str = "device") -> DeviceRecord:
    d = _obj(v, what)
    kind = _str(d, "kind", what)
    if kind not in _DEVICE_KINDS:
        raise CodecError(f"{what}.kind: {kind!r} is not one of {sorted(_DEVICE_KINDS)}")
    return DeviceRecord(
        name=_str(d, "name", what, nonempty=True),
        kind=cast(DeviceKind, kind),
        model=_str(d, "model", what, required=False, default=""),
        uuid=_opt_str(d, "uuid", what),
        memory_total_mb=_int(d, "memory_total_mb", what),
        memory_free_mb=_int(d, "memory_free_mb", what),
        utilization=_float(d, "utilization", what, lo=0.0, hi=1.0),
        temperature_c=_float(d, "temperature_c", what, lo=-273.15, hi=1000.0),
        compute_capability=_opt_str(d, "compute_capability", what, max_chars=16),
    )


def model_from_dict(v: object, what: str = "model") -> ModelRecord:
    d = _obj(v, what)
    status = _str(d, "status", what)
    if status not in _MODEL_STATUSES:
        raise CodecError(f"{what}.status: {status!r} is not one of {sorted(_MODEL_STATUSES)}")
    return ModelRecord(
        id=ModelId(_str(d, "id", what, nonempty=True)),
        status=cast(ModelStatus, status),
        engine=_str(d, "engine", what, required=False, default=""),
        devices=_str_tuple(d, "devices", what, max_items=MAX_DEVICES),
        memory_mb=_int(d, "memory_mb", what, required=False),
        in_flight=_int(d, "in_flight", what, required=False),
        queued=_int(d, "queued", what, required=False),
        last_used=_float(d, "last_used", what, lo=0.0, hi=1e12) or 0.0,
        progress=_float(d, "progress", what, lo=0.0, hi=1.0),
        error=_opt_str(d, "error", what, max_chars=MAX_TEXT_CHARS),
        tokens_per_s=_float(d, "tokens_per_s", what, lo=0.0, hi=1e9),
        resident=_bool(d, "resident", what),
        requests_total=_int(d, "requests_total", what, required=False),
        ttft_s=_float(d, "ttft_s", what, lo=0.0, hi=1e6),
        phase=_phase(d, what),
        done_bytes=_opt_int(d, "done_bytes", what),
        total_bytes=_opt_int(d, "total_bytes", what),
        bytes_per_s=_float(d, "bytes_per_s", what, lo=0.0, hi=1e13),
    )


def _phase(d: Mapping[str, Any], what: str) -> str | None:
    phase = _opt_str(d, "phase", what)
    if phase is not None and phase not in _LOAD_PHASES:
        raise CodecError(f"{what}.phase: {phase!r} is not one of {sorted(_LOAD_PHASES)}")
    return phase


def _catalogue_entry(v: object, what: str) -> dict[str, object]:
    d = _obj(v, what)
    _str(d, "id", what, nonempty=True)
    _int(d, "version", what)
    try:
        size = len(orjson.dumps(d))
    except (orjson.JSONEncodeError, TypeError) as e:  # not JSON-able (only from a non-JSON caller)
        raise CodecError(f"{what}: {e}") from None
    if size > MAX_CATALOGUE_ENTRY_BYTES:
        raise CodecError(f"{what}: entry of {size} bytes exceeds {MAX_CATALOGUE_ENTRY_BYTES}")
    return dict(d)


def _labels(d: Mapping[str, Any], what: str) -> dict[str, str]:
    v = d.get("labels")
    if v is None:
        return {}
    labels = _obj(v, f"{what}.labels")
    if len(labels) > MAX_LABELS:
        raise CodecError(f"{what}.labels: more than {MAX_LABELS} labels")
    for k, val in labels.items():
        if not isinstance(val, str) or len(k) > MAX_NAME_CHARS or len(val) > MAX_NAME_CHARS:
            raise CodecError(f"{what}.labels[{k[:40]!r}]: expected a short string")
    return dict(labels)


def node_from_dict(v: object, what: str = "node") -> NodeRecord:
    """A `NodeRecord` from its wire dict; `CodecError` for anything malformed."""
    d = _obj(v, what)
    return NodeRecord(
        node_id=NodeId(_str(d, "id", what, max_chars=MAX_ID_CHARS, nonempty=True)),
        name=_str(d, "name", what),
        generation=_int(d, "generation", what, hi=MAX_COUNTER),
        version=_int(d, "version", what, hi=MAX_COUNTER),
        heartbeat=_int(d, "heartbeat", what, hi=MAX_COUNTER),
        address=_str(d, "address", what),
        port=_int(d, "port", what, hi=65535),
        mesh=_str(d, "mesh", what, required=False, default="default"),
        agent_version=_str(d, "agent_version", what, required=False, default="0.0.0"),
        engines=_str_tuple(d, "engines", what, max_items=MAX_ENGINES),
        labels=_labels(d, what),
        draining=_bool(d, "draining", what),
        left=_bool(d, "left", what),
        devices=_each(_list(d, "devices", what, max_items=MAX_DEVICES), f"{what}.devices", device_from_dict),
        models=_each(_list(d, "models", what, max_items=MAX_MODELS), f"{what}.models", model_from_dict),
        catalogue=_each(
            _list(d, "catalogue", what, max_items=MAX_CATALOGUE_ENTRIES),
            f"{what}.catalogue",
            _catalogue_entry,
        ),
    )


# --- compact integer vectors ------------------------------------------------------------------------

_INT_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_END = _INT_ALPHABET[:32]  # last 5-bit group of a value
_MORE = _INT_ALPHABET[32:]  # a 5-bit group with more to follow
_CHAR_GROUP: dict[str, tuple[int, bool]] = {c: (i % 32, i >= 32) for i, c in enumerate(_INT_ALPHABET)}
MAX_CHARS_PER_INT = 13  # 65 bits: every zigzagged int64
MIN_INT = -MAX_INT - 1


def encode_ints(values: Iterable[int]) -> str:
    """Signed int64 values as one string (zigzag, 5 bits per character, see the module docstring)."""
    out: list[str] = []
    for v in values:
        z = v << 1 if v >= 0 else (-v << 1) - 1
        while z >= 32:
            out.append(_MORE[z & 31])
            z >>= 5
        out.append(_END[z])
    return "".join(out)


def decode_ints(v: object, count: int, what: str, *, lo: int = MIN_INT, hi: int = MAX_INT) -> list[int]:
    """Exactly `count` values from `encode_ints`' string, each within [lo, hi]; `CodecError` otherwise."""
    if not isinstance(v, str):
        raise CodecError(f"{what}: expected a string, got {type(v).__name__}")
    if len(v) > count * MAX_CHARS_PER_INT:
        raise CodecError(f"{what}: longer than {count} values can be")
    out: list[int] = []
    z = shift = chars = 0
    for c in v:
        group = _CHAR_GROUP.get(c)
        if group is None:
            raise CodecError(f"{what}: bad character {c!r}")
        digit, more = group
        z |= digit << shift
        chars += 1
        if chars > MAX_CHARS_PER_INT:
            raise CodecError(f"{what}: value longer than {MAX_CHARS_PER_INT} characters")
        if more:
            shift += 5
            continue
        value = z >> 1 if not z & 1 else -((z + 1) >> 1)
        if not lo <= value <= hi:
            raise CodecError(f"{what}[{len(out)}]: {value} outside [{lo}, {hi}]")
        out.append(value)
        z = shift = chars = 0
    if chars:
        raise CodecError(f"{what}: ends inside a value")
    if len(out) != count:
        raise CodecError(f"{what}: {len(out)} values, expected {count}")
    return out


# --- /mesh/state ------------------------------------------------------------------------------------


def _locations(model_id: str, nodes: Sequence[tuple[NodeRecord, Liveness]]) -> list[dict[str, object]]:
    out: list[dict[str, object]] = []
    for node, liveness in nodes:
        if liveness in ("dead", "left"):
            continue
        m = node.model(model_id)
        if m is not None:
            out.append(
                {
                    "node": node.node_id,
                    "node_name": node.name,
                    "status": m.status,
                    "memory_mb": m.memory_mb,
                    "in_flight": m.in_flight,
                }
            )
    return out


def state_to_json(
    *,
    mesh: str,
    open_mesh: bool,
    self_id: NodeId,
    agent_version: str,
    nodes: Iterable[tuple[NodeRecord, Liveness]],
    catalogue: Iterable[Mapping[str, object]],
    feasible_on: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, object]:
    """The `GET /mesh/state` document (shape in `mesh.fleet.records`' docstring).

    `nodes`: every known record with its liveness as this agent sees it (own record included).
    `catalogue`: the mesh-wide catalogue (`mesh.fleet.merge.mesh_catalogue`), entries as dicts with "version".
    `feasible_on`: model id → node names where placement finds it feasible (from `catalogue.placement`);
    models missing from it get `[]`. `locations` is derived here from the node records (dead and left
    nodes excluded).
    """
    node_list = sorted(nodes, key=lambda nl: (nl[0].name, nl[0].node_id))
    node_dicts: list[dict[str, object]] = []
    for node, liveness in node_list:
        nd = node_to_dict(node, with_catalogue=False)
        nd["liveness"] = liveness
        node_dicts.append(nd)
    feasible = feasible_on or {}
    cat: list[dict[str, object]] = []
    for entry in catalogue:
        mid = str(entry.get("id", ""))
        e = dict(entry)
        e["feasible_on"] = list(feasible.get(mid, ()))
        e["locations"] = _locations(mid, node_list)
        cat.append(e)
    cat.sort(key=lambda e: str(e.get("id", "")))
    return {
        "mesh": mesh,
        "open": open_mesh,
        "self": self_id,
        "agent_version": agent_version,
        "nodes": node_dicts,
        "catalogue": cat,
    }
