"""Hypothesis strategies shared by the test suite (one documented module, as attrs keeps its own).

Add strategies for your area in a section of its own; keep each one small, composable and documented.

Catalogue
- `model_names()`            safe model ids / aliases (`org/name` and plain names).
- `toml_values()`            any value a TOML document (or a peer's JSON) could put in a field.
- `valid_entry_tables()`     raw `[[models]]` tables that validate (keys as in models.toml).
- `fuzzed_entry_tables()`    tables mixing known fields, misspelt keys and arbitrary values.
- `model_entries()`          validated `ModelEntry` objects (built through `catalogue.validate`).

Fleet (`mesh.fleet.records` shapes), consistent enough for placement
- `device_records()`         one device; `cpu` or `cuda:N`.
- `node_records()`           a node with devices and models on those devices.
- `fleets()`                 a list of nodes with unique ids and unique names.
- `placement_entries()`      entries sized to be interesting against `fleets()` (memory, devices, pins).

Sizes are drawn from small sets on purpose, so that "fits exactly", "fits after evicting" and "never
fits" all happen often.

Wire (what gossip carries: any valid record, fields drawn independently, for the codec and the merge)
- `wire_node_records()`      a valid `NodeRecord` from a small id space (so views collide).
- `views()`                  records keyed by their own id, as gossip holds them.
- `json_garbage()`           arbitrary JSON-able values, for robustness tests of the decoders.

Hostile gossip (what a stranger may push; `tests/gossip/test_hostile_gossip.py`)
- `hostile_numbers()`, `hostile_records()`, `hostile_messages()`: see their section.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from helexa.catalogue.entry import ModelEntry
from helexa.catalogue.validate import DEFAULTS_FIELDS, ENGINES, FIELDS, parse_entry
from helexa.engine.base import ModelId
from helexa.mesh.fleet.codec import node_to_dict
from helexa.mesh.fleet.records import DeviceRecord, ModelRecord, NodeId, NodeRecord

# Settings for property tests on this shared, busy machine: no per-example deadline (timings are noise
# here) and no "generation is slow" health check. Use as `@SHARED_MACHINE` above `@given`.
SHARED_MACHINE = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- catalogue -----------------------------------------------------------------------------------------

_ALNUM = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
_name_part = st.builds(
    lambda first, rest: first + rest.replace("..", "._"),
    st.sampled_from(_ALNUM),
    st.text(alphabet=_ALNUM + "_-.", max_size=12),
)


def repo_names() -> st.SearchStrategy[str]:
    """`org/name`, as Hugging Face repo ids are spelt."""
    return st.builds(lambda org, name: f"{org}/{name}", _name_part, _name_part)


def model_names() -> st.SearchStrategy[str]:
    """Safe names: `org/name` or a plain name, never containing `..`."""
    return st.one_of(_name_part, repo_names())


_json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)


def json_values() -> st.SearchStrategy[object]:
    """JSON-able values (what an entry's `options` may hold)."""
    return st.recursive(
        _json_scalars.filter(lambda v: v is not None),
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=8), children, max_size=4),
        ),
        max_leaves=12,
    )


def toml_values() -> st.SearchStrategy[object]:
    """Anything a TOML table or a gossiped dict might put in a field, well-formed or not."""
    scalars = st.one_of(
        _json_scalars,
        st.floats(),  # NaN and infinities included
        st.integers(),  # beyond 64 bits
        st.datetimes(),
        st.dates(),
        st.just(dt.time(12, 30)),
        st.sampled_from(["30m", "1h30m", "-1", "0", "lots", "", " x ", "a/..", "/abs", "builtin:demo"]),
    )
    return st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(st.text(max_size=8), children, max_size=4),
        ),
        max_leaves=10,
    )


def keep_alive_values() -> st.SearchStrategy[object]:
    return st.one_of(
        st.integers(min_value=-1, max_value=10**7),
        st.floats(min_value=0, max_value=1e7),
        st.sampled_from(["30m", "1h30m", "45s", "0", "-1", "1.5h", "500ms", "2d", "90"]),
    )


def defaults_tables() -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "temperature": st.one_of(st.floats(min_value=0, max_value=2), st.integers(0, 2)),
            "top_p": st.floats(min_value=0, max_value=1, exclude_min=True),
            "top_k": st.integers(min_value=0, max_value=200),
            "max_tokens": st.integers(min_value=1, max_value=100_000),
        },
    )


def valid_entry_tables(
    ids: st.SearchStrategy[str] | None = None,
    versions: st.SearchStrategy[int] | None = None,
    sources: st.SearchStrategy[str] | None = None,
) -> st.SearchStrategy[dict[str, object]]:
    """Raw tables that pass validation with `base_dir=None` (sources are repo ids, absolute paths,
    `builtin:` names, or absent for the fake engine)."""
    source_strategy = (
        sources
        if sources is not None
        else st.one_of(
            repo_names(),
            st.builds(lambda s: f"HF://{s}", repo_names()),
            st.builds(lambda s: f"/models/{s}", model_names()),
            st.just("builtin:demo"),
        )
    )

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, object]:
        table: dict[str, object] = {"id": draw(ids if ids is not None else model_names())}
        engine = draw(st.sampled_from(ENGINES))
        if engine == "fake" or draw(st.booleans()):
            table["engine"] = engine
        if engine != "fake" or draw(st.booleans()):
            table["source"] = draw(source_strategy)
        optional: dict[str, st.SearchStrategy[Any]] = {
            "revision": st.sampled_from(["main", "v1.0", "0123abc"]),
            "quant": st.sampled_from(["q4f16_1", "q0f16", "int8"]),
            "memory_mb": st.integers(min_value=0, max_value=200_000),
            "min_devices": st.integers(min_value=1, max_value=8),
            "min_device_memory_mb": st.integers(min_value=0, max_value=80_000),
            "pinned_on": st.lists(
                st.sampled_from(["beast", "benjy", "laptop", "n1"]), unique=True, max_size=3
            ),
            "resident": st.booleans(),
            "aliases": st.lists(model_names(), unique=True, max_size=3),
            "keep_alive": keep_alive_values(),
            "preload": st.booleans(),
            "context_length": st.integers(min_value=1, max_value=1_000_000),
            "defaults": defaults_tables(),
            "version": versions if versions is not None else st.integers(min_value=1, max_value=10**6),
            "options": st.dictionaries(st.text(max_size=8), json_values(), max_size=3),
        }
        for key, strategy in optional.items():
            if draw(st.booleans()):
                table[key] = draw(strategy)
        aliases = table.get("aliases")
        if isinstance(aliases, list):
            table["aliases"] = [a for a in aliases if a != table["id"]]
        return table

    return build()


def fuzzed_entry_tables() -> st.SearchStrategy[dict[Any, object]]:
    """Tables for "validation never raises": a valid table with some fields replaced by arbitrary values,
    unknown keys added, or an arbitrary dict outright."""
    keys = st.one_of(
        st.sampled_from(FIELDS), st.sampled_from(["tempreature", "memroy_mb", "", "ID"]), st.text()
    )

    @st.composite
    def mutated(draw: st.DrawFn) -> dict[Any, object]:
        table: dict[Any, object] = dict(draw(valid_entry_tables()))
        for _ in range(draw(st.integers(min_value=1, max_value=3))):
            table[draw(keys)] = draw(toml_values())
        if draw(st.booleans()) and table:
            table.pop(draw(st.sampled_from(sorted(table, key=repr))))
        if draw(st.booleans()):
            table["defaults"] = draw(
                st.dictionaries(st.sampled_from([*DEFAULTS_FIELDS, "seed"]), toml_values(), max_size=4)
            )
        return table

    return st.one_of(mutated(), st.dictionaries(keys, toml_values(), max_size=8))


def model_entries(
    ids: st.SearchStrategy[str] | None = None, versions: st.SearchStrategy[int] | None = None
) -> st.SearchStrategy[ModelEntry]:
    """Validated entries: `valid_entry_tables()` through `catalogue.validate.parse_entry`."""

    def parse(table: dict[str, object]) -> ModelEntry:
        entry, problems = parse_entry(table, file="strategy", index=1, base_dir=None)
        assert entry is not None, problems
        return entry

    return valid_entry_tables(ids=ids, versions=versions).map(parse)


# --- fleet ---------------------------------------------------------------------------------------------

MEMORY_SIZES_MB = (0, 500, 1_000, 4_000, 8_000, 12_000, 16_000, 24_000, 48_000)
NODE_IDS = tuple(f"n{i}" for i in range(1, 7))
NODE_NAMES = ("beast", "benjy", "laptop", "closet", "attic", "garage")
MODEL_IDS = ("m/a", "m/b", "m/c", "m/d", "m/e")


def device_records(name: str, kind: str) -> st.SearchStrategy[DeviceRecord]:
    """One device named `name` whose free memory never exceeds its total."""

    @st.composite
    def build(draw: st.DrawFn) -> DeviceRecord:
        total = draw(st.sampled_from(MEMORY_SIZES_MB[1:]))
        free = draw(st.sampled_from([m for m in (*MEMORY_SIZES_MB, total) if m <= total]))
        return DeviceRecord(
            name=name,
            kind="cuda" if kind == "cuda" else "cpu",
            model=kind,
            memory_total_mb=total,
            memory_free_mb=free,
        )

    return build()


def model_records(device_names: tuple[str, ...]) -> st.SearchStrategy[ModelRecord]:
    """A model on some of `device_names` (always at least one of them); mostly loaded and idle."""
    return st.builds(
        ModelRecord,
        id=st.sampled_from(MODEL_IDS).map(ModelId),
        status=st.sampled_from(["loaded", "loaded", "loaded", "loaded", "loading", "unloading", "failed"]),
        engine=st.just("transformers"),
        devices=st.lists(
            st.sampled_from(device_names), min_size=1, max_size=len(device_names), unique=True
        ).map(tuple),
        memory_mb=st.sampled_from(MEMORY_SIZES_MB),
        in_flight=st.sampled_from([0, 0, 0, 1, 3]),
        queued=st.sampled_from([0, 0, 0, 2]),
        last_used=st.floats(min_value=0, max_value=2_000),
        resident=st.sampled_from([False, False, True]),
    )


@st.composite
def node_records(draw: st.DrawFn, node_id: str | None = None, name: str | None = None) -> NodeRecord:
    """A node: CPU-only (one `cpu` device) or 1-4 GPUs (sometimes with a `cpu` device too), with models
    whose ids are unique on the node. Free memory is usually what the models leave (total minus their share
    minus some other use), sometimes an arbitrary sample, as live readings are."""
    gpus = draw(st.integers(min_value=0, max_value=4))
    devices = [draw(device_records(f"cuda:{i}", "cuda")) for i in range(gpus)]
    if gpus == 0 or draw(st.booleans()):
        devices.append(draw(device_records("cpu", "cpu")))
    names = tuple(d.name for d in devices)
    models = draw(st.lists(model_records(names), max_size=4, unique_by=lambda m: m.id))
    if draw(st.integers(min_value=0, max_value=3)):
        used: dict[str, int] = {}
        for m in models:
            for d in m.devices:
                used[d] = used.get(d, 0) + m.memory_mb // len(m.devices)
        other = draw(st.sampled_from([0, 0, 500, 4_000]))
        devices = [
            dataclasses.replace(d, memory_free_mb=max(0, d.memory_total_mb - used.get(d.name, 0) - other))
            for d in devices
        ]
    return NodeRecord(
        node_id=NodeId(node_id or draw(st.sampled_from(NODE_IDS))),
        name=name or draw(st.sampled_from(NODE_NAMES)),
        generation=1,
        version=1,
        heartbeat=0,
        address="10.0.0.1",
        port=31313,
        engines=draw(
            st.sampled_from(
                [(), ("transformers",), ("transformers",), ("mlc", "transformers"), ("mlc",), ("fake",)]
            )
        ),
        draining=draw(st.booleans()) and draw(st.booleans()),
        devices=tuple(devices),
        models=tuple(models),
    )


@st.composite
def fleets(draw: st.DrawFn, max_nodes: int = 5) -> list[NodeRecord]:
    """Nodes with unique ids and unique names."""
    count = draw(st.integers(min_value=0, max_value=max_nodes))
    ids = draw(st.permutations(NODE_IDS))[:count]
    names = draw(st.permutations(NODE_NAMES))[:count]
    return [draw(node_records(node_id=i, name=n)) for i, n in zip(ids, names, strict=True)]


def placement_entries(*, simple: bool = False) -> st.SearchStrategy[ModelEntry]:
    """Entries whose sizes, device needs, pins and engines make placement decisions interesting.
    `simple=True`: one device, any engine that runs everywhere, no pins (for eviction properties, where
    the interesting cases are about memory)."""
    if simple:
        return st.builds(
            ModelEntry,
            id=st.sampled_from(["m/new", "m/new", "m/new", MODEL_IDS[0]]).map(ModelId),
            source=st.just("org/model"),
            engine=st.sampled_from(["auto", "transformers"]),
            memory_mb=st.sampled_from(MEMORY_SIZES_MB),
        )
    return st.builds(
        ModelEntry,
        id=st.sampled_from(["m/new", "m/new", "m/new", MODEL_IDS[0]]).map(ModelId),
        source=st.just("org/model"),
        engine=st.sampled_from(ENGINES),
        memory_mb=st.sampled_from(MEMORY_SIZES_MB),
        min_devices=st.sampled_from([1, 1, 1, 2, 3]),
        min_device_memory_mb=st.sampled_from([0, 0, 8_000, 24_000]),
        pinned_on=st.one_of(
            st.just(()),
            st.lists(st.sampled_from([*NODE_IDS, *NODE_NAMES]), max_size=2, unique=True).map(tuple),
        ),
    )


@st.composite
def crowded_nodes_and_entries(draw: st.DrawFn) -> tuple[NodeRecord, ModelEntry]:
    """A node and an entry slightly too big for its freest device right now, so that whether it fits
    depends on which models can be evicted (the interesting case for `eviction_plan`)."""
    node = dataclasses.replace(draw(node_records()), draining=False, engines=("transformers",))
    entry = draw(placement_entries(simple=True))
    idle: dict[str, int] = {}  # memory held per device by models an eviction may take
    for m in node.models:
        if m.status == "loaded" and not m.in_flight and not m.queued and not m.resident and m.id != entry.id:
            for d in m.devices:
                idle[d] = idle.get(d, 0) + m.memory_mb // len(m.devices)
    roomy = [d for d in node.devices if idle.get(d.name, 0) > 0]
    if roomy:
        device = draw(st.sampled_from(roomy))
        extra = draw(st.integers(min_value=1, max_value=idle[device.name] + 1_000))
        entry = dataclasses.replace(entry, memory_mb=device.memory_free_mb + extra)
    elif node.devices:
        freest = max(d.memory_free_mb for d in node.devices)
        entry = dataclasses.replace(entry, memory_mb=freest + draw(st.sampled_from([1, 500, 4_000])))
    return node, entry


# --- wire (gossiped records) ----------------------------------------------------------------------------

_text = st.text(max_size=20)
_count = st.integers(min_value=0, max_value=2**40)
_finite = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def wire_devices() -> st.SearchStrategy[DeviceRecord]:
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


def wire_models() -> st.SearchStrategy[ModelRecord]:
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
        phase=st.none() | st.sampled_from(["resolving", "downloading", "converting", "loading", "warming"]),
        done_bytes=st.none() | _count,
        total_bytes=st.none() | _count,
        bytes_per_s=st.none() | st.floats(min_value=0, max_value=1e10, allow_nan=False),
    )


def wire_catalogue_entries() -> st.SearchStrategy[dict[str, object]]:
    return st.fixed_dictionaries(
        {
            "id": st.sampled_from(["helexa/demo", "Qwen/Qwen2.5-7B", "m3"]),
            "version": st.integers(1, 5),
            "memory_mb": st.integers(0, 1000),
        },
        optional={"removed": st.booleans()},
    )


_WIRE_NODE_IDS = st.sampled_from(["n1", "n2", "n3"])


def wire_node_records(node_ids: st.SearchStrategy[str] = _WIRE_NODE_IDS) -> st.SearchStrategy[NodeRecord]:
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
        devices=st.lists(wire_devices(), max_size=2).map(tuple),
        models=st.lists(wire_models(), max_size=2).map(tuple),
        catalogue=st.lists(wire_catalogue_entries(), max_size=2).map(tuple),
    )


def views() -> st.SearchStrategy[dict[NodeId, NodeRecord]]:
    """Views as gossip would hold them: records keyed by their own id (small id space → collisions)."""
    return st.lists(wire_node_records(), max_size=4).map(lambda rs: {r.node_id: r for r in rs})


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


# --- hostile gossip (what a stranger on an open mesh may send) ------------------------------------------
#
# - `hostile_numbers(now_ms)`     integers a forger picks: the int64 and 2^53 edges, start times far in the
#                                 future or just inside the allowed skew, negatives, and ordinary ones.
# - `hostile_records(ids, now_ms)` wire dicts (`node_to_dict` form) of valid records whose generation,
#                                 version and heartbeat are replaced by hostile numbers (ids from `ids`,
#                                 so they hit the honest nodes' own ids), sometimes claiming `left`.
# - `hostile_messages(ids, now_ms)` (kind, payload) pairs for a gossip responder: `push` / `full` with
#                                 hostile records, `syn` with hostile digests, `csyn` with hostile version
#                                 and heartbeat vectors (the test fills in the responder's membership hash),
#                                 or JSON garbage.

_HOUR_MS = 3_600_000


def hostile_numbers(now_ms: int) -> st.SearchStrategy[int]:
    edges = [0, 1, 2**31, 2**53 - 1, 2**53, 2**63 - 1, 2**63, 2**64, -1, -(2**63)]
    times = [now_ms, now_ms + 1, now_ms + _HOUR_MS - 1, now_ms + _HOUR_MS + 1, now_ms + 10 * 86_400_000]
    return st.one_of(
        st.sampled_from(edges + times),
        st.integers(min_value=0, max_value=10),
        st.integers(min_value=now_ms - _HOUR_MS, max_value=now_ms + 2 * _HOUR_MS),
        st.integers(min_value=-(2**65), max_value=2**65),
    )


def hostile_records(ids: st.SearchStrategy[str], now_ms: int) -> st.SearchStrategy[dict[str, object]]:
    numbers = hostile_numbers(now_ms)

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, object]:
        d = node_to_dict(draw(wire_node_records(node_ids=ids)))
        d["mesh"] = "default"
        for key in ("generation", "version", "heartbeat"):
            if draw(st.booleans()):
                d[key] = draw(numbers)
        return d

    return build()


def hostile_messages(ids: st.SearchStrategy[str], now_ms: int) -> st.SearchStrategy[tuple[str, object]]:
    numbers = hostile_numbers(now_ms)
    records = st.lists(hostile_records(ids, now_ms), min_size=1, max_size=3)
    digests = st.lists(st.tuples(ids, numbers, numbers, numbers).map(list), min_size=1, max_size=4)
    vectors = st.tuples(
        st.lists(numbers, min_size=2, max_size=2),  # versions (two honest nodes: two positions)
        st.lists(numbers, min_size=2, max_size=2),  # heartbeat residuals
        numbers,  # the reference time t
    )
    return st.one_of(
        st.tuples(st.sampled_from(["push", "full"]), records),
        st.tuples(st.just("syn"), digests),
        st.tuples(st.just("csyn"), vectors),
        st.tuples(st.just("garbage"), json_garbage()),
    )
