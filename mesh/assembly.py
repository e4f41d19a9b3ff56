"""The one composition root: build an agent's parts and its aiohttp application.

    agent = await build_agent(config)      # identity, hardware, catalogue (off the loop), every part wired
    app = make_app(agent)                  # routes, middleware, typed app state, background tasks

Wiring happens here and nowhere else: parts are handed what they need (values, callables), so imports
point one way, from here down. `build_app(config, engine_for=...)` is the same for tests (fake engine).
The app serves the OpenAI routes (`mesh.server.openai_routes`), the peer API (`mesh.server.peer_routes`,
HMAC-checked with a mesh key), the operator and fleet API (`mesh.server.operator_routes`) and forwards
remote decisions (`mesh.routing.forwarding`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Mapping, Sequence

import psutil
from aiohttp import web

from helexa.catalogue import store
from helexa.catalogue.entry import ModelEntry
from helexa.engine import registry
from helexa.engine.base import Engine
from helexa.mesh.agent import AGENT_VERSION, Agent
from helexa.mesh.config import AgentConfig
from helexa.mesh.fleet.catalogue import CatalogueView, LocalCatalogue
from helexa.mesh.fleet.records import DeviceRecord, NodeRecord
from helexa.mesh.fleet.view import Fleet
from helexa.mesh.gossip.auth import peer_auth_middleware
from helexa.mesh.hardware import Hardware, HardwareSnapshot
from helexa.mesh.identity import load_identity
from helexa.mesh.metrics import Metrics
from helexa.mesh.peering import MeshOptions, MeshRuntime
from helexa.mesh.routing.cortex import MeshCortex
from helexa.mesh.routing.forwarding import Forwarder
from helexa.mesh.routing.neuron import EngineFactory, HardwareDevices, Neuron, NeuronTiming
from helexa.mesh.server import appkeys
from helexa.mesh.server.headers import CorsPolicy, add_response_headers, cors_middleware
from helexa.mesh.server.middleware import error_middleware
from helexa.mesh.server.openai_routes import add_openai_routes
from helexa.mesh.server.operator_routes import add_operator_routes
from helexa.mesh.server.peer_routes import add_peer_routes
from helexa.mesh.server.responses_routes import add_responses_routes

log = logging.getLogger(__name__)

__all__ = ["build_agent", "build_app", "make_app"]

# The largest request body the agent reads (aiohttp answers 413 beyond it).
MAX_BODY_BYTES = 16 * 1024 * 1024


# --- catalogue ------------------------------------------------------------------------------------------


def _read_catalogue(config: AgentConfig) -> list[ModelEntry]:
    """Create the default catalogue if needed and read it (blocking; run off the loop). Never raises."""
    path = config.catalogue_path
    try:
        if config.catalogue_default:
            store.ensure_catalogue(path)
        catalogue = store.load_catalogue(path)
    except Exception as e:
        log.warning("cannot read the catalogue %s: %s; serving no models until it is fixed", path, e)
        return []
    entries = list(catalogue.entries)
    log.info("catalogue %s: %d model(s)", path, len(entries))
    return entries


def catalogue_dicts(entries: Sequence[ModelEntry]) -> tuple[dict[str, object], ...]:
    """Entries as plain dicts for this node's record (gossip carries them)."""
    return tuple(store.entry_to_dict(e) for e in entries)


# --- engines --------------------------------------------------------------------------------------------


def default_engine_factory(engines: Mapping[str, Engine] | None = None) -> EngineFactory:
    """Choose the engine for an entry with `engine.registry`; `engines` overrides instances by name."""
    cache: dict[str, Engine] = dict(engines or {})

    def engine_for(entry: ModelEntry, devices: tuple[DeviceRecord, ...]) -> Engine:
        has_cuda = any(d.kind == "cuda" for d in devices)
        name = registry.choose_engine(entry.engine, entry.source, has_cuda)
        if entry.task == "embed" and name == "mlc":
            name = "transformers"  # MLC serves causal LMs only
        # Embedding models have their own transformers engine; injected engines serve every task.
        key = f"{name}:embed" if entry.task == "embed" and name == "transformers" else name
        if key not in cache:
            cache[key] = registry.create_engine(name, entry.task)
        return cache[key]

    return engine_for


def _engine_names(snapshot: HardwareSnapshot) -> tuple[str, ...]:
    """Engines this node runs (placement filters on them): transformers always, mlc on CUDA hosts that
    have it (the scripted `fake` engine runs anywhere: placement does not filter it). With injected
    engines (in-process tests) the node publishes none, which placement does not filter."""
    names = ["transformers"]
    if snapshot.gpu_available and registry.mlc_available():
        names.insert(0, "mlc")
    return tuple(names)


# --- addresses ------------------------------------------------------------------------------------------


def advertise_address(config: AgentConfig) -> str:
    """The address peers should use: configured, else the bound one, else the first non-loopback IPv4."""
    if config.advertise_address:
        return config.advertise_address
    if config.host not in ("0.0.0.0", "::", ""):
        return config.host
    try:
        for addrs in psutil.net_if_addrs().values():
            for addr in addrs:
                if addr.family == socket.AF_INET and not addr.address.startswith("127."):
                    return str(addr.address)
    except Exception:  # pragma: no cover - psutil cannot fail here in practice
        pass
    return "127.0.0.1"


# --- the application ------------------------------------------------------------------------------------


async def build_agent(
    config: AgentConfig,
    *,
    engine_for: EngineFactory | None = None,
    engines: Mapping[str, Engine] | None = None,
    hardware: Hardware | None = None,
    catalogue: Sequence[ModelEntry] | None = None,
    port: int | None = None,
    neuron_timing: NeuronTiming | None = None,
    mesh_options: MeshOptions | None = None,
) -> Agent:
    """Assemble the agent's parts. Blocking reads (identity, first hardware sample, catalogue) run in
    worker threads. `catalogue` replaces reading the catalogue file (tests; catalogue edits then stay
    in memory)."""
    identity = await asyncio.to_thread(load_identity, config.state_dir)
    hw = hardware or Hardware()
    snapshot: HardwareSnapshot = await hw.sample()
    entries = list(catalogue) if catalogue is not None else await asyncio.to_thread(_read_catalogue, config)
    metrics = Metrics(node=config.name)
    neuron = Neuron(
        engine_for=engine_for or default_engine_factory(engines),
        devices=HardwareDevices(hw),
        node_name=config.name,
        node_id=identity.node_id,
        metrics=metrics,
        timing=neuron_timing,
        cache_dir=config.hf_cache_dir,
        gguf_cache_dir=config.state_dir / "gguf",
        gguf_cache_mb=config.gguf_cache_mb,
    )
    view = CatalogueView(entries)
    record = NodeRecord(
        node_id=identity.node_id,
        name=config.name,
        generation=identity.generation,
        version=1,
        heartbeat=0,
        address=advertise_address(config),
        port=config.port if port is None else port,
        mesh=config.mesh,
        agent_version=AGENT_VERSION,
        engines=_engine_names(snapshot) if engine_for is None and not engines else (),
        labels=dict(config.labels),
        devices=snapshot.devices,
        catalogue=catalogue_dicts(entries),
    )
    local = LocalCatalogue(entries, path=config.catalogue_path if catalogue is None else None)
    options = mesh_options or MeshOptions()
    fleet = Fleet(
        initial=record,
        models=neuron.records,
        devices=lambda: HardwareDevices(hw).devices(),
        catalogue=local.records,
        counts_interval_s=options.record_counts_interval_s,
    )
    neuron.on_change.append(fleet.mark_changed)
    cortex = MeshCortex(fleet=fleet, neuron=neuron, catalogue=view)
    mesh = MeshRuntime(
        own=fleet.self_record,
        fleet=fleet,
        neuron=neuron,
        cortex=cortex,
        view=view,
        local=local,
        metrics=metrics,
        mesh_key=config.mesh_key,
        api_keys=config.api_keys,
        model_roots=config.local_model_roots,
        static_peers=config.peers,
        mdns=config.mdns,
        options=options,
    )
    agent = Agent(
        config=config,
        identity=identity,
        hardware=hw,
        metrics=metrics,
        neuron=neuron,
        fleet=fleet,
        cortex=cortex,
        catalogue=view,
        mesh=mesh,
    )
    agent.drain_hooks.append(mesh.leave)

    def refresh_devices() -> None:
        # The sampler's last sample (every SAMPLE_INTERVAL_S, and after each load/unload): cached, so a
        # scrape never probes the hardware itself.
        if hw.last is not None:
            _record_devices(metrics, hw.last.devices)

    metrics.add_refresher(refresh_devices)
    return agent


def _record_devices(metrics: Metrics, devices: Sequence[DeviceRecord]) -> None:
    mib = 1024 * 1024
    for d in devices:
        metrics.set_device(
            device=d.name,
            used_bytes=(d.memory_total_mb - d.memory_free_mb) * mib,
            total_bytes=d.memory_total_mb * mib,
            utilization_ratio=d.utilization,
        )


def make_app(agent: Agent) -> web.Application:
    """The aiohttp application over an assembled agent: routes, middleware, state, background tasks."""
    cors = CorsPolicy(agent.config.cors_origins)
    app = web.Application(
        middlewares=[
            cors_middleware(cors),
            peer_auth_middleware(agent.mesh.auth, exempt=agent.mesh.unguarded_paths),
            error_middleware,
        ],
        client_max_size=MAX_BODY_BYTES,
    )
    add_response_headers(app, cors)
    app[appkeys.AGENT] = agent
    app[appkeys.CORTEX] = agent.cortex
    app[appkeys.METRICS] = agent.metrics
    app[appkeys.NODE_NAME] = agent.config.name
    app[appkeys.HEALTH] = agent.health
    app[appkeys.API_KEYS] = agent.config.api_keys
    mesh = agent.mesh
    forwarder: appkeys.Forwarder = Forwarder(
        session=lambda: mesh.http,
        auth=mesh.auth,
        prove_members=mesh.open,  # gossip is open: a record proves nothing, a signed hello does
        fleet=agent.fleet,
        cortex=agent.cortex,
        avoid_s=mesh.timing.dead_after_s * 2,  # long enough for the failure detector to be sure
    )
    app[appkeys.FORWARDER] = forwarder
    add_openai_routes(app)
    add_responses_routes(app)
    add_peer_routes(app, mesh.gossip)
    add_operator_routes(app, mesh.bus, keepalive_s=mesh.events_keepalive_s)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_end_event_streams)
    return app


async def _end_event_streams(app: web.Application) -> None:
    """End every `/mesh/events` stream when the server shuts down (after the drain, before aiohttp waits
    for open connections): an attached dashboard would otherwise hold the stop for the whole shutdown
    timeout, since the bus is closed only later, when the mesh stops (`cleanup_ctx`)."""
    app[appkeys.AGENT].mesh.bus.close()


async def _background(app: web.Application) -> AsyncIterator[None]:
    """Background loops for the app's lifetime: hardware sampler, keep-alive reaper, preloads."""
    agent = app[appkeys.AGENT]
    if agent.hardware.last is not None:
        _record_devices(agent.metrics, agent.hardware.last.devices)

    def on_hardware(snapshot: HardwareSnapshot) -> None:
        _record_devices(agent.metrics, snapshot.devices)
        agent.fleet.mark_changed()

    tasks = [
        asyncio.create_task(agent.hardware.run_sampler(on_hardware), name="hardware sampler"),
        asyncio.create_task(agent.neuron.run_reaper(), name="keep-alive reaper"),
    ]
    try:
        async with agent.mesh.running(advertise_address=agent.fleet.self_record.address):
            yield
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await agent.neuron.close()
        await asyncio.to_thread(agent.hardware.shutdown)


async def build_app(
    config: AgentConfig,
    *,
    engine_for: EngineFactory | None = None,
    engines: Mapping[str, Engine] | None = None,
    hardware: Hardware | None = None,
    catalogue: Sequence[ModelEntry] | None = None,
    neuron_timing: NeuronTiming | None = None,
    port: int | None = None,
    mesh_options: MeshOptions | None = None,
) -> web.Application:
    """Assemble an agent and its application (for tests: pass the fake engine as `engine_for`)."""
    agent = await build_agent(
        config,
        engine_for=engine_for,
        engines=engines,
        hardware=hardware,
        catalogue=catalogue,
        neuron_timing=neuron_timing,
        port=port,
        mesh_options=mesh_options,
    )
    return make_app(agent)
