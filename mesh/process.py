"""`helexa agent`: run this host's agent as a process.

Start-up order (LESSONS: loading before binding made hosts look down for minutes):

1. parse the configuration (a bad value: one line on stderr, exit status 2);
2. **bind the port** (the socket listens at once: early clients queue in the backlog);
3. assemble the agent and its application (`mesh.assembly`: identity, a first hardware sample and the
   catalogue are read off the event loop; problems are warnings, never fatal, a full or read-only state
   directory included) and serve it behind the server's own bounds (`mesh.server.connections`: idle,
   header and body timeouts, a stalled reader's connection closed, a connection limit, malformed requests
   answered in the OpenAI envelope);
4. in the background (`cleanup_ctx`): the hardware sampler, the keep-alive reaper and the mesh
   (`mesh.peering.MeshRuntime`: gossip, mDNS discovery, the event bus, preloads placed on one node).

SIGINT/SIGTERM stop admitting work, run the drain hooks (`Agent.drain`, bounded by `drain_timeout_s`;
the mesh's graceful leave is one: peers mark this node `left` at once), end what still runs and exit; a
second signal cuts the drain short. Heavy libraries (torch) are imported only when a model loads, so an
idle agent stays small and starts in well under two seconds.

`start_agent(config, ...)` runs the same agent in-process on a bound socket (tests pass the fake engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from helexa.mesh import timing
from helexa.mesh.agent import Agent
from helexa.mesh.assembly import build_agent, make_app
from helexa.mesh.config import AgentConfig, ConfigError, load_config
from helexa.mesh.logs import configure_logging
from helexa.mesh.server.connections import ConnectionGuard, GuardedSite, ServerLimits
from helexa.mesh.server.inference import end_requests
from helexa.mesh.server.middleware import body_deadline_middleware

log = logging.getLogger(__name__)

__all__ = ["RunningAgent", "bind", "main", "raise_fd_limit", "serve", "start_agent"]


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
    guard: ConnectionGuard
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
    limits: ServerLimits | None = None,
    **build: Any,
) -> RunningAgent:
    """Bind (unless given a bound socket), assemble the agent and serve it. `build` goes to `build_agent`
    (tests pass the fake engine, hardware and timings); `configure(app)` may adjust the app first;
    `limits` are the HTTP server's bounds (default: from the config, see `mesh.server.connections`)."""
    sock = sock or bind(config.host, config.port)
    port = int(sock.getsockname()[1])
    limits = limits or ServerLimits.for_process(config)
    agent = await build_agent(config, port=port, **build)
    app = make_app(agent)
    # The server's own protection of request bodies goes first, outside even the peer authentication
    # (which reads the body to check its signature).
    app.middlewares.insert(0, body_deadline_middleware(limits.body_timeout_s))
    if configure is not None:
        configure(app)
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=timing.SHUTDOWN_TIMEOUT_S, access_log=None
    )
    await runner.setup()
    assert runner.server is not None
    guard = ConnectionGuard(runner.server, limits)
    await GuardedSite(runner, sock, guard).start()
    return RunningAgent(agent=agent, app=app, runner=runner, guard=guard, port=port, host=config.host)


def raise_fd_limit() -> int | None:
    """Raise this process's soft file-descriptor limit to the hard one (as Go's runtime does): connections
    are capped at half of it (`ServerLimits.for_process`), and systemd's default soft limit is 1024.
    Returns the soft limit now (None: unlimited)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft not in (hard, resource.RLIM_INFINITY):
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return None if soft == resource.RLIM_INFINITY else int(soft)


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
    limits = ServerLimits.for_process(config, fd_limit=raise_fd_limit())
    running = await start_agent(config, sock=sock, limits=limits)
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
    # A service logs lines, not progress bars: libraries the engines load (transformers' GGUF conversion)
    # draw tqdm bars on stderr. tqdm reads TQDM_* defaults when it is first imported, which is later.
    os.environ.setdefault("TQDM_DISABLE", "1")
    try:
        return asyncio.run(serve(config))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130
