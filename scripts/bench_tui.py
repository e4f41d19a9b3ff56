"""CPU share of `helexa tui` watching a simulated 50-node, 8-GPU-per-node fleet that changes twice a second.

Runs the real dashboard in a child process on a pseudo-terminal (so Textual renders and writes
escape codes exactly as it would for an operator), drains its output, and reads the child's CPU time
with psutil over the measured window. Target: < 15 % of one core.

Sources (`--source`):
- `http` (default): the dashboard runs as in production, `helexa tui --agent URL`, against a fake agent
  in another process that serves `/mesh/state` JSON (the simulated fleet advanced one step per poll, so
  every poll brings a changed document that the dashboard fetches, parses and diffs) and `/mesh/events`.
  The simulation's cost lands in the fake agent, not in the measured process.
- `http --frozen`: the same, but the fleet never changes: the floor (polling, no parse, no paint).
- `fake`: the in-process simulated source (`--fake-fleet`): no HTTP and no JSON, but the simulation
  runs inside the measured process.

    scripts/bench tui [--seconds 30] [--nodes 50] [--gpus 8] [--size 200x50] [--source http|fake]
                      [--frozen] [--profile FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import pty
import select
import socket
import struct
import sys
import termios
import time
import urllib.request
from pathlib import Path

import psutil
from aiohttp import web

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from helexa.tui.fake_agent import fake_agent_app  # noqa: E402
from helexa.tui.source import FakeFleetSource  # noqa: E402


def serve_fake_agent(sock: socket.socket, nodes: int, gpus: int, *, frozen: bool) -> None:
    """Child process: serve the fake agent on an already bound socket until killed."""
    fake = FakeFleetSource(nodes=nodes, gpus_per_node=gpus, clock=time.time, open_mesh=True)

    async def serve() -> None:
        runner = web.AppRunner(fake_agent_app(fake, tick_per_poll=not frozen), access_log=None)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        await asyncio.Event().wait()

    asyncio.run(serve())


def states_served(url: str) -> int:
    with urllib.request.urlopen(url + "/bench/stats", timeout=5) as resp:
        return int(json.loads(resp.read())["states_served"])


def drain(fd: int, until: float) -> int:
    total = 0
    while (left := until - time.monotonic()) > 0:
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            total += len(chunk)
    return total


def reap(pid: int, timeout_s: float, fd: int | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if fd is not None:
            drain(fd, time.monotonic() + 0.1)
        else:
            time.sleep(0.05)
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            return
    os.kill(pid, 9)
    os.waitpid(pid, 0)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--size", default="200x50")
    parser.add_argument("--source", choices=("http", "fake"), default="http")
    parser.add_argument(
        "--frozen", action="store_true", help="http source that never changes: the idle floor (polling only)"
    )
    parser.add_argument("--profile", metavar="FILE", help="run the dashboard under cProfile, stats to FILE")
    args = parser.parse_args()
    cols, rows = (int(v) for v in args.size.split("x"))

    agent_pid: int | None = None
    url = ""
    if args.source == "http":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        agent_pid = os.fork()
        if agent_pid == 0:  # child: the fake agent
            try:
                serve_fake_agent(sock, args.nodes, args.gpus, frozen=args.frozen)
            finally:
                os._exit(0)
        sock.close()
        tui_args = ["--agent", url]
    else:
        tui_args = ["--fake-fleet", f"{args.nodes}x{args.gpus}"]

    call = f"main({tui_args!r})"
    run = f"from helexa.tui.app import main; {call}"
    if args.profile:
        stats_path = str(Path(args.profile).resolve())
        run = f"import cProfile; from helexa.tui.app import main; cProfile.run({call!r}, {stats_path!r})"
    pid, fd = pty.fork()
    if pid == 0:  # child: the dashboard
        os.chdir(ROOT)
        env = dict(
            os.environ, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows), PYTHONPATH=str(ROOT)
        )
        os.execve(sys.executable, [sys.executable, "-c", run], env)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    proc = psutil.Process(pid)
    served0 = served1 = 0
    try:
        drain(fd, time.monotonic() + args.warmup)
        if url:
            served0 = states_served(url)
        cpu0 = proc.cpu_times()
        t0 = time.monotonic()
        written = drain(fd, t0 + args.seconds)
        cpu1 = proc.cpu_times()
        wall = time.monotonic() - t0
        if url:
            served1 = states_served(url)
        rss_mb = proc.memory_info().rss / 2**20
    finally:
        os.write(fd, b"q")
        reap(pid, 10.0 if args.profile else 5.0, fd)
        if agent_pid is not None:
            os.kill(agent_pid, 15)
            reap(agent_pid, 5.0)
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    share = 100.0 * cpu / wall
    load1, _, _ = os.getloadavg()
    if url:
        what = "unchanged states (not parsed)" if args.frozen else "changed states parsed"
        feed = f"HTTP /mesh/state, {(served1 - served0) / wall:.2f} {what} per second"
    else:
        feed = "in-process simulated source, every device changing every 0.5 s"
    print(f"fleet: {args.nodes} nodes x {args.gpus} GPUs; {feed}; terminal {cols}x{rows}")
    print(
        f"window: {wall:.1f} s after {args.warmup:.0f} s warm-up; "
        f"terminal output {written / wall / 1024:.1f} KiB/s; machine load average {load1:.1f}"
    )
    print(f"CPU: {cpu:.2f} s = {share:.1f} % of one core (target < 15 %), RSS {rss_mb:.0f} MB")
    return 0 if share < 15.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
