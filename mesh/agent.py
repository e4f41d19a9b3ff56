"""`helexa agent`: run this host's agent.

Start-up order (LESSONS: loading before binding made hosts look down for minutes):

1. parse the configuration (a bad value: one line on stderr, exit status 2);
2. **bind the port** (the socket listens at once: early clients queue in the backlog);
3. off the event loop: node identity, a first hardware sample, the catalogue (`ensure_catalogue`, then
   `load_catalogue`; problems are warnings, never fatal);
4. build the aiohttp application (error middleware, the OpenAI routes, typed app state) and serve it;
5. in the background (`cleanup_ctx`): the hardware sampler, the keep-alive reaper, and the mesh
   (`mesh.runtime.MeshRuntime`: gossip, mDNS discovery, the event bus, preloads placed on one node).

The app serves the OpenAI routes (`mesh.server`), the peer API (`mesh.peer_api`, HMAC-checked with a mesh
key), the operator and fleet API (`mesh.operator_api`) and forwards remote decisions (`mesh.forwarding`).

SIGINT/SIGTERM stop admitting work, run the drain hooks (`Agent.drain`, bounded by `drain_timeout_s`;
the mesh's graceful leave is one: peers mark this node `left` at once) and exit. Heavy libraries (torch)
are imported only when a model loads, so an idle agent stays small and starts in well under two seconds.

`build_app(config, engine_for=...)` assembles the same application for tests (with the fake engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from helexa.catalogue.entry import ModelEntry
from helexa.engine.base import Engine
from helexa.mesh.config import AgentConfig, ConfigError, load_config
from helexa.mesh.fleet.records import DeviceRecord, NodeRecord
from helexa.mesh.fleet.view import Fleet
from helexa.mesh.hardware import Hardware, HardwareSnapshot
from helexa.mesh.identity import Identity, load_identity
from helexa.mesh.metrics import Metrics
from helexa.mesh.peering import LocalCatalogue, MeshOptions, MeshRuntime
from helexa.mesh.routing.cortex import CatalogueView, MeshCortex
from helexa.mesh.routing.neuron import EngineFactory, HardwareDevices, Neuron, NeuronTiming
from helexa.mesh.server import appkeys

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
# aiohttp's own bound on closing connections at shutdown. Streams were given `drain_timeout_s` before
# this point; what remains is cut quickly so a stop never ends in SIGKILL.
SHUTDOWN_TIMEOUT_S = 3.0


@dataclass(kw_only=True)
class Agent:
    """Everything one running agent is made of (held in the app under `AGENT`)."""

    config: AgentConfig
    identity: Identity
    hardware: Hardware
    metrics: Metrics
    neuron: Neuron
    fleet: Fleet
    cortex: MeshCortex
    catalogue: CatalogueView
    mesh: MeshRuntime
    started_at: float = field(default_factory=time.monotonic)
    draining: bool = False
    # Hooks run (in order) when the agent starts draining; the mesh adds its graceful leave here.
    drain_hooks: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    def health(self) -> Mapping[str, object]:
        """`/healthz` body from cached state only."""
        records = self.neuron.records()
        return {
            "status": "draining" if self.draining else "ok",
            "node": self.config.name,
            "node_id": self.identity.node_id,
            "generation": self.identity.generation,
            "models_loaded": sum(1 for r in records if r.status == "loaded"),
            "models_loading": sum(1 for r in records if r.status == "loading"),
            "uptime_s": round(time.monotonic() - self.started_at, 3),
        }

    async def drain(self) -> None:
        """Stop admitting work and let what runs finish (bounded). Called once, on SIGTERM/SIGINT."""
        if self.draining:
            return
        self.draining = True
        self.fleet.set_draining(True)
        log.info("draining (at most %.0f s)", self.config.drain_timeout_s)
        for hook in list(self.drain_hooks):
            try:
                await hook()
            except Exception:
                log.exception("drain hook failed")
        # Let requests in flight finish, bounded by drain_timeout_s.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.drain_timeout_s):
                await self.neuron.wait_idle()


AGENT: web.AppKey[Agent] = web.AppKey("helexa_agent", Agent)


# --- catalogue ------------------------------------------------------------------------------------------


def _read_catalogue(config: AgentConfig) -> list[ModelEntry]:
    """Create the default catalogue if needed and read it (blocking; run off the loop). Never raises."""
    try:
        from helexa.catalogue import store
    except ImportError as e:  # pragma: no cover - the catalogue package is part of helexa
        log.warning("catalogue support unavailable (%s); serving no models", e)
        return []
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
    try:
        from helexa.catalogue.store import entry_to_dict
    except ImportError:  # pragma: no cover
        return ()
    return tuple(entry_to_dict(e) for e in entries)


# --- engines --------------------------------------------------------------------------------------------


def default_engine_factory(engines: Mapping[str, Engine] | None = None) -> EngineFactory:
    """Choose the engine for an entry with `engine.registry`; `engines` overrides instances by name."""
    cache: dict[str, Engine] = dict(engines or {})

    def engine_for(entry: ModelEntry, devices: tuple[DeviceRecord, ...]) -> Engine:
        from helexa.engine import registry

        has_cuda = any(d.kind == "cuda" for d in devices)
        name = registry.choose_engine(entry.engine, entry.source, has_cuda)
        if name not in cache:
            cache[name] = registry.create_engine(name)
        return cache[name]

    return engine_for


def _engine_names(snapshot: HardwareSnapshot) -> tuple[str, ...]:
    """Engines this node runs (placement filters on them): transformers always, mlc on CUDA hosts that
    have it (the scripted `fake` engine runs anywhere: placement does not filter it). With injected
    engines (in-process tests) the node publishes none, which placement does not filter."""
    from helexa.engine import registry

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
        import psutil

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
    from helexa.mesh.gossip.auth import peer_auth_middleware
    from helexa.mesh.routing.forwarding import Forwarder
    from helexa.mesh.server.openai_routes import add_openai_routes, error_middleware
    from helexa.mesh.server.operator_routes import add_operator_routes
    from helexa.mesh.server.peer_routes import add_peer_routes

    app = web.Application(
        middlewares=[peer_auth_middleware(agent.mesh.auth), error_middleware],
        client_max_size=16 * 1024 * 1024,
    )
    app[AGENT] = agent
    app[appkeys.CORTEX] = agent.cortex
    app[appkeys.METRICS] = agent.metrics
    app[appkeys.NODE_NAME] = agent.config.name
    app[appkeys.HEALTH] = agent.health
    app[appkeys.API_KEYS] = agent.config.api_keys
    forwarder: appkeys.Forwarder = Forwarder(runtime=agent.mesh, fleet=agent.fleet, cortex=agent.cortex)
    app[appkeys.FORWARDER] = forwarder
    add_openai_routes(app)
    add_peer_routes(app, agent)
    add_operator_routes(app, agent)
    app.cleanup_ctx.append(_background)
    app.on_shutdown.append(_end_event_streams)
    return app


async def _end_event_streams(app: web.Application) -> None:
    """End every `/mesh/events` stream when the server shuts down (after the drain, before aiohttp waits
    for open connections): an attached dashboard would otherwise hold the stop for the whole shutdown
    timeout, since the bus is closed only later, when the mesh stops (`cleanup_ctx`)."""
    app[AGENT].mesh.bus.close()


async def _background(app: web.Application) -> AsyncIterator[None]:
    """Background loops for the app's lifetime: hardware sampler, keep-alive reaper, preloads."""
    agent = app[AGENT]
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


# --- process entry point --------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """Bind and listen now (before anything slow): clients that connect early wait in the backlog."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.create_server((host, port), family=family, backlog=1024, reuse_port=False)
    sock.setblocking(False)
    return sock


@dataclass(kw_only=True)
class RunningAgent:
    """An agent serving on a bound socket (`start_agent`); `stop()` drains, `kill()` does not."""

    agent: Agent
    app: web.Application
    runner: web.AppRunner
    port: int
    host: str
    closed: bool = False

    @property
    def url(self) -> str:
        host = self.host if self.host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        return f"http://{host}:{self.port}"

    async def stop(self, *, drain: bool = True, now: asyncio.Event | None = None) -> None:
        """Stop: drain first (graceful leave, requests finish, bounded by `drain_timeout_s`; `now` being
        set, as by a second SIGTERM, cuts it short), end what still runs at once, close everything."""
        if self.closed:
            return
        self.closed = True
        if drain:
            await self._drain(now)
        from helexa.mesh.server.openai_routes import end_requests

        ended = await end_requests(self.app)
        if ended:
            log.warning("ended %d request(s) still running after the drain", ended)
        await self.runner.cleanup()

    async def _drain(self, now: asyncio.Event | None) -> None:
        limit_s = self.agent.config.drain_timeout_s + 1.0
        drain = asyncio.ensure_future(self.agent.drain())
        waiters: set[asyncio.Future[Any]] = {drain}
        if now is not None:
            waiters.add(asyncio.ensure_future(now.wait()))
        try:
            await asyncio.wait(waiters, timeout=limit_s, return_when=asyncio.FIRST_COMPLETED)
            finished = drain.done()
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)
        if now is not None and now.is_set():
            log.warning("stopping now (a second signal): requests still running are ended")
        elif not finished:
            log.warning("drain took longer than %.0f s; stopping anyway", self.agent.config.drain_timeout_s)

    async def kill(self) -> None:
        """Die abruptly, as on SIGKILL (tests): every connection is reset, no graceful leave."""
        if self.closed:
            return
        self.closed = True
        server = self.runner.server
        for site in list(self.runner.sites):
            await site.stop()
        if server is not None:
            for handler in list(server.connections):
                transport = handler.transport
                if transport is not None:
                    transport.abort()
        await self.runner.cleanup()


async def start_agent(
    config: AgentConfig,
    *,
    sock: socket.socket | None = None,
    configure: Callable[[web.Application], None] | None = None,
    **build: Any,
) -> RunningAgent:
    """Bind (unless given a bound socket), assemble the agent and serve it. `build` goes to `build_agent`
    (tests pass the fake engine, hardware and timings); `configure(app)` may adjust the app first."""
    sock = sock or bind(config.host, config.port)
    port = int(sock.getsockname()[1])
    agent = await build_agent(config, port=port, **build)
    app = make_app(agent)
    if configure is not None:
        configure(app)
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_S, access_log=None
    )
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return RunningAgent(agent=agent, app=app, runner=runner, port=port, host=config.host)


async def serve(config: AgentConfig, *, ready: Callable[[int], None] | None = None) -> int:
    """Run the agent until SIGINT/SIGTERM. Returns the process exit status."""
    started = time.monotonic()
    try:
        sock = bind(config.host, config.port)
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, e.strerror or e)
        return 1
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    running = await start_agent(config, sock=sock)
    agent, port = running.agent, running.port
    log.info(
        "helexa agent %s (id %s, mesh %s%s) listening on %s (advertised as %s:%d), ready in %.2f s",
        config.name,
        agent.identity.node_id[:8],
        config.mesh,
        "" if config.mesh_key else ", open: no mesh key",
        running.url,
        agent.fleet.self_record.address,
        port,
        time.monotonic() - started,
    )
    if ready is not None:
        ready(port)
    now = asyncio.Event()
    try:
        await stop.wait()
        log.info("stopping (a second SIGTERM or Ctrl-C stops at once)")
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, now.set)
        await running.stop(now=now)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
        await running.stop(drain=False)  # a no-op unless the graceful stop above was interrupted
    log.info("stopped")
    return 0


# syslog priorities (what journald reads from a `<N>` line prefix) of the logging levels.
_SYSLOG_PRIORITY = {"DEBUG": 7, "INFO": 6, "WARNING": 4, "ERROR": 3, "CRITICAL": 2}


class _Formatter(logging.Formatter):
    """Plain lines; colours only on a terminal; syslog priority prefixes under journald.

    Under systemd (stderr is the journal stream) each line starts with `<N>` (journald's
    `SyslogLevelPrefix`) so `journalctl -p warning` filters by level, and carries no timestamp (the
    journal records its own). Elsewhere: `time LEVEL logger: message`, coloured only on a terminal.
    """

    COLOURS = {"DEBUG": "\033[2m", "WARNING": "\033[33m", "ERROR": "\033[31m", "CRITICAL": "\033[1;31m"}

    def __init__(self, *, colour: bool, journald: bool = False) -> None:
        fmt = (
            "%(levelname)s %(name)s: %(message)s"
            if journald
            else "%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        super().__init__(fmt)
        self.colour = colour and not journald
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if self.journald:
            # One journal entry per line: a traceback's lines would each become an entry of their own.
            return f"<{_SYSLOG_PRIORITY.get(record.levelname, 6)}>" + text.replace("\n", "\n    ")
        if self.colour and record.levelname in self.COLOURS:
            return f"{self.COLOURS[record.levelname]}{text}\033[0m"
        return text


def _is_journal(stream: Any, environ: Mapping[str, str]) -> bool:
    """True when `stream` is systemd's journal stream (`JOURNAL_STREAM` names its device and inode)."""
    value = environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not dev.isdigit() or not ino.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure_logging(level: str, *, stream: Any = None, environ: Mapping[str, str] | None = None) -> None:
    """The agent's logging: one handler on the root logger, level from the config (`--log-level`,
    `HELEXA_LOG_LEVEL`). Colour only on a terminal (and never with `NO_COLOR`); journald gets priority
    prefixes instead (see `_Formatter`)."""
    env = os.environ if environ is None else environ
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    journald = _is_journal(out, env)
    colour = bool(getattr(out, "isatty", lambda: False)()) and not env.get("NO_COLOR") and not journald
    handler.setFormatter(_Formatter(colour=colour, journald=journald))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's access log is off (access_log=None); keep its other chatter at warning unless debugging.
    logging.getLogger("aiohttp").setLevel(logging.WARNING if level != "debug" else logging.NOTSET)


def main(argv: Sequence[str] | None = None) -> int:
    """`helexa agent [...]`: returns the exit status (2 for a bad configuration)."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        config = load_config(args, os.environ)
    except ConfigError as e:
        print(f"helexa agent: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    configure_logging(config.log_level)
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


__all__ = [
    "AGENT",
    "Agent",
    "RunningAgent",
    "build_agent",
    "build_app",
    "main",
    "make_app",
    "serve",
    "start_agent",
]
