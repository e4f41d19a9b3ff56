"""What the dashboard shows, parsed from the agent's `/mesh/state` and `/mesh/events` JSON.

The wire shape is documented in `helexa.mesh.fleet.records`. Parsing here is forgiving: a missing or odd field
becomes a neutral default instead of an exception, because the dashboard must keep drawing while
agents of different versions share a mesh. Everything is frozen, so "did this change?" is `==`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

ConnectionState = Literal["connecting", "connected", "reconnecting"]


@dataclass(frozen=True, kw_only=True, slots=True)
class DeviceView:
    name: str
    kind: str
    model: str
    memory_total_mb: int
    memory_free_mb: int
    utilization: float | None = None  # 0..1
    temperature_c: float | None = None

    @property
    def memory_used_mb(self) -> int:
        return max(0, self.memory_total_mb - self.memory_free_mb)


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelView:
    id: str
    status: str  # loading|loaded|unloading|failed
    engine: str = ""
    devices: tuple[str, ...] = ()
    memory_mb: int = 0
    in_flight: int = 0
    queued: int = 0
    last_used: float = 0.0
    progress: float | None = None
    error: str | None = None
    tokens_per_s: float | None = None
    resident: bool = False
    # For the traffic view; None from agents that do not publish them.
    requests_total: int | None = None
    ttft_s: float | None = None
    # While loading: the phase, and while downloading the bytes, rate and time left.
    phase: str | None = None
    done_bytes: int | None = None
    total_bytes: int | None = None
    bytes_per_s: float | None = None
    eta_s: float | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class NodeView:
    id: str
    name: str
    address: str
    port: int
    generation: int  # ms since the epoch at the agent's start
    liveness: str  # alive|suspect|dead|left
    agent_version: str = ""
    draining: bool = False
    devices: tuple[DeviceView, ...] = ()
    models: tuple[ModelView, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class LocationView:
    node: str  # node id or name, as the agent sent it
    status: str
    memory_mb: int = 0
    in_flight: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class CatalogueEntryView:
    """One catalogue entry as the dashboard shows it (a row of the Catalogue tab)."""

    id: str
    aliases: tuple[str, ...] = ()
    pinned_on: tuple[str, ...] = ()
    feasible_on: tuple[str, ...] = ()
    locations: tuple[LocationView, ...] = ()
    resident: bool = False
    memory_mb: int = 0
    engine: str = "auto"


@dataclass(frozen=True, kw_only=True, slots=True)
class FleetState:
    mesh: str = "default"
    open: bool = True
    self_id: str = ""
    agent_version: str = ""
    nodes: tuple[NodeView, ...] = ()
    catalogue: tuple[CatalogueEntryView, ...] = ()

    def node_name(self, key: str) -> str:
        """A node's name from its id (or the key itself when it already is a name or unknown)."""
        for node in self.nodes:
            if key in (node.id, node.name):
                return node.name
        return key

    def entry(self, model_id: str) -> CatalogueEntryView | None:
        for entry in self.catalogue:
            if model_id == entry.id or model_id in entry.aliases:
                return entry
        return None


@dataclass(frozen=True, kw_only=True, slots=True)
class FleetEvent:
    type: str
    ts: float
    node: str | None = None
    model: str | None = None
    message: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ConnectionStatus:
    state: ConnectionState
    attempt: int = 0
    retry_in_s: float | None = None
    reason: str | None = None


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _int(value: Any, default: int = 0) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    return default


def _float_or_none(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _strs(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple):
        return tuple(str(v) for v in value)
    return ()


def _dicts(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, list):
        return [v for v in value if isinstance(v, Mapping)]
    return []


def parse_device(data: Mapping[str, Any]) -> DeviceView:
    return DeviceView(
        name=_str(data.get("name"), "?"),
        kind=_str(data.get("kind"), "cpu"),
        model=_str(data.get("model")),
        memory_total_mb=_int(data.get("memory_total_mb")),
        memory_free_mb=_int(data.get("memory_free_mb")),
        utilization=_float_or_none(data.get("utilization")),
        temperature_c=_float_or_none(data.get("temperature_c")),
    )


def parse_model(data: Mapping[str, Any]) -> ModelView:
    ttft_s = _float_or_none(data.get("ttft_s"))
    if ttft_s is None and (ttft_ms := _float_or_none(data.get("ttft_ms"))) is not None:
        ttft_s = ttft_ms / 1000.0
    requests = data.get("requests_total")
    return ModelView(
        id=_str(data.get("id"), "?"),
        status=_str(data.get("status"), "loaded"),
        engine=_str(data.get("engine")),
        devices=_strs(data.get("devices")),
        memory_mb=_int(data.get("memory_mb")),
        in_flight=_int(data.get("in_flight")),
        queued=_int(data.get("queued")),
        last_used=_float_or_none(data.get("last_used")) or 0.0,
        progress=_float_or_none(data.get("progress")),
        error=data.get("error") if isinstance(data.get("error"), str) else None,
        tokens_per_s=_float_or_none(data.get("tokens_per_s")),
        resident=bool(data.get("resident", False)),
        requests_total=_int(requests) if isinstance(requests, int) else None,
        ttft_s=ttft_s,
        phase=data.get("phase") if isinstance(data.get("phase"), str) else None,
        done_bytes=_int(data["done_bytes"]) if isinstance(data.get("done_bytes"), int) else None,
        total_bytes=_int(data["total_bytes"]) if isinstance(data.get("total_bytes"), int) else None,
        bytes_per_s=_float_or_none(data.get("bytes_per_s")),
        eta_s=_float_or_none(data.get("eta_s")),
    )


def parse_node(data: Mapping[str, Any]) -> NodeView:
    node_id = _str(data.get("id")) or _str(data.get("node_id"), "?")
    return NodeView(
        id=node_id,
        name=_str(data.get("name"), node_id),
        address=_str(data.get("address")),
        port=_int(data.get("port")),
        generation=_int(data.get("generation")),
        liveness=_str(data.get("liveness"), "alive"),
        agent_version=_str(data.get("agent_version")),
        draining=bool(data.get("draining", False)),
        devices=tuple(parse_device(d) for d in _dicts(data.get("devices"))),
        models=tuple(parse_model(m) for m in _dicts(data.get("models"))),
    )


def parse_entry(data: Mapping[str, Any]) -> CatalogueEntryView:
    return CatalogueEntryView(
        id=_str(data.get("id"), "?"),
        aliases=_strs(data.get("aliases")),
        pinned_on=_strs(data.get("pinned_on")),
        feasible_on=_strs(data.get("feasible_on")),
        locations=tuple(
            LocationView(
                node=_str(loc.get("node")) or _str(loc.get("node_name"), "?"),
                status=_str(loc.get("status"), "loaded"),
                memory_mb=_int(loc.get("memory_mb")),
                in_flight=_int(loc.get("in_flight")),
            )
            for loc in _dicts(data.get("locations"))
        ),
        resident=bool(data.get("resident", False)),
        memory_mb=_int(data.get("memory_mb")),
        engine=_str(data.get("engine"), "auto"),
    )


def parse_state(data: Mapping[str, Any]) -> FleetState:
    """`GET /mesh/state` JSON → `FleetState` (nodes sorted by name so rows stay put)."""
    nodes = sorted((parse_node(n) for n in _dicts(data.get("nodes"))), key=lambda n: (n.name, n.id))
    catalogue = sorted((parse_entry(e) for e in _dicts(data.get("catalogue"))), key=lambda e: e.id)
    return FleetState(
        mesh=_str(data.get("mesh"), "default"),
        open=bool(data.get("open", True)),
        self_id=_str(data.get("self")),
        agent_version=_str(data.get("agent_version")),
        nodes=tuple(nodes),
        catalogue=tuple(catalogue),
    )


def _megabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def transfer(done: int, total: int | None, bytes_per_s: float | None, eta_s: float | None) -> str:
    """A download in a few words: `41.0/98.4 MB 5.2 MB/s 11s left`."""
    text = f"{done / 1e6:.1f}/{_megabytes(total)}" if total else _megabytes(done)
    if bytes_per_s:
        text += f" {_megabytes(bytes_per_s)}/s"
    if eta_s is not None:
        text += f" {round(eta_s)}s left" if eta_s < 3600 else f" {eta_s / 3600:.1f}h left"
    return text


def _event_details(data: Mapping[str, Any]) -> str | None:
    """The short detail an agent's event carries besides its kind: load progress, how long a load took,
    why a model was unloaded (`operator`, `idle`, `evicted for X`)."""
    parts: list[str] = []
    progress = _float_or_none(data.get("progress"))
    if data.get("type") == "load_progress":
        if isinstance(data.get("phase"), str):
            parts.append(str(data["phase"]))
        if progress is not None:
            parts.append(f"{progress * 100:.0f}%")
        done, total = data.get("done_bytes"), data.get("total_bytes")
        if isinstance(done, int) and isinstance(total, int):
            parts.append(
                transfer(
                    done, total, _float_or_none(data.get("bytes_per_s")), _float_or_none(data.get("eta_s"))
                )
            )
    duration_s = _float_or_none(data.get("duration_s"))
    if duration_s is not None:
        parts.append(f"in {duration_s:.2f} s")
    if isinstance(data.get("reason"), str) and data["reason"]:
        parts.append(str(data["reason"]))
    return " ".join(parts) or None


def parse_event(data: Mapping[str, Any], *, default_type: str = "message", now_s: float = 0.0) -> FleetEvent:
    """One `/mesh/events` JSON object → `FleetEvent`.

    The agent (`helexa.mesh.fleet.events.Event.to_json`) sends `time` (unix seconds), `node` (the node's
    id) and `node_name`; the log shows the name. `ts` and a `node` that is a name or an object are
    accepted too.
    """
    node = data.get("node_name") or data.get("node")
    if isinstance(node, Mapping):
        node = node.get("name") or node.get("id")
    message = data.get("message")
    if message is None and isinstance(data.get("error"), str):
        message = data.get("error")
    if message is None:
        message = _event_details(data)
    ts = _float_or_none(data.get("ts"))
    if ts is None:
        ts = _float_or_none(data.get("time"))
    return FleetEvent(
        type=_str(data.get("type"), default_type),
        ts=ts or now_s,
        node=str(node) if node is not None else None,
        model=_str(data.get("model")) or None,
        message=str(message) if message is not None else None,
    )
