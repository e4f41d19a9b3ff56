"""Feasibility and placement: pure functions over the fleet view (no I/O, no clock, no randomness).

The views are Protocols whose attribute names match `helexa.mesh.fleet.records` (`NodeRecord`,
`DeviceRecord`, `ModelRecord` satisfy them structurally), so the catalogue never imports the mesh.
Liveness is passed in as the set of routable node ids, because only the caller's failure detector knows
it.

Memory model:
- A model needs `memory_mb` (the catalogue's value, or a measured one passed as `memory_mb=`), split
  evenly over the `k` devices it uses: every chosen device must hold `ceil(memory_mb / k)`.
- *Feasible* (`feasible_devices`) compares with each device's total memory: it could run there if
  everything else were unloaded. *Fits now* compares with live free memory; *fits after eviction* adds the
  memory of idle (no in-flight, no queued), non-resident, loaded models back to their devices.
- Device kinds: `mlc` needs CUDA; the other engines prefer CUDA devices and fall back to a `cpu` device.
  `k` starts at `min_devices`; engines other than mlc (whose shard count is fixed when the model is
  compiled) may spread a model that fits no single device over more devices.
- A node that publishes its `engines` must run the entry's engine (`auto` = mlc or transformers; a node
  running only `fake` serves every entry, for tests). A node that publishes none is not filtered.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Protocol

from helexa.engine.base import ModelId

from .entry import ModelEntry

__all__ = [
    "DeviceView",
    "ModelView",
    "NodeView",
    "devices_fitting_now",
    "eviction_plan",
    "feasible_devices",
    "feasible_on",
    "infeasible_reason",
    "place",
]


class DeviceView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def memory_total_mb(self) -> int: ...
    @property
    def memory_free_mb(self) -> int: ...


class ModelView(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def status(self) -> str: ...
    @property
    def devices(self) -> Sequence[str]: ...
    @property
    def memory_mb(self) -> int: ...
    @property
    def in_flight(self) -> int: ...
    @property
    def queued(self) -> int: ...
    @property
    def last_used(self) -> float: ...
    @property
    def resident(self) -> bool: ...


class NodeView(Protocol):
    @property
    def node_id(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def engines(self) -> Sequence[str]: ...
    @property
    def draining(self) -> bool: ...
    @property
    def devices(self) -> Sequence[DeviceView]: ...
    @property
    def models(self) -> Sequence[ModelView]: ...


# --- feasibility ---------------------------------------------------------------------------------------


def _kinds(entry: ModelEntry, node: NodeView) -> tuple[str, ...]:
    """Device kinds the entry may use on this node, in order of preference ('' = none)."""
    engines = set(node.engines)
    if entry.engine == "fake":
        # The scripted engine ships with every agent (tests, demos, benchmarks): it runs anywhere.
        return ("cuda", "cpu")
    if entry.engine == "mlc":
        return ("cuda",) if not engines or "mlc" in engines else ()
    if not engines or "fake" in engines:
        return ("cuda", "cpu")
    if entry.engine == "transformers":
        return ("cuda", "cpu") if "transformers" in engines else ()
    # auto: mlc runs on CUDA only, transformers anywhere.
    if "transformers" in engines:
        return ("cuda", "cpu")
    return ("cuda",) if "mlc" in engines else ()


def _need(entry: ModelEntry, memory_mb: int | None) -> int:
    return max(0, entry.memory_mb if memory_mb is None else memory_mb)


def _choose(
    entry: ModelEntry,
    node: NodeView,
    need_mb: int,
    free_of: Callable[[DeviceView], int] | None,
) -> tuple[str, ...] | None:
    """The devices to use: per kind in preference order, the smallest `k >= min_devices` for which `k`
    devices each hold `ceil(need / k)` (in total memory, and in `free_of` when given); the `k` with the most
    free memory among those, ties by name."""
    for kind in _kinds(entry, node):
        devices = [
            d for d in node.devices if d.kind == kind and d.memory_total_mb >= entry.min_device_memory_mb
        ]
        devices.sort(key=lambda d: (-d.memory_free_mb, -d.memory_total_mb, d.name))
        k_max = entry.min_devices if entry.engine == "mlc" else len(devices)
        for k in range(entry.min_devices, k_max + 1):
            per_device = math.ceil(need_mb / k)
            usable = [
                d
                for d in devices
                if d.memory_total_mb >= per_device and (free_of is None or free_of(d) >= per_device)
            ]
            if len(usable) >= k:
                if free_of is not None:
                    usable.sort(key=lambda d: (-free_of(d), -d.memory_total_mb, d.name))
                return tuple(d.name for d in usable[:k])
    return None


def feasible_devices(
    entry: ModelEntry, node: NodeView, *, memory_mb: int | None = None
) -> tuple[str, ...] | None:
    """Devices the entry could use on `node` if nothing else were loaded, most free first; None when it can
    run there at all. `memory_mb` overrides `entry.memory_mb` (a measured value from a loaded copy)."""
    return _choose(entry, node, _need(entry, memory_mb), None)


def devices_fitting_now(
    entry: ModelEntry,
    node: NodeView,
    *,
    memory_mb: int | None = None,
    extra_free_mb: Mapping[str, int] | None = None,
) -> tuple[str, ...] | None:
    """Devices where the entry fits in live free memory now (plus `extra_free_mb` per device name, what an
    eviction would give back); None when it does not fit."""
    extra = extra_free_mb or {}
    return _choose(entry, node, _need(entry, memory_mb), lambda d: d.memory_free_mb + extra.get(d.name, 0))


def infeasible_reason(entry: ModelEntry, node: NodeView, *, memory_mb: int | None = None) -> str | None:
    """Why the entry can never run on `node` (human readable), or None when it can."""
    if feasible_devices(entry, node, memory_mb=memory_mb) is not None:
        return None
    kinds = _kinds(entry, node)
    if not kinds:
        runs = ", ".join(node.engines) or "none"
        return f"node {node.name} does not run the {entry.engine} engine (it runs: {runs})"
    candidates = [d for d in node.devices if d.kind in kinds]
    if not candidates:
        if kinds == ("cuda",):
            return f"the {entry.engine} engine needs a CUDA GPU and node {node.name} has none"
        return f"node {node.name} has no device"
    need = _need(entry, memory_mb)
    big_enough = [d for d in candidates if d.memory_total_mb >= entry.min_device_memory_mb]
    listing = ", ".join(f"{d.name} {d.memory_total_mb} MB" for d in sorted(candidates, key=lambda d: d.name))
    if len(big_enough) < entry.min_devices:
        return (
            f"needs {entry.min_devices} device(s) with at least {entry.min_device_memory_mb} MB each; "
            f"node {node.name} has {listing}"
        )
    return f"needs {need} MB over {entry.min_devices} or more device(s); node {node.name} has {listing}"


# --- eviction ------------------------------------------------------------------------------------------


def _evictable(entry: ModelEntry, node: NodeView) -> list[ModelView]:
    return [
        m
        for m in node.models
        if m.id != entry.id
        and m.status == "loaded"
        and m.in_flight == 0
        and m.queued == 0
        and not m.resident
        and m.memory_mb > 0
        and _owned_devices(m, node)
    ]


def _owned_devices(model: ModelView, node: NodeView) -> tuple[str, ...]:
    """The devices whose memory a model holds; a model that lists none on a one-device node holds that one."""
    names = {d.name for d in node.devices}
    listed = tuple(dict.fromkeys(n for n in model.devices if n in names))
    if listed:
        return listed
    return tuple(names) if len(names) == 1 else ()


def _freed_by(models: Iterable[ModelView], node: NodeView) -> dict[str, int]:
    freed: dict[str, int] = {}
    for model in models:
        owned = _owned_devices(model, node)
        for name in owned:
            freed[name] = freed.get(name, 0) + model.memory_mb // len(owned)
    return freed


def eviction_plan(
    entry: ModelEntry, node: NodeView, *, now: float, memory_mb: int | None = None
) -> tuple[ModelId, ...] | None:
    """Models to unload from `node` so the entry fits: `()` when it fits already (or is present there),
    None when it cannot fit even after evicting every candidate.

    Candidates are loaded models that are idle (no request in flight or queued) and not `resident`; the
    least recently used go first (idle time `now - last_used`, ties by id). After the greedy pass, models
    whose eviction turned out unnecessary are kept.
    """
    if node.draining or feasible_devices(entry, node, memory_mb=memory_mb) is None:
        return None
    if any(m.id == entry.id and m.status in ("loading", "loaded") for m in node.models):
        return ()
    if devices_fitting_now(entry, node, memory_mb=memory_mb) is not None:
        return ()
    order = sorted(_evictable(entry, node), key=lambda m: (-max(0.0, now - m.last_used), m.id))
    chosen: list[ModelView] = []
    for model in order:
        chosen.append(model)
        if devices_fitting_now(entry, node, memory_mb=memory_mb, extra_free_mb=_freed_by(chosen, node)):
            break
    else:
        return None
    # Keep anything the fit does not need, trying the most recently used first.
    for model in reversed(chosen[:-1]):
        trial = [m for m in chosen if m is not model]
        if devices_fitting_now(entry, node, memory_mb=memory_mb, extra_free_mb=_freed_by(trial, node)):
            chosen = trial
    return tuple(ModelId(m.id) for m in chosen)


def _fits_after_eviction(entry: ModelEntry, node: NodeView, memory_mb: int | None) -> bool:
    freed = _freed_by(_evictable(entry, node), node)
    return devices_fitting_now(entry, node, memory_mb=memory_mb, extra_free_mb=freed) is not None


# --- placement -----------------------------------------------------------------------------------------


def _pinned(entry: ModelEntry, node: NodeView) -> bool:
    return not entry.pinned_on or node.name in entry.pinned_on or node.node_id in entry.pinned_on


def _free_mb(entry: ModelEntry, node: NodeView) -> int:
    kinds = _kinds(entry, node)
    return sum(max(0, d.memory_free_mb) for d in node.devices if d.kind in kinds)


# Free memory within one band counts as equal when ranking nodes where a model fits nowhere yet.
FREE_MEMORY_BAND_MB = 4096


def _rendezvous(model_id: str, node_id: str) -> str:
    """A stable pseudo-random rank of a node for a model (highest-random-weight hashing)."""
    return hashlib.blake2b(f"{model_id}\0{node_id}".encode(), digest_size=8).hexdigest()


def place(
    entry: ModelEntry,
    nodes: Iterable[NodeView],
    *,
    routable: Collection[str],
    memory_mb: int | None = None,
) -> tuple[str, ...]:
    """Node ids to ask to load `entry`, best first (MISSION order, deterministic, independent of the order
    of `nodes`): only routable, non-draining nodes where it is feasible and, with `pinned_on`, only those
    nodes (by name or id); first where it fits in free memory now, then where it fits after evicting idle
    non-resident models, then the rest.

    Every agent must compute the same order from its own, slightly different view of the fleet (free memory
    moves all the time and reaches peers a gossip round late), or simultaneous first requests arriving at
    different agents start loads on different nodes. So within the first two groups the order is a
    rendezvous hash of (model id, node id), which no memory reading moves (and which spreads different
    models over the fleet); the last group, where only the roomiest node has a chance, orders by free
    memory in coarse bands (`FREE_MEMORY_BAND_MB`), then the hash."""
    ranked: dict[str, tuple[int, int, str, str]] = {}
    for node in nodes:
        if node.node_id not in routable or node.draining or not _pinned(entry, node):
            continue
        if feasible_devices(entry, node, memory_mb=memory_mb) is None:
            continue
        if devices_fitting_now(entry, node, memory_mb=memory_mb) is not None:
            tier = 0
        elif _fits_after_eviction(entry, node, memory_mb):
            tier = 1
        else:
            tier = 2
        band = -(_free_mb(entry, node) // FREE_MEMORY_BAND_MB) if tier == 2 else 0
        key = (tier, band, _rendezvous(entry.id, node.node_id), node.node_id)
        if node.node_id not in ranked or key < ranked[node.node_id]:
            ranked[node.node_id] = key
    return tuple(sorted(ranked, key=ranked.__getitem__))


def feasible_on(
    entry: ModelEntry,
    nodes: Iterable[NodeView],
    *,
    routable: Collection[str] | None = None,
    memory_mb: int | None = None,
) -> tuple[str, ...]:
    """Names of the nodes the entry could run on (honouring `pinned_on`, leaving out draining nodes),
    sorted; with `routable`, only those nodes. This is `feasible_on` of `GET /v1/models`."""
    names = {
        node.name
        for node in nodes
        if (routable is None or node.node_id in routable)
        and not node.draining
        and _pinned(entry, node)
        and feasible_devices(entry, node, memory_mb=memory_mb) is not None
    }
    return tuple(sorted(names))
