"""Where the dashboard's data comes from, and where its actions go.

`FleetSource` is the seam: `HttpFleetSource` talks to a real agent (polls `/mesh/state` about twice a
second, follows `/mesh/events`, reconnects by itself with back-off); `FakeFleetSource` simulates a fleet
of any size, deterministically (seeded, with an injectable clock), for tests, snapshots and the bench,
and records every operator call it receives. The fake holds agent records and builds its `/mesh/state`
with the agent's own `state_to_json`, so what it shows is what an agent would send.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import orjson

from helexa.catalogue.entry import ModelEntry
from helexa.catalogue.store import entry_to_dict
from helexa.engine.base import ModelId
from helexa.mesh.client import AgentClient, AgentError, AgentUnreachable
from helexa.mesh.fleet.codec import state_to_json
from helexa.mesh.fleet.records import DeviceRecord, Liveness, ModelRecord, ModelStatus, NodeId, NodeRecord

from .fleet import ConnectionStatus, FleetEvent, FleetState, parse_event, parse_state

logger = logging.getLogger(__name__)

# Twice a second is what an operator perceives as live; faster only costs the agent CPU.
POLL_INTERVAL_S = 0.5
# Reconnect back-off: quick first retry (an agent restart takes ~1 s), capped so a long outage is
# noticed within seconds of its end.
BACKOFF_INITIAL_S = 0.5
BACKOFF_MAX_S = 8.0


class OperatorError(Exception):
    """An operator action failed; the message is one line for the operator."""


class FleetSink(Protocol):
    """What a source feeds: the app implements it by posting messages to itself."""

    def on_fleet_state(self, state: FleetState) -> None: ...

    def on_fleet_event(self, event: FleetEvent) -> None: ...

    def on_connection(self, status: ConnectionStatus) -> None: ...


class FleetSource(Protocol):
    """A live fleet: `run` feeds a sink until cancelled; the other methods are operator actions."""

    @property
    def url(self) -> str: ...

    async def run(self, sink: FleetSink) -> None: ...

    async def load_model(self, model: str, node: str | None = None) -> str: ...

    async def unload_model(self, model: str, node: str | None = None) -> str: ...

    async def set_pinned(self, model: str, pinned_on: Sequence[str]) -> str: ...


def backoff_s(attempt: int, *, initial_s: float = BACKOFF_INITIAL_S, max_s: float = BACKOFF_MAX_S) -> float:
    """Delay before reconnect attempt `attempt` (1-based): doubling from `initial_s`, capped."""
    return float(min(max_s, initial_s * 2 ** max(0, attempt - 1)))


def _result_line(result: object, fallback: str) -> str:
    if isinstance(result, dict) and isinstance(result.get("message"), str):
        return str(result["message"])
    return fallback


class HttpFleetSource:
    """A real agent over HTTP."""

    def __init__(
        self,
        url: str,
        *,
        poll_interval_s: float = POLL_INTERVAL_S,
        backoff_initial_s: float = BACKOFF_INITIAL_S,
        backoff_max_s: float = BACKOFF_MAX_S,
        mesh_key: str | None = None,
    ) -> None:
        # The mesh key authorises the changing calls (load, unload, pin) on a keyed mesh.
        self._client = AgentClient(url, mesh_key=mesh_key)
        self._poll_interval_s = poll_interval_s
        self._backoff_initial_s = backoff_initial_s
        self._backoff_max_s = backoff_max_s

    @property
    def url(self) -> str:
        return self._client.url

    async def aclose(self) -> None:
        """Close the HTTP session (operator calls made outside `run` open one)."""
        await self._client.aclose()

    def _backoff(self, attempt: int) -> float:
        return backoff_s(attempt, initial_s=self._backoff_initial_s, max_s=self._backoff_max_s)

    async def run(self, sink: FleetSink) -> None:
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._poll(sink))
                tg.create_task(self._follow_events(sink))
        finally:
            await self._client.aclose()

    async def _poll(self, sink: FleetSink) -> None:
        sink.on_connection(ConnectionStatus(state="connecting"))
        attempt = 0
        last_body: bytes | None = None
        while True:
            try:
                body = await self._client.state_bytes()
                data = orjson.loads(body) if body != last_body else None
            except (AgentUnreachable, AgentError, orjson.JSONDecodeError) as exc:
                attempt += 1
                delay = self._backoff(attempt)
                level = logging.WARNING if attempt == 1 else logging.DEBUG
                logger.log(level, "agent state unavailable (attempt %d): %s", attempt, exc)
                sink.on_connection(
                    ConnectionStatus(state="reconnecting", attempt=attempt, retry_in_s=delay, reason=str(exc))
                )
                last_body = None
                await asyncio.sleep(delay)
                continue
            if attempt or last_body is None:
                sink.on_connection(ConnectionStatus(state="connected"))
            attempt = 0
            if data is not None and isinstance(data, dict):
                last_body = body
                sink.on_fleet_state(parse_state(data))
            await asyncio.sleep(self._poll_interval_s)

    async def _follow_events(self, sink: FleetSink) -> None:
        attempt = 0
        while True:
            try:
                async for data in self._client.events():
                    attempt = 0
                    sink.on_fleet_event(parse_event(data, now_s=time.time()))
            except (AgentUnreachable, AgentError) as exc:
                logger.debug("event stream: %s", exc)
            attempt += 1
            await asyncio.sleep(self._backoff(attempt))

    async def load_model(self, model: str, node: str | None = None) -> str:
        try:
            result = await self._client.load(model, node)
        except (AgentError, AgentUnreachable) as exc:
            raise OperatorError(f"load {model}: {exc}") from exc
        return _result_line(result, f"load {model} requested" + (f" on {node}" if node else ""))

    async def unload_model(self, model: str, node: str | None = None) -> str:
        try:
            result = await self._client.unload(model, node)
        except (AgentError, AgentUnreachable) as exc:
            raise OperatorError(f"unload {model}: {exc}") from exc
        return _result_line(result, f"unload {model} requested" + (f" on {node}" if node else ""))

    async def set_pinned(self, model: str, pinned_on: Sequence[str]) -> str:
        try:
            result = await self._client.set_pinned(model, pinned_on)
        except (AgentError, AgentUnreachable) as exc:
            raise OperatorError(f"pin {model}: {exc}") from exc
        where = ", ".join(pinned_on) if pinned_on else "nowhere (unpinned)"
        return _result_line(result, f"{model} pinned on {where}")


# --- the fake fleet ----------------------------------------------------------------------------

FIXED_CLOCK_S = 1_767_225_600.0  # 2026-01-01T00:00:00Z: snapshots use this so ages never drift

OperatorOp = Literal["load", "unload", "pin"]


@dataclass(frozen=True, kw_only=True, slots=True)
class OperatorCall:
    """One operator action the fake received (tests assert on these)."""

    op: OperatorOp
    model: str
    node: str | None = None
    pinned_on: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True, slots=True)
class _FakeModelSpec:
    id: str
    memory_mb: int
    aliases: tuple[str, ...] = ()
    min_devices: int = 1
    cpu_ok: bool = False


_FAKE_CATALOGUE = (
    _FakeModelSpec(id="helexa/demo", memory_mb=60, aliases=("demo",), cpu_ok=True),
    _FakeModelSpec(id="Qwen/Qwen2.5-0.5B-Instruct", memory_mb=1_400, aliases=("qwen-0.5b",)),
    _FakeModelSpec(id="Qwen/Qwen2.5-7B-Instruct", memory_mb=16_500, aliases=("qwen",)),
    _FakeModelSpec(id="meta-llama/Llama-3.1-8B-Instruct", memory_mb=17_800, aliases=("llama",)),
    _FakeModelSpec(id="mistralai/Mistral-Small-24B-Instruct", memory_mb=50_000, min_devices=2),
)

_GPU_MODELS = (
    ("NVIDIA GeForce RTX 5090", 32_607),
    ("NVIDIA GeForce RTX 4090", 24_564),
    ("NVIDIA GeForce RTX 3060", 12_288),
    ("NVIDIA H100 80GB HBM3", 81_559),
)
_SMALL_NAMES = ("beast", "benjy", "closet", "laptop")
_AGENT_VERSION = "0.1.0"


@dataclass(kw_only=True, slots=True)
class _FakeNode:
    """One simulated agent: its own record (models kept apart, by id) and its liveness as seen by the
    agent the dashboard watches."""

    record: NodeRecord
    liveness: Liveness = "alive"
    models: dict[str, ModelRecord] = field(default_factory=dict)


class FakeFleetSource:
    """A simulated fleet: `nodes` hosts with `gpus_per_node` GPUs each (0 = CPU-only).

    The fleet is held as the agent holds it (`NodeRecord`s, their liveness, catalogue entries) and shown
    through the agent's own `/mesh/state` builder (`wire_state`) and the dashboard's parser (`snapshot`),
    so the fake and a real agent cannot drift apart.

    With `interval_s` set, `run` advances the simulation every `interval_s` (utilisation, memory,
    temperature and decode rates drift on every device, loads progress). With `interval_s=None` it
    only publishes when a test calls `tick()`, `kill_node()` etc., so snapshots are stable.
    """

    def __init__(
        self,
        *,
        nodes: int = 3,
        gpus_per_node: int = 2,
        seed: int = 0,
        interval_s: float | None = None,
        clock: Callable[[], float] = lambda: FIXED_CLOCK_S,
        mesh: str = "default",
        open_mesh: bool = False,
        url: str = "fake://fleet",
        load_steps: int = 4,
    ) -> None:
        self._rng = random.Random(seed)
        self._clock = clock
        self._interval_s = interval_s
        self._url = url
        self._mesh = mesh
        self._open = open_mesh
        self._load_steps = max(1, load_steps)
        self._sink: FleetSink | None = None
        self.calls: list[OperatorCall] = []
        self.fail_next: str | None = None  # the next operator call fails with this message
        self._pinned: dict[str, tuple[str, ...]] = {}
        self._catalogue_versions: dict[str, int] = {}  # grows with every pin edit, as the agent's does
        self._nodes: list[_FakeNode] = []
        self._ticks = 0
        now = clock()
        for i in range(nodes):
            node_id = NodeId(f"node-{i:03d}")
            name = _SMALL_NAMES[i] if nodes <= len(_SMALL_NAMES) else f"gpu-{i + 1:02d}"
            gpu_name, gpu_mb = _GPU_MODELS[i % len(_GPU_MODELS)]
            count = gpus_per_node if not (nodes <= len(_SMALL_NAMES) and name == "laptop") else 0
            devices: tuple[DeviceRecord, ...]
            if count:
                devices = tuple(
                    DeviceRecord(
                        name=f"cuda:{d}",
                        kind="cuda",
                        model=gpu_name,
                        uuid=f"GPU-{node_id}-cuda:{d}",
                        memory_total_mb=gpu_mb,
                        memory_free_mb=gpu_mb - 600,
                        utilization=0.0,
                        temperature_c=float(35 + (i + d) % 10),
                        compute_capability="8.9",
                    )
                    for d in range(count)
                )
            else:
                devices = (
                    DeviceRecord(
                        name="cpu",
                        kind="cpu",
                        model="AMD Ryzen 7 7840U",
                        memory_total_mb=32_000,
                        memory_free_mb=20_000,
                        utilization=0.05,
                    ),
                )
            record = NodeRecord(
                node_id=node_id,
                name=name,
                address=f"10.0.{i // 250}.{i % 250 + 10}",
                port=31313,
                generation=int((now - 3600 * (i % 7 + 1) - 61 * i) * 1000),
                version=1,
                heartbeat=0,
                mesh=mesh,
                agent_version=_AGENT_VERSION,
                engines=("mlc", "transformers"),
                devices=devices,
            )
            self._nodes.append(_FakeNode(record=record))
        # A starting population: a model or two per GPU node, deterministic.
        for i, node in enumerate(self._nodes):
            if node.record.devices[0].kind == "cpu":
                self._put_model(node, "helexa/demo", "loaded")
                continue
            spec = _FAKE_CATALOGUE[1 + i % 3]
            if self._fits(node, spec):
                self._put_model(node, spec.id, "loaded")

    # --- simulation ---

    @property
    def url(self) -> str:
        return self._url

    def _fits(self, node: _FakeNode, spec: _FakeModelSpec) -> bool:
        gpus = [d for d in node.record.devices if d.kind == "cuda"]
        if not gpus:
            return spec.cpu_ok
        per_device = spec.memory_mb / spec.min_devices
        return len(gpus) >= spec.min_devices and max(d.memory_total_mb for d in gpus) >= per_device

    def _put_model(
        self, node: _FakeNode, model_id: str, status: ModelStatus, progress: float | None = None
    ) -> None:
        spec = next(s for s in _FAKE_CATALOGUE if s.id == model_id)
        devices = tuple(d.name for d in node.record.devices[: spec.min_devices])
        node.models[model_id] = ModelRecord(
            id=ModelId(model_id),
            status=status,
            engine="transformers" if devices == ("cpu",) else "mlc",
            devices=devices,
            memory_mb=spec.memory_mb,
            progress=progress,
            tokens_per_s=None if status != "loaded" else 0.0,
            last_used=self._clock() - 30,
        )

    def _node(self, key: str | None) -> _FakeNode | None:
        for node in self._nodes:
            if key in (node.record.node_id, node.record.name):
                return node
        return None

    def _emit_event(
        self, type_: str, node: str | None = None, model: str | None = None, message: str | None = None
    ) -> None:
        if self._sink is not None:
            self._sink.on_fleet_event(
                FleetEvent(type=type_, ts=self._clock(), node=node, model=model, message=message)
            )

    def _catalogue_entry(self, spec: _FakeModelSpec) -> dict[str, object]:
        entry = ModelEntry(
            id=ModelId(spec.id),
            source=spec.id,
            memory_mb=spec.memory_mb,
            min_devices=spec.min_devices,
            aliases=spec.aliases,
            pinned_on=self._pinned.get(spec.id, ()),
            version=self._catalogue_versions.get(spec.id, 1),
        )
        return entry_to_dict(entry)

    def wire_state(self) -> dict[str, Any]:
        """The current state as an agent's `GET /mesh/state` JSON document, built by the agent's own
        `state_to_json` from the fake's records (shape in `helexa.mesh.fleet.records`).

        What `fake_agent_app` serves, so that the dashboard parses real JSON as it does in production.
        """
        heartbeat = self._ticks
        nodes = [
            (
                replace(
                    n.record,
                    version=heartbeat + 1,
                    heartbeat=heartbeat,
                    left=n.liveness == "left",
                    models=tuple(n.models[k] for k in sorted(n.models)),
                ),
                n.liveness,
            )
            for n in self._nodes
        ]
        feasible_on = {
            spec.id: [n.record.name for n in self._nodes if n.liveness == "alive" and self._fits(n, spec)]
            for spec in _FAKE_CATALOGUE
        }
        return state_to_json(
            mesh=self._mesh,
            open_mesh=self._open,
            self_id=self._nodes[0].record.node_id if self._nodes else NodeId(""),
            agent_version=_AGENT_VERSION,
            nodes=nodes,
            catalogue=[self._catalogue_entry(spec) for spec in _FAKE_CATALOGUE],
            feasible_on=feasible_on,
        )

    def snapshot(self) -> FleetState:
        """The current state as the dashboard sees it: `wire_state()` through the dashboard's parser."""
        return parse_state(self.wire_state())

    def publish(self) -> None:
        if self._sink is not None:
            self._sink.on_fleet_state(self.snapshot())

    def tick(self) -> None:
        """Advance the simulation one step and publish it."""
        self._ticks += 1
        rng = self._rng
        for node in self._nodes:
            if node.liveness != "alive":
                continue
            busy = 0.0
            for model_id, m in list(node.models.items()):
                if m.status == "loading":
                    progress = min(1.0, (m.progress or 0.0) + 1.0 / self._load_steps)
                    if progress >= 1.0:
                        node.models[model_id] = replace(m, status="loaded", progress=None, tokens_per_s=0.0)
                        self._emit_event("load_done", node.record.name, model_id)
                    else:
                        node.models[model_id] = replace(m, progress=progress)
                elif m.status == "loaded":
                    in_flight = max(0, min(8, m.in_flight + rng.choice((-1, 0, 0, 1))))
                    tps = round(in_flight * rng.uniform(30.0, 45.0), 1)
                    node.models[model_id] = replace(
                        m,
                        in_flight=in_flight,
                        queued=max(0, in_flight - 6),
                        tokens_per_s=tps,
                        last_used=self._clock() if in_flight else m.last_used,
                        # Each request in flight is taken to finish within the step.
                        requests_total=m.requests_total + in_flight,
                    )
                    busy += in_flight / 8
            used_by_models = sum(m.memory_mb for m in node.models.values())
            devices = []
            for d in node.record.devices:
                share = used_by_models / max(1, len(node.record.devices))
                util = max(0.0, min(1.0, busy + rng.uniform(-0.05, 0.05)))
                temp = None
                if d.temperature_c is not None:
                    temp = max(30.0, min(90.0, d.temperature_c + rng.choice((-1.0, 0.0, 1.0))))
                free = int(max(0, d.memory_total_mb - 600 - share - rng.randint(0, 64)))
                devices.append(
                    replace(
                        d,
                        utilization=round(util, 2),
                        temperature_c=temp,
                        memory_free_mb=free,
                    )
                )
            node.record = replace(node.record, devices=tuple(devices))
        self.publish()

    def kill_node(self, name: str, liveness: Liveness = "dead") -> None:
        node = self._node(name)
        if node is None:
            raise KeyError(name)
        node.liveness = liveness
        self._emit_event(liveness, node.record.name, message=f"{node.record.name} is {liveness}")
        self.publish()

    async def run(self, sink: FleetSink) -> None:
        self._sink = sink
        try:
            sink.on_connection(ConnectionStatus(state="connected"))
            for node in self._nodes:
                self._emit_event("join", node.record.name, message=f"{node.record.name} joined")
            self.publish()
            interval_s = self._interval_s
            if interval_s is None:
                await asyncio.Event().wait()
                return
            while True:
                await asyncio.sleep(interval_s)
                self.tick()
        finally:
            self._sink = None

    # --- operator actions (recorded) ---

    def _check_fail(self) -> None:
        if self.fail_next is not None:
            message, self.fail_next = self.fail_next, None
            raise OperatorError(message)

    def _spec(self, model: str) -> _FakeModelSpec:
        for spec in _FAKE_CATALOGUE:
            if model == spec.id or model in spec.aliases:
                return spec
        raise OperatorError(f"model {model!r} is not in the catalogue (model_not_found, HTTP 404)")

    async def load_model(self, model: str, node: str | None = None) -> str:
        self.calls.append(OperatorCall(op="load", model=model, node=node))
        self._check_fail()
        spec = self._spec(model)
        if node is not None:
            target = self._node(node)
            if target is None:
                raise OperatorError(f"no node named {node!r} (node_not_found, HTTP 404)")
        else:
            candidates = [n for n in self._nodes if n.liveness == "alive" and self._fits(n, spec)]
            target = next((n for n in candidates if spec.id not in n.models), None)
            if target is None:
                raise OperatorError(f"{spec.id} fits on no live node (model_unavailable, HTTP 503)")
        if spec.id not in target.models:
            self._put_model(target, spec.id, "loading", progress=0.0)
            self._emit_event("load_started", target.record.name, spec.id)
            self.publish()
        return f"loading {spec.id} on {target.record.name}"

    async def unload_model(self, model: str, node: str | None = None) -> str:
        self.calls.append(OperatorCall(op="unload", model=model, node=node))
        self._check_fail()
        spec = self._spec(model)
        targets = [
            n for n in self._nodes if spec.id in n.models and node in (None, n.record.name, n.record.node_id)
        ]
        if not targets:
            raise OperatorError(f"{spec.id} is not loaded" + (f" on {node}" if node else "") + " (HTTP 404)")
        for target in targets:
            del target.models[spec.id]
            self._emit_event("unload", target.record.name, spec.id)
        self.publish()
        return f"unloaded {spec.id} from " + ", ".join(t.record.name for t in targets)

    async def set_pinned(self, model: str, pinned_on: Sequence[str]) -> str:
        self.calls.append(OperatorCall(op="pin", model=model, pinned_on=tuple(pinned_on)))
        self._check_fail()
        spec = self._spec(model)
        self._pinned[spec.id] = tuple(pinned_on)
        self._catalogue_versions[spec.id] = self._catalogue_versions.get(spec.id, 1) + 1
        self.publish()
        return f"{spec.id} pinned on {', '.join(pinned_on)}" if pinned_on else f"{spec.id} unpinned"
